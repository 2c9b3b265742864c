// AdamW as one fused kernel over a flat parameter range. CPU twin: vb::cpu::adamw_step (kernels/cpu/ops.h).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace vb::cuda {

// torch.optim.AdamW's order of operations in float (its foreach path): p *= 1 - lr*wd; m = lerp(m, g, 1-b1);
// v = v*b2 + (1-b2)*g*g; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps). step: 1-based, after this update.
void adamw(cudaStream_t st, int64_t n, float* p, const float* g, float* m, float* v, double lr, double beta1,
           double beta2, double eps, double weight_decay, int64_t step);

}  // namespace vb::cuda
