#pragma once
/// @file Batch encoding with GPT2Tokenizer into left-padded LibTorch tensors, ready for generation: every row ends
/// with its last real token, so the next token of every row is predicted at the last position.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <rlhf/detail/error.hpp>
#include <rlhf/tokenizer/gpt2_tokenizer.hpp>

namespace rlhf {

/// Token ids of a batch of texts, left-padded to a common length T (the longest row).
struct BatchEncoding {
  /// Token ids, pad_id left of each row's tokens.
  torch::Tensor input_ids;  // [B, T] int64
  /// 1 for a real token, 0 for padding.
  torch::Tensor attention_mask;  // [B, T] int64
};

/// Encodes each text (special tokens become their ids when allow_special), optionally prepends eos_id() as the
/// beginning-of-text token (GPT-2 uses "<|endoftext|>" for both), and left-pads the rows with pad_id. A row may be
/// empty (all padding) but not every row. Throws rlhf::Error for an empty batch, a pad_id outside the vocab, or
/// when every row is empty.
inline BatchEncoding encode_batch(const GPT2Tokenizer& tokenizer, const std::vector<std::string>& texts, int64_t pad_id,
                                  bool allow_special = false, bool prepend_bos = false) {
  if (texts.empty()) detail::fail("encode_batch: empty batch (expected at least one text)");
  if (pad_id < 0 || pad_id >= tokenizer.vocab_size()) {
    detail::fail("encode_batch: pad_id {} is outside the vocab [0, {})", pad_id, tokenizer.vocab_size());
  }
  std::vector<std::vector<int64_t>> rows;
  rows.reserve(texts.size());
  std::size_t length = 0;
  for (const std::string& text : texts) {
    std::vector<int64_t> ids;
    if (prepend_bos) ids.push_back(tokenizer.eos_id());
    const std::vector<int64_t> encoded = tokenizer.encode(text, allow_special);
    ids.insert(ids.end(), encoded.begin(), encoded.end());
    length = std::max(length, ids.size());
    rows.push_back(std::move(ids));
  }
  if (length == 0) {
    detail::fail("encode_batch: all {} texts encode to no tokens ---> HINT: pass prepend_bos = true to start every "
                 "row with a token",
                 texts.size());
  }
  const auto batch = static_cast<int64_t>(rows.size());
  const auto width = static_cast<int64_t>(length);
  torch::Tensor input_ids = torch::full({batch, width}, pad_id, torch::kLong);  // [B, T]
  torch::Tensor attention_mask = torch::zeros({batch, width}, torch::kLong);    // [B, T]
  auto ids_access = input_ids.accessor<int64_t, 2>();
  auto mask_access = attention_mask.accessor<int64_t, 2>();
  for (int64_t b = 0; b < batch; ++b) {
    const std::vector<int64_t>& row = rows[static_cast<std::size_t>(b)];
    const int64_t offset = width - static_cast<int64_t>(row.size());
    for (std::size_t t = 0; t < row.size(); ++t) {
      ids_access[b][offset + static_cast<int64_t>(t)] = row[t];
      mask_access[b][offset + static_cast<int64_t>(t)] = 1;
    }
  }
  return {input_ids, attention_mask};
}

}  // namespace rlhf
