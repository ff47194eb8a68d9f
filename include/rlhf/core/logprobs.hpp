#pragma once
/// @file Per-token log-probabilities and entropies from logits, computed in float32 row chunk by row chunk, and
/// from hidden states through an output projection without ever holding the [B, T, V] float32 logits at once
/// (under autograd too: the chunks are recomputed in the backward pass, as gradient checkpointing does).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <rlhf/core/masked.hpp>
#include <rlhf/detail/error.hpp>

namespace rlhf {
namespace detail::ppo_math {

/// Elements of one row chunk of logits in float32 (16 MiB) for the chunked log-probability and entropy loops.
inline constexpr int64_t kChunkElements = int64_t{1} << 22;

/// The dtype of the softmax statistics: double stays double, everything else is computed in float32.
inline torch::ScalarType stats_dtype(torch::ScalarType t) { return t == torch::kDouble ? torch::kDouble : torch::kFloat; }

/// Throws unless `tokens` holds integers.
inline void check_token_dtype(const char* where, const torch::Tensor& tokens) {
  if (tokens.is_floating_point() || tokens.is_complex() || tokens.scalar_type() == torch::kBool)
    fail("{}: tokens must be an integer tensor, got {}", where, std::string(c10::toString(tokens.scalar_type())));
}

/// Throws unless every token id lies in [0, V) (reads one flag back from the device; a bad id on a GPU would otherwise
/// end in a device-side assert that kills the context).
inline void check_token_range(const char* where, const torch::Tensor& tokens, int64_t vocab) {
  if (tokens.numel() == 0) return;
  auto bad = tokens.lt(0).logical_or(tokens.ge(vocab));
  if (bad.any().item<bool>())
    fail("{}: token ids must lie in [0, {}) (the vocabulary of the logits), found {}", where, vocab,
         tokens.masked_select(bad).flatten()[0].item<int64_t>());
}

/// log softmax(logits)[token] and the entropy of softmax(logits), for rows of logits [n, V] already in the stats dtype
/// and tokens [n] (int64). Either part can be skipped. The entropy is logsumexp(x) - sum_v p_v x_v, with the terms of
/// zero probability (-inf logits included) counted as 0 so that masked vocabularies give finite values and gradients.
inline std::pair<torch::Tensor, torch::Tensor> row_stats(const torch::Tensor& logits, const torch::Tensor& tokens,
                                                         bool want_logprobs, bool want_entropy) {
  auto lse = logits.logsumexp(-1);  // [n]
  torch::Tensor logprobs, entropy;
  if (want_logprobs) logprobs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse;  // [n]
  if (want_entropy) {
    auto p = torch::softmax(logits, -1);                                // [n, V]
    auto finite = logits.masked_fill(p.eq(0), 0);                       // [n, V] p * x -> 0 where p = 0
    entropy = lse - (p * finite).sum(-1);                               // [n]
  }
  return {logprobs, entropy};
}

/// Applies row_stats to logits [..., V] in chunks of rows converted to the stats dtype, so that neither a float32
/// copy of reduced-precision logits nor the softmax temporaries exist for all rows at once. Returns [...] tensors.
inline std::pair<torch::Tensor, torch::Tensor> chunked_logit_stats(const torch::Tensor& logits,
                                                                   const torch::Tensor& tokens, bool want_logprobs,
                                                                   bool want_entropy) {
  const int64_t V = logits.size(-1);
  auto lead = logits.sizes().slice(0, logits.dim() - 1).vec();  // [...]
  auto rows = logits.reshape({-1, V});                          // [N, V]
  auto ids = want_logprobs ? tokens.reshape({-1}).to(torch::kLong) : torch::Tensor();  // [N]
  const int64_t N = rows.size(0);
  const auto dtype = stats_dtype(logits.scalar_type());
  if (N == 0) {
    auto empty = torch::zeros(lead, logits.options().dtype(dtype));
    return {want_logprobs ? empty : torch::Tensor(), want_entropy ? empty : torch::Tensor()};
  }
  const int64_t step = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(V, 1));
  std::vector<torch::Tensor> lp, ent;
  for (int64_t s = 0; s < N; s += step) {
    const int64_t n = std::min(step, N - s);
    auto [l, e] = row_stats(rows.narrow(0, s, n).to(dtype), want_logprobs ? ids.narrow(0, s, n) : ids, want_logprobs,
                            want_entropy);
    if (want_logprobs) lp.push_back(l);
    if (want_entropy) ent.push_back(e);
  }
  return {want_logprobs ? torch::cat(lp).reshape(lead) : torch::Tensor(),
          want_entropy ? torch::cat(ent).reshape(lead) : torch::Tensor()};
}

/// The projection of token_stats_chunked, held by its autograd node until the backward pass.
struct ProjectionHolder : torch::CustomClassHolder {
  explicit ProjectionHolder(std::function<torch::Tensor(const torch::Tensor&)> f) : fn(std::move(f)) {}
  std::function<torch::Tensor(const torch::Tensor&)> fn;
};

/// Logits of rows [s, s + n) of hidden through the projection, checked to be [n, V], in the stats dtype, divided by
/// the temperature.
inline torch::Tensor project_rows(const ProjectionHolder& project, const torch::Tensor& hidden_rows, int64_t vocab,
                                  double temperature) {
  auto logits = project.fn(hidden_rows);  // [n, V]
  if (!logits.defined() || logits.dim() != 2 || logits.size(0) != hidden_rows.size(0) ||
      (vocab >= 0 && logits.size(1) != vocab))
    fail("token_stats_chunked: project must map [n, D] to [n, V]; for {} rows it returned {}{}", hidden_rows.size(0),
         shape_of(logits), vocab >= 0 ? fmt::format(" (V = {} before)", vocab) : std::string());
  logits = logits.to(stats_dtype(logits.scalar_type()));
  return temperature == 1.0 ? logits : logits / temperature;
}

/// token_stats_chunked under autograd: the forward pass keeps only hidden and the tokens; the backward pass
/// recomputes each chunk's logits with gradients enabled and back-propagates through them one chunk at a time
/// (reentrant gradient checkpointing). The second input, a one-row probe of the projection, ties the node into the
/// graph when only the projection's parameters require gradients; it receives no gradient.
struct TokenStatsFunction : public torch::autograd::Function<TokenStatsFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, torch::Tensor hidden,
                                                torch::Tensor probe, torch::Tensor tokens,
                                                c10::intrusive_ptr<ProjectionHolder> project, double temperature,
                                                int64_t chunk_rows, int64_t vocab) {
    const int64_t N = hidden.size(0);
    std::vector<torch::Tensor> lp, ent;
    for (int64_t s = 0; s < N; s += chunk_rows) {
      const int64_t n = std::min(chunk_rows, N - s);
      auto [l, e] = row_stats(project_rows(*project, hidden.narrow(0, s, n), vocab, temperature),
                              tokens.narrow(0, s, n), true, true);
      lp.push_back(l);
      ent.push_back(e);
    }
    ctx->save_for_backward({hidden, tokens});
    ctx->saved_data["project"] = c10::IValue::make_capsule(std::move(project));
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["chunk_rows"] = chunk_rows;
    ctx->saved_data["vocab"] = vocab;
    return {torch::cat(lp), torch::cat(ent)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (torch::GradMode::is_enabled())
      fail("token_stats_chunked: double backward (create_graph = true) is not supported");
    auto saved = ctx->get_saved_variables();
    const auto& hidden = saved[0];  // [N, D]
    const auto& tokens = saved[1];  // [N]
    auto capsule = ctx->saved_data["project"].toCapsule();
    const auto& project = *static_cast<ProjectionHolder*>(capsule.get());
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const int64_t chunk_rows = ctx->saved_data["chunk_rows"].toInt();
    const int64_t vocab = ctx->saved_data["vocab"].toInt();
    const auto& grad_logprobs = grads[0];  // [N]
    const auto& grad_entropy = grads[1];   // [N]

    const bool to_hidden = ctx->needs_input_grad(0);
    torch::Tensor grad_hidden = to_hidden ? torch::zeros_like(hidden) : torch::Tensor();  // [N, D]
    const int64_t N = hidden.size(0);
    torch::AutoGradMode enable_grad(true);
    for (int64_t s = 0; s < N; s += chunk_rows) {
      const int64_t n = std::min(chunk_rows, N - s);
      auto h = hidden.narrow(0, s, n).detach().requires_grad_(to_hidden);  // [n, D] a leaf of the recomputed graph
      auto [l, e] = row_stats(project_rows(project, h, vocab, temperature), tokens.narrow(0, s, n), true, true);
      if (!l.requires_grad()) continue;
      // Accumulates into the .grad of the projection's parameters and of h.
      torch::autograd::backward({l, e}, {grad_logprobs.narrow(0, s, n), grad_entropy.narrow(0, s, n)});
      if (to_hidden && h.grad().defined()) grad_hidden.narrow(0, s, n).copy_(h.grad());
    }
    // One slot per argument of forward: hidden, probe (no gradient), tokens, and the four non-tensor settings.
    return {grad_hidden, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(),
            torch::Tensor()};
  }
};

}  // namespace detail::ppo_math

/// log softmax(logits)[tokens]: the log-probability of each token, [...] from logits [..., V] and tokens [...]
/// (typically [B, T, V] and [B, T]).
///
/// Computed as the gathered logit minus logsumexp over the vocabulary, in float32 (double stays double), row chunk by
/// row chunk, so no log_softmax copy of the logits is made and reduced-precision logits are converted to float32 one
/// chunk at a time. Differentiable with respect to the logits. Throws when the shapes disagree or a token id lies
/// outside [0, V). Align the logits with the tokens first: the logits at position t predict token t + 1.
inline torch::Tensor gather_logprobs(const torch::Tensor& logits, const torch::Tensor& tokens) {
  if (!logits.defined() || logits.dim() < 1)
    detail::fail("gather_logprobs: logits must be [..., V], got {}", detail::ppo_math::shape_of(logits));
  if (!tokens.defined() || tokens.sizes() != logits.sizes().slice(0, logits.dim() - 1))
    detail::fail("gather_logprobs: tokens must have the shape of logits without the vocabulary dimension, {}; got {}",
                 fmt::format("[{}]", fmt::join(logits.sizes().slice(0, logits.dim() - 1), ", ")),
                 detail::ppo_math::shape_of(tokens));
  detail::ppo_math::check_token_dtype("gather_logprobs", tokens);
  detail::ppo_math::check_token_range("gather_logprobs", tokens, logits.size(-1));
  return detail::ppo_math::chunked_logit_stats(logits, tokens, true, false).first;
}

/// Entropy of softmax(logits) over the last dimension, -sum_v p_v log p_v: [...] from logits [..., V], in float32
/// (double stays double), row chunk by row chunk. Vocabulary entries with logit -inf (masked by top-k / top-p) count as
/// 0 and keep values and gradients finite. Differentiable. Matches TRL's `entropy_from_logits`.
inline torch::Tensor entropy_from_logits(const torch::Tensor& logits) {
  if (!logits.defined() || logits.dim() < 1)
    detail::fail("entropy_from_logits: logits must be [..., V], got {}", detail::ppo_math::shape_of(logits));
  return detail::ppo_math::chunked_logit_stats(logits, torch::Tensor(), false, true).second;
}

/// Log-probabilities of the tokens and entropies of the next-token distributions, [N] each.
struct TokenStats {
  torch::Tensor logprobs;  // [N] log softmax(project(hidden) / temperature)[token]
  torch::Tensor entropy;   // [N] entropy of softmax(project(hidden) / temperature)
};

/// Log-probabilities and entropies from hidden states `hidden` [N, D] (N = B * T rows, already aligned with `tokens`
/// [N]) and an output projection `project` ([n, D] -> [n, V], e.g. the final layer norm and the unembedding), chunk
/// of `chunk_rows` rows by chunk, at the given sampling temperature (logits / temperature, in float32).
///
/// Only [chunk_rows, V] logits exist at any time, also under autograd: the backward pass recomputes each chunk and
/// back-propagates through it before the next (gradient checkpointing), so the result has the values and gradients
/// of the unchunked computation (gather_logprobs / entropy_from_logits of project(hidden) / temperature) at the cost
/// of a second projection. Gradients flow to `hidden` and to whatever `project` uses. Requirements, as for reentrant
/// checkpointing: `project` must be deterministic (no dropout) and stay callable until the backward pass (it is
/// copied); its parameters' gradients are accumulated into their `.grad` during `loss.backward()`, so use
/// `backward()`, not `torch::autograd::grad`, for them; parameters that are not leaves must not have their graph
/// freed before this node's backward; double backward is not supported. Throws for bad shapes, a token id outside
/// [0, V), a non-positive temperature or chunk_rows < 1.
inline TokenStats token_stats_chunked(const torch::Tensor& hidden,
                                      const std::function<torch::Tensor(const torch::Tensor&)>& project,
                                      const torch::Tensor& tokens, double temperature, int64_t chunk_rows) {
  if (!hidden.defined() || hidden.dim() != 2)
    detail::fail("token_stats_chunked: hidden must be [N, D], got {}", detail::ppo_math::shape_of(hidden));
  if (!tokens.defined() || tokens.dim() != 1 || tokens.size(0) != hidden.size(0))
    detail::fail("token_stats_chunked: tokens must be [N] = [{}], got {}", hidden.size(0),
                 detail::ppo_math::shape_of(tokens));
  detail::ppo_math::check_token_dtype("token_stats_chunked", tokens);
  if (!(temperature > 0.0) || !std::isfinite(temperature))
    detail::fail("token_stats_chunked: temperature must be positive and finite, got {}", temperature);
  if (chunk_rows < 1) detail::fail("token_stats_chunked: chunk_rows must be at least 1, got {}", chunk_rows);
  if (!project) detail::fail("token_stats_chunked: project is empty");

  const int64_t N = hidden.size(0);
  const auto dtype = detail::ppo_math::stats_dtype(hidden.scalar_type());
  if (N == 0) {
    auto empty = torch::zeros({0}, hidden.options().dtype(dtype));
    return {empty, empty.clone()};
  }
  auto holder = c10::make_intrusive<detail::ppo_math::ProjectionHolder>(project);
  auto ids = tokens.to(torch::kLong);  // [N]

  // One row through the projection: gives V, checks the output shape, and tells whether the projection has
  // parameters that require gradients.
  auto probe = holder->fn(hidden.narrow(0, 0, 1));  // [1, V]
  if (!probe.defined() || probe.dim() != 2 || probe.size(0) != 1)
    detail::fail("token_stats_chunked: project must map [n, D] to [n, V]; for 1 row it returned {}",
                 detail::ppo_math::shape_of(probe));
  const int64_t vocab = probe.size(1);
  detail::ppo_math::check_token_range("token_stats_chunked", ids, vocab);

  if (torch::GradMode::is_enabled() && (hidden.requires_grad() || probe.requires_grad())) {
    auto out = detail::ppo_math::TokenStatsFunction::apply(hidden, probe, ids, holder, temperature, chunk_rows, vocab);
    return {out[0], out[1]};
  }
  std::vector<torch::Tensor> lp, ent;
  for (int64_t s = 0; s < N; s += chunk_rows) {
    const int64_t n = std::min(chunk_rows, N - s);
    auto [l, e] = detail::ppo_math::row_stats(
        detail::ppo_math::project_rows(*holder, hidden.narrow(0, s, n), vocab, temperature), ids.narrow(0, s, n),
        true, true);
    lp.push_back(l);
    ent.push_back(e);
  }
  return {torch::cat(lp), torch::cat(ent)};
}

}  // namespace rlhf
