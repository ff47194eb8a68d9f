// A program that uses rlhf as a user's project would: build a tiny GPT-2, sample, check the result.
#include <cstdio>

#include <rlhf/rlhf.hpp>

int main() {
  rlhf::configure_runtime({.threads = 1});
  auto tokenizer = rlhf::GPT2Tokenizer::byte_level();
  torch::manual_seed(0);
  rlhf::GPT2<> model(rlhf::GPT2Config{.vocab_size = tokenizer.vocab_size(), .n_positions = 32, .n_embd = 16,
                                      .n_layer = 1, .n_head = 2, .bos_token_id = tokenizer.eos_id(),
                                      .eos_token_id = tokenizer.eos_id()});
  auto batch = rlhf::encode_batch(tokenizer, {"hello", "hi"}, tokenizer.eos_id());
  auto gen = rlhf::generate(*model, batch.input_ids, batch.attention_mask, {.max_new_tokens = 5, .seed = 1});
  if (gen.ids.size(0) != 2 || gen.ids.size(1) != batch.input_ids.size(1) + 5) return 1;
  std::printf("consumer ok: rlhf %s\n", rlhf::kVersion);
  return 0;
}
