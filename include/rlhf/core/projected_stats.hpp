#pragma once
/// @file PPO's per-token statistics (log p(token), entropy, KL to the reference) straight from final hidden states
/// through the tied output projection, as one autograd node that owns the logits it makes: its backward pass turns
/// them into their own gradient in place and multiplies that into the gradients of the hidden states and of the
/// projection, so the [N, V] gradient never exists beside the logits, and reduced-precision logits (bf16 under
/// autocast) are kept as they come out of the product instead of as an fp32 copy.

#include <cmath>
#include <cstdint>
#include <string>

#include <torch/torch.h>

#include <rlhf/core/gemm.hpp>
#include <rlhf/core/logprobs.hpp>
#include <rlhf/detail/error.hpp>

namespace rlhf {
namespace detail::ppo_math {

/// projected_token_stats' autograd node. Inputs: rows [N, D] (in the weight's dtype, contiguous), the projection
/// weight [V, D], tokens [N] int64, the reference's rows [N, D] and weight (empty tensors for none; never
/// differentiated) and the temperature. The forward pass (grad mode off, as in every custom node's forward) makes
/// the logits and the reference's with linear_mm_nt, as GPT2Impl::logits() does (bf16 under bf16 autocast), and keeps
/// them, the rows (in the product's dtype) and the per-row statistics; the backward pass overwrites the
/// logits with their gradient (token_stats_grad) and multiplies it into dL/drows and dL/dweight (mm_nt_grads).
struct ProjectedStatsFunction : public torch::autograd::Function<ProjectedStatsFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, torch::Tensor rows,
                                                torch::Tensor weight, torch::Tensor tokens, torch::Tensor ref_rows,
                                                torch::Tensor ref_weight, double temperature) {
    auto logits = linear_mm_nt(rows, weight);  // [N, V]
    auto ref = ref_rows.numel() > 0 ? linear_mm_nt(ref_rows, ref_weight) : torch::empty({0}, logits.options());
    auto st = token_stats_rows(logits, tokens, ref, temperature);
    const bool reduced = logits.scalar_type() != stats_dtype(logits.scalar_type());
    ctx->save_for_backward({reduced ? rows.to(logits.scalar_type()) : rows, weight, tokens, ref, st.entropy, st.kl,
                            st.lse, st.ref_lse});
    // Not a saved variable: the node owns the logits and may overwrite them (its backward runs once).
    ctx->saved_data["logits"] = logits;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["rows_dtype"] = static_cast<int64_t>(rows.scalar_type());
    return stats_outputs(ctx, st);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (torch::GradMode::is_enabled())
      fail("projected_token_stats: double backward (create_graph = true) is not supported");
    auto held = ctx->saved_data.find("logits");
    if (held == ctx->saved_data.end())
      fail("projected_token_stats: a second backward pass through the same statistics (retain_graph = true) is not "
           "supported: the first one turned the kept logits into their gradient");
    auto logits = held->second.toTensor();
    ctx->saved_data.erase("logits");
    auto saved = ctx->get_saved_variables();
    const auto &rows = saved[0], &weight = saved[1];
    const SoftmaxRowStats stats{{}, saved[4], saved[5], saved[6], saved[7]};
    auto grad = token_stats_grad(logits, saved[2], saved[3], ctx->saved_data["temperature"].toDouble(), grads, stats,
                                 logits);  // [N, V], in place
    const bool reduced = logits.scalar_type() != stats_dtype(logits.scalar_type());
    const auto rows_dtype = static_cast<torch::ScalarType>(ctx->saved_data["rows_dtype"].toInt());
    auto [d_rows, d_weight] =
        mm_nt_grads(grad, rows, weight, rows_dtype, reduced, ctx->needs_input_grad(0), ctx->needs_input_grad(1));
    return {d_rows, d_weight, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace detail::ppo_math

/// policy_token_stats of the logits `hidden` x `weight`^T, computed from the final hidden states `hidden` [..., D]
/// and the tied output projection `weight` [V, D] (GPT-2's wte; GPT2Impl::fusable_output_weight()) in one autograd
/// node: log p(token), the entropy of p and KL(p || q), [...] each (fp32; double stays double), p =
/// softmax(hidden weight^T / temperature), q the same of `ref_hidden` [..., D] through `ref_weight` [V, D] (both
/// optional and never differentiated; with them also log q(token), `ref_logprobs`, without gradient). The product
/// runs as GPT2Impl::logits() runs it (bf16 under bf16 autocast).
///
/// Same values and gradients (to `hidden` and `weight`) as policy_token_stats(logits(hidden), ...), with less memory
/// at the backward pass: the node keeps the logits (and the reference's) in the product's dtype and turns them into
/// their own gradient in place, so no fp32 copy of bf16 logits and no separate [..., V] gradient exist. Throws for
/// mismatched shapes, a token id outside [0, V) or a non-positive temperature; neither double backward nor a second
/// backward pass through the same result (retain_graph) is supported.
inline PolicyTokenStats projected_token_stats(const torch::Tensor& hidden, const torch::Tensor& weight,
                                              const torch::Tensor& tokens, double temperature = 1.0,
                                              const torch::Tensor& ref_hidden = {},
                                              const torch::Tensor& ref_weight = {}) {
  using detail::ppo_math::shape_of;
  if (!weight.defined() || weight.dim() != 2)
    detail::fail("projected_token_stats: weight must be [V, D], got {}", shape_of(weight));
  const int64_t V = weight.size(0), D = weight.size(1);
  if (!hidden.defined() || hidden.dim() < 1 || hidden.size(-1) != D)
    detail::fail("projected_token_stats: hidden must be [..., {}] (D of weight {}), got {}", D, shape_of(weight),
                 shape_of(hidden));
  const auto lead = hidden.sizes().slice(0, hidden.dim() - 1).vec();
  if (!tokens.defined() || tokens.sizes() != hidden.sizes().slice(0, hidden.dim() - 1))
    detail::fail("projected_token_stats: tokens must be [{}] (hidden without its last dimension), got {}",
                 fmt::join(lead, ", "), shape_of(tokens));
  if (ref_hidden.defined() && ref_hidden.sizes() != hidden.sizes())
    detail::fail("projected_token_stats: ref_hidden must have the shape of hidden {}, got {}", shape_of(hidden),
                 shape_of(ref_hidden));
  if (ref_weight.defined() && !ref_hidden.defined())
    detail::fail("projected_token_stats: ref_weight was given without ref_hidden (the reference's hidden states)");
  if (ref_hidden.defined() && (!ref_weight.defined() || ref_weight.sizes() != weight.sizes()))
    detail::fail("projected_token_stats: ref_weight must have the shape of weight {} when ref_hidden is given, got {}",
                 shape_of(weight), shape_of(ref_weight));
  if (!(temperature > 0.0) || !std::isfinite(temperature))
    detail::fail("projected_token_stats: temperature must be positive and finite, got {}", temperature);
  detail::ppo_math::check_token_dtype("projected_token_stats", tokens);
  detail::ppo_math::check_token_range("projected_token_stats", tokens, V);
  auto as_rows = [&](const torch::Tensor& h, const torch::Tensor& w) {  // [N, D] in the weight's dtype
    return h.reshape({-1, D}).to(w.scalar_type()).contiguous();
  };
  auto ref_rows = ref_hidden.defined() ? as_rows(ref_hidden.detach(), ref_weight) : torch::empty({0}, hidden.options());
  auto out = detail::ppo_math::ProjectedStatsFunction::apply(
      as_rows(hidden, weight), weight, tokens.reshape({-1}).to(torch::kLong), ref_rows,
      ref_hidden.defined() ? ref_weight.detach() : torch::empty({0}, weight.options()), temperature);
  return {out[0].view(lead), out[1].view(lead), out[2].view(lead),
          ref_hidden.defined() ? out[3].view(lead) : torch::Tensor()};
}

}  // namespace rlhf
