#pragma once
/// @file Preallocated key/value cache for incremental decoding.

#include <cstdint>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <rlhf/detail/error.hpp>

namespace rlhf {

/// Keys and values of every layer for the positions decoded so far, in buffers allocated once for `capacity`
/// positions, so a decoding step writes one slice per layer instead of concatenating (and reallocating) the cache.
class KVCache {
 public:
  /// Buffers of shape [batch, n_head, capacity, d_head] per layer for keys and for values.
  KVCache(int64_t n_layer, int64_t batch, int64_t n_head, int64_t capacity, int64_t d_head,
          torch::TensorOptions options)
      : capacity_(capacity), dtype_(options.dtype().toScalarType()) {
    keys_.reserve(n_layer);
    values_.reserve(n_layer);
    for (int64_t i = 0; i < n_layer; ++i) {
      keys_.push_back(torch::empty({batch, n_head, capacity, d_head}, options));
      values_.push_back(torch::empty({batch, n_head, capacity, d_head}, options));
    }
  }

  /// Positions already in the cache.
  int64_t length() const { return length_; }
  /// Positions the buffers can hold.
  int64_t capacity() const { return capacity_; }
  /// The dtype the keys and values are held in.
  torch::ScalarType dtype() const { return dtype_; }
  /// Rows (sequences) in the cache.
  int64_t batch_size() const { return keys_.empty() ? 0 : keys_.front().size(0); }

  /// Writes the keys and values of `t` new positions of `layer` (k, v: [B, H, t, Dh]) after the cached ones and
  /// returns views of all positions so far ([B, H, length + t, Dh]). Call `advance(t)` once all layers are done.
  std::pair<torch::Tensor, torch::Tensor> append(int64_t layer, const torch::Tensor& k, const torch::Tensor& v) {
    const int64_t t = k.size(2);
    if (length_ + t > capacity_)
      detail::fail("KVCache: {} cached + {} new positions exceed the capacity of {}", length_, t, capacity_);
    keys_[layer].narrow(2, length_, t).copy_(k);
    values_[layer].narrow(2, length_, t).copy_(v);
    return {keys_[layer].narrow(2, 0, length_ + t), values_[layer].narrow(2, 0, length_ + t)};
  }

  /// Marks `t` more positions as cached (after every layer appended them).
  void advance(int64_t t) { length_ += t; }

  /// Forgets the cached positions (the buffers are kept for reuse).
  void clear() { length_ = 0; }

 private:
  std::vector<torch::Tensor> keys_;    // per layer [B, H, capacity, Dh]
  std::vector<torch::Tensor> values_;  // per layer [B, H, capacity, Dh]
  int64_t capacity_;
  torch::ScalarType dtype_;
  int64_t length_ = 0;
};

}  // namespace rlhf
