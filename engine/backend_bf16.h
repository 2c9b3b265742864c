// bf16 autocast's numerics, emulated over a float32 backend (the CPU): the reference that `vbtrain verify
// --precision bf16` holds beside PyTorch's own autocast distance to the float64 golden, and the twin a CUDA bf16
// path will be compared with. Values stay float32 in memory, rounded to bf16 (kernels/bf16.h, round to nearest
// even) wherever torch.autocast(bfloat16) keeps a bf16 tensor:
// - convolutions and linear layers: inputs and weights (and the linear bias) rounded, float32 sums, the output
//   rounded; in backward the data and weight gradients rounded (the gradient of the weights' bf16 copy, which
//   the cast back to the float32 master makes exact);
// - batch norm: statistics and arithmetic in float32 on the bf16 input, its output rounded, then the residual
//   add rounded (as `out += identity` in bf16), then ReLU; backward's data gradient rounded, the parameter
//   gradients float32;
// - pooling: max pool exact, average pool's output rounded; their gradients rounded;
// - softmax and weighted cross-entropy in float32 (autocast runs the loss there), the logits' gradient rounded
//   (the cast back to bf16);
// - AdamW, the running statistics and every parameter stay float32. Evaluation runs each convolution and its
//   batch norm apart (autocast does not fold).
#pragma once
#include <memory>

#include "engine/backend.h"

namespace vb {

// The emulation over `inner` (a float32 backend; the CPU's), which it owns. precision() is BF16.
std::unique_ptr<Backend> make_bf16_emulation(std::unique_ptr<Backend> inner);

}  // namespace vb
