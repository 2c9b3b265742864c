// Blocked, packed, multithreaded GEMM (the BLIS loop structure) with a register-tiled micro-kernel.
//
//   for jc in N step NC:              B panel  op(B)[pc:pc+kc, jc:jc+nc] packed into NR-wide slivers
//     for pc in K step KC:            A panel  op(A)[0:M, pc:pc+kc]      packed into MR-tall slivers
//       pack both (in parallel), then in parallel over tiles of C (MC rows x a multiple of NR columns):
//         for each NR sliver of the tile:        the B sliver stays in L1
//           for each MR sliver of the tile:      the A block (MC x kc) stays in L2
//             micro-kernel: MR x NR accumulators in registers over kc, then C = alpha*acc + beta*C
//                           (beta is the caller's on the first kc block and 1 on the following ones)
//
// Determinism: every element of C is reduced in the same order whatever the thread count and whatever the
// tiling: a sum over k in kc-sized blocks, each block accumulated in k order by the same fused multiply-adds,
// blocks added to C in order. Edge tiles run the full micro-kernel on zero-padded slivers and update a copy
// of the C block with the same vector operations, so an element's bits don't depend on where tiles fall.
// The threads only split M and N, never K.
//
// The code is written over a small vector abstraction: AVX2+FMA intrinsics when the compiler targets them
// (micro-kernels of 6x16 floats and 6x8 doubles, 12 accumulator registers), else a scalar fallback that gives
// the same results up to rounding. Packing that has to transpose (a row-major A, a transposed B) goes through
// 8x8 in-register transposes for float. When N is small next to M (N = 49 for a 7x7 feature map), the driver
// computes C^T = op(B)^T op(A)^T instead, which wastes less of the micro-tile on padding.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

#include "kernels/cpu/simd.h"

namespace vb::cpu {
namespace {

using simd::Traits;

// ---- micro-kernel -----------------------------------------------------------------------------------------
// acc = sum_k a[k*MR + i] * b[k*NR + j]; then c[i*ldc + j] = alpha*acc + beta*c (beta == 0: c not read).
template <class T>
inline void store_row(T* c, typename Traits<T>::Vec::V lo, typename Traits<T>::Vec::V hi, T alpha, T beta) {
  using Vec = typename Traits<T>::Vec;
  const auto va = Vec::set1(alpha);
  if (beta == T(0)) {
    Vec::store(c, Vec::mul(va, lo));
    Vec::store(c + Vec::W, Vec::mul(va, hi));
  } else {
    const auto vb = Vec::set1(beta);
    Vec::store(c, Vec::fma(va, lo, Vec::mul(vb, Vec::load(c))));
    Vec::store(c + Vec::W, Vec::fma(va, hi, Vec::mul(vb, Vec::load(c + Vec::W))));
  }
}

#ifdef VB_GEMM_AVX2
// 6 rows x 2 vectors, the accumulators as named variables so that they live in registers only (with arrays,
// GCC keeps a copy in memory and stores all twelve every iteration).
template <class T>
inline void micro_kernel(int kc, const T* __restrict a, const T* __restrict b, T* c, int64_t ldc, T alpha, T beta,
                         int64_t ldb = Traits<T>::NV * Traits<T>::Vec::W) {
  using Vec = typename Traits<T>::Vec;
  using V = typename Vec::V;
  static_assert(Traits<T>::MR == 6 && Traits<T>::NV == 2, "the AVX2 kernel is 6 x 2 vectors");
  constexpr int W = Vec::W;
  V c00 = Vec::zero(), c01 = Vec::zero(), c10 = Vec::zero(), c11 = Vec::zero(), c20 = Vec::zero(), c21 = Vec::zero(),
    c30 = Vec::zero(), c31 = Vec::zero(), c40 = Vec::zero(), c41 = Vec::zero(), c50 = Vec::zero(), c51 = Vec::zero();
  for (int k = 0; k < kc; ++k) {
    const V b0 = Vec::load(b), b1 = Vec::load(b + W);
    V av = Vec::bcast(a + 0);
    c00 = Vec::fma(av, b0, c00);
    c01 = Vec::fma(av, b1, c01);
    av = Vec::bcast(a + 1);
    c10 = Vec::fma(av, b0, c10);
    c11 = Vec::fma(av, b1, c11);
    av = Vec::bcast(a + 2);
    c20 = Vec::fma(av, b0, c20);
    c21 = Vec::fma(av, b1, c21);
    av = Vec::bcast(a + 3);
    c30 = Vec::fma(av, b0, c30);
    c31 = Vec::fma(av, b1, c31);
    av = Vec::bcast(a + 4);
    c40 = Vec::fma(av, b0, c40);
    c41 = Vec::fma(av, b1, c41);
    av = Vec::bcast(a + 5);
    c50 = Vec::fma(av, b0, c50);
    c51 = Vec::fma(av, b1, c51);
    a += 6;
    b += ldb;
  }
  store_row<T>(c, c00, c01, alpha, beta);
  store_row<T>(c + ldc, c10, c11, alpha, beta);
  store_row<T>(c + 2 * ldc, c20, c21, alpha, beta);
  store_row<T>(c + 3 * ldc, c30, c31, alpha, beta);
  store_row<T>(c + 4 * ldc, c40, c41, alpha, beta);
  store_row<T>(c + 5 * ldc, c50, c51, alpha, beta);
}
#else
template <class T>
inline void micro_kernel(int kc, const T* __restrict a, const T* __restrict b, T* c, int64_t ldc, T alpha, T beta,
                         int64_t ldb = Traits<T>::NV * Traits<T>::Vec::W) {
  using Vec = typename Traits<T>::Vec;
  using V = typename Vec::V;
  constexpr int MR = Traits<T>::MR, NV = Traits<T>::NV, W = Vec::W, NR = NV * W;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = Vec::zero();
  for (int k = 0; k < kc; ++k) {
    for (int i = 0; i < MR; ++i) {
      const V av = Vec::bcast(a + i);
      for (int j = 0; j < NV; ++j) acc[i][j] = Vec::fma(av, Vec::load(b + j * W), acc[i][j]);
    }
    a += MR;
    b += ldb;
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; j += 2) store_row<T>(c + i * ldc + j * W, acc[i][j], acc[i][j + 1], alpha, beta);
}
#endif

// An m x n (m <= MR, n <= NR) corner of C: the same kernel on a copy.
template <class T>
void micro_kernel_edge(int kc, const T* a, const T* b, T* c, int64_t ldc, int m, int n, T alpha, T beta,
                       int64_t ldb) {
  constexpr int MR = Traits<T>::MR, NR = Traits<T>::NV * Traits<T>::Vec::W;
  alignas(64) T tmp[MR * NR];
  if (beta != T(0))
    for (int i = 0; i < m; ++i) std::memcpy(tmp + i * NR, c + i * ldc, sizeof(T) * size_t(n));
  micro_kernel<T>(kc, a, b, tmp, NR, alpha, beta, ldb);
  for (int i = 0; i < m; ++i) std::memcpy(c + i * ldc, tmp + i * NR, sizeof(T) * size_t(n));
}

// The same for a block of C stored transposed: element (i, j) of the block lives at c[j*ldc + i].
template <class T>
void micro_kernel_transposed(int kc, const T* a, const T* b, T* c, int64_t ldc, int m, int n, T alpha, T beta,
                             int64_t ldb) {
  constexpr int MR = Traits<T>::MR, NR = Traits<T>::NV * Traits<T>::Vec::W;
  alignas(64) T tmp[MR * NR];
  if (beta != T(0))
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) tmp[i * NR + j] = c[j * ldc + i];
  micro_kernel<T>(kc, a, b, tmp, NR, alpha, beta, ldb);
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) c[j * ldc + i] = tmp[i * NR + j];
}

// ---- packing ----------------------------------------------------------------------------------------------
// dst[k*ld + r] = rows[r][k] for r < nrows, 0 for nrows <= r < ld (k < kc): source rows that run along k,
// interleaved k-major. This is the transposing half of packing.
template <class T>
void interleave_rows(const T* const* rows, int nrows, int kc, T* dst, int ld) {
  for (int r = 0; r < nrows; ++r) {
    const T* src = rows[r];
    for (int k = 0; k < kc; ++k) dst[k * ld + r] = src[k];
  }
  for (int r = nrows; r < ld; ++r)
    for (int k = 0; k < kc; ++k) dst[k * ld + r] = T(0);
}

#ifdef VB_GEMM_AVX2
// Float: 8 x 8 blocks transposed in registers, rows taken 8 at a time (6 for the A sliver: masked stores).
template <>
void interleave_rows<float>(const float* const* rows, int nrows, int kc, float* dst, int ld) {
  const __m256i mask6 = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
  for (int r0 = 0; r0 < ld; r0 += 8) {
    const int lanes = std::min(8, ld - r0);
    const float* src[8];
    for (int r = 0; r < 8; ++r) src[r] = (r < lanes && r0 + r < nrows) ? rows[r0 + r] : nullptr;
    int k0 = 0;
    for (; k0 + 8 <= kc; k0 += 8) {
      __m256 v[8];
      for (int r = 0; r < 8; ++r) v[r] = src[r] ? _mm256_loadu_ps(src[r] + k0) : _mm256_setzero_ps();
      const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
      const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
      const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
      const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 o[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                           _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                           _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                           _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
      float* d = dst + int64_t(k0) * ld + r0;
      if (lanes == 8) {
        for (int k = 0; k < 8; ++k) _mm256_storeu_ps(d + k * ld, o[k]);
      } else if (lanes == 6) {
        for (int k = 0; k < 8; ++k) _mm256_maskstore_ps(d + k * ld, mask6, o[k]);
      } else {
        alignas(32) float tmp[8];
        for (int k = 0; k < 8; ++k) {
          _mm256_store_ps(tmp, o[k]);
          for (int r = 0; r < lanes; ++r) d[k * ld + r] = tmp[r];
        }
      }
    }
    for (; k0 < kc; ++k0)
      for (int r = 0; r < lanes; ++r) dst[int64_t(k0) * ld + r0 + r] = src[r] ? src[r][k0] : 0.0f;
  }
}
#endif

// Sliver s of a non-transposed A: rows [i0, i0+MR), columns [p0, p0+kc), stored k-major: dst[k*MR + r].
template <class T>
void pack_a_sliver(const T* A, int64_t lda, int M, int i0, int p0, int kc, T* dst) {
  constexpr int MR = Traits<T>::MR;
  const int m = std::min(MR, M - i0);
  // op(A)(i, k) = A[i*lda + k]: one contiguous row per r (a transposed A is packed by pack_a_row)
  const T* rows[MR];
  for (int r = 0; r < m; ++r) rows[r] = A + int64_t(i0 + r) * lda + p0;
  interleave_rows<T>(rows, m, kc, dst, MR);
}

// Row k of a packed transposed A (kc rows per sliver): src holds op(A)(i, k) for i < M contiguously; value i goes
// to sliver i / MR at k*MR + i % MR (zero past M in the last sliver): pack_a_sliver's layout.
template <class T>
void pack_a_row(const T* src, int M, int k, int kc, T* dst) {
  constexpr int MR = Traits<T>::MR;
  int i = 0;
  for (; i + MR <= M; i += MR) std::memcpy(dst + int64_t(i / MR) * MR * kc + int64_t(k) * MR, src + i, sizeof(T) * MR);
  if (i < M) {
    T* d = dst + int64_t(i / MR) * MR * kc + int64_t(k) * MR;
    for (int r = 0; r < MR; ++r) d[r] = i + r < M ? src[i + r] : T(0);
  }
}

// Sliver s of B: columns [j0, j0+NR) of op(B), rows [p0, p0+kc), stored k-major: dst[k*NR + c].
template <class T>
void pack_b_sliver(bool transB, const T* B, int64_t ldb, int N, int j0, int p0, int kc, T* dst) {
  constexpr int NR = Traits<T>::NV * Traits<T>::Vec::W;
  const int n = std::min(NR, N - j0);
  if (!transB) {  // op(B)(k, j) = B[k*ldb + j]: NR contiguous values per k
    for (int k = 0; k < kc; ++k) {
      const T* src = B + int64_t(p0 + k) * ldb + j0;
      T* d = dst + k * NR;
      if (n == NR) {
        std::memcpy(d, src, sizeof(T) * NR);
      } else {
        int c = 0;
        for (; c < n; ++c) d[c] = src[c];
        for (; c < NR; ++c) d[c] = T(0);
      }
    }
  } else {  // op(B)(k, j) = B[j*ldb + k]: one contiguous row of B per column c
    const T* rows[NR];
    for (int c = 0; c < n; ++c) rows[c] = B + int64_t(j0 + c) * ldb + p0;
    interleave_rows<T>(rows, n, kc, dst, NR);
  }
}

// Grow-only, 64-byte aligned scratch owned by the thread that calls gemm (helpers write into it).
struct AlignedBuffer {
  void* p = nullptr;
  size_t cap = 0;
  ~AlignedBuffer() { std::free(p); }
  template <class T>
  T* get(size_t n) {
    const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    if (bytes > cap) {
      std::free(p);
      p = std::aligned_alloc(64, bytes);
      if (!p) throw std::bad_alloc();
      cap = bytes;
    }
    return static_cast<T*>(p);
  }
};
thread_local AlignedBuffer t_pack_a, t_pack_b;

template <class T>
void scale_c(int M, int N, T beta, T* C, int64_t ldc) {
  for (int i = 0; i < M; ++i) {
    T* c = C + int64_t(i) * ldc;
    if (beta == T(0))
      std::fill(c, c + N, T(0));
    else
      for (int j = 0; j < N; ++j) c[j] *= beta;
  }
}

// Up to this many MR-row slivers of A (M <= 72 for float), B is read in place (see the driver). Measured on
// the 2-core EPYC: 16 x 1024 x 147 (the stem) 67 -> 90 GFLOP/s, 64 x 3136 x 576 72 -> 84; from M = 256 up,
// packing is as fast or faster (1024^3: 55 vs 39).
constexpr int kDirectBMaxSlivers = 12;

// The driver. c_transposed: element (i, j) of the M x N product lives at C[j*ldc + i].
template <class T>
void gemm_driver(bool transA, bool transB, int M, int N, int K, T alpha, const T* A, int64_t lda, const T* B,
                 int64_t ldb, T beta, T* C, int64_t ldc, bool c_transposed) {
  using Tr = Traits<T>;
  constexpr int MR = Tr::MR, NR = Tr::NV * Tr::Vec::W, KC = Tr::KC, MC = Tr::MC, NC = Tr::NC;
  const int m_slivers = (M + MR - 1) / MR;
  const int nc_max = std::min(N, NC);
  T* pa = t_pack_a.get<T>(size_t(m_slivers) * MR * std::min(K, KC));
  T* pb = t_pack_b.get<T>(size_t((nc_max + NR - 1) / NR) * NR * std::min(K, KC));

  // Small products aren't worth waking threads for.
  const double flops = 2.0 * M * N * K;
  const bool serial = flops < 2.0 * 48 * 48 * 48;
  const int threads = serial ? 1 : num_threads();

  // A non-transposed B that few A slivers reuse is read in place (NR contiguous values per k, ldb apart)
  // instead of packed: packing is then a full extra pass over B for little reuse (the stem: 16 output
  // channels over 1024 columns). Only full-width slivers; a ragged last sliver is still packed. The
  // micro-kernel does the same operations on the same values either way.
  const bool direct_b = !transB && m_slivers <= kDirectBMaxSlivers;
  for (int jc = 0; jc < N; jc += NC) {
    const int nc = std::min(NC, N - jc);
    const int n_slivers = (nc + NR - 1) / NR;
    const int full_slivers = nc / NR;
    // Tiles of C: MC-row blocks times groups of NR slivers, enough of them for every thread to get a few.
    const int m_blocks = (M + MC - 1) / MC;
    const int want_n_groups = std::max(1, (4 * threads + m_blocks - 1) / m_blocks);
    const int slivers_per_group = std::max(1, (n_slivers + want_n_groups - 1) / want_n_groups);
    const int n_groups = (n_slivers + slivers_per_group - 1) / slivers_per_group;
    const int64_t tiles = int64_t(m_blocks) * n_groups;

    for (int pc = 0; pc < K; pc += KC) {
      const int kc = std::min(KC, K - pc);
      const T beta_eff = pc == 0 ? beta : T(1);
      // A transposed A (rows of op(A) are columns of A) is packed a row of A at a time, into every sliver: going
      // sliver by sliver read MR values per row of A, lda apart, and that gather was a third of a filter
      // gradient's GEMM (dy^T x, dy's rows 1 KB apart). The other operands are packed sliver by sliver.
      if (transA)
        parallel_for(kc, serial ? kc : 16, [&](int64_t b, int64_t e) {
          for (int64_t k = b; k < e; ++k) {
            // The rows stream from memory (dy, written a whole layer ago): fetch a few rows ahead.
            if (k + 4 < e)
              for (int i = 0; i < M; i += 64 / int(sizeof(T)))
                __builtin_prefetch(A + int64_t(pc + k + 4) * lda + i);
            pack_a_row<T>(A + int64_t(pc + k) * lda, M, int(k), kc, pa);
          }
        });
      const int a_units = transA ? 0 : m_slivers;  // slivers of A packed below
      const int64_t pack_units = int64_t(a_units) + n_slivers;
      parallel_for(pack_units, serial ? pack_units : 8, [&](int64_t b, int64_t e) {
        for (int64_t u = b; u < e; ++u) {
          if (u < a_units)
            pack_a_sliver<T>(A, lda, M, int(u) * MR, pc, kc, pa + u * MR * kc);
          else {
            const int64_t s = u - a_units;
            if (direct_b && s < full_slivers) continue;
            pack_b_sliver<T>(transB, B, ldb, N, jc + int(s) * NR, pc, kc, pb + s * NR * kc);
          }
        }
      });
      parallel_for(tiles, serial ? tiles : 1, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          const int mb = int(t / n_groups), ng = int(t % n_groups);
          const int i_begin = mb * MC, i_end = std::min(M, i_begin + MC);
          const int s_begin = ng * slivers_per_group, s_end = std::min(n_slivers, s_begin + slivers_per_group);
          for (int s = s_begin; s < s_end; ++s) {
            const int j = jc + s * NR;
            const int n = std::min(NR, N - j);
            const bool in_place = direct_b && s < full_slivers;
            const T* bs = in_place ? B + int64_t(pc) * ldb + j : pb + int64_t(s) * NR * kc;
            const int64_t bstride = in_place ? ldb : NR;
            for (int i = i_begin; i < i_end; i += MR) {
              const int m = std::min(MR, M - i);
              const T* as = pa + int64_t(i / MR) * MR * kc;
              if (c_transposed)
                micro_kernel_transposed<T>(kc, as, bs, C + int64_t(j) * ldc + i, ldc, m, n, alpha, beta_eff, bstride);
              else if (m == MR && n == NR)
                micro_kernel<T>(kc, as, bs, C + int64_t(i) * ldc + j, ldc, alpha, beta_eff, bstride);
              else
                micro_kernel_edge<T>(kc, as, bs, C + int64_t(i) * ldc + j, ldc, m, n, alpha, beta_eff, bstride);
            }
          }
        }
      });
    }
  }
}

}  // namespace

// Picks the orientation that wastes less of the micro-kernel on zero padding: C = op(A) op(B) or, stored
// transposed, C^T = op(B)^T op(A)^T, the latter only when N is what wastes it. Both give the same bits (the products commute, the k order is the same).
template <class T>
void gemm(bool transA, bool transB, int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta,
          T* C, int ldc) {
  constexpr int MR = Traits<T>::MR, NR = Traits<T>::NV * Traits<T>::Vec::W;
  if (M <= 0 || N <= 0) return;
  if (K <= 0 || alpha == T(0)) {
    scale_c(M, N, beta, C, ldc);
    return;
  }
  auto padded = [](int64_t x, int64_t q) { return (x + q - 1) / q * q; };
  const int64_t cost = padded(M, MR) * padded(N, NR), cost_t = padded(N, MR) * padded(M, NR);
  // The transposed product stores C element by element and packs the wide operand as A: measured on this
  // path, it only pays when N itself wastes much of the NR-wide tile (N = 49 for a 7x7 map, N = 4 for 2x2),
  // not when it would merely trim M's padding (M = 16 or 32 output channels: 1.2-2.9x slower there).
  const int64_t n_waste = padded(N, NR) - N;
  if (cost_t < cost && 8 * n_waste > padded(N, NR))
    gemm_driver<T>(!transB, !transA, N, M, K, alpha, B, ldb, A, lda, beta, C, ldc, true);
  else
    gemm_driver<T>(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, false);
}

template void gemm<float>(bool, bool, int, int, int, float, const float*, int, const float*, int, float, float*, int);
template void gemm<double>(bool, bool, int, int, int, double, const double*, int, const double*, int, double, double*,
                           int);

}  // namespace vb::cpu
