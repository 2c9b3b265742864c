// float <-> bf16 conversion kernels (see bf16_convert.cuh). CPU twins: vb::to_bf16, vb::to_float.
#include "kernels/check.h"
#include "kernels/cuda/bf16_convert.cuh"
#include "kernels/cuda/nhwc_vec.cuh"

namespace vb::cuda {
namespace {

// Eight elements per thread-step when both pointers allow 128-bit bf16 access (32-byte float reads), else one.
template <int V>
__global__ void f2b_kernel(int64_t nv, const float* __restrict__ x, vb::bf16* __restrict__ y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nv; i += int64_t(gridDim.x) * blockDim.x) {
    float v[V];
    if constexpr (V == 8) {
      float a[4], b[4];
      detail::load_vec<4>(x + i * V, a);
      detail::load_vec<4>(x + i * V + 4, b);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        v[k] = a[k];
        v[k + 4] = b[k];
      }
    } else {
      detail::load_vec<V>(x + i * V, v);
    }
    detail::store_vec<V>(y + i * V, v);
  }
}

template <int V>
__global__ void b2f_kernel(int64_t nv, const vb::bf16* __restrict__ x, float* __restrict__ y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nv; i += int64_t(gridDim.x) * blockDim.x) {
    float v[V];
    detail::load_vec<V>(x + i * V, v);
    if constexpr (V == 8) {
      const float a[4] = {v[0], v[1], v[2], v[3]}, b[4] = {v[4], v[5], v[6], v[7]};
      detail::store_vec<4>(y + i * V, a);
      detail::store_vec<4>(y + i * V + 4, b);
    } else {
      detail::store_vec<V>(y + i * V, v);
    }
  }
}

__global__ void add_bf16_kernel(int64_t n, const vb::bf16* a, const vb::bf16* b, vb::bf16* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v[1] = {detail::load1(a + i) + detail::load1(b + i)};
    detail::store_vec<1>(y + i, v);
  }
}
__global__ void relu_bf16_kernel(int64_t n, const vb::bf16* x, vb::bf16* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float u = detail::load1(x + i);
    const float v[1] = {u < 0.f ? 0.f : u};  // NaN: the comparison is false, NaN passes
    detail::store_vec<1>(y + i, v);
  }
}
__global__ void round_to_bf16_kernel(int64_t n, const float* x, float* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __uint_as_float(uint32_t(detail::bf16_bits(x[i])) << 16);
}

}  // namespace

void add_bf16(cudaStream_t st, int64_t n, const vb::bf16* a, const vb::bf16* b, vb::bf16* y) {
  if (n <= 0) return;
  add_bf16_kernel<<<detail::grid_for(n, 256), 256, 0, st>>>(n, a, b, y);
  VB_CUDA_LAUNCH_CHECK();
}
void relu_bf16(cudaStream_t st, int64_t n, const vb::bf16* x, vb::bf16* y) {
  if (n <= 0) return;
  relu_bf16_kernel<<<detail::grid_for(n, 256), 256, 0, st>>>(n, x, y);
  VB_CUDA_LAUNCH_CHECK();
}
void round_to_bf16(cudaStream_t st, int64_t n, const float* x, float* y) {
  if (n <= 0) return;
  round_to_bf16_kernel<<<detail::grid_for(n, 256), 256, 0, st>>>(n, x, y);
  VB_CUDA_LAUNCH_CHECK();
}

void float_to_bf16(cudaStream_t st, int64_t n, const float* x, vb::bf16* y) {
  VB_CHECK(n >= 0 && (n == 0 || (x && y)), "float_to_bf16: bad size ", n, " or null buffer");
  if (n == 0) return;
  if (n % 8 == 0 && detail::aligned16(x) && detail::aligned16(y)) {
    f2b_kernel<8><<<detail::grid_for(n / 8, 256), 256, 0, st>>>(n / 8, x, y);
  } else {
    f2b_kernel<1><<<detail::grid_for(n, 256), 256, 0, st>>>(n, x, y);
  }
  VB_CUDA_LAUNCH_CHECK();
}

void bf16_to_float(cudaStream_t st, int64_t n, const vb::bf16* x, float* y) {
  VB_CHECK(n >= 0 && (n == 0 || (x && y)), "bf16_to_float: bad size ", n, " or null buffer");
  if (n == 0) return;
  if (n % 8 == 0 && detail::aligned16(x) && detail::aligned16(y)) {
    b2f_kernel<8><<<detail::grid_for(n / 8, 256), 256, 0, st>>>(n / 8, x, y);
  } else {
    b2f_kernel<1><<<detail::grid_for(n, 256), 256, 0, st>>>(n, x, y);
  }
  VB_CUDA_LAUNCH_CHECK();
}

}  // namespace vb::cuda
