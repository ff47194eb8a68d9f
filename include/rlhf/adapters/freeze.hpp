#pragma once
/// @file Frozen layers and per-layer learning rates for GPT-2-style models (parameter names "transformer.wte",
/// "transformer.h.{i}.", ...), as the seeds recommend for larger models: freeze the embeddings and early blocks, or
/// give them smaller learning rates.

#include <charconv>
#include <cstdint>
#include <string_view>

#include <torch/torch.h>

#include <rlhf/detail/error.hpp>

namespace rlhf {

/// Which parts of the base model to freeze (requires_grad = false) before training.
struct FreezeOptions {
  bool embeddings = false;   ///< wte and wpe; wte is tied to the output projection, so that freezes it too
  int64_t first_blocks = 0;  ///< blocks 0 .. first_blocks - 1, e.g. 6 of gpt2's 12
};

/// Depth of a parameter for per-layer learning rates: 0 for the embeddings ("transformer.wte", "transformer.wpe"),
/// i + 1 for block i ("transformer.h.{i}."), n_layer + 1 for everything after the blocks (ln_f).
inline int64_t gpt2_depth(std::string_view name, int64_t n_layer) {
  constexpr std::string_view blocks = "transformer.h.";
  if (name.starts_with("transformer.wte") || name.starts_with("transformer.wpe")) return 0;
  if (name.starts_with(blocks)) {
    int64_t index = 0;
    const char* begin = name.data() + blocks.size();
    auto [end, ec] = std::from_chars(begin, name.data() + name.size(), index);
    if (ec == std::errc() && end != begin) return index + 1;
  }
  return n_layer + 1;
}

/// Freezes the parts of `model` (a GPT2Impl, or any module with GPT-2 parameter names and config().n_layer) that
/// `options` names; parameters already frozen stay frozen, nothing is unfrozen.
template <class Model>
void freeze(Model& model, const FreezeOptions& options) {
  const int64_t n_layer = model.config().n_layer;
  if (options.first_blocks < 0 || options.first_blocks > n_layer)
    detail::fail("FreezeOptions: first_blocks ({}) must be in [0, n_layer = {}]", options.first_blocks, n_layer);
  for (auto& item : model.named_parameters()) {
    const int64_t depth = gpt2_depth(item.key(), n_layer);
    const bool frozen = (depth == 0 && options.embeddings) || (depth >= 1 && depth <= options.first_blocks);
    if (frozen) item.value().requires_grad_(false);
  }
}

}  // namespace rlhf
