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
#include <rlhf/core/softmax_stats.hpp>
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

/// Calls fn(s, n) for consecutive row chunks [s, s + n) of `rows` [N, V], each of about kChunkElements elements.
template <class Fn>
void for_each_chunk(const torch::Tensor& rows, Fn&& fn) {
  const int64_t N = rows.size(0), step = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(rows.size(1), 1));
  for (int64_t s = 0; s < N; s += step) fn(s, std::min(step, N - s));
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
  std::vector<torch::Tensor> lp, ent;
  for_each_chunk(rows, [&](int64_t s, int64_t n) {
    auto [l, e] = row_stats(rows.narrow(0, s, n).to(dtype), want_logprobs ? ids.narrow(0, s, n) : ids, want_logprobs,
                            want_entropy);
    if (want_logprobs) lp.push_back(l);
    if (want_entropy) ent.push_back(e);
  });
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

/// The softmax statistics of rows s .. s + n - 1 of logits / temperature (and of the reference logits when they
/// are not empty), in the stats dtype: log p, p, and log p and log q set to 0 where p = 0 (so that the p log p
/// terms of masked entries are 0 and their gradients finite).
struct FusedChunk {
  torch::Tensor logp, p, logp_finite, ref_logp, ref_logp_finite;  // [n, V] each
};

inline FusedChunk fused_chunk(const torch::Tensor& logits, const torch::Tensor& ref_logits, int64_t s, int64_t n,
                              double temperature) {
  const auto dtype = stats_dtype(logits.scalar_type());
  auto log_softmax = [&](const torch::Tensor& x) {
    auto z = x.narrow(0, s, n).to(dtype);
    if (temperature != 1.0) z = z / temperature;
    return torch::log_softmax(z, -1);
  };
  FusedChunk c;
  c.logp = log_softmax(logits);
  c.p = c.logp.exp();
  auto zero = c.p.eq(0);
  c.logp_finite = c.logp.masked_fill(zero, 0);
  if (ref_logits.numel() > 0) {
    c.ref_logp = log_softmax(ref_logits);
    c.ref_logp_finite = c.ref_logp.masked_fill(zero, 0);
  }
  return c;
}

/// The per-row statistics of policy_token_stats, [N] each in the stats dtype, of logits [N, V] / temperature and
/// reference logits (an empty tensor for none; the KL is then 0 and `ref_logprob` undefined), tokens [N] int64 in
/// range: fp32 and bf16 logits on a CPU with AVX-512 take the kernels of core/softmax_stats.hpp (which also give the
/// two log-sum-exps per row), others a row-chunk loop of torch's operators (`lse` and `ref_lse` left undefined).
inline SoftmaxRowStats token_stats_rows(const torch::Tensor& logits, const torch::Tensor& tokens,
                                        const torch::Tensor& ref_logits, double temperature) {
  const bool with_ref = ref_logits.numel() > 0;
  if (softmax_stats_kernels_apply(logits, ref_logits)) {
    auto st = softmax_stats_forward(logits, tokens, ref_logits, temperature);
    if (with_ref)  // log q(token) = zr[token] - logsumexp(zr)
      st.ref_logprob = ref_logits.gather(1, tokens.to(torch::kLong).unsqueeze(1)).squeeze(1).to(torch::kFloat)
                           .div_(temperature)
                           .sub_(st.ref_lse);
    return st;
  }
  const int64_t N = logits.size(0);
  auto opts = logits.options().dtype(stats_dtype(logits.scalar_type()));
  SoftmaxRowStats st{torch::empty({N}, opts), torch::empty({N}, opts), torch::zeros({N}, opts), {}, {}, {}};
  if (with_ref) st.ref_logprob = torch::empty({N}, opts);
  for_each_chunk(logits, [&](int64_t s, int64_t n) {
    auto c = fused_chunk(logits, ref_logits, s, n, temperature);
    auto picked = tokens.narrow(0, s, n).unsqueeze(-1);
    st.logprob.narrow(0, s, n).copy_(c.logp.gather(-1, picked).squeeze(-1));
    st.entropy.narrow(0, s, n).copy_(-(c.p * c.logp_finite).sum(-1));
    if (!with_ref) return;
    st.kl.narrow(0, s, n).copy_((c.p * (c.logp_finite - c.ref_logp_finite)).sum(-1));
    st.ref_logprob.narrow(0, s, n).copy_(c.ref_logp.gather(-1, picked).squeeze(-1));
  });
  return st;
}

/// The outputs of the statistics nodes: log p(token), entropy and KL (differentiable), and log q(token) (not
/// differentiable; an empty tensor without reference logits).
inline torch::autograd::variable_list stats_outputs(torch::autograd::AutogradContext* ctx, SoftmaxRowStats& st) {
  auto ref_logprob = st.ref_logprob.defined() ? st.ref_logprob : torch::empty({0}, st.logprob.options());
  ctx->mark_non_differentiable({ref_logprob});
  return {st.logprob, st.entropy, st.kl, ref_logprob};
}

/// The gradient [N, V] (the logits' dtype), written into `out` (which may be `logits` itself: each row chunk is read
/// before it is written), of sum g_lp log p(token) + g_ent entropy + g_kl KL with respect to the logits, from
/// token_stats_rows' `stats` of the same operands; g_* are [N] (undefined: no gradient, counted as 0). In closed
/// form, dL/dz = p (-g_lp - g_H (log p + H) + g_KL (log p - log q - KL)) + g_lp onehot(token), z = logits / T.
inline torch::Tensor token_stats_grad(const torch::Tensor& logits, const torch::Tensor& tokens,
                                      const torch::Tensor& ref_logits, double temperature,
                                      const torch::autograd::variable_list& grads, const SoftmaxRowStats& stats,
                                      torch::Tensor out) {
  auto opts = logits.options().dtype(stats_dtype(logits.scalar_type()));
  auto column = [&](const torch::Tensor& g) {  // [N, 1]; an output without gradient counts as 0
    return (g.defined() ? g.to(opts.dtype()) : torch::zeros({logits.size(0)}, opts)).unsqueeze(-1);
  };
  auto g_lp = column(grads[0]), g_ent = column(grads[1]), g_kl = column(grads[2]);
  if (stats.lse.defined())  // token_stats_rows ran the kernels
    return softmax_stats_backward(logits, tokens, ref_logits, temperature, g_lp.squeeze(-1), g_ent.squeeze(-1),
                                  g_kl.squeeze(-1), stats, out);
  const bool with_ref = ref_logits.numel() > 0;
  for_each_chunk(logits, [&](int64_t s, int64_t n) {
    auto c = fused_chunk(logits, ref_logits, s, n, temperature);
    auto lp_g = g_lp.narrow(0, s, n);
    auto coef = (c.logp_finite + stats.entropy.narrow(0, s, n).unsqueeze(-1))
                    .mul_(g_ent.narrow(0, s, n))
                    .neg_()
                    .sub_(lp_g);
    if (with_ref)
      coef.add_((c.logp_finite - c.ref_logp_finite)
                    .sub_(stats.kl.narrow(0, s, n).unsqueeze(-1))
                    .mul_(g_kl.narrow(0, s, n)));
    auto g = c.p.mul_(coef).scatter_add_(-1, tokens.narrow(0, s, n).unsqueeze(-1), lp_g);
    out.narrow(0, s, n).copy_(temperature == 1.0 ? g : g.div_(temperature));
  });
  return out;
}

/// policy_token_stats' autograd node: the forward pass keeps only the logits and per-row statistics; the backward
/// pass writes the logits' gradient in closed form (token_stats_grad).
struct FusedStatsFunction : public torch::autograd::Function<FusedStatsFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, torch::Tensor logits,
                                                torch::Tensor tokens, torch::Tensor ref_logits, double temperature) {
    ctx->saved_data["temperature"] = temperature;
    auto st = token_stats_rows(logits, tokens, ref_logits, temperature);
    ctx->save_for_backward({logits, tokens, ref_logits, st.entropy, st.kl, st.lse, st.ref_lse});
    return stats_outputs(ctx, st);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (torch::GradMode::is_enabled())
      fail("policy_token_stats: double backward (create_graph = true) is not supported");
    auto saved = ctx->get_saved_variables();
    const auto& logits = saved[0];
    const SoftmaxRowStats stats{{}, saved[3], saved[4], saved[5], saved[6]};
    return {token_stats_grad(logits, saved[1], saved[2], ctx->saved_data["temperature"].toDouble(), grads, stats,
                             torch::empty_like(logits)),
            torch::Tensor(), torch::Tensor(), torch::Tensor()};
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

/// The statistics of a PPO minibatch's next-token distributions, [...] each.
struct PolicyTokenStats {
  torch::Tensor logprobs;  ///< log p(token), p = softmax(logits / temperature)
  torch::Tensor entropy;   ///< -sum_v p_v log p_v
  torch::Tensor kl;        ///< KL(p || q) = sum_v p_v (log p_v - log q_v), q = softmax(ref_logits / temperature);
                           ///< zeros without reference logits
  torch::Tensor ref_logprobs;  ///< log q(token), not differentiable; undefined without reference logits
};

/// log p(token), the entropy of p and KL(p || q) per row of logits [..., V] (p = softmax(logits / temperature), q
/// the same of `ref_logits`, optional) in one pass per row chunk, in float32 (double stays double). Differentiable
/// with respect to `logits` (not `ref_logits`): under autograd the node keeps the logits and three numbers per row
/// and writes the logits' gradient in closed form in the backward pass, so none of the [..., V] log-softmax,
/// probabilities or their products exist beyond one chunk. Values and gradients equal gather_logprobs,
/// entropy_from_logits and full_kl of logits / temperature. With reference logits also log q(token)
/// (`ref_logprobs`, no gradient), which the same pass over q gives. Entries with p = 0 (logit -inf) count as 0.
/// Throws for mismatched shapes, a token id outside [0, V) or a non-positive temperature; no double backward.
inline PolicyTokenStats policy_token_stats(const torch::Tensor& logits, const torch::Tensor& tokens,
                                           double temperature = 1.0, const torch::Tensor& ref_logits = {}) {
  if (!logits.defined() || logits.dim() < 1)
    detail::fail("policy_token_stats: logits must be [..., V], got {}", detail::ppo_math::shape_of(logits));
  const auto lead = logits.sizes().slice(0, logits.dim() - 1).vec();
  if (!tokens.defined() || tokens.sizes() != logits.sizes().slice(0, logits.dim() - 1))
    detail::fail("policy_token_stats: tokens must be [{}] (logits without the vocabulary dimension), got {}",
                 fmt::join(lead, ", "), detail::ppo_math::shape_of(tokens));
  if (ref_logits.defined() && ref_logits.sizes() != logits.sizes())
    detail::fail("policy_token_stats: ref_logits must have the shape of logits {}, got {}",
                 detail::ppo_math::shape_of(logits), detail::ppo_math::shape_of(ref_logits));
  if (!(temperature > 0.0) || !std::isfinite(temperature))
    detail::fail("policy_token_stats: temperature must be positive and finite, got {}", temperature);
  detail::ppo_math::check_token_dtype("policy_token_stats", tokens);
  const int64_t V = logits.size(-1);
  detail::ppo_math::check_token_range("policy_token_stats", tokens, V);
  auto rows = logits.reshape({-1, V});
  auto ref = ref_logits.defined() ? ref_logits.detach().reshape({-1, V}) : torch::empty({0}, logits.options());
  auto out = detail::ppo_math::FusedStatsFunction::apply(rows, tokens.reshape({-1}).to(torch::kLong), ref,
                                                         temperature);
  return {out[0].view(lead), out[1].view(lead), out[2].view(lead),
          ref_logits.defined() ? out[3].view(lead) : torch::Tensor()};
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
