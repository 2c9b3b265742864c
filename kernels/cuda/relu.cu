// ReLU forward and backward. CPU twins: cpu::relu_fwd, cpu::relu_bwd (kernels/cpu/ops.h).
#include "kernels/check.h"
#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/elementwise.cuh"

namespace vb::cuda {
namespace {

// As the CPU twins and torch: relu lets NaN (and -0) through (clamp_min), and its backward zeroes only where
// y <= 0, so a NaN output passes its gradient (threshold_backward).
__device__ __forceinline__ float relu1(float v) { return v < 0.f ? 0.f : v; }
__device__ __forceinline__ float mask1(float y, float d) { return y <= 0.f ? 0.f : d; }

__global__ void relu_fwd_kernel(int64_t n, const float* x, float* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = relu1(x[i]);
}
__global__ void relu_fwd4_kernel(int64_t n4, const float4* x, float4* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
    const float4 v = x[i];
    y[i] = make_float4(relu1(v.x), relu1(v.y), relu1(v.z), relu1(v.w));
  }
}
__global__ void relu_bwd_kernel(int64_t n, const float* y, const float* dy, float* dx) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dx[i] = mask1(y[i], dy[i]);
}
__global__ void relu_bwd4_kernel(int64_t n4, const float4* y, const float4* dy, float4* dx) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
    const float4 a = y[i], d = dy[i];
    dx[i] = make_float4(mask1(a.x, d.x), mask1(a.y, d.y), mask1(a.z, d.z), mask1(a.w, d.w));
  }
}

}  // namespace

void relu_fwd(cudaStream_t st, int64_t n, const float* x, float* y) {
  if (n <= 0) return;
  if (n % 4 == 0 && detail::aligned16(x) && detail::aligned16(y))
    relu_fwd4_kernel<<<detail::grid_for(n / 4, 256), 256, 0, st>>>(n / 4, reinterpret_cast<const float4*>(x),
                                                                   reinterpret_cast<float4*>(y));
  else
    relu_fwd_kernel<<<detail::grid_for(n, 256), 256, 0, st>>>(n, x, y);
  VB_CUDA_LAUNCH_CHECK();
}

void relu_bwd(cudaStream_t st, int64_t n, const float* y, const float* dy, float* dx) {
  if (n <= 0) return;
  if (n % 4 == 0 && detail::aligned16(y) && detail::aligned16(dy) && detail::aligned16(dx))
    relu_bwd4_kernel<<<detail::grid_for(n / 4, 256), 256, 0, st>>>(n / 4, reinterpret_cast<const float4*>(y),
                                                                   reinterpret_cast<const float4*>(dy),
                                                                   reinterpret_cast<float4*>(dx));
  else
    relu_bwd_kernel<<<detail::grid_for(n, 256), 256, 0, st>>>(n, y, dy, dx);
  VB_CUDA_LAUNCH_CHECK();
}

}  // namespace vb::cuda
