// AdamW as one fused kernel over a flat parameter range. CPU twin: vb::cpu::adamw_step (kernels/cpu/ops.h).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace vb::cuda {

// torch.optim.AdamW's order of operations in float (its foreach path): p *= 1 - lr*wd; m = lerp(m, g, 1-b1);
// v = v*b2 + (1-b2)*g*g; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps). step: 1-based, after this update.
void adamw(cudaStream_t st, int64_t n, float* p, const float* g, float* m, float* v, double lr, double beta1,
           double beta2, double eps, double weight_decay, int64_t step);

// The same in two parts, for a captured step (CUDA graph) whose AdamW launch gets new scalars every replay
// (the step count and, each epoch, the learning rate): the scalars, computed on the host in double and rounded
// to float once, and the launch with them.
struct AdamScalars {
  float decay;       // 1 - lr * weight_decay
  float w1;          // lerp weight, 1 - beta1
  bool lerp_low;     // torch.lerp's branch: weight < 0.5
  float beta2, one_minus_beta2;
  float step_size;   // lr / (1 - beta1^t)
  float bc2_sqrt;    // sqrt(1 - beta2^t)
  float eps;
};
AdamScalars adam_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step);
void adamw(cudaStream_t st, int64_t n, float* p, const float* g, float* m, float* v, const AdamScalars& a);
// The kernel both launch, kernel(int64_t n, float* p, const float* g, float* m, float* v, AdamScalars a), with
// the launch shape for n: what a graph's kernel node needs to be given new scalars.
const void* adamw_kernel_function();
void adamw_launch_shape(int64_t n, dim3* grid, dim3* block);

}  // namespace vb::cuda
