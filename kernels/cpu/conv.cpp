// Convolution as GEMM. Per sample n, with CRS = C*R*S and PQ = P*Q:
//   forward      y_n [K, PQ]   = w [K, CRS] * col_n [CRS, PQ]           col_n = im2col(x_n)
//   backward dx  dcol [CRS, PQ] = w^T * dy_n [K, PQ];  dx_n = col2im(dcol)
//   backward dw  dw [K, CRS]  += dy_n * col_n^T                          (samples in order 0..N-1)
// A 1x1 stride-1 unpadded convolution is a GEMM on x_n itself (col_n == x_n), so it skips im2col.
//
// Small feature maps: when P*Q is small (deep stages, small inputs: 2x2 to 14x14), a per-sample GEMM has too
// few columns to use the micro-kernel and pays for packing the weights once per sample. Those convolutions
// take the samples in groups of g (group_size: a function of the shape only, never of the thread count),
// whose columns sit side by side: col_g [CRS, g*PQ], one GEMM per group, then the output block [K, g*PQ] is
// scattered to NCHW (and gradients gathered from it). Each output element is still one sum over the same k
// in the same order, so the forward and data gradient are bit-identical to the per-sample form; the filter
// gradient sums over the group's columns in one GEMM, then over groups in order: fixed for a given shape.
//
// Threads: the forward and data-backward pass split the batch (its groups) over threads when that balances
// (a multiple of the thread count, or many), each group then running serially on one thread with that
// thread's own scratch; otherwise groups go one by one and the GEMM and im2col/col2im split the work. Both
// give the same bits. The filter gradient always goes group by group (a fixed reduction order over n) with
// the GEMM splitting the output channels and columns, never the reduction.
//
// Scratch (the im2col matrix) is grow-only and thread_local: no allocation in steady state.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernels/check.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

namespace vb::cpu {
namespace {

template <class T, int Tag = 0>
T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

bool is_pointwise(const ConvShape& s) { return s.R == 1 && s.S == 1 && s.stride == 1 && s.pad == 0; }

// Valid output columns [q0, q1) for kernel column `s_`: those whose input column q*stride - pad + s_ is in
// [0, W).
inline void valid_q(int Q, int W, int stride, int pad, int s_, int& q0, int& q1) {
  const int off = s_ - pad;                                         // iw = q*stride + off
  q0 = off >= 0 ? 0 : std::min(Q, (-off + stride - 1) / stride);    // first q with iw >= 0
  q1 = W - off <= 0 ? 0 : std::min(Q, (W - off - 1) / stride + 1);  // first q with iw >= W
  if (q1 < q0) q1 = q0;
}

// dst[q] = src[2q] for q in [q0, q1); src[i] may be read for i < limit only. Floats with AVX2 take 8 at a time
// from two loads and a shuffle (the stem's im2col is this gather: a scalar loop made it cost as much as its
// GEMM).
template <class T>
inline void gather_stride2(const T* src, T* dst, int q0, int q1, int limit) {
  int q = q0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    for (; q + 8 <= q1 && 2 * q + 16 <= limit; q += 8) {
      const __m256 a = _mm256_loadu_ps(src + 2 * q), b = _mm256_loadu_ps(src + 2 * q + 8);
      const __m256 t = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));  // a0 a2 b0 b2 | a4 a6 b4 b6
      _mm256_storeu_ps(dst + q, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(t), _MM_SHUFFLE(3, 1, 2, 0))));
    }
  }
#endif
  for (; q < q1; ++q) dst[q] = src[2 * q];
}

// Rows [row_begin, row_end) of col [CRS, PQ] (row stride ld) from one sample x [C, H, W]; only the output
// rows [p_begin, p_end) of each (the columns [p_begin*Q, p_end*Q)), stored from column 0 of dst.
template <class T>
void im2col_rows(const ConvShape& s, const T* x, T* col, int64_t row_begin, int64_t row_end, int64_t ld,
                 int p_begin = 0, int p_end = -1) {
  const int P = p_end < 0 ? s.P() : p_end, Q = s.Q();
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int c = int(row / (s.R * s.S)), r = int(row / s.S % s.R), s_ = int(row % s.S);
    int q0, q1;
    valid_q(Q, s.W, s.stride, s.pad, s_, q0, q1);
    const int off = s_ - s.pad;
    const T* xc = x + int64_t(c) * s.H * s.W;
    T* dst = col + row * ld;
    for (int p = p_begin; p < P; ++p, dst += Q) {
      const int ih = p * s.stride - s.pad + r;
      if (ih < 0 || ih >= s.H) {
        std::fill(dst, dst + Q, T(0));
        continue;
      }
      const T* xrow = xc + int64_t(ih) * s.W;  // column q reads xrow[q*stride + off]
      std::fill(dst, dst + q0, T(0));
      if (s.stride == 1) {
        if (q1 > q0) std::memcpy(dst + q0, xrow + q0 + off, sizeof(T) * size_t(q1 - q0));
      } else if (s.stride == 2) {
        gather_stride2(xrow + off, dst, q0, q1, s.W - off);
      } else {
        for (int q = q0; q < q1; ++q) dst[q] = xrow[q * s.stride + off];
      }
      std::fill(dst + q1, dst + Q, T(0));
    }
  }
}

// Channels [c_begin, c_end) of dx [C, H, W] = col2im(dcol [CRS, PQ], row stride ld): assigned, then summed over
// (r, s, p, q) in that order.
template <class T>
void col2im_channels(const ConvShape& s, const T* col, T* dx, int64_t c_begin, int64_t c_end, int64_t ld) {
  const int P = s.P(), Q = s.Q();
  for (int64_t c = c_begin; c < c_end; ++c) {
    T* xc = dx + c * s.H * s.W;
    std::fill(xc, xc + int64_t(s.H) * s.W, T(0));
    for (int r = 0; r < s.R; ++r)
      for (int s_ = 0; s_ < s.S; ++s_) {
        int q0, q1;
        valid_q(Q, s.W, s.stride, s.pad, s_, q0, q1);
        const int off = s_ - s.pad;
        const T* src = col + ((c * s.R + r) * s.S + s_) * ld;
        for (int p = 0; p < P; ++p, src += Q) {
          const int ih = p * s.stride - s.pad + r;
          if (ih < 0 || ih >= s.H) continue;
          T* xrow = xc + int64_t(ih) * s.W;
          if (s.stride == 1) {
            for (int q = q0; q < q1; ++q) xrow[q + off] += src[q];
          } else {
            for (int q = q0; q < q1; ++q) xrow[q * s.stride + off] += src[q];
          }
        }
      }
  }
}

// col [CRS, g*PQ] (sample i in columns [i*PQ, (i+1)*PQ)) from the g samples at x. A 1x1 stride-1 convolution's
// col is x itself, gathered.
template <class T>
void im2col(const ConvShape& s, const T* x, T* col, int g = 1) {
  const int64_t rows = int64_t(s.C) * s.R * s.S, pq = int64_t(s.P()) * s.Q(), ld = g * pq;
  const int64_t x_stride = int64_t(s.C) * s.H * s.W;
  parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(ld, 1)), [&](int64_t b, int64_t e) {
    for (int i = 0; i < g; ++i) {
      if (is_pointwise(s)) {
        for (int64_t row = b; row < e; ++row)
          std::memcpy(col + row * ld + i * pq, x + i * x_stride + row * pq, sizeof(T) * size_t(pq));
      } else {
        im2col_rows(s, x + i * x_stride, col + i * pq, b, e, ld);
      }
    }
  });
}

// col [CRS, (p1-p0)*Q]: the columns of output rows [p0, p1) of one sample.
template <class T>
void im2col_band(const ConvShape& s, const T* x, T* col, int p0, int p1) {
  const int64_t rows = int64_t(s.C) * s.R * s.S, ld = int64_t(p1 - p0) * s.Q();
  parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(ld, 1)),
               [&](int64_t b, int64_t e) { im2col_rows(s, x, col, b, e, ld, p0, p1); });
}

template <class T>
void col2im(const ConvShape& s, const T* col, T* dx, int g = 1) {
  const int64_t pq = int64_t(s.P()) * s.Q(), per_channel = int64_t(s.R) * s.S * pq * g;
  const int64_t x_stride = int64_t(s.C) * s.H * s.W;
  parallel_for(s.C, std::max<int64_t>(1, 16384 / std::max<int64_t>(per_channel, 1)), [&](int64_t b, int64_t e) {
    for (int i = 0; i < g; ++i) col2im_channels(s, col + i * pq, dx + i * x_stride, b, e, g * pq);
  });
}

// Rows [K] of a group's block [K, g*PQ] <-> the g samples' [K, PQ] planes of an NCHW tensor.
template <class T>
void scatter_group(int K, int64_t pq, int g, const T* block, T* y) {
  parallel_for(K, std::max<int64_t>(1, 16384 / std::max<int64_t>(g * pq, 1)), [&](int64_t b, int64_t e) {
    for (int i = 0; i < g; ++i)
      for (int64_t k = b; k < e; ++k)
        std::memcpy(y + (int64_t(i) * K + k) * pq, block + k * g * pq + i * pq, sizeof(T) * size_t(pq));
  });
}
template <class T>
void gather_group(int K, int64_t pq, int g, const T* y, T* block) {
  parallel_for(K, std::max<int64_t>(1, 16384 / std::max<int64_t>(g * pq, 1)), [&](int64_t b, int64_t e) {
    for (int i = 0; i < g; ++i)
      for (int64_t k = b; k < e; ++k)
        std::memcpy(block + k * g * pq + i * pq, y + (int64_t(i) * K + k) * pq, sizeof(T) * size_t(pq));
  });
}

// Output rows per band of a large single-sample im2col (forward): col [CRS, PQ] larger than kBandElems is
// built and multiplied a band of rows at a time, so that it stays in the L2 cache between im2col writing it
// and the GEMM reading it, instead of a round trip through memory (the stem's col is 600 KB per image,
// ResNet-50's first 3x3's 7 MB). 0 when the whole col fits. In the forward pass each output element is still
// one GEMM sum over all of CRS (bit-identical to the unbanded form); the filter gradient sums band by band, in
// order (a fixed order for the shape, whatever the thread count).
constexpr int64_t kBandElems = int64_t(64) << 10;
int band_rows(const ConvShape& s) {
  const int64_t crs = int64_t(s.C) * s.R * s.S, q = s.Q();
  if (crs * q * s.P() <= kBandElems) return 0;
  // At least ~128 columns, or the GEMM runs on slivers too thin to amortise its set-up.
  const int64_t rows = std::max(kBandElems / (crs * q), (128 + q - 1) / q);
  return rows >= s.P() ? 0 : int(rows);
}

// Samples per GEMM: enough for ~kGroupCols columns, within a scratch budget; 1 for large feature maps.
constexpr int64_t kGroupCols = 1024, kGroupScratch = int64_t(8) << 20;  // elements
int group_size(const ConvShape& s) {
  const int64_t pq = int64_t(s.P()) * s.Q(), crs = int64_t(s.C) * s.R * s.S;
  const int64_t rows = std::max<int64_t>({crs, s.K, s.C});
  int64_t g = std::min<int64_t>(s.N, (kGroupCols + pq - 1) / pq);
  while (g > 1 && rows * g * pq > kGroupScratch) --g;
  return int(std::max<int64_t>(g, 1));
}

// Samples per GEMM for the forward and data-gradient passes, whose bits don't depend on the grouping (each
// output element is one GEMM sum over C*R*S or K, whichever columns share the GEMM): group_size's groups,
// their number rounded up to a multiple of the thread count, so that they split evenly over the threads (a
// batch of 8 at 14x14 on 2 threads: 4 + 4, not 6 + 2). The filter gradient, whose sum order follows the
// groups, keeps group_size.
int split_group_size(const ConvShape& s) {
  const int g0 = group_size(s), t = num_threads();
  int64_t groups = (s.N + g0 - 1) / g0;
  if (t > 1 && s.N >= t) groups = (groups + t - 1) / t * t;
  return int((s.N + groups - 1) / groups);
}

// Whether to split the batch over threads (see the top of the file).
bool split_batch(int N) {
  const int t = num_threads();
  return t > 1 && N >= t && (N % t == 0 || N >= 4 * t);
}

void check_shape(const ConvShape& s) { check_conv_shape(s, "conv2d"); }

// Runs fn(n0, g) for every group of g samples starting at n0 (the last may be shorter): groups split over
// threads, or one after the other (fn's inner work then splits).
template <class F>
void for_each_group(int N, int g, F&& fn) {
  const int groups = (N + g - 1) / g;
  auto one = [&](int64_t gi) { fn(int(gi) * g, std::min(g, N - int(gi) * g)); };
  if (split_batch(groups)) {
    parallel_for(groups, 1, [&](int64_t b, int64_t e) {
      for (int64_t gi = b; gi < e; ++gi) one(gi);
    });
  } else {
    for (int gi = 0; gi < groups; ++gi) one(gi);
  }
}

}  // namespace

void check_conv_shape(const ConvShape& s, const char* what) {
  // The padded input must hold the kernel (H + 2 pad >= R): P() divides a negative numerator toward zero, so
  // P() > 0 alone let a kernel larger than the padded input through (the few-channel NHWC path then read past
  // its padded copy).
  VB_CHECK(s.N >= 0 && s.C > 0 && s.H > 0 && s.W > 0 && s.K > 0 && s.R > 0 && s.S > 0 && s.stride > 0 && s.pad >= 0 &&
               s.H + 2 * s.pad >= s.R && s.W + 2 * s.pad >= s.S && s.P() > 0 && s.Q() > 0,
           what, ": bad shape N=", s.N, " C=", s.C, " H=", s.H, " W=", s.W, " K=", s.K, " R=", s.R, " S=", s.S,
           " stride=", s.stride, " pad=", s.pad);
}

template <class T>
void conv2d_fwd(const ConvShape& s, const T* x, const T* w, T* y) {
  check_shape(s);
  const int P = s.P(), Q = s.Q(), CRS = s.C * s.R * s.S, PQ = P * Q;
  const int64_t x_stride = int64_t(s.C) * s.H * s.W, y_stride = int64_t(s.K) * PQ;
  for_each_group(s.N, split_group_size(s), [&](int n, int g) {
    const T* xn = x + n * x_stride;
    T* yn = y + n * y_stride;
    if (g == 1 && is_pointwise(s)) {
      gemm<T>(false, false, s.K, PQ, s.C, T(1), w, s.C, xn, PQ, T(0), yn, PQ);
      return;
    }
    const int cols = g * PQ;
    if (g == 1) {
      if (const int band = band_rows(s)) {
        T* col = scratch<T>(size_t(CRS) * band * Q);
        for (int p0 = 0; p0 < P; p0 += band) {
          const int p1 = std::min(P, p0 + band), bc = (p1 - p0) * Q;
          im2col_band(s, xn, col, p0, p1);
          gemm<T>(false, false, s.K, bc, CRS, T(1), w, CRS, col, bc, T(0), yn + int64_t(p0) * Q, PQ);
        }
        return;
      }
      T* col = scratch<T>(size_t(CRS) * PQ);
      im2col(s, xn, col);
      gemm<T>(false, false, s.K, PQ, CRS, T(1), w, CRS, col, PQ, T(0), yn, PQ);
      return;
    }
    T* col = scratch<T>(size_t(CRS) * cols);
    im2col(s, xn, col, g);
    T* block = scratch<T, 1>(size_t(s.K) * cols);
    gemm<T>(false, false, s.K, cols, CRS, T(1), w, CRS, col, cols, T(0), block, cols);
    scatter_group(s.K, PQ, g, block, yn);
  });
}

template <class T>
void conv2d_bwd_data(const ConvShape& s, const T* dy, const T* w, T* dx) {
  check_shape(s);
  const int P = s.P(), Q = s.Q(), CRS = s.C * s.R * s.S, PQ = P * Q;
  const int64_t x_stride = int64_t(s.C) * s.H * s.W, y_stride = int64_t(s.K) * PQ;
  for_each_group(s.N, split_group_size(s), [&](int n, int g) {
    const T* dyn = dy + n * y_stride;
    T* dxn = dx + n * x_stride;
    if (g == 1 && is_pointwise(s)) {
      gemm<T>(true, false, s.C, PQ, s.K, T(1), w, s.C, dyn, PQ, T(0), dxn, PQ);
      return;
    }
    const int cols = g * PQ;
    const T* dyg = dyn;
    if (g > 1) {
      T* block = scratch<T, 1>(size_t(s.K) * cols);
      gather_group(s.K, PQ, g, dyn, block);
      dyg = block;
    }
    T* dcol = scratch<T>(size_t(CRS) * cols);
    if (is_pointwise(s)) {
      gemm<T>(true, false, s.C, cols, s.K, T(1), w, s.C, dyg, cols, T(0), dcol, cols);
      scatter_group(s.C, PQ, g, dcol, dxn);
      return;
    }
    gemm<T>(true, false, CRS, cols, s.K, T(1), w, CRS, dyg, cols, T(0), dcol, cols);
    col2im(s, dcol, dxn, g);
  });
}

template <class T>
void conv2d_bwd_filter(const ConvShape& s, const T* x, const T* dy, T* dw) {
  check_shape(s);
  const int P = s.P(), Q = s.Q(), CRS = s.C * s.R * s.S, PQ = P * Q;
  const int64_t x_stride = int64_t(s.C) * s.H * s.W, y_stride = int64_t(s.K) * PQ;
  if (s.N == 0) {
    std::fill(dw, dw + int64_t(s.K) * CRS, T(0));
    return;
  }
  const int gs = group_size(s);
  for (int n = 0; n < s.N; n += gs) {
    const int g = std::min(gs, s.N - n);
    const T* xn = x + n * x_stride;
    const T* dyn = dy + n * y_stride;
    const T beta = n == 0 ? T(0) : T(1);
    if (g == 1) {
      if (is_pointwise(s)) {
        gemm<T>(false, true, s.K, s.C, PQ, T(1), dyn, PQ, xn, PQ, beta, dw, s.C);
        continue;
      }
      if (const int band = band_rows(s)) {  // bands of output rows, summed in order
        T* col = scratch<T>(size_t(CRS) * band * Q);
        for (int p0 = 0; p0 < P; p0 += band) {
          const int p1 = std::min(P, p0 + band), bc = (p1 - p0) * Q;
          im2col_band(s, xn, col, p0, p1);
          gemm<T>(false, true, s.K, CRS, bc, T(1), dyn + int64_t(p0) * Q, PQ, col, bc, p0 == 0 ? beta : T(1), dw,
                  CRS);
        }
        continue;
      }
      T* col = scratch<T>(size_t(CRS) * PQ);
      im2col(s, xn, col);
      gemm<T>(false, true, s.K, CRS, PQ, T(1), dyn, PQ, col, PQ, beta, dw, CRS);
      continue;
    }
    const int cols = g * PQ;
    T* col = scratch<T>(size_t(CRS) * cols);
    T* block = scratch<T, 1>(size_t(s.K) * cols);
    im2col(s, xn, col, g);
    gather_group(s.K, PQ, g, dyn, block);
    gemm<T>(false, true, s.K, CRS, cols, T(1), block, cols, col, cols, beta, dw, CRS);
  }
}

#define VB_INSTANTIATE_CONV(T)                                                \
  template void conv2d_fwd<T>(const ConvShape&, const T*, const T*, T*);      \
  template void conv2d_bwd_data<T>(const ConvShape&, const T*, const T*, T*); \
  template void conv2d_bwd_filter<T>(const ConvShape&, const T*, const T*, T*);
VB_INSTANTIATE_CONV(float)
VB_INSTANTIATE_CONV(double)
#undef VB_INSTANTIATE_CONV

}  // namespace vb::cpu
