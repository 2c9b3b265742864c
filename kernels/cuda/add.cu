// y = a + b, flat (joins the two gradient paths of a residual block). CPU twin: cpu::add (kernels/cpu/ops.h).
#include "kernels/check.h"
#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/elementwise.cuh"

namespace vb::cuda {
namespace {

// No __restrict__: y may alias a or b (each element is read before it is written, by the same thread).
__global__ void add_kernel(int64_t n, const float* a, const float* b, float* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = a[i] + b[i];
}
__global__ void add4_kernel(int64_t n4, const float4* a, const float4* b, float4* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
    const float4 u = a[i], v = b[i];
    y[i] = make_float4(u.x + v.x, u.y + v.y, u.z + v.z, u.w + v.w);
  }
}

}  // namespace

void add(cudaStream_t st, int64_t n, const float* a, const float* b, float* y) {
  if (n <= 0) return;
  if (n % 4 == 0 && detail::aligned16(a) && detail::aligned16(b) && detail::aligned16(y))
    add4_kernel<<<detail::grid_for(n / 4, 256), 256, 0, st>>>(n / 4, reinterpret_cast<const float4*>(a),
                                                              reinterpret_cast<const float4*>(b),
                                                              reinterpret_cast<float4*>(y));
  else
    add_kernel<<<detail::grid_for(n, 256), 256, 0, st>>>(n, a, b, y);
  VB_CUDA_LAUNCH_CHECK();
}

}  // namespace vb::cuda
