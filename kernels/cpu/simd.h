// The CPU kernels' small vector abstraction: AVX2+FMA intrinsics when the compiler targets them (8 floats or
// 4 doubles a register), else a scalar fallback with the same operations. Traits<T> holds the register tile
// (MR rows x NV vectors) and the GEMM's cache blocking for T; the GEMM (gemm.cpp) and the NHWC convolution
// (conv_nhwc.cpp) share both.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VB_GEMM_AVX2 1
#endif

namespace vb::cpu::simd {

#ifdef VB_GEMM_AVX2
struct VecF {
  using T = float;
  using V = __m256;
  static constexpr int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const T* p) { return _mm256_loadu_ps(p); }
  static void store(T* p, V v) { _mm256_storeu_ps(p, v); }
  static V bcast(const T* p) { return _mm256_broadcast_ss(p); }
  static V set1(T x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }  // a > b ? a : b (b when either is a NaN)
};
struct VecD {
  using T = double;
  using V = __m256d;
  static constexpr int W = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const T* p) { return _mm256_loadu_pd(p); }
  static void store(T* p, V v) { _mm256_storeu_pd(p, v); }
  static V bcast(const T* p) { return _mm256_broadcast_sd(p); }
  static V set1(T x) { return _mm256_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static V max(V a, V b) { return _mm256_max_pd(a, b); }  // a > b ? a : b (b when either is a NaN)
};
template <class T>
struct Traits;
template <>
struct Traits<float> {
  using Vec = VecF;
  static constexpr int MR = 6, NV = 2;  // 6 x 16
  static constexpr int KC = 384, MC = 96, NC = 4096;
};
template <>
struct Traits<double> {
  using Vec = VecD;
  static constexpr int MR = 6, NV = 2;  // 6 x 8
  static constexpr int KC = 256, MC = 72, NC = 2048;
};
#else
template <class TT>
struct VecScalar {
  using T = TT;
  using V = TT;
  static constexpr int W = 1;
  static V zero() { return T(0); }
  static V load(const T* p) { return *p; }
  static void store(T* p, V v) { *p = v; }
  static V bcast(const T* p) { return *p; }
  static V set1(T x) { return x; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V mul(V a, V b) { return a * b; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V max(V a, V b) { return a > b ? a : b; }
};
template <class T>
struct Traits {
  using Vec = VecScalar<T>;
  static constexpr int MR = 4, NV = 8;
  static constexpr int KC = 256, MC = 64, NC = 2048;
};
#endif

}  // namespace vb::cpu::simd
