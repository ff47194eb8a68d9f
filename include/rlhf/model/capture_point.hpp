#pragma once
/// @file Capture points: observers a model's layers call during their forward passes, for training-process
/// transparency (rlhf/interp/capture.hpp records per-datum gradients through them). A layer whose capture pointer
/// is set calls its observer; unset (the default), the layer pays one pointer test per forward and nothing else.

#include <torch/torch.h>

namespace rlhf {

/// An observer of a layer's forward passes: linear layers (Conv1D, LoRAConv1D), layernorms (GPT2LayerNorm) and
/// the tied output projection (GPT2Impl::logits).
class ForwardCapture {
 public:
  virtual ~ForwardCapture() = default;
  /// `x` [..., in] is the layer's input and `y` [..., out] its output, before the layer returns it; an observer
  /// may register a gradient hook on `y`. A LoRA layer passes its adapter's input (after the adapter's dropout).
  virtual void on_forward(const torch::Tensor& x, const torch::Tensor& y) = 0;
};

/// An observer of a GPT-2's embedding layer: `ids` [B, T] token ids, `position_ids` [B, T], and `y` [B, T, D] =
/// scale x wte[ids] + wpe[position_ids] (before embedding dropout), on which an observer may register a gradient
/// hook.
class EmbeddingCapture {
 public:
  virtual ~EmbeddingCapture() = default;
  virtual void on_embed(const torch::Tensor& ids, const torch::Tensor& position_ids, double scale,
                        const torch::Tensor& y) = 0;
};

/// The capture points of a GPT-2's embeddings and tied output projection: a base of GPT2TransformerImpl, so that a
/// recorder finds them by dynamic_cast whatever the model's adapter policy.
struct GPT2CapturePoints {
  virtual ~GPT2CapturePoints() = default;
  /// Observer of the embedding layer (not owned; null = none). Set and cleared by rlhf::ShiftRecorder.
  EmbeddingCapture* embedding_capture = nullptr;
  /// Observer of the tied output projection, GPT2Impl::logits (not owned; null = none): its input [..., D] and
  /// logits [..., V].
  ForwardCapture* head_capture = nullptr;
};

/// torch's LayerNorm with a capture point (the layernorms of GPT2 blocks and the final one). Behaves exactly as
/// torch::nn::LayerNormImpl; `capture` is called by rlhf::layer_norm_fp32.
class GPT2LayerNormImpl : public torch::nn::LayerNormImpl {
 public:
  using torch::nn::LayerNormImpl::LayerNormImpl;
  /// Observer of this layernorm's forwards (not owned; null = none). Set and cleared by rlhf::ShiftRecorder.
  ForwardCapture* capture = nullptr;
};

}  // namespace rlhf
