#include "test_util.hpp"

#include <array>
#include <cmath>
#include <filesystem>
#include <limits>

#include <rlhf/model/gpt2.hpp>


namespace {

using rlhf::GPT2;
using rlhf::GPT2Config;

GPT2Config tiny_config() {
  GPT2Config c;
  c.vocab_size = 37;
  c.n_positions = 24;
  c.n_embd = 16;
  c.n_layer = 2;
  c.n_head = 4;
  return c;
}

/// GPT-2 written out op by op from the paper and Hugging Face's modeling_gpt2.py, head by head, sharing no code with
/// the library's forward: the independent reference the model is checked against.
torch::Tensor reference_logits(GPT2<>& model, const torch::Tensor& ids) {
  torch::NoGradGuard no_grad;
  const auto& c = model->config();
  std::map<std::string, torch::Tensor> p;
  for (auto& item : model->named_parameters()) p[item.key()] = item.value().to(torch::kDouble);
  auto ln = [&](const torch::Tensor& x, const std::string& name) {
    auto mean = x.mean(-1, true);
    auto var = (x - mean).pow(2).mean(-1, true);
    return (x - mean) / (var + c.layer_norm_epsilon).sqrt() * p[name + ".weight"] + p[name + ".bias"];
  };
  auto gelu_new = [](const torch::Tensor& x) {
    return 0.5 * x * (1.0 + torch::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x.pow(3))));
  };
  const int64_t t = ids.size(0), d = c.n_embd, dh = d / c.n_head;
  auto x = p["transformer.wte.weight"].index_select(0, ids) +
           p["transformer.wpe.weight"].narrow(0, 0, t);  // [T, D]
  for (int64_t l = 0; l < c.n_layer; ++l) {
    auto pre = "transformer.h." + std::to_string(l) + ".";
    auto a = ln(x, pre + "ln_1");
    auto qkv = a.mm(p[pre + "attn.c_attn.weight"]) + p[pre + "attn.c_attn.bias"];  // [T, 3D]
    std::vector<torch::Tensor> heads;
    for (int64_t h = 0; h < c.n_head; ++h) {
      auto q = qkv.narrow(1, h * dh, dh), k = qkv.narrow(1, d + h * dh, dh), v = qkv.narrow(1, 2 * d + h * dh, dh);
      auto out = torch::zeros({t, dh}, torch::kDouble);
      for (int64_t i = 0; i < t; ++i) {
        auto s = (k.narrow(0, 0, i + 1).mv(q[i])) / std::sqrt(double(dh));  // [i+1]
        auto w = (s - s.max()).exp();
        w = w / w.sum();
        out[i] = w.unsqueeze(0).mm(v.narrow(0, 0, i + 1)).squeeze(0);
      }
      heads.push_back(out);
    }
    x = x + torch::cat(heads, 1).mm(p[pre + "attn.c_proj.weight"]) + p[pre + "attn.c_proj.bias"];
    auto m = ln(x, pre + "ln_2");
    auto hid = gelu_new(m.mm(p[pre + "mlp.c_fc.weight"]) + p[pre + "mlp.c_fc.bias"]);
    x = x + hid.mm(p[pre + "mlp.c_proj.weight"]) + p[pre + "mlp.c_proj.bias"];
  }
  return ln(x, "transformer.ln_f").mm(p["transformer.wte.weight"].t()).to(torch::kFloat);  // [T, V]
}

GPT2<> tiny_model(uint64_t seed = 1) {
  torch::manual_seed(seed);
  GPT2<> model(tiny_config());
  model->eval();
  // Non-trivial layernorm parameters and biases, so a swapped or ignored parameter shows.
  torch::NoGradGuard no_grad;
  for (auto& item : model->named_parameters())
    if (item.key().find("ln_") != std::string::npos || item.key().find("bias") != std::string::npos)
      item.value().normal_(0.5, 0.2);
  return model;
}

/// tiny_config() with two heads of 8 (or `n_head` heads): the fused decode attention takes heads whose width is a
/// multiple of 8.
GPT2<> tiny_model_wide_heads(uint64_t seed, int64_t n_head = 2) {
  auto config = tiny_config();
  config.n_head = n_head;
  torch::manual_seed(seed);
  GPT2<> model(config);
  model->eval();
  return model;
}

float max_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<float>(); }

using rlhf::test::RestoreDecodeIsa;

/// The operand rounded to bf16, in fp64: products of such operands in fp64 are what a bf16 product with fp32 sums
/// approximates before its result is rounded.
torch::Tensor bf16_exact(const torch::Tensor& t) { return t.to(torch::kBFloat16).to(torch::kDouble); }

/// Whether bf16 `y` is `exact` rounded to bf16, up to the fp32 arithmetic's own error `slack`: within half a bf16
/// step (at most 2^-8 relative) plus `slack`. Torch's bf16 products meet the same bound.
bool bf16_rounding_of(const torch::Tensor& y, const torch::Tensor& exact, double slack = 1e-5) {
  if (y.scalar_type() != torch::kBFloat16) return false;
  auto err = (y.to(torch::kDouble) - exact).abs();
  return (err <= exact.abs() * std::ldexp(1.0, -8) + slack).all().item<bool>();
}

}  // namespace

TEST_CASE("GPT2Config reads a Hugging Face config.json") {
  // gpt2's config.json as published, verbatim.
  auto json = nlohmann::json::parse(R"({
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
    "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": null,
    "summary_first_dropout": 0.1, "summary_proj_to_labels": true, "summary_type": "cls_index",
    "summary_use_proj": true, "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}},
    "vocab_size": 50257})");
  // Keys that newer Hugging Face releases write into every config.json carry no meaning for the model.
  json["transformers_version"] = "4.57.0";
  json["dtype"] = "float32";
  json["use_cache"] = true;
  auto config = GPT2Config::from_json(json, "gpt2/config.json");
  CHECK(config == GPT2Config{});
  CHECK(config.d_head() == 64);
  CHECK(config.d_mlp() == 3072);

  SUBCASE("round trip through to_json") { CHECK(GPT2Config::from_json(config.to_json()) == config); }
  SUBCASE("unknown key") {
    json["n_layers"] = 12;
    CHECK_THROWS_WITH_AS(GPT2Config::from_json(json, "gpt2/config.json"),
                         "config: gpt2/config.json: unknown key 'n_layers' (a GPT-2 config has n_layer, n_head, "
                         "n_embd, n_positions, vocab_size, layer_norm_epsilon, activation_function, *_pdrop, ...)",
                         rlhf::Error);
  }
  SUBCASE("inconsistent values") {
    json["n_head"] = 5;
    CHECK_THROWS_WITH_AS(GPT2Config::from_json(json, "c.json"),
                         "config: c.json: 'n_embd' (768) must be divisible by 'n_head' (5)", rlhf::Error);
    json["n_head"] = 12;
    json["n_ctx"] = 512;
    CHECK_THROWS_WITH_AS(GPT2Config::from_json(json, "c.json"),
                         "config: c.json: 'n_ctx' (512) differs from 'n_positions' (1024)", rlhf::Error);
  }
  SUBCASE("wrong types and values") {
    json["n_layer"] = "12";
    CHECK_THROWS_WITH_AS(GPT2Config::from_json(json, "c.json"),
                         "config: c.json: 'n_layer' must be an integer >= 1, got \"12\"", rlhf::Error);
    json["n_layer"] = 12;
    json["activation_function"] = "swish";
    CHECK_THROWS_WITH_AS(GPT2Config::from_json(json, "c.json"),
                         "config: c.json: 'activation_function' is 'swish'; supported: gelu_new, "
                         "gelu_pytorch_tanh, gelu, gelu_fast, relu",
                         rlhf::Error);
    json["activation_function"] = "gelu_new";
    json["model_type"] = "llama";
    CHECK_THROWS_WITH_AS(GPT2Config::from_json(json, "c.json"),
                         "config: c.json: 'model_type' is \"llama\", expected \"gpt2\"", rlhf::Error);
    json["model_type"] = "gpt2";
    json["layer_norm_epsilon"] = -1e-5;
    CHECK_THROWS_WITH_AS(GPT2Config::from_json(json, "c.json"),
                         "config: c.json: 'layer_norm_epsilon' must be positive, got -1e-05", rlhf::Error);
  }
  SUBCASE("missing file") {
    CHECK_THROWS_WITH_AS(GPT2Config::from_file("/nonexistent/config.json"),
                         "config: /nonexistent/config.json: cannot open (expected a Hugging Face config.json)",
                         rlhf::Error);
  }
}

TEST_CASE("GPT2 forward matches an op-by-op reference") {
  auto model = tiny_model();
  auto ids = torch::tensor({3, 14, 15, 9, 2, 6, 5, 35, 8, 9}, torch::kLong);
  auto hidden = model->forward(ids.unsqueeze(0));
  CHECK(hidden.sizes() == torch::IntArrayRef({1, 10, 16}));
  CHECK((hidden.scalar_type() == torch::kFloat));
  auto logits = model->logits(hidden).squeeze(0);
  CHECK(max_diff(logits, reference_logits(model, ids)) < 1e-4);
  CHECK(model->named_parameters().contains("transformer.h.1.attn.c_attn.weight"));
  CHECK(model->named_parameters()["transformer.h.1.attn.c_attn.weight"].sizes() == torch::IntArrayRef({16, 48}));
}

TEST_CASE("GPT2 with a KV cache gives the full forward's logits") {
  auto model = tiny_model(2);
  auto ids = torch::randint(0, 37, {3, 12}, torch::kLong);
  auto full = model->logits(model->forward(ids));  // [3, 12, V]
  auto cache = model->new_cache(3, 12);
  // A 5-token prefix, then one token at a time, then a 3-token chunk.
  std::vector<torch::Tensor> parts = {model->logits(model->forward(ids.narrow(1, 0, 5), {}, &cache))};
  for (int64_t i = 5; i < 9; ++i) parts.push_back(model->logits(model->forward(ids.narrow(1, i, 1), {}, &cache)));
  parts.push_back(model->logits(model->forward(ids.narrow(1, 9, 3), {}, &cache)));
  CHECK(cache.length() == 12);
  CHECK(max_diff(torch::cat(parts, 1), full) < 1e-5);
  CHECK_THROWS_WITH_AS(model->forward(ids.narrow(1, 0, 1), {}, &cache),
                       "KVCache: 12 cached + 1 new positions exceed the capacity of 12", rlhf::Error);
}

TEST_CASE("GPT2 left padding gives the unpadded logits") {
  auto model = tiny_model(3);
  auto a = torch::tensor({{5, 6, 7, 8, 9}}, torch::kLong);
  auto b = torch::tensor({{10, 11}}, torch::kLong);
  const int pad = 0;
  auto batch = torch::tensor({{5, 6, 7, 8, 9}, {pad, pad, pad, 10, 11}}, torch::kLong);
  auto mask = torch::tensor({{1, 1, 1, 1, 1}, {0, 0, 0, 1, 1}}, torch::kLong);
  auto padded = model->logits(model->forward(batch, mask));  // [2, 5, V]
  auto alone_a = model->logits(model->forward(a));
  auto alone_b = model->logits(model->forward(b));
  CHECK(max_diff(padded[0], alone_a[0]) < 1e-5);
  CHECK(max_diff(padded[1].narrow(0, 3, 2), alone_b[0]) < 1e-5);

  SUBCASE("and continues correctly with a cache") {
    auto cache = model->new_cache(2, 6);
    model->forward(batch, mask, &cache);
    auto next = torch::tensor({{12}, {13}}, torch::kLong);
    auto mask2 = torch::cat({mask, torch::ones({2, 1}, torch::kLong)}, 1);
    auto step = model->logits(model->forward(next, mask2, &cache));  // [2, 1, V]
    auto b_full = model->logits(model->forward(torch::tensor({{10, 11, 13}}, torch::kLong)));
    CHECK(max_diff(step[1][0], b_full[0][2]) < 1e-5);
  }
}

TEST_CASE("GPT2 save_pretrained / from_pretrained") {
  rlhf::test::TempDir dir;
  auto model = tiny_model(4);
  model.save_pretrained(dir.path());
  CHECK(std::filesystem::exists(dir.path() / "config.json"));
  CHECK(std::filesystem::exists(dir.path() / "model.safetensors"));
  auto ids = torch::randint(0, 37, {2, 7}, torch::kLong);
  auto expected = model->logits(model->forward(ids));

  SUBCASE("identical logits") {
    auto loaded = GPT2<>::from_pretrained(dir.path());
    loaded->eval();
    CHECK(torch::equal(loaded->logits(loaded->forward(ids)), expected));
    CHECK(loaded->config() == model->config());
  }
  SUBCASE("names without the transformer. prefix and with the old mask buffers") {
    std::map<std::string, torch::Tensor> tensors;
    for (auto& item : model->named_parameters())
      tensors[item.key().substr(std::string("transformer.").size())] = item.value();
    tensors["h.0.attn.bias"] = torch::ones({1, 1, 24, 24});
    rlhf::save_safetensors(dir.path() / "model.safetensors", tensors);
    auto loaded = GPT2<>::from_pretrained(dir.path());
    loaded->eval();
    CHECK(torch::equal(loaded->logits(loaded->forward(ids)), expected));
  }
  SUBCASE("bf16 weights, fp32 layernorms") {
    auto loaded = GPT2<>::from_pretrained(dir.path(), {.dtype = torch::kBFloat16});
    loaded->eval();
    CHECK((loaded->dtype() == torch::kBFloat16));
    CHECK((loaded->transformer->ln_f->weight.scalar_type() == torch::kFloat));
    auto logits = loaded->logits(loaded->forward(ids));
    CHECK(max_diff(logits, expected) < 0.1);
  }
  SUBCASE("missing, unexpected and misshapen tensors") {
    auto path = (dir.path() / "model.safetensors").string();
    std::map<std::string, torch::Tensor> tensors;
    for (auto& item : model->named_parameters()) tensors[item.key()] = item.value();
    auto full = tensors;
    tensors.erase("transformer.h.1.mlp.c_fc.bias");
    rlhf::save_safetensors(path, tensors);
    CHECK_THROWS_WITH_AS(GPT2<>::from_pretrained(dir.path()),
                         fmt::format("safetensors: {}: missing tensor 'h.1.mlp.c_fc.bias' (expected shape [64]); "
                                     "{} of {} parameters found",
                                     path, full.size() - 1, full.size())
                             .c_str(),
                         rlhf::Error);
    tensors = full;
    tensors["transformer.h.2.ln_1.weight"] = torch::ones({16});
    rlhf::save_safetensors(path, tensors);
    CHECK_THROWS_WITH_AS(GPT2<>::from_pretrained(dir.path()),
                         fmt::format("safetensors: {}: unexpected tensor 'transformer.h.2.ln_1.weight' (not a "
                                     "parameter of GPT-2 with n_layer = 2; ---> HINT: does config.json belong to "
                                     "this checkpoint?)",
                                     path)
                             .c_str(),
                         rlhf::Error);
    tensors = full;
    tensors["transformer.h.0.attn.c_attn.weight"] = torch::ones({16, 47});
    rlhf::save_safetensors(path, tensors);
    CHECK_THROWS_WITH_AS(GPT2<>::from_pretrained(dir.path()),
                         fmt::format("safetensors: {}: tensor 'transformer.h.0.attn.c_attn.weight' has shape "
                                     "[16, 47], config expects [16, 48]",
                                     path)
                             .c_str(),
                         rlhf::Error);
  }
}

TEST_CASE("few-row fp32 decode kernels equal torch's products") {
  if (rlhf::detail::cpu_decode_isa() == rlhf::DecodeIsa::none) {
    // Without AVX2 + FMA the kernels decline every product and torch's operators run.
    CHECK_FALSE(rlhf::small_rows_addmm({}, torch::randn({1, 8}), torch::randn({8, 16})).defined());
    return;
  }
  torch::manual_seed(7);
  c10::InferenceMode inference;
  // Every version this CPU runs: AVX2 always, AVX-512 where the CPU has it.
  std::vector<rlhf::DecodeIsa> isas{rlhf::DecodeIsa::avx2};
  if (rlhf::detail::cpu_decode_isa() >= rlhf::DecodeIsa::avx512) isas.push_back(rlhf::DecodeIsa::avx512);
  RestoreDecodeIsa restore;
  for (auto isa : isas) {
    rlhf::set_decode_isa(isa);
    REQUIRE(rlhf::decode_isa() == isa);
    const int isa_level = static_cast<int>(isa);
    CAPTURE(isa_level);
    const int64_t max_rows = rlhf::small_rows_addmm_max_rows();
    CHECK(max_rows == (isa >= rlhf::DecodeIsa::avx512 ? 64 : 8));
    // Column counts with and without a tail past the 16- and 48-wide (addmm) and 4- and 6-row (mm_nt) tiles; k with
    // a tail past 8 and 16.
    for (int64_t k : {8, 13, 20, 96}) {
      for (int64_t n : {16, 40, 67, 100, 2304}) {
        CAPTURE(k);
        CAPTURE(n);
        auto w = torch::randn({k, n}), bias = torch::randn({n}), e = torch::randn({n, k});
        for (int64_t m = 1; m <= max_rows; ++m) {
          CAPTURE(m);
          auto x = torch::randn({m, k});
          auto y = rlhf::small_rows_addmm(bias, x, w);
          REQUIRE(y.defined());
          CHECK(max_diff(y, torch::addmm(bias, x, w)) < 1e-4);
          CHECK(max_diff(rlhf::small_rows_addmm({}, x, w), torch::mm(x, w)) < 1e-4);
        }
        for (int64_t m : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{7}, int64_t{16}, rlhf::kSmallRowsMmNt}) {
          CAPTURE(m);
          auto x = torch::randn({m, k});
          auto y = rlhf::small_rows_mm_nt(x, e);
          REQUIRE(y.defined());
          CHECK(max_diff(y, torch::mm(x, e.t())) < 1e-4);
        }
      }
    }
    // Products the kernels leave to torch: too many rows, other dtypes, non-contiguous operands.
    CHECK_FALSE(rlhf::small_rows_addmm({}, torch::randn({max_rows + 1, 8}), torch::randn({8, 16})).defined());
    CHECK_FALSE(rlhf::small_rows_mm_nt(torch::randn({rlhf::kSmallRowsMmNt + 1, 8}), torch::randn({16, 8})).defined());
    CHECK_FALSE(rlhf::small_rows_mm_nt(torch::randn({2, 8}, torch::kDouble), torch::randn({16, 8}, torch::kDouble))
                    .defined());
    CHECK_FALSE(rlhf::small_rows_addmm({}, torch::randn({1, 8}), torch::randn({16, 8}).t()).defined());
  }
  rlhf::set_decode_isa(rlhf::DecodeIsa::none);
  CHECK(rlhf::small_rows_addmm_max_rows() == 0);
  CHECK_FALSE(rlhf::small_rows_mm_nt(torch::randn({1, 8}), torch::randn({16, 8})).defined());
}

TEST_CASE("few-row decode kernels stay out of autograd and follow the switch") {
  if (rlhf::detail::cpu_decode_isa() == rlhf::DecodeIsa::none) return;
  auto w = torch::randn({8, 16}, torch::requires_grad());
  auto x = torch::randn({1, 8});
  CHECK_FALSE(rlhf::small_rows_addmm({}, x, w).defined());  // the graph is needed: torch's addmm
  {
    torch::NoGradGuard no_grad;
    CHECK(rlhf::small_rows_addmm({}, x, w).defined());
    rlhf::set_decode_kernels(false);
    CHECK_FALSE(rlhf::decode_kernels_enabled());
    CHECK_FALSE(rlhf::small_rows_addmm({}, x, w).defined());
    rlhf::set_decode_kernels(true);
  }
  // Decoding through the model gives the same logits with the kernels on and off.
  auto model = tiny_model(5);
  auto ids = torch::randint(0, 37, {2, 6}, torch::kLong);
  auto decode = [&] {
    c10::InferenceMode inference;
    auto cache = model->new_cache(2, 6);
    std::vector<torch::Tensor> parts = {model->logits(model->forward(ids.narrow(1, 0, 3), {}, &cache))};
    for (int64_t i = 3; i < 6; ++i) parts.push_back(model->logits(model->forward(ids.narrow(1, i, 1), {}, &cache)));
    return torch::cat(parts, 1).clone();
  };
  auto with = decode();
  rlhf::set_decode_kernels(false);
  auto without = decode();
  rlhf::set_decode_kernels(true);
  CHECK(max_diff(with, without) < 1e-5);
  CHECK(max_diff(with, model->logits(model->forward(ids)).detach()) < 1e-5);
}

TEST_CASE("AVX-512 fp32 products (core/gemm.hpp) equal float64's in every layout, past every block edge") {
  using rlhf::gemm_addmm;
  auto x = torch::randn({9, 20});
  if (rlhf::decode_isa() < rlhf::DecodeIsa::avx512) {  // other CPUs: torch's operators run
    CHECK_FALSE(rlhf::gemm_applies({&x}));
    return;
  }
  torch::manual_seed(11);
  RestoreDecodeIsa restore;
  // (m, n, k) past the 8 x 48 tile, the 128-row, 256-deep and 3072-column blocks, with m > n (threads split rows)
  // and n >= m (threads split columns), and k = 1.
  const std::vector<std::array<int64_t, 3>> shapes = {
      {1, 1, 1}, {7, 47, 3}, {8, 48, 256}, {9, 49, 257}, {130, 100, 513}, {17, 3100, 20}, {300, 50, 40}, {64, 200, 1}};
  for (const auto& [m, n, k] : shapes) {
    CAPTURE(m);
    CAPTURE(n);
    CAPTURE(k);
    const auto a64 = torch::randn({m, k}, torch::kDouble), b64 = torch::randn({k, n}, torch::kDouble);
    const auto bias64 = torch::randn({n}, torch::kDouble);
    const auto want = torch::addmm(bias64, a64, b64);
    const double tolerance = 1e-6 * (10.0 + static_cast<double>(k));
    // a and b as given, transposed views of the other layout, and a broadcast (stride 0) row.
    for (bool a_t : {false, true})
      for (bool b_t : {false, true}) {
        CAPTURE(a_t);
        CAPTURE(b_t);
        auto a = a_t ? a64.t().contiguous().to(torch::kFloat).t() : a64.to(torch::kFloat);
        auto b = b_t ? b64.t().contiguous().to(torch::kFloat).t() : b64.to(torch::kFloat);
        CHECK(a.stride(a_t ? 0 : 1) == 1);  // read in place, transposed or not
        auto y = gemm_addmm(bias64.to(torch::kFloat), a, b);
        CHECK(y.sizes() == torch::IntArrayRef{m, n});
        CHECK((y.to(torch::kDouble) - want).abs().max().item<double>() < tolerance);
        CHECK((gemm_addmm({}, a, b).to(torch::kDouble) - a64.mm(b64)).abs().max().item<double>() < tolerance);
      }
    auto row = torch::randn({1, k}, torch::kDouble);
    auto broadcast = gemm_addmm({}, row.to(torch::kFloat).expand({m, k}), b64.to(torch::kFloat));
    CHECK((broadcast.to(torch::kDouble) - row.expand({m, k}).mm(b64)).abs().max().item<double>() < tolerance);
  }
  // k = 0: the bias alone; empty results.
  CHECK(torch::equal(gemm_addmm(torch::ones({5}), torch::randn({3, 0}), torch::randn({0, 5})), torch::ones({3, 5})));
  CHECK(gemm_addmm({}, torch::randn({0, 4}), torch::randn({4, 6})).sizes() == torch::IntArrayRef{0, 6});
  // Refused: shapes that do not agree, other dtypes, autocast, and the kernels capped below AVX-512.
  CHECK_THROWS_WITH_AS(gemm_addmm({}, torch::randn({3, 4}), torch::randn({5, 6})),
                       doctest::Contains("shapes [3, 4] x [5, 6] (bias none)"), rlhf::Error);
  auto d = torch::randn({3, 4}, torch::kDouble);
  CHECK_FALSE(rlhf::gemm_applies({&x, &d}));
  {
    rlhf::AutocastScope autocast(rlhf::Precision::bf16, torch::kCPU);
    CHECK_FALSE(rlhf::gemm_applies({&x}));
  }
  rlhf::set_decode_isa(rlhf::DecodeIsa::avx2);
  CHECK_FALSE(rlhf::gemm_applies({&x}));
  CHECK_THROWS_AS(gemm_addmm({}, x, torch::randn({20, 3})), rlhf::Error);
}

TEST_CASE("AVX-512 fp32 products: the linear layers' and vocabulary projection's gradients equal torch's") {
  if (rlhf::decode_isa() < rlhf::DecodeIsa::avx512) return;  // the test above checks that they decline
  torch::manual_seed(12);
  RestoreDecodeIsa restore;
  // y = bias + x w and y = x e^T with a non-trivial upstream gradient, on the kernels and on torch's operators.
  const auto x0 = torch::randn({70, 33}), w0 = torch::randn({33, 50}), b0 = torch::randn({50}),
             e0 = torch::randn({90, 33}), up = torch::randn({70, 50}), up_nt = torch::randn({70, 90});
  struct Grads {
    std::string node;
    torch::Tensor y, dx, dw, db, y_nt, dx_nt, de;
  };
  auto run = [&](bool frozen_w) {
    auto x = x0.clone().requires_grad_(), w = w0.clone().requires_grad_(!frozen_w), b = b0.clone().requires_grad_();
    auto e = e0.clone().requires_grad_();
    Grads g;
    g.y = rlhf::linear_addmm(b, x, w);
    g.node = g.y.grad_fn()->name();
    (g.y * up).sum().backward();
    g.dx = x.grad().clone(), g.db = b.grad().clone();
    if (!frozen_w) g.dw = w.grad().clone();
    else CHECK_FALSE(w.grad().defined());
    x.mutable_grad().reset();
    g.y_nt = rlhf::linear_mm_nt(x, e);
    (g.y_nt * up_nt).sum().backward();
    g.dx_nt = x.grad(), g.de = e.grad();
    return g;
  };
  for (bool frozen_w : {false, true}) {
    CAPTURE(frozen_w);
    rlhf::set_decode_isa(rlhf::DecodeIsa::avx512);
    const auto kernels = run(frozen_w);
    CHECK(kernels.node.find("GemmAddmmFunction") != std::string::npos);
    rlhf::set_decode_isa(rlhf::DecodeIsa::none);
    const auto torch_ops = run(frozen_w);
    CHECK(torch_ops.node == "AddmmBackward0");
    CHECK(max_diff(kernels.y, torch_ops.y) < 1e-4);
    CHECK(max_diff(kernels.dx, torch_ops.dx) < 1e-4);
    CHECK(max_diff(kernels.db, torch_ops.db) < 1e-4);
    if (!frozen_w) CHECK(max_diff(kernels.dw, torch_ops.dw) < 1e-4);
    CHECK(max_diff(kernels.y_nt, torch_ops.y_nt) < 1e-4);
    CHECK(max_diff(kernels.dx_nt, torch_ops.dx_nt) < 1e-4);
    CHECK(max_diff(kernels.de, torch_ops.de) < 1e-4);
  }
  // A second derivative (create_graph): the backward runs on torch's operators and is itself differentiable.
  auto second = [&] {
    auto x = x0.clone().requires_grad_(), w = w0.clone().requires_grad_();
    auto y = rlhf::linear_addmm(b0, x, w);
    auto dx = torch::autograd::grad({(y * up).sum()}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/true)[0];
    return torch::autograd::grad({dx.pow(2).sum()}, {w})[0];
  };
  rlhf::set_decode_isa(rlhf::DecodeIsa::avx512);
  const auto on_kernels = second();
  rlhf::set_decode_isa(rlhf::DecodeIsa::none);
  CHECK(max_diff(on_kernels, second()) < 1e-3);
}

TEST_CASE("AVX512-BF16 products (core/gemm.hpp) equal float64's of the bf16-rounded operands, past every edge") {
  using rlhf::gemm_bf16_addmm;
  auto x = torch::randn({9, 20});
  if (rlhf::decode_isa() < rlhf::DecodeIsa::avx512_bf16) {  // other CPUs: torch's operators run
    CHECK_FALSE(rlhf::gemm_bf16_supported({&x}));
    rlhf::AutocastScope autocast(rlhf::Precision::bf16, torch::kCPU);
    CHECK_FALSE(rlhf::gemm_bf16_applies({&x}));
    return;
  }
  torch::manual_seed(13);
  RestoreDecodeIsa restore;
  // (m, n, k) past the 8 x 48 tile, the 16 x 16 blocks the packing moves in registers, the 128-row, 1024-deep and
  // 3072-column blocks, with odd k (the last pair half zero), m > n and n >= m; k far beyond m and n (split along k
  // among the threads).
  const std::vector<std::array<int64_t, 3>> shapes = {{1, 1, 1},       {7, 47, 3},     {16, 48, 32},  {9, 49, 33},
                                                      {130, 100, 1025}, {17, 3100, 40}, {300, 50, 66}, {64, 200, 2},
                                                      {64, 64, 12999}};
  const auto bf16_exact = [](const torch::Tensor& t) { return t.to(torch::kBFloat16).to(torch::kDouble); };
  for (const auto& [m, n, k] : shapes) {
    CAPTURE(m);
    CAPTURE(n);
    CAPTURE(k);
    const auto a64 = torch::randn({m, k}, torch::kDouble), b64 = torch::randn({k, n}, torch::kDouble);
    const auto bias = torch::randn({n});
    // The operands as the kernels see them: rounded to bf16 (to nearest even, as torch's cast).
    const auto want = torch::addmm(bias.to(torch::kDouble), bf16_exact(a64), bf16_exact(b64));
    const double tolerance = 1e-6 * (10.0 + static_cast<double>(k));
    for (bool a_t : {false, true})
      for (bool b_t : {false, true})
        for (auto source : {torch::kFloat, torch::kBFloat16}) {
          CAPTURE(a_t);
          CAPTURE(b_t);
          CAPTURE(source);
          // a in fp32 or bf16, b the other way (the weights' case: fp32 b, bf16 a), as given or transposed views
          const auto other = source == torch::kFloat ? torch::kBFloat16 : torch::kFloat;
          auto a = a_t ? a64.t().contiguous().to(source).t() : a64.to(source);
          auto b = b_t ? b64.t().contiguous().to(other).t() : b64.to(other);
          auto y = gemm_bf16_addmm(bias, a, b, torch::kFloat);
          CHECK((y.scalar_type() == torch::kFloat));
          CHECK((y.to(torch::kDouble) - want).abs().max().item<double>() < tolerance);
          // A bf16 result is the fp32 sum rounded once: within half a bf16 step (at most 2^-8 relative) of the sum.
          auto y16 = gemm_bf16_addmm(bias, a, b, torch::kBFloat16);
          CHECK((y16.scalar_type() == torch::kBFloat16));
          CHECK(((y16.to(torch::kDouble) - want).abs() - want.abs() / 256).max().item<double>() < tolerance);
        }
    auto row = torch::randn({1, k});
    auto broadcast = gemm_bf16_addmm({}, row.expand({m, k}), b64.to(torch::kFloat), torch::kFloat);
    const auto broadcast_want = bf16_exact(row).expand({m, k}).mm(bf16_exact(b64));
    CHECK((broadcast.to(torch::kDouble) - broadcast_want).abs().max().item<double>() < tolerance);
  }
  // k = 0: the bias alone; empty results.
  CHECK(torch::equal(gemm_bf16_addmm(torch::ones({5}), torch::randn({3, 0}), torch::randn({0, 5}), torch::kFloat),
                     torch::ones({3, 5})));
  CHECK(gemm_bf16_addmm({}, torch::randn({0, 4}), torch::randn({4, 6}), torch::kBFloat16).sizes() ==
        torch::IntArrayRef{0, 6});
  // When torch computes a product in bf16: under bf16 autocast, or with every operand bf16.
  auto x16 = x.to(torch::kBFloat16);
  CHECK_FALSE(rlhf::gemm_bf16_applies({&x}));
  CHECK_FALSE(rlhf::gemm_bf16_applies({&x, &x16}));
  CHECK(rlhf::gemm_bf16_applies({&x16}));
  {
    rlhf::AutocastScope autocast(rlhf::Precision::bf16, torch::kCPU);
    CHECK(rlhf::gemm_bf16_applies({&x, &x16}));
  }
  // Refused: shapes that do not agree, other dtypes, and the kernels capped below AVX512-BF16.
  CHECK_THROWS_WITH_AS(gemm_bf16_addmm({}, torch::randn({3, 4}), torch::randn({5, 6}), torch::kFloat),
                       doctest::Contains("shapes [3, 4] x [5, 6] (bias none)"), rlhf::Error);
  auto d = torch::randn({3, 4}, torch::kDouble);
  CHECK_FALSE(rlhf::gemm_bf16_supported({&x, &d}));
  CHECK_THROWS_AS(gemm_bf16_addmm({}, x, torch::randn({20, 3}), torch::kDouble), rlhf::Error);
  rlhf::set_decode_isa(rlhf::DecodeIsa::avx512);
  CHECK_FALSE(rlhf::gemm_bf16_supported({&x16}));
  CHECK_THROWS_AS(gemm_bf16_addmm({}, x16, torch::randn({20, 3}), torch::kFloat), rlhf::Error);
}

TEST_CASE("AVX512-BF16 products under bf16 autocast: the layers' and the projection's gradients agree with torch's") {
  if (rlhf::decode_isa() < rlhf::DecodeIsa::avx512_bf16) return;  // the test above checks that they decline
  torch::manual_seed(14);
  RestoreDecodeIsa restore;
  const auto x0 = torch::randn({70, 64}), w0 = torch::randn({64, 50}), b0 = torch::randn({50}),
             e0 = torch::randn({90, 64}), up = torch::randn({70, 50}), up_nt = torch::randn({70, 90});
  struct Grads {
    std::string node, node_nt;
    torch::Tensor y, dx, dw, db, y_nt, dx_nt, de;
  };
  auto run = [&] {
    auto x = x0.clone().requires_grad_(), w = w0.clone().requires_grad_(), b = b0.clone().requires_grad_();
    auto e = e0.clone().requires_grad_();
    Grads g;
    {
      rlhf::AutocastScope autocast(rlhf::Precision::bf16, torch::kCPU);
      g.y = rlhf::linear_addmm(b, x, w);
      g.y_nt = rlhf::linear_mm_nt(x, e);
    }
    g.node = g.y.grad_fn()->name(), g.node_nt = g.y_nt.grad_fn()->name();
    ((g.y.to(torch::kFloat) * up).sum() + (g.y_nt.to(torch::kFloat) * up_nt).sum()).backward();
    g.dx = x.grad(), g.dw = w.grad(), g.db = b.grad(), g.de = e.grad();
    return g;
  };
  rlhf::set_decode_isa(rlhf::DecodeIsa::avx512_bf16);
  const auto kernels = run();
  CHECK(kernels.node.find("GemmBf16AddmmFunction") != std::string::npos);
  CHECK(kernels.node_nt.find("GemmBf16MmNtFunction") != std::string::npos);
  rlhf::set_decode_isa(rlhf::DecodeIsa::avx512);  // torch's autocast: bf16 copies of x, w, e and oneDNN's products
  const auto torch_ops = run();
  CHECK(torch_ops.node.find("Addmm") != std::string::npos);
  // Both round the operands to bf16 and sum in fp32; torch also rounds the weights' gradients to bf16 before
  // casting them back, so they agree to bf16's precision (2^-8) of each tensor's scale.
  const auto close = [](const torch::Tensor& a, const torch::Tensor& b) {
    CHECK((a.scalar_type() == b.scalar_type()));
    return ((a.to(torch::kFloat) - b.to(torch::kFloat)).abs().max() / b.to(torch::kFloat).abs().max()).item<float>();
  };
  CHECK((kernels.y.scalar_type() == torch::kBFloat16));
  CHECK(close(kernels.y, torch_ops.y) < 1e-2);
  CHECK(close(kernels.y_nt, torch_ops.y_nt) < 1e-2);
  CHECK(close(kernels.dx, torch_ops.dx) < 1e-2);
  CHECK(close(kernels.dw, torch_ops.dw) < 1e-2);
  CHECK(close(kernels.db, torch_ops.db) < 1e-2);
  CHECK(close(kernels.de, torch_ops.de) < 1e-2);
  // The weights' gradients come from the fp32 sums: nearer float64's than torch's bf16-rounded ones.
  const auto up64 = up.to(torch::kDouble);
  const auto exact_dw = x0.to(torch::kBFloat16).to(torch::kDouble).t().mm(up64.to(torch::kBFloat16).to(torch::kDouble));
  CHECK((kernels.dw.to(torch::kDouble) - exact_dw).abs().max().item<double>() <
        (torch_ops.dw.to(torch::kDouble) - exact_dw).abs().max().item<double>());
  // Every operand bf16 (bf16 weights, no autocast): the gradients come out in bf16.
  auto x = x0.to(torch::kBFloat16).requires_grad_(), w = w0.to(torch::kBFloat16).requires_grad_();
  rlhf::set_decode_isa(rlhf::DecodeIsa::avx512_bf16);
  auto y = rlhf::linear_addmm({}, x, w);
  CHECK(y.grad_fn()->name().find("GemmBf16AddmmFunction") != std::string::npos);
  y.to(torch::kFloat).sum().backward();
  CHECK((w.grad().scalar_type() == torch::kBFloat16));
  CHECK(close(w.grad(), x0.t().mm(torch::ones({70, 50})).to(torch::kBFloat16)) < 1e-2);
}

TEST_CASE("GPT-2's forward and backward on the AVX-512 products equal torch's") {
  if (rlhf::decode_isa() < rlhf::DecodeIsa::avx512) return;
  RestoreDecodeIsa restore;
  auto ids = torch::randint(0, 37, {3, 11}, torch::kLong);
  auto run = [&](rlhf::DecodeIsa isa) {
    rlhf::set_decode_isa(isa);
    auto model = tiny_model(9);  // eval(): no dropout, the same forward both times
    auto logits = model->logits(model->forward(ids));
    (logits.log_softmax(-1).select(-1, 3).sum()).backward();
    std::vector<torch::Tensor> out{logits.detach()};
    for (const auto& p : model->parameters()) out.push_back(p.grad().clone());
    return out;
  };
  const auto kernels = run(rlhf::DecodeIsa::avx512), torch_ops = run(rlhf::DecodeIsa::none);
  REQUIRE(kernels.size() == torch_ops.size());
  for (size_t i = 0; i < kernels.size(); ++i) {
    CAPTURE(i);
    CHECK(max_diff(kernels[i], torch_ops[i]) < 1e-4);
  }
}

TEST_CASE("GPT2 sparse embedding gradient: wte's gradient is unchanged when the loss goes through the projection") {
  torch::manual_seed(5);
  auto ids = torch::randint(0, 37, {3, 11}, torch::kLong);
  auto model = tiny_model(9);
  const auto& wte = model->transformer->wte->weight;
  auto wte_grad = [&](bool sparse, bool through_projection) {
    model->zero_grad(/*set_to_none=*/true);  // (a zeroed dense .grad would take a sparse gradient in place too)
    rlhf::SparseEmbeddingGrad<rlhf::GPT2Impl<>> guard(*model);  // on while it lives
    if (!sparse) model->set_sparse_embedding_grad(false);
    CHECK(model->sparse_embedding_grad() == sparse);
    auto hidden = model->forward(ids);
    auto loss = through_projection ? model->logits(hidden).log_softmax(-1).select(-1, 3).sum() : hidden.sum();
    loss.backward();
    return wte.grad();
  };
  auto dense = wte_grad(false, true).clone();
  auto sparse = wte_grad(true, true);
  CHECK_FALSE(model->sparse_embedding_grad());  // the guard restored the setting
  CHECK_FALSE(sparse.is_sparse());              // the projection's dense gradient took the lookup's in place
  // The same sums in another order (the lookup's rows added one by one into the projection's gradient).
  CHECK(max_diff(sparse, dense) < 1e-6 * dense.abs().max().item<float>() * 10);
  // Without the projection in the loss the lookup's gradient stays sparse: the setting is for losses through it.
  auto alone = wte_grad(true, false);
  CHECK(alone.is_sparse());
  auto alone_dense = alone.to_dense();
  auto alone_reference = wte_grad(false, false);
  CHECK(max_diff(alone_dense, alone_reference) < 1e-6 * alone_reference.abs().max().item<float>() * 10);
}

TEST_CASE("fp32 decoding with left padding through the fused attention gives the full forward's logits") {
  auto model = tiny_model_wide_heads(8);
  auto ids = torch::randint(0, 37, {3, 9}, torch::kLong);
  auto mask = torch::ones({3, 9}, torch::kLong);
  mask.index_put_({0, torch::indexing::Slice(0, 3)}, 0);  // left padding of two rows
  mask.index_put_({2, 0}, 0);
  c10::InferenceMode inference;
  auto full = model->logits(model->forward(ids, mask));
  auto cache = model->new_cache(3, 9);
  std::vector<torch::Tensor> parts = {model->logits(model->forward(ids.narrow(1, 0, 4), mask.narrow(1, 0, 4), &cache))};
  for (int64_t i = 4; i < 9; ++i)
    parts.push_back(model->logits(model->forward(ids.narrow(1, i, 1), mask.narrow(1, 0, i + 1), &cache)));
  auto stepwise = torch::cat(parts, 1);
  auto real = mask.to(torch::kBool);  // padded positions' outputs are ignored
  CHECK(max_diff(stepwise.index({real}), full.index({real})) < 1e-5);
}

TEST_CASE("bf16 decode kernels round torch's bf16 products") {
  c10::InferenceMode inference;
  if (rlhf::detail::cpu_decode_isa() < rlhf::DecodeIsa::avx512_bf16) {
    // Without AVX512-BF16 (and BW, VL) bf16 products stay with torch, also inside a pack scope.
    rlhf::DecodePackScope packs;
    CHECK_FALSE(rlhf::small_rows_addmm({}, torch::randn({1, 8}, torch::kBFloat16), torch::randn({8, 16}, torch::kBFloat16))
                    .defined());
    return;
  }
  torch::manual_seed(11);
  RestoreDecodeIsa restore;
  // bf16 weights and inputs, and fp32 ones under bf16 autocast (what PPOConfig::precision = bf16 decodes with).
  for (bool autocast : {false, true}) {
    CAPTURE(autocast);
    rlhf::AutocastScope scope(autocast ? rlhf::Precision::bf16 : rlhf::Precision::fp32, torch::kCPU);
    auto operand = [&](const torch::Tensor& t) { return autocast ? t : t.to(torch::kBFloat16); };
    rlhf::DecodePackScope packs;
    int64_t packed_bytes = 0;
    // k even and odd (a zero pair partner), n with column tails past the 16-wide vectors and 48-wide panels, row
    // counts past the 8-row tiles and beyond the fp32 kernels' 64 (prefill)
    for (int64_t k : {8, 13, 96}) {
      for (int64_t n : {16, 40, 67, 100}) {
        CAPTURE(k);
        CAPTURE(n);
        auto w = torch::randn({k, n}), bias = torch::randn({n}), e = torch::randn({n, k});
        auto w_op = operand(w), bias_op = operand(bias), e_op = operand(e);  // the weights, as a model holds them
        for (int64_t m : {1, 2, 7, 8, 9, 16, 33, 64, 200}) {
          CAPTURE(m);
          auto x = torch::randn({m, k});
          auto y = rlhf::small_rows_addmm(bias_op, operand(x), w_op);
          REQUIRE(y.defined());
          // (torch's own bf16 addmm is no reference here: it is 0.46 relative off at 9 x 8 x 16, and more than a
          // rounding off at most shapes)
          CHECK(bf16_rounding_of(y, torch::addmm(bf16_exact(bias), bf16_exact(x), bf16_exact(w))));
          CHECK(bf16_rounding_of(rlhf::small_rows_addmm({}, operand(x), w_op), torch::mm(bf16_exact(x), bf16_exact(w))));
          auto y_nt = rlhf::small_rows_mm_nt(operand(x), e_op);
          REQUIRE(y_nt.defined());
          CHECK(bf16_rounding_of(y_nt, torch::mm(bf16_exact(x), bf16_exact(e).t())));
        }
        // each weight packed once, in panels of 48 columns and pairs of k: w and e^T; the bias rounded once (fp32)
        packed_bytes += 2 * ((n + 47) / 48) * ((k + 1) / 2) * 48 * 2 * 2 + n * 4;
        CHECK(packs.bytes() == packed_bytes);
      }
    }
    // What stays with torch: no open pack scope (a fresh pack per product would cost more than it saves), the
    // kernels capped below AVX512-BF16, fp32 operands without autocast.
    auto x = operand(torch::randn({2, 8})), w = operand(torch::randn({8, 16}));
    {
      rlhf::DecodePackScope inner;  // scopes nest: the inner one packs for itself
      CHECK(rlhf::small_rows_addmm({}, x, w).defined());
      CHECK(inner.bytes() > 0);
    }
    rlhf::set_decode_isa(rlhf::DecodeIsa::avx512);
    CHECK_FALSE(rlhf::small_rows_addmm({}, x, w).defined());
    rlhf::set_decode_kernels(true);
  }
  CHECK_FALSE(rlhf::DecodePackScope::active());
  {
    rlhf::DecodePackScope packs;
    CHECK(rlhf::DecodePackScope::active() == &packs);
    auto y = rlhf::small_rows_addmm({}, torch::randn({2, 8}), torch::randn({8, 16}));  // fp32: the fp32 kernels
    REQUIRE(y.defined());
    CHECK((y.scalar_type() == torch::kFloat));
    // with AVX-512 they read w from one packed fp32 panel (8 x 48 floats), with AVX2 in place
    CHECK(packs.bytes() == (rlhf::decode_isa() >= rlhf::DecodeIsa::avx512 ? 8 * 48 * 4 : 0));
  }
}

TEST_CASE("pack_fp32_panels: 48-column panels of [K, N], zero past N") {
  torch::manual_seed(14);
  for (auto [k, n] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {7, 50}, {32, 48}, {33, 97}, {768, 2304}}) {
    CAPTURE(k);
    CAPTURE(n);
    const auto w = torch::randn({k, n});
    const int64_t panels = (n + 47) / 48;
    auto padded = torch::zeros({k, panels * 48});
    padded.narrow(1, 0, n).copy_(w);
    CHECK(torch::equal(rlhf::pack_fp32_panels(w), padded.view({k, panels, 48}).permute({1, 0, 2}).contiguous()));
  }
  CHECK_THROWS_WITH_AS(rlhf::pack_fp32_panels(torch::randn({4, 8}, torch::kDouble)),
                       doctest::Contains("expected an fp32 matrix"), rlhf::Error);
}

TEST_CASE("fp32 decode kernels give the same sums from packed panels as from the weight in place") {
  if (rlhf::decode_isa() < rlhf::DecodeIsa::avx512) return;  // with AVX2 only they read w in place (case above)
  c10::InferenceMode inference;
  torch::manual_seed(15);
  // n with column tails past the 16-wide vectors and 48-wide panels, odd k, rows past the 8-row tiles up to the
  // kernels' 64, and tiles of 4 or more rows (which prefetch ahead within a panel) over k past the prefetch distance
  for (int64_t k : {8, 13, 96}) {
    for (int64_t n : {16, 40, 67, 100}) {
      CAPTURE(k);
      CAPTURE(n);
      auto w = torch::randn({k, n}), bias = torch::randn({n});
      for (int64_t m : {1, 2, 5, 8, 9, 16, 33, 64}) {
        CAPTURE(m);
        auto x = torch::randn({m, k});
        auto in_place = rlhf::small_rows_addmm(bias, x, w);
        rlhf::DecodePackScope packs;
        auto packed = rlhf::small_rows_addmm(bias, x, w);
        REQUIRE(in_place.defined());
        REQUIRE(packed.defined());
        CHECK(packs.bytes() == (n + 47) / 48 * k * 48 * 4);
        CHECK(torch::equal(packed, in_place));  // one FMA per k in the same order
        CHECK(max_diff(packed, torch::addmm(bias, x, w)) < 1e-4);
      }
    }
  }
}

TEST_CASE("fp32 decode kernels pack a weight again when it changes") {
  if (rlhf::decode_isa() < rlhf::DecodeIsa::avx512) return;
  torch::manual_seed(16);
  auto w = torch::randn({8, 16}, torch::requires_grad());
  auto x = torch::randn({3, 8});
  torch::NoGradGuard no_grad;
  rlhf::DecodePackScope packs;
  auto check = [&] { CHECK(max_diff(rlhf::small_rows_addmm({}, x, w), torch::mm(x, w)) < 1e-5); };
  check();
  w.mul_(-2.0);  // an optimiser step: in place, the version counter moves
  check();
  w.set_data(torch::randn({8, 16}));  // new storage (Module::to)
  check();
  CHECK(packs.bytes() == 8 * 48 * 4);  // the latest pack only
}

TEST_CASE("pack_bf16_pairs: bf16 pairs along k in 48-column panels, from [K, N] and from [N, K]") {
  torch::manual_seed(13);
  // Shapes past the 16 x 16 blocks and 16-column runs the vector path moves, with odd K (a zero second half in the
  // last pair) and column tails.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 1}, {7, 50}, {32, 48}, {33, 97}, {64, 200}, {768, 100}};
  for (auto [k, n] : shapes) {
    CAPTURE(k);
    CAPTURE(n);
    auto w = torch::randn({k, n});
    // Values torch's rounding treats specially: ties (to even), a subnormal, infinities, a NaN.
    const float specials[] = {1.00390625f, 1.01171875f, -3e-39f, std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()};
    for (int64_t i = 0; i < std::min<int64_t>(k * n, 6); ++i) w.view(-1)[(i * 7919) % (k * n)] = specials[i];
    const int64_t kp = (k + 1) / 2, panels = (n + 47) / 48;
    auto padded = torch::zeros({2 * kp, panels * 48}, torch::kBFloat16);
    padded.narrow(0, 0, k).narrow(1, 0, n).copy_(w.to(torch::kBFloat16));
    const auto expected = padded.view({kp, 2, panels, 48}).permute({2, 0, 3, 1}).contiguous();  // [panel, i, c, 2]
    // Bit for bit, but for a NaN's bits: a NaN only (torch's vectorised cast gives 0xFFFF, its scalar one 0x7FC0).
    auto same = [](const torch::Tensor& a, const torch::Tensor& b) {
      const auto nan_a = a.isnan(), nan_b = b.isnan();
      return torch::equal(nan_a, nan_b) &&
             torch::equal(a.view(torch::kShort).masked_fill(nan_a, 0), b.view(torch::kShort).masked_fill(nan_b, 0));
    };
    CHECK(same(rlhf::pack_bf16_pairs(w, /*transposed=*/false), expected));
    CHECK(same(rlhf::pack_bf16_pairs(w.t().contiguous(), /*transposed=*/true), expected));
    // A bf16 weight: packed as it is.
    CHECK(same(rlhf::pack_bf16_pairs(w.to(torch::kBFloat16), false), expected));
  }
}

TEST_CASE("bf16 decode kernels pack a weight again when it changes") {
  if (rlhf::detail::cpu_decode_isa() < rlhf::DecodeIsa::avx512_bf16) return;  // the case above checks the decline
  torch::manual_seed(12);
  auto w = torch::randn({8, 16}, torch::requires_grad());
  auto x = torch::randn({3, 8});
  rlhf::AutocastScope scope(rlhf::Precision::bf16, torch::kCPU);
  torch::NoGradGuard no_grad;
  rlhf::DecodePackScope packs;
  CHECK(bf16_rounding_of(rlhf::small_rows_addmm({}, x, w), torch::mm(bf16_exact(x), bf16_exact(w))));
  w.mul_(-2.0);  // an optimiser step: in place, the version counter moves
  CHECK(bf16_rounding_of(rlhf::small_rows_addmm({}, x, w), torch::mm(bf16_exact(x), bf16_exact(w))));
  w.set_data(torch::randn({8, 16}));  // new storage (Module::to)
  CHECK(bf16_rounding_of(rlhf::small_rows_addmm({}, x, w), torch::mm(bf16_exact(x), bf16_exact(w))));
  CHECK(packs.bytes() == 1 * 4 * 48 * 2 * 2);  // the latest pack only
}

TEST_CASE("fused decode attention equals torch's operators") {
  c10::InferenceMode inference;
  RestoreDecodeIsa restore;
  const int64_t b = 3, h = 4, capacity = 40;
  const double scale = 0.25;
  if (rlhf::detail::cpu_decode_isa() < rlhf::DecodeIsa::avx2) {
    CHECK_FALSE(rlhf::decode_attention(torch::randn({b, h, 1, 16}), torch::randn({b, h, 9, 16}),
                                       torch::randn({b, h, 9, 16}), torch::zeros({b, 1, 1, 9}), scale)
                    .defined());
    return;
  }
  torch::manual_seed(13);
  // AVX2 (8 lanes), and the CPU's best: with AVX-512, 16 positions at a time for head widths in 16s up to 128
  std::vector<rlhf::DecodeIsa> isas{rlhf::DecodeIsa::avx2};
  if (rlhf::detail::cpu_decode_isa() >= rlhf::DecodeIsa::avx512) isas.push_back(rlhf::DecodeIsa::avx512_bf16);
  for (const auto isa : isas) {
    rlhf::set_decode_isa(isa);
    // positions: part of a 16-block, two and a part, exactly one; widths in 16s (1 and 4), in 8s only, past 128
    for (const auto& [dh, s] : {std::pair<int64_t, int64_t>{16, 9}, {64, 37}, {24, 17}, {144, 16}}) {
      CAPTURE(static_cast<int>(isa));
      CAPTURE(dh);
      CAPTURE(s);
      auto bias = torch::zeros({b, 1, 1, s});
      bias.index_put_({0, 0, 0, 2}, -INFINITY);                           // a padded key of row 0
      bias.index_put_({1, 0, 0, torch::indexing::Slice(0, 4)}, -INFINITY);  // row 1's first four keys
      for (auto q_dtype : {torch::kFloat, torch::kBFloat16}) {
        for (auto kv_dtype : {torch::kFloat, torch::kBFloat16}) {
          CAPTURE(q_dtype);
          CAPTURE(kv_dtype);
          // as the model hands them over: q a strided slice of the fused projection, k and v views of the cache
          auto q = torch::randn({b, 1, 3, h, dh}).to(q_dtype).permute({2, 0, 3, 1, 4})[0];  // [B, H, 1, Dh]
          auto keys = torch::randn({b, h, capacity, dh}).to(kv_dtype);
          auto values = torch::randn({b, h, capacity, dh}).to(kv_dtype);
          auto k = keys.narrow(2, 0, s), v = values.narrow(2, 0, s);
          auto out = rlhf::decode_attention(q, k, v, bias, scale);
          REQUIRE(out.defined());
          CHECK(out.sizes() == torch::IntArrayRef({b, h, 1, dh}));
          CHECK((out.scalar_type() == kv_dtype));
          CHECK(out.transpose(1, 2).is_contiguous());  // the heads' concatenation needs no copy
          auto scores = (q.to(torch::kDouble) * k.to(torch::kDouble)).sum(-1).mul(scale).unsqueeze(2) + bias;
          auto expected = (torch::softmax(scores, -1).transpose(-2, -1) * v.to(torch::kDouble)).sum(2, true);
          if (kv_dtype == torch::kBFloat16)
            CHECK(bf16_rounding_of(out, expected));
          else
            CHECK(max_diff(out.to(torch::kDouble), expected) < 1e-5);
          // a key the bias hides changes nothing
          values.index_put_({1, torch::indexing::Slice(), 3}, 1e4);
          CHECK(torch::equal(rlhf::decode_attention(q, k, v, bias, scale), out));
        }
      }
    }
  }
  rlhf::set_decode_kernels(true);
  // What stays with torch: a head width that is not a multiple of 8, a bias in bf16, the kernels turned off.
  const int64_t s = 9;
  auto bias = torch::zeros({b, 1, 1, s});
  auto q = torch::randn({b, h, 1, 16}), k = torch::randn({b, h, s, 16});
  CHECK_FALSE(rlhf::decode_attention(torch::randn({b, h, 1, 12}), torch::randn({b, h, s, 12}),
                                     torch::randn({b, h, s, 12}), bias, scale)
                  .defined());
  CHECK_FALSE(rlhf::decode_attention(q, k, k, bias.to(torch::kBFloat16), scale).defined());
  rlhf::set_decode_kernels(false);
  CHECK_FALSE(rlhf::decode_attention(q, k, k, bias, scale).defined());
  rlhf::set_decode_kernels(true);
}

TEST_CASE("fused attention (core/attention.hpp): float64's attention of the bf16 inputs, forward and backward") {
  const int64_t b = 3, t = 21, heads = 2, dh = 24, d = heads * dh;  // t past a 16-lane vector and an 8-row tile
  torch::manual_seed(17);
  auto qkv = torch::randn({b, t, 3 * d}).to(torch::kBFloat16);
  // padded keys in rows 1 and 2 (left padding), the causal mask everywhere
  auto mask = torch::ones({b, t}, torch::kLong);
  mask[1].narrow(0, 0, 4).zero_();
  mask[2].narrow(0, 0, 9).zero_();
  const auto bias = rlhf::attention_bias(mask, 0, t, torch::kFloat);
  const double scale = 0.2;
  if (rlhf::decode_isa() < rlhf::DecodeIsa::avx512_bf16) {  // other CPUs: the module composes torch's operators
    CHECK_FALSE(rlhf::fused_attention(qkv, bias, heads, scale).defined());
    return;
  }
  // float64 of the same bf16 values; its gradient for the weights g of a loss sum(g out)
  auto x64 = qkv.to(torch::kDouble).requires_grad_(true);
  auto expected = rlhf::detail::composed_attention(x64, bias.to(torch::kDouble), heads, scale);
  const auto g = torch::randn({b, t, d});
  const auto expected_grad = torch::autograd::grad({expected}, {x64}, {g.to(torch::kDouble)}, true)[0];
  // bf16 rounding of p and of the outputs: ~2^-8 relative
  const auto close = [](const torch::Tensor& got, const torch::Tensor& want) {
    return (got.to(torch::kDouble) - want).abs().max().item<double>() <= 1e-2 * want.abs().max().item<double>();
  };
  torch::Tensor without_graph;
  {
    torch::NoGradGuard no_grad;
    without_graph = rlhf::fused_attention(qkv, bias, heads, scale);
  }
  REQUIRE(without_graph.defined());
  CHECK((without_graph.scalar_type() == torch::kBFloat16));
  CHECK(close(without_graph, expected.detach()));
  auto x = qkv.clone().requires_grad_(true);
  auto out = rlhf::fused_attention(x, bias, heads, scale);
  REQUIRE(out.defined());
  CHECK(out.grad_fn() != nullptr);
  CHECK(torch::equal(out.detach(), without_graph));
  auto grad = torch::autograd::grad({out}, {x}, {g.to(torch::kBFloat16)}, /*retain_graph=*/true)[0];
  CHECK((grad.scalar_type() == torch::kBFloat16));
  CHECK(close(grad, expected_grad));
  // an fp32 output gradient reads the same
  auto grad32 = torch::autograd::grad({out}, {x}, {g.to(torch::kBFloat16).to(torch::kFloat)}, true)[0];
  CHECK(torch::equal(grad32, grad));
  // create_graph: the composition's gradient, differentiable again (a second derivative along g)
  auto first = torch::autograd::grad({out}, {x}, {g.to(torch::kBFloat16)}, true, /*create_graph=*/true)[0];
  REQUIRE(first.requires_grad());
  auto second = torch::autograd::grad({(first.to(torch::kFloat) * first.to(torch::kFloat)).sum()}, {x})[0];
  auto first64 = torch::autograd::grad({expected}, {x64}, {g.to(torch::kDouble)}, true, true)[0];
  auto second64 = torch::autograd::grad({(first64 * first64).sum()}, {x64})[0];
  CHECK(close(second, second64));
  // what it does not take: fp32 projections, a bias that wants a gradient, shapes that do not split into heads
  CHECK_FALSE(rlhf::fused_attention(qkv.to(torch::kFloat), bias, heads, scale).defined());
  CHECK_FALSE(rlhf::fused_attention(qkv, bias.clone().requires_grad_(true), heads, scale).defined());
  CHECK_FALSE(rlhf::fused_attention(qkv, bias, 5, scale).defined());
  CHECK_FALSE(rlhf::fused_attention(qkv.narrow(1, 0, 20), bias, heads, scale).defined());
}

TEST_CASE("GPT-2 under bf16 autocast: the fused attention's logits and gradients match torch's composition") {
  if (rlhf::decode_isa() < rlhf::DecodeIsa::avx512_bf16) return;  // covered above: the composition runs there
  RestoreDecodeIsa restore;
  torch::manual_seed(19);
  auto c = tiny_config();
  c.n_embd = 32;
  rlhf::GPT2<> model(c);
  model->eval();
  auto ids = torch::randint(0, 37, {2, 11}, torch::kLong);
  auto mask = torch::ones({2, 11}, torch::kLong);
  mask[0].narrow(0, 0, 3).zero_();
  const auto run = [&] {
    model->zero_grad();
    rlhf::AutocastScope autocast(rlhf::Precision::bf16, torch::kCPU);
    auto logits = model->logits(model->forward(ids, mask)).to(torch::kFloat);
    logits.mul(torch::linspace(-1, 1, 37)).sum().backward();
    const auto weight = model->named_parameters()["transformer.h.0.attn.c_attn.weight"];
    return std::make_pair(logits.detach(), weight.grad().clone());
  };
  const auto [fused_logits, fused_grad] = run();
  rlhf::set_decode_isa(rlhf::DecodeIsa::avx512);  // no bf16 kernels: torch's composition
  const auto [torch_logits, torch_grad] = run();
  CHECK((fused_logits - torch_logits).abs().max().item<float>() < 0.05 * torch_logits.abs().max().item<float>());
  CHECK((fused_grad - torch_grad).abs().max().item<float>() < 0.05 * torch_grad.abs().max().item<float>());
}

TEST_CASE("column_sums: the fp32 column sums of fp32 and bf16 matrices, as torch's sum over rows") {
  torch::manual_seed(17);
  // Widths past the 128-column blocks and 16-wide vectors, split over threads or not; one row; no rows.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 1}, {5, 17}, {528, 768}, {33, 3072}, {64, 300},
                                                           {0, 40}};
  for (const auto dtype : {torch::kFloat, torch::kBFloat16})
    for (auto [m, n] : shapes) {
      CAPTURE(m);
      CAPTURE(n);
      const auto x = torch::randn({m, n}).to(dtype);
      const auto sums = rlhf::detail::column_sums(x);
      REQUIRE((sums.scalar_type() == torch::kFloat));
      REQUIRE((sums.sizes() == torch::IntArrayRef{n}));
      const auto exact = x.to(torch::kDouble).sum(0);
      // fp32 sums of m values of size ~1: within m ulps of 1, whatever the order
      CHECK((sums.to(torch::kDouble) - exact).abs().max().item<double>() <= 1e-6 * std::max<int64_t>(m, 1));
    }
  // A strided matrix takes torch's reduction.
  const auto x = torch::randn({40, 64});
  CHECK(torch::allclose(rlhf::detail::column_sums(x.t()), x.t().sum(0)));
}

TEST_CASE("layer_norm_rows: torch's layernorm, without a graph and with one (gradients of x, weight and bias)") {
  if (!rlhf::detail::avx512_supported()) return;  // the kernel needs AVX-512; the callers then take torch's
  torch::manual_seed(19);
  // Widths with tails past the 16-wide vectors; rows split over threads or not; a leading batch dimension.
  for (const auto& sizes : std::vector<std::vector<int64_t>>{{1, 13}, {32, 768}, {4, 66, 768}, {3, 100}, {0, 8}}) {
    const int64_t d = sizes.back(), dims = static_cast<int64_t>(sizes.size()), rows = sizes.front();
    CAPTURE(d);
    CAPTURE(dims);
    CAPTURE(rows);
    const auto x = torch::randn(sizes) * 3 + 1, weight = torch::randn({d}), bias = torch::randn({d});
    c10::InferenceMode inference;
    const auto y = rlhf::layer_norm_rows(x, weight, bias, 1e-5);
    REQUIRE(y.defined());
    CHECK(torch::allclose(y, torch::layer_norm(x, {d}, weight, bias, 1e-5), 1e-5, 1e-5));
  }
  // With a graph: the autograd node, whose gradients match torch's layer_norm's, first and second order.
  for (const auto& sizes : std::vector<std::vector<int64_t>>{{3, 13}, {66, 768}, {2, 5, 100}}) {
    const int64_t d = sizes.back();
    CAPTURE(d);
    const auto x0 = torch::randn(sizes) * 2 - 1, w0 = torch::randn({d}), b0 = torch::randn({d});
    const auto upstream = torch::randn(sizes);
    const auto grads = [&](bool kernel, bool create_graph) {
      auto x = x0.clone().requires_grad_(), w = w0.clone().requires_grad_(), b = b0.clone().requires_grad_();
      auto y = kernel ? rlhf::layer_norm_rows(x, w, b, 1e-5) : torch::layer_norm(x, {d}, w, b, 1e-5);
      REQUIRE(y.defined());
      auto g = torch::autograd::grad({y}, {x, w, b}, {upstream}, /*retain_graph=*/true, create_graph);
      std::vector<torch::Tensor> out{y.detach(), g[0], g[1], g[2]};
      // second order: d/dx of sum(dL/dx ^ 2)
      if (create_graph) out.push_back(torch::autograd::grad({g[0].pow(2).sum()}, {x})[0]);
      return out;
    };
    for (const bool create_graph : {false, true}) {
      CAPTURE(create_graph);
      const auto mine = grads(true, create_graph), theirs = grads(false, create_graph);
      for (size_t i = 0; i < mine.size(); ++i) {
        CAPTURE(i);
        CHECK(torch::allclose(mine[i], theirs[i], 1e-4, 1e-4));
      }
    }
  }
  const auto x = torch::randn({4, 16}), weight = torch::randn({16}), bias = torch::randn({16});
  CHECK_FALSE(rlhf::layer_norm_rows(x.to(torch::kBFloat16), weight, bias, 1e-5).defined());  // fp32 only
  CHECK_FALSE(rlhf::layer_norm_rows(x.t(), weight.narrow(0, 0, 4), bias.narrow(0, 0, 4), 1e-5).defined());
}

TEST_CASE("GELU kernels: fp32 near the exact values and bf16 their rounding, forward and backward") {
  // Odd length: a masked tail after the 16-wide vectors; -12 .. 12 covers both saturated ends of tanh.
  auto x = torch::linspace(-12, 12, 20001).to(torch::kBFloat16);
  auto g = torch::randn({20001}).to(torch::kBFloat16);
  if (!rlhf::detail::avx512_supported()) {  // torch's GELU runs
    CHECK(torch::equal(rlhf::gelu_tanh(x), torch::gelu(x, "tanh")));
    return;
  }
  auto xd = x.to(torch::kDouble).requires_grad_(true);
  auto exact = torch::gelu(xd, "tanh");
  exact.backward(g.to(torch::kDouble));
  {
    torch::NoGradGuard no_grad;
    CHECK(bf16_rounding_of(rlhf::gelu_tanh(x), exact.detach(), 1e-6));
  }
  auto xg = x.clone().requires_grad_(true);
  auto y = rlhf::gelu_tanh(xg);
  CHECK(bf16_rounding_of(y.detach(), exact.detach(), 1e-6));
  y.backward(g);
  // fp32 arithmetic: where x < -4 the slope is ~1e-5 and 0.5 (1 + tanh) cancels (measured 2e-6 past the rounding;
  // torch's own bf16 backward is 0.03 off at x = -3)
  CHECK(bf16_rounding_of(xg.grad(), xd.grad(), 1e-5));
  // Inside a model's graph: the gradient reaches what came before.
  auto w = torch::randn({20001}, torch::requires_grad());
  rlhf::gelu_tanh((w.to(torch::kBFloat16) * x)).to(torch::kFloat).sum().backward();
  REQUIRE(w.grad().defined());
  CHECK(w.grad().abs().sum().item<float>() > 0);
  // fp32: within ~1e-7 relative to |x| forward (cancellation in 0.5 x (1 + tanh) where x << 0 bounds it, as in
  // torch's fp32 GELU), and 1e-6 relative to |dy| backward
  auto x32 = torch::linspace(-12, 12, 20001).requires_grad_(true);
  auto g32 = torch::randn({20001});
  auto y32 = rlhf::gelu_tanh(x32);
  CHECK((y32.scalar_type() == torch::kFloat));
  CHECK(((y32.detach().to(torch::kDouble) - torch::gelu(x32.detach().to(torch::kDouble), "tanh")).abs() <=
         1e-7 * (1 + x32.detach().abs().to(torch::kDouble)))
            .all()
            .item<bool>());
  y32.backward(g32);
  auto x64 = x32.detach().to(torch::kDouble).requires_grad_(true);
  torch::gelu(x64, "tanh").backward(g32.to(torch::kDouble));
  CHECK(((x32.grad().to(torch::kDouble) - x64.grad()).abs() <= 1e-6 * (1 + g32.abs().to(torch::kDouble)))
            .all()
            .item<bool>());
  // What stays with torch: tensors of other dtypes, and every tensor with the kernels capped below AVX-512.
  auto x64_plain = torch::randn({100}, torch::kDouble);
  CHECK(torch::equal(rlhf::gelu_tanh(x64_plain), torch::gelu(x64_plain, "tanh")));
  RestoreDecodeIsa restore;
  rlhf::set_decode_isa(rlhf::DecodeIsa::avx2);
  CHECK(torch::equal(rlhf::gelu_tanh(x), torch::gelu(x, "tanh")));
}

TEST_CASE("under bf16 autocast the KV cache holds bf16 and decodes as an fp32 cache does") {
  // The projections give bf16 keys and values under autocast: a bf16 cache holds them as they are. Heads of 8 take
  // the AVX2 attention, one head of 16 the AVX-512 one where the CPU has it.
  RestoreDecodeIsa restore;
  for (const int64_t n_head : {2, 1}) {
    CAPTURE(n_head);
    auto model = tiny_model_wide_heads(7, n_head);
    const auto& config = model->config();
    auto ids = torch::randint(0, 37, {2, 8}, torch::kLong);
    c10::InferenceMode inference;
    CHECK((model->new_cache(2, 8).dtype() == torch::kFloat));
    rlhf::AutocastScope scope(rlhf::Precision::bf16, torch::kCPU);
    auto decode = [&](rlhf::KVCache cache) {
      std::vector<torch::Tensor> parts = {model->logits(model->forward(ids.narrow(1, 0, 3), {}, &cache))};
      for (int64_t i = 3; i < 8; ++i)
        parts.push_back(model->logits(model->forward(ids.narrow(1, i, 1), {}, &cache)));
      return torch::cat(parts, 1);
    };
    CHECK((model->new_cache(2, 8).dtype() == torch::kBFloat16));
    // The fused attention and torch's operators (kernels off) both form the products in fp32 and sum them in fp32.
    for (bool kernels : {true, false}) {
      CAPTURE(kernels);
      rlhf::set_decode_kernels(kernels);
      const auto with_bf16 = decode(model->new_cache(2, 8));
      const auto with_fp32 = decode(
          rlhf::KVCache(config.n_layer, 2, config.n_head, 8, config.d_head(), torch::TensorOptions(torch::kFloat)));
      CHECK(torch::equal(with_bf16, with_fp32));
    }
  }
}

TEST_CASE("bf16 decoding through the decode kernels is as close to fp32 as torch's bf16") {
  // Under bf16 autocast and with bf16 weights, decoding step by step through the bf16 kernels, the fused attention
  // and the bf16 GELU, against torch's bf16 operators (kernels off): both are bf16's distance from fp32 away from
  // the fp32 logits (the kernels round once per product, torch's bf16 addmm without autocast sometimes twice).
  auto model = tiny_model_wide_heads(6);
  auto ids = torch::randint(0, 37, {2, 8}, torch::kLong);
  auto decode = [&](bool kernels, int64_t* packed_bytes = nullptr) {
    rlhf::set_decode_kernels(kernels);
    c10::InferenceMode inference;
    rlhf::DecodePackScope packs;
    auto cache = model->new_cache(2, 8);
    std::vector<torch::Tensor> parts = {model->logits(model->forward(ids.narrow(1, 0, 3), {}, &cache))};
    for (int64_t i = 3; i < 8; ++i) parts.push_back(model->logits(model->forward(ids.narrow(1, i, 1), {}, &cache)));
    rlhf::set_decode_kernels(true);
    if (packed_bytes) *packed_bytes = packs.bytes();
    return torch::cat(parts, 1).clone();
  };
  RestoreDecodeIsa restore;
  const auto fp32 = decode(false);
  for (bool autocast : {true, false}) {
    CAPTURE(autocast);
    if (!autocast) model->place(torch::kCPU, torch::kBFloat16);
    rlhf::AutocastScope scope(autocast ? rlhf::Precision::bf16 : rlhf::Precision::fp32, torch::kCPU);
    int64_t packed_bytes = 0;
    const auto with = decode(true, &packed_bytes), without = decode(false);
    const float kernel_error = max_diff(with, fp32), torch_error = max_diff(without, fp32);
    MESSAGE("max |logit - fp32 logit|: kernels " << kernel_error << ", torch bf16 " << torch_error);
    CHECK(torch_error > 0);  // bf16 really ran
    CHECK(kernel_error > 0);
    CHECK(kernel_error <= 1.5 * torch_error);
    if (rlhf::detail::cpu_decode_isa() >= rlhf::DecodeIsa::avx512_bf16)
      CHECK(packed_bytes > 0);  // the bf16 kernels took the products
  }
}
