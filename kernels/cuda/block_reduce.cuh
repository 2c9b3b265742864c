// Device-side helpers shared by the kernels of kernels/cuda (included by .cu files only).
// Reductions here are deterministic: a fixed shuffle tree inside each warp, then the warps' results summed in
// warp order by one thread, so the same inputs always give the same bits.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace vb::cuda::detail {

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums a and b over the block (blockDim.x a multiple of 32, at most 1024). Every thread gets the totals.
__device__ __forceinline__ void block_sum2(float& a, float& b) {
  __shared__ float sa[32], sb[32];
  __shared__ float ta, tb;
  a = warp_sum(a);
  b = warp_sum(b);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float x = 0.f, y = 0.f;
    for (int w = 0; w < int(blockDim.x) / kWarp; ++w) {
      x += sa[w];
      y += sb[w];
    }
    ta = x;
    tb = y;
  }
  __syncthreads();
  a = ta;
  b = tb;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Blocks for a grid-stride loop over n items with `threads` threads each: enough to fill an H200 (132 SMs)
// several times over, never more than the work needs.
inline unsigned grid_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  if (b > 132 * 16) b = 132 * 16;
  return unsigned(b < 1 ? 1 : b);
}

}  // namespace vb::cuda::detail
