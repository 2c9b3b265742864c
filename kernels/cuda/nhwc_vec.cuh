// Device helpers of the NHWC kernels (bn_nhwc.cu, pool_nhwc.cu; included by .cu files only): V consecutive
// activations of type A (float or vb::bf16) loaded as floats and stored back, with one 128-bit access when
// V * sizeof(A) == 16. bf16 -> float is exact (the bits shifted up); float -> bf16 is __float2bfloat16_rn,
// which vb::to_bf16 (kernels/bf16.h) reproduces on the host.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "kernels/bf16.h"
#include "kernels/cuda/block_reduce.cuh"

namespace vb::cuda::detail {

// Elements per 128-bit access.
template <class A>
constexpr int kVec = int(16 / sizeof(A));

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ uint16_t bf16_bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
__device__ __forceinline__ uint32_t bf16_pack(float lo, float hi) {
  return uint32_t(bf16_bits(lo)) | (uint32_t(bf16_bits(hi)) << 16);
}

template <int V>
__device__ __forceinline__ void load_vec(const float* p, float (&v)[V]) {
  if constexpr (V == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = p[k];
  }
}
template <int V>
__device__ __forceinline__ void load_vec(const vb::bf16* p, float (&v)[V]) {
  if constexpr (V == 8) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    v[0] = bf16_lo(q.x);
    v[1] = bf16_hi(q.x);
    v[2] = bf16_lo(q.y);
    v[3] = bf16_hi(q.y);
    v[4] = bf16_lo(q.z);
    v[5] = bf16_hi(q.z);
    v[6] = bf16_lo(q.w);
    v[7] = bf16_hi(q.w);
  } else {
    const uint16_t* b = reinterpret_cast<const uint16_t*>(p);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = __uint_as_float(uint32_t(b[k]) << 16);
  }
}

template <int V>
__device__ __forceinline__ void store_vec(float* p, const float (&v)[V]) {
  if constexpr (V == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = v[k];
  }
}
template <int V>
__device__ __forceinline__ void store_vec(vb::bf16* p, const float (&v)[V]) {
  if constexpr (V == 8) {
    *reinterpret_cast<uint4*>(p) =
        make_uint4(bf16_pack(v[0], v[1]), bf16_pack(v[2], v[3]), bf16_pack(v[4], v[5]), bf16_pack(v[6], v[7]));
  } else {
    uint16_t* b = reinterpret_cast<uint16_t*>(p);
#pragma unroll
    for (int k = 0; k < V; ++k) b[k] = bf16_bits(v[k]);
  }
}

// One element as float (scalar paths and per-channel reads).
__device__ __forceinline__ float load1(const float* p) { return *p; }
__device__ __forceinline__ float load1(const vb::bf16* p) {
  return __uint_as_float(uint32_t(*reinterpret_cast<const uint16_t*>(p)) << 16);
}

// Whether C channels and these pointers allow 128-bit accesses (null pointers are ignored).
template <class A>
inline bool nhwc_vec_ok(int C, std::initializer_list<const void*> ptrs) {
  if (C % kVec<A> != 0) return false;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  return true;
}

// Runs f with the vector width as a compile-time constant: kVec<A> when allowed, else 1.
template <class A, class F>
void with_vec(bool vec, F&& f) {
  if (vec)
    f(std::integral_constant<int, kVec<A>>{});
  else
    f(std::integral_constant<int, 1>{});
}

}  // namespace vb::cuda::detail
