#pragma once
/// @file Statistics over the valid (masked-in) elements of a tensor: mean, variance and whitening, with the
/// conventions of TRL's `masked_mean` / `masked_var` / `masked_whiten` (trl/core.py), which PPO for language models
/// uses to average per-token losses over the response tokens and to normalise advantages.

#include <cstdint>
#include <string>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include <rlhf/detail/error.hpp>

namespace rlhf {
namespace detail::ppo_math {

/// "[2, 3]" for a shape, for error messages.
inline std::string shape_of(const torch::Tensor& t) {
  return t.defined() ? format_shape(t.sizes()) : std::string("an undefined tensor");
}

/// Throws unless `a` and `b` are defined tensors of the same shape, e.g. "masked_mean: mask has shape [2, 4], x has
/// shape [2, 3]; they must match".
inline void check_same_shape(const char* where, const char* a_name, const torch::Tensor& a, const char* b_name,
                             const torch::Tensor& b) {
  if (!a.defined() || !b.defined() || a.sizes() != b.sizes())
    fail("{}: {} has shape {}, {} has shape {}; they must match", where, b_name, shape_of(b), a_name, shape_of(a));
}

/// A floating-point view of `x`: integer and bool tensors become float32 (so `masked_mean(a > b, mask)` is a fraction).
inline torch::Tensor as_floating(const torch::Tensor& x) { return x.is_floating_point() ? x : x.to(torch::kFloat); }

/// `mask != 0` as a bool tensor, whatever the mask's dtype.
inline torch::Tensor valid_of(const torch::Tensor& mask) {
  return mask.scalar_type() == torch::kBool ? mask : mask.ne(0);
}

}  // namespace detail::ppo_math

/// Mean of `x` over the elements where `mask` is nonzero: sum(x * mask) / sum(mask), a 0-dim tensor.
///
/// `mask` has `x`'s shape and any dtype (nonzero = valid). Masked-out elements are ignored entirely (a NaN or inf there
/// does not leak into the result, nor into the gradient, which is zero for them). A bool or integer `x` is averaged as
/// float32. An all-zero mask gives NaN (0 / 0), as in TRL. Matches TRL's `masked_mean(values, mask)`.
inline torch::Tensor masked_mean(const torch::Tensor& x, const torch::Tensor& mask) {
  detail::ppo_math::check_same_shape("masked_mean", "x", x, "mask", mask);
  auto valid = detail::ppo_math::valid_of(mask);
  auto xf = detail::ppo_math::as_floating(x);
  return xf.masked_fill(valid.logical_not(), 0).sum() / valid.sum().to(xf.scalar_type());
}

/// Mean of `x` over the valid elements along dimension `dim`: sum(x * mask, dim) / sum(mask, dim). The result has
/// `x`'s shape without `dim`, e.g. [B, T] with dim = 1 gives [B]. A slice with no valid element gives NaN. Matches
/// TRL's `masked_mean(values, mask, axis=dim)`.
inline torch::Tensor masked_mean(const torch::Tensor& x, const torch::Tensor& mask, int64_t dim) {
  detail::ppo_math::check_same_shape("masked_mean", "x", x, "mask", mask);
  auto valid = detail::ppo_math::valid_of(mask);
  auto xf = detail::ppo_math::as_floating(x);
  return xf.masked_fill(valid.logical_not(), 0).sum(dim) / valid.sum(dim).to(xf.scalar_type());
}

/// Variance of `x` over the valid elements, a 0-dim tensor: masked_mean((x - masked_mean(x))^2), times the Bessel
/// correction n / (n - 1) when `unbiased` (n = number of valid elements), as TRL's `masked_var`.
///
/// Throws rlhf::Error when `unbiased` and fewer than 2 elements are valid (TRL raises only for 0 and returns inf for
/// 1); this reads the count back from the device. A biased variance of an empty mask is NaN.
inline torch::Tensor masked_var(const torch::Tensor& x, const torch::Tensor& mask, bool unbiased = true) {
  auto mean = masked_mean(x, mask);  // checks the shapes
  auto centered = detail::ppo_math::as_floating(x) - mean;
  auto var = masked_mean(centered * centered, mask);
  if (unbiased) {
    const int64_t n = detail::ppo_math::valid_of(mask).sum().item<int64_t>();
    if (n < 2)
      detail::fail(
          "masked_var: an unbiased variance needs at least 2 valid elements, the mask has {} ---> HINT: a minibatch "
          "of one short response has too few tokens; use larger minibatches or a biased variance",
          n);
    var = var * (static_cast<double>(n) / static_cast<double>(n - 1));
  }
  return var;
}

/// Whitens `x` over the valid elements: (x - mean) / sqrt(var + 1e-8) with mean = masked_mean(x, mask) and var =
/// masked_var(x, mask, unbiased = true), so the valid elements end up with mean 0 and unbiased variance ~1. With
/// `shift_mean = false` the mean is added back (only the scale changes), as TRL does when it whitens rewards.
///
/// Valid elements equal TRL's `masked_whiten`; masked-out elements are returned unchanged (TRL whitens them too, but
/// nothing downstream reads them). Throws as masked_var when fewer than 2 elements are valid.
inline torch::Tensor masked_whiten(const torch::Tensor& x, const torch::Tensor& mask, bool shift_mean = true) {
  auto mean = masked_mean(x, mask);
  auto var = masked_var(x, mask, /*unbiased=*/true);
  auto whitened = (detail::ppo_math::as_floating(x) - mean) * torch::rsqrt(var + 1e-8);
  if (!shift_mean) whitened = whitened + mean;
  return torch::where(detail::ppo_math::valid_of(mask), whitened, detail::ppo_math::as_floating(x));
}

}  // namespace rlhf
