// Fused AdamW. CPU twin: cpu::adamw_step (kernels/cpu/ops.h). The scalars are computed in double on the host
// and rounded to float, as PyTorch does with its Python-float hyper-parameters.
#include <cmath>

#include "kernels/check.h"
#include "kernels/cuda/adamw.cuh"
#include "kernels/cuda/block_reduce.cuh"

namespace vb::cuda {
namespace {

__global__ void adamw_kernel(int64_t n, float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                             float* __restrict__ v, AdamScalars a) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float gi = g[i];
    const float pi = p[i] * a.decay;
    const float mi = a.lerp_low ? m[i] + a.w1 * (gi - m[i]) : gi - (gi - m[i]) * (1.f - a.w1);
    const float vi = v[i] * a.beta2 + a.one_minus_beta2 * gi * gi;
    const float denom = sqrtf(vi) / a.bc2_sqrt + a.eps;
    p[i] = pi + (-a.step_size) * (mi / denom);
    m[i] = mi;
    v[i] = vi;
  }
}

}  // namespace

AdamScalars adam_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  VB_CHECK(step >= 1, "adamw: step must be 1-based, got ", step);
  AdamScalars a;
  a.decay = float(1.0 - lr * weight_decay);
  a.w1 = float(1.0 - beta1);
  a.lerp_low = (1.0 - beta1) < 0.5;
  a.beta2 = float(beta2);
  a.one_minus_beta2 = float(1.0 - beta2);
  a.step_size = float(lr / (1.0 - std::pow(beta1, double(step))));
  a.bc2_sqrt = float(std::sqrt(1.0 - std::pow(beta2, double(step))));
  a.eps = float(eps);
  return a;
}

void adamw(cudaStream_t st, int64_t n, float* p, const float* g, float* m, float* v, const AdamScalars& a) {
  if (n <= 0) return;
  dim3 grid, block;
  adamw_launch_shape(n, &grid, &block);
  adamw_kernel<<<grid, block, 0, st>>>(n, p, g, m, v, a);
  VB_CUDA_LAUNCH_CHECK();
}

void adamw(cudaStream_t st, int64_t n, float* p, const float* g, float* m, float* v, double lr, double beta1,
           double beta2, double eps, double weight_decay, int64_t step) {
  const AdamScalars a = adam_scalars(lr, beta1, beta2, eps, weight_decay, step);
  adamw(st, n, p, g, m, v, a);
}

const void* adamw_kernel_function() { return reinterpret_cast<const void*>(&adamw_kernel); }

void adamw_launch_shape(int64_t n, dim3* grid, dim3* block) {
  *grid = dim3(detail::grid_for(n, 256));
  *block = dim3(256);
}

}  // namespace vb::cuda
