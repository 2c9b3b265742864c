// Global average pooling. CPU twins: cpu::avgpool_fwd, cpu::avgpool_bwd (kernels/cpu/ops.h).
#include "kernels/check.h"
#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/pool.cuh"

namespace vb::cuda {
namespace {

// One warp per (n, c) plane: lanes stride the plane, then a fixed shuffle tree (deterministic).
__global__ void avgpool_fwd_kernel(int64_t planes, int HW, const float* __restrict__ x, float* __restrict__ y) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / detail::kWarp;
  const int lane = threadIdx.x % detail::kWarp;
  if (warp >= planes) return;  // whole warps leave together
  const float* xp = x + warp * HW;
  float s = 0.f;
  for (int i = lane; i < HW; i += detail::kWarp) s += xp[i];
  s = detail::warp_sum(s);
  if (lane == 0) y[warp] = s / float(HW);
}

__global__ void avgpool_bwd_kernel(int64_t total, int HW, const float* __restrict__ dy, float* __restrict__ dx) {
  const float inv = 1.0f / float(HW);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    dx[i] = dy[i / HW] * inv;
}

}  // namespace

void avgpool_fwd(cudaStream_t st, int N, int C, int HW, const float* x, float* y) {
  VB_CHECK(N >= 0 && C >= 0 && HW > 0, "avgpool: bad shape N=", N, " C=", C, " HW=", HW);
  const int64_t planes = int64_t(N) * C;
  if (planes == 0) return;  // a grid of 0 blocks is an invalid launch
  const int threads = 256;
  const unsigned blocks = unsigned((planes * detail::kWarp + threads - 1) / threads);
  avgpool_fwd_kernel<<<blocks, threads, 0, st>>>(planes, HW, x, y);
  VB_CUDA_LAUNCH_CHECK();
}

void avgpool_bwd(cudaStream_t st, int N, int C, int HW, const float* dy, float* dx) {
  VB_CHECK(N >= 0 && C >= 0 && HW > 0, "avgpool: bad shape N=", N, " C=", C, " HW=", HW);
  const int64_t total = int64_t(N) * C * HW;
  if (total == 0) return;
  avgpool_bwd_kernel<<<detail::grid_for(total, 256), 256, 0, st>>>(total, HW, dy, dx);
  VB_CUDA_LAUNCH_CHECK();
}

}  // namespace vb::cuda
