#pragma once
/// @file The default adapter policy: plain linear layers, no adapters.

#include <rlhf/model/conv1d.hpp>

namespace rlhf {

/// Adapter policy of a model whose linear layers are the plain GPT-2 Conv1D layers (full fine-tuning).
/// An adapter policy provides `Linear` (a LibTorch module holder built as `Linear(in, out, init_std)`, whose
/// forward maps [..., in] to [..., out]).
struct NoAdapter {
  using Linear = Conv1D;  ///< the layer type every adapted projection uses
};

}  // namespace rlhf
