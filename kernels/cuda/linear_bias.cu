// The linear layer's bias, around the cuBLAS products of engine/backend_cuda.cu. CPU twins: the bias terms of
// cpu::linear_fwd and cpu::linear_bwd (kernels/cpu/ops.h).
#include "kernels/check.h"
#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/elementwise.cuh"

namespace vb::cuda {
namespace {

__global__ void bias_add_kernel(int64_t total, int OUT, const float* __restrict__ b, float* __restrict__ y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    y[i] += b[i % OUT];
}

// One thread per output feature; rows summed in order, so the result does not depend on the launch.
__global__ void bias_grad_kernel(int N, int OUT, const float* __restrict__ dy, float* __restrict__ db) {
  const int o = blockIdx.x * blockDim.x + threadIdx.x;
  if (o >= OUT) return;
  float s = 0.f;
  for (int n = 0; n < N; ++n) s += dy[int64_t(n) * OUT + o];
  db[o] = s;
}

}  // namespace

void bias_add(cudaStream_t st, int N, int OUT, const float* b, float* y) {
  const int64_t total = int64_t(N) * OUT;
  if (total <= 0) return;
  bias_add_kernel<<<detail::grid_for(total, 256), 256, 0, st>>>(total, OUT, b, y);
  VB_CUDA_LAUNCH_CHECK();
}

void bias_grad(cudaStream_t st, int N, int OUT, const float* dy, float* db) {
  if (OUT <= 0) return;
  bias_grad_kernel<<<unsigned((OUT + 127) / 128), 128, 0, st>>>(N, OUT, dy, db);
  VB_CUDA_LAUNCH_CHECK();
}

}  // namespace vb::cuda
