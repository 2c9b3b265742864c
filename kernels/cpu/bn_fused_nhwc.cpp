// Batch norm fused with the residual add and ReLU around it, NHWC (see bn_fused_nhwc.h).
//
// Reductions: the M rows are cut into chunks of row_chunk(C) rows; parallel_for hands out whole chunks (grain 1,
// each chunk about 16k values), each chunk accumulates its per-channel sums in double (rows in order, the loop
// over the row's C contiguous values vectorised) into its own slot, and the slots are combined in chunk order on
// the calling thread (plain sums, or Chan et al.'s formula for the variance: see mean_m2). Which thread ran a chunk never changes a bit. Element passes split rows over threads.
// The per-element expressions and per-channel coefficients are bn_fused.cpp's, written out the same way.
#include "kernels/cpu/bn_fused_nhwc.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/check.h"
#include "kernels/cpu/bn_coeffs.h"
#include "kernels/cpu/parallel.h"

namespace vb::cpu {
namespace {

constexpr int64_t kChunkValues = 16384;

// Rows per reduction chunk: a function of C alone (so of the shape alone).
int64_t row_chunk(int C) { return std::max<int64_t>(1, kChunkValues / std::max(C, 1)); }
// parallel_for's grain for the element passes (no reductions there: any split gives the same bits).
int64_t row_grain(int C) { return row_chunk(C); }

// The calling thread's scratch; one buffer per (type, tag).
template <class V, int Tag = 0>
V* scratch(size_t n) {
  thread_local std::vector<V> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// The row loops below take 4 rows at a time, a channel's accumulator kept in a register across them (one load
// and one store of it per 4 values instead of per value). The additions are still made row by row, in order:
// the same bits as one row at a time.
constexpr int kRows = 4;

// acc[c] += x[r][c] over rows [r0, r1).
template <class T>
void add_sum_rows(double* __restrict acc, const T* __restrict x, int64_t r0, int64_t r1, int C) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) {
    const T* __restrict x0 = x + r * C;
    for (int c = 0; c < C; ++c) {
      double s = acc[c];
      s += double(x0[c]);
      s += double(x0[C + c]);
      s += double(x0[2 * C + c]);
      s += double(x0[3 * C + c]);
      acc[c] = s;
    }
  }
  for (; r < r1; ++r) {
    const T* __restrict xr = x + r * C;
    for (int c = 0; c < C; ++c) acc[c] += double(xr[c]);
  }
}

// acc[c] += (x[r][c] - mean[c])^2 over rows [r0, r1).
template <class T>
void add_sq_dev_rows(double* __restrict acc, const T* __restrict x, const double* __restrict mean, int64_t r0,
                     int64_t r1, int C) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) {
    const T* __restrict x0 = x + r * C;
    for (int c = 0; c < C; ++c) {
      const double m = mean[c];
      double s = acc[c];
      for (int j = 0; j < kRows; ++j) {
        const double d = double(x0[j * C + c]) - m;
        s += d * d;
      }
      acc[c] = s;
    }
  }
  for (; r < r1; ++r) {
    const T* __restrict xr = x + r * C;
    for (int c = 0; c < C; ++c) {
      const double d = double(xr[c]) - mean[c];
      acc[c] += d * d;
    }
  }
}

// s_dy[c] += g, s_dyx[c] += g (x - mean[c]) over `rows` rows (kRows at most) of n channels: row j's values at
// x + j * C and g + j * gstride.
template <class T>
inline void add_grad_sums_block(double* __restrict s_dy, double* __restrict s_dyx, const T* __restrict x,
                                const T* __restrict g, const double* __restrict mean, int rows, int n, int64_t C,
                                int64_t gstride) {
  if (rows == kRows) {
    for (int c = 0; c < n; ++c) {
      const double m = mean[c];
      double a = s_dy[c], b = s_dyx[c];
      for (int j = 0; j < kRows; ++j) {
        const double gd = double(g[j * gstride + c]);
        a += gd;
        b += gd * (double(x[j * C + c]) - m);
      }
      s_dy[c] = a;
      s_dyx[c] = b;
    }
    return;
  }
  for (int j = 0; j < rows; ++j)
    for (int c = 0; c < n; ++c) {
      const double gd = double(g[j * gstride + c]);
      s_dy[c] += gd;
      s_dyx[c] += gd * (double(x[j * C + c]) - mean[c]);
    }
}

// The backward's sums over rows [r0, r1): g = the ReLU's backward of dy (elementwise.cpp's relu_bwd: 0 where
// y <= 0, dy elsewhere, a NaN y passing dy) or dy. With the ReLU, g is made a block of channels at a time in a
// local buffer: the select vectorises there (dy loaded unconditionally), not inside the double accumulation.
template <class T, bool kRelu>
void add_grad_sums_rows(double* __restrict s_dy, double* __restrict s_dyx, const T* x, const T* y, const T* dy,
                        const double* __restrict mean, int64_t r0, int64_t r1, int C) {
  constexpr int kBlock = 256;
  alignas(64) T g[kRows * kBlock];
  for (int64_t r = r0; r < r1; r += kRows) {
    const int rows = int(std::min<int64_t>(kRows, r1 - r));
    const int64_t o = r * C;
    if constexpr (!kRelu) {
      add_grad_sums_block(s_dy, s_dyx, x + o, dy + o, mean, rows, C, C, C);
    } else {
      for (int c0 = 0; c0 < C; c0 += kBlock) {
        const int n = std::min(kBlock, C - c0);
        for (int j = 0; j < rows; ++j) {
          const T* __restrict yr = y + o + j * int64_t(C) + c0;
          const T* __restrict dyr = dy + o + j * int64_t(C) + c0;
          T* __restrict gj = g + j * kBlock;
          for (int i = 0; i < n; ++i) {
            const T v = dyr[i];
            gj[i] = yr[i] <= T(0) ? T(0) : v;
          }
        }
        add_grad_sums_block(s_dy + c0, s_dyx + c0, x + o + c0, g, mean + c0, rows, n, C, kBlock);
      }
    }
  }
}

// The reduction chunks: rows [k * rows, min(M, (k + 1) * rows)) for k < n; part + k * K * C holds chunk k's K
// slots of C doubles.
struct Chunks {
  int64_t rows, n;
  double* part;
  int64_t begin(int64_t k) const { return k * rows; }
  int64_t end(int64_t k, int64_t M) const { return std::min(M, (k + 1) * rows); }
};

// Runs f(slots, r0, r1) on every chunk (slots zeroed before), chunks spread over the threads.
template <class F>
Chunks chunk_partials(int64_t M, int C, int K, F&& f) {
  Chunks ch;
  ch.rows = row_chunk(C);
  ch.n = (M + ch.rows - 1) / ch.rows;
  const size_t slot = size_t(K) * C;
  ch.part = scratch<double, 1>(size_t(ch.n) * slot);
  parallel_for(ch.n, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      double* p = ch.part + size_t(k) * slot;
      std::fill(p, p + slot, 0.0);
      f(p, ch.begin(k), ch.end(k, M));
    }
  });
  return ch;
}

// Per-channel sums over the M rows in the fixed chunk order: sums[k * C + c] for k < K, of the partial sums a
// chunk's f(slots, r0, r1) accumulates into its K slots of C doubles.
template <class F>
void reduce_rows(int64_t M, int C, int K, double* sums, F&& f) {
  const Chunks ch = chunk_partials(M, C, K, f);
  const size_t slot = size_t(K) * C;
  std::fill(sums, sums + slot, 0.0);
  for (int64_t k = 0; k < ch.n; ++k) {
    const double* __restrict p = ch.part + size_t(k) * slot;
    for (size_t i = 0; i < slot; ++i) sums[i] += p[i];
  }
}

// Per-channel mean and sum of squared deviations from it (M2) over the M rows. Each chunk is reduced in two
// passes while it is in cache (its sum, then the squared deviations from its own mean), and the chunks are
// combined in chunk order by Chan et al.'s formula, M2 = sum_k M2_k + n_k (mean_k - mean)^2 (every term >= 0):
// the numerical safety of the two-pass scheme with one sweep over the tensor instead of two.
template <class T>
void mean_m2(int64_t M, int C, const T* x, double* mean, double* m2) {
  const Chunks ch = chunk_partials(M, C, 2, [&](double* p, int64_t r0, int64_t r1) {
    add_sum_rows(p, x, r0, r1, C);
    double* mk = scratch<double, 5>(size_t(C));
    for (int c = 0; c < C; ++c) mk[c] = p[c] / double(r1 - r0);
    add_sq_dev_rows(p + C, x, mk, r0, r1, C);
  });
  std::fill(mean, mean + C, 0.0);
  for (int64_t k = 0; k < ch.n; ++k) {
    const double* __restrict p = ch.part + size_t(k) * 2 * C;
    for (int c = 0; c < C; ++c) mean[c] += p[c];
  }
  for (int c = 0; c < C; ++c) mean[c] /= double(M);
  std::fill(m2, m2 + C, 0.0);
  for (int64_t k = 0; k < ch.n; ++k) {
    const double* __restrict p = ch.part + size_t(k) * 2 * C;
    const double nk = double(ch.end(k, M) - ch.begin(k));
    for (int c = 0; c < C; ++c) {
      const double d = p[c] / nk - mean[c];
      m2[c] += p[C + c] + nk * d * d;
    }
  }
}

// y = act(x * a + b + r) over rows [r0, r1), a and b per channel: bn_fused.cpp's affine_act (batchnorm.cpp's
// affine, then elementwise.cpp's add and relu_fwd).
template <class T, bool kRes, bool kRelu>
void affine_act_rows(const T* x, const T* res, T* y, const T* __restrict a, const T* __restrict b, int64_t r0,
                     int64_t r1, int C) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    const T* rr = kRes ? res + r * C : nullptr;
    for (int c = 0; c < C; ++c) {
      T v = xr[c] * a[c] + b[c];
      if constexpr (kRes) v = v + rr[c];
      if constexpr (kRelu) v = v < T(0) ? T(0) : v;
      yr[c] = v;
    }
  }
}

// Few channels: the element passes take G = 64 / C rows at a time as one row of G*C values, with each
// per-channel coefficient array repeated G times (`arrays` arrays of C values at coef, C apart, into tag Tag's
// scratch), so that their loops run over 64 values or more instead of C (16 for a small model's first stage: the
// loop overhead was most of the pass). The same expression for each element: the same bits. Returns G (1: the
// coefficients as they are).
template <class T, int Tag>
int widen_rows(int C, int arrays, const T* coef, const T*& wide) {
  const int G = C < 64 ? 64 / C : 1;
  wide = coef;
  if (G == 1) return 1;
  T* rep = scratch<T, Tag>(size_t(arrays) * G * C);
  for (int k = 0; k < arrays; ++k)
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < C; ++c) rep[(int64_t(k) * G + g) * C + c] = coef[int64_t(k) * C + c];
  wide = rep;
  return G;
}

template <class T>
void affine_act_span(int64_t r0, int64_t r1, int C, const T* x, const T* res, T* y, const T* a, const T* b,
                     bool relu) {
  if (res) {
    if (relu)
      affine_act_rows<T, true, true>(x, res, y, a, b, r0, r1, C);
    else
      affine_act_rows<T, true, false>(x, res, y, a, b, r0, r1, C);
  } else {
    if (relu)
      affine_act_rows<T, false, true>(x, res, y, a, b, r0, r1, C);
    else
      affine_act_rows<T, false, false>(x, res, y, a, b, r0, r1, C);
  }
}

// ab: the coefficients a (C values), then b (C values).
template <class T>
void affine_act(int64_t M, int C, const T* x, const T* res, T* y, const T* ab, bool relu) {
  const T* wide;
  const int G = widen_rows<T, 7>(C, 2, ab, wide);
  const int Cw = G * C;
  const int64_t groups = M / G;
  parallel_for(groups, row_grain(Cw), [&](int64_t g0, int64_t g1) {
    affine_act_span<T>(g0, g1, Cw, x, res, y, wide, wide + Cw, relu);
  });
  if (groups * G < M) affine_act_span<T>(groups * G, M, C, x, res, y, ab, ab + C, relu);  // the rows left over
}

// dres = g; dx = (g - k_dy - (x - m) * k_x) * a over rows [r0, r1), coefficients per channel (coef: a, k_dy, k_x,
// m, C each). g goes through a local buffer: dx and dres may alias dy, and the buffer lets the loops vectorise
// without a dependence on that (each row's dy is read whole before its dx / dres are written).
template <class T, bool kRelu>
void grad_apply_rows(const T* x, const T* y, const T* dy, T* dx, T* dres, const T* __restrict coef, int64_t r0,
                     int64_t r1, int C) {
  constexpr int kBlock = 512;
  alignas(64) T g[kBlock];
  const T* __restrict a = coef;
  const T* __restrict k_dy = coef + C;
  const T* __restrict k_x = coef + 2 * C;
  const T* __restrict m = coef + 3 * C;
  for (int64_t r = r0; r < r1; ++r)
    for (int c0 = 0; c0 < C; c0 += kBlock) {
      const int n = std::min(kBlock, C - c0);
      const int64_t o = r * C + c0;
      const T* dyr = dy + o;
      if constexpr (kRelu) {
        const T* yr = y + o;
        for (int i = 0; i < n; ++i) {
          const T v = dyr[i];
          g[i] = yr[i] <= T(0) ? T(0) : v;
        }
      } else {
        for (int i = 0; i < n; ++i) g[i] = dyr[i];
      }
      if (dres) {
        T* dr = dres + o;
        for (int i = 0; i < n; ++i) dr[i] = g[i];
      }
      if (dx) {
        const T* xr = x + o;
        T* d = dx + o;
        for (int i = 0; i < n; ++i) {
          const int c = c0 + i;
          d[i] = (g[i] - k_dy[c] - (xr[i] - m[c]) * k_x[c]) * a[c];
        }
      }
    }
}

}  // namespace

template <class T>
void bn_train_fwd_nhwc(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* residual,
                       bool relu, T* y, T* save_mean, T* save_invstd, T* running_mean, T* running_var,
                       double momentum, double eps) {
  const int64_t count = int64_t(N) * HW;
  VB_CHECK(count > 1, "batch norm in training mode needs more than one value per channel (N*H*W = ", count, ")");
  VB_CHECK(C > 0, "batch norm NHWC: bad C=", C);
  const int64_t M = count;
  double* m2 = scratch<double, 2>(size_t(C));  // sum of squared deviations from the mean
  double* mean = scratch<double, 3>(size_t(C));
  mean_m2(M, C, x, mean, m2);
  T* a = scratch<T, 4>(2 * size_t(C));
  T* b = a + C;
  for (int c = 0; c < C; ++c) {
    const double sq = m2[c];
    const double invstd = 1.0 / std::sqrt(sq / double(count) + eps);  // biased variance
    if (save_mean) save_mean[c] = T(mean[c]);
    if (save_invstd) save_invstd[c] = T(invstd);
    if (running_mean) running_mean[c] = T(momentum * mean[c] + (1.0 - momentum) * double(running_mean[c]));
    if (running_var)
      running_var[c] = T(momentum * (sq / double(count - 1)) + (1.0 - momentum) * double(running_var[c]));
    // From the statistics as saved (rounded to T), so that bn_apply_nhwc reproduces y bit for bit.
    bn_affine(gamma, beta, c, T(mean[c]), T(invstd), a[c], b[c]);
  }
  if (y) affine_act(M, C, x, residual, y, a, relu);
}

template <class T>
void bn_apply_nhwc(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* save_mean,
                   const T* save_invstd, bool relu, T* y) {
  T* a = scratch<T, 4>(2 * size_t(C));
  T* b = a + C;
  for (int c = 0; c < C; ++c) bn_affine(gamma, beta, c, save_mean[c], save_invstd[c], a[c], b[c]);
  affine_act<T>(int64_t(N) * HW, C, x, nullptr, y, a, relu);
}

template <class T>
void bn_eval_fwd_nhwc(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* running_mean,
                      const T* running_var, double eps, const T* residual, bool relu, T* y) {
  // batchnorm_eval_fwd's coefficients (computed in double, rounded to T), once per channel.
  T* a = scratch<T, 4>(2 * size_t(C));
  T* b = a + C;
  for (int c = 0; c < C; ++c) bn_eval_affine(gamma, beta, running_mean, running_var, eps, c, a[c], b[c]);
  affine_act(int64_t(N) * HW, C, x, residual, y, a, relu);
}

template <class T>
void bn_bwd_nhwc(int N, int C, int HW, const T* x, const T* y, const T* dy, const T* gamma, const T* save_mean,
                 const T* save_invstd, bool relu, T* dx, T* dresidual, T* dgamma, T* dbeta) {
  const int64_t count = int64_t(N) * HW, M = count;
  VB_CHECK(C > 0, "batch norm NHWC: bad C=", C);
  double* mean = scratch<double, 3>(size_t(C));
  for (int c = 0; c < C; ++c) mean[c] = double(save_mean[c]);
  double* sums = scratch<double, 2>(2 * size_t(C));  // sum(g), sum(g * (x - mean))
  reduce_rows(M, C, 2, sums, [&](double* p, int64_t r0, int64_t r1) {
    if (relu)
      add_grad_sums_rows<T, true>(p, p + C, x, y, dy, mean, r0, r1, C);
    else
      add_grad_sums_rows<T, false>(p, p + C, x, y, dy, mean, r0, r1, C);
  });
  T* coef = scratch<T, 4>(4 * size_t(C));  // a, k_dy, k_x, mean: C each
  for (int c = 0; c < C; ++c) {
    const double invstd = double(save_invstd[c]);
    const double sum_dy = sums[c], sum_dyx = sums[C + c];
    if (dgamma) dgamma[c] = T(sum_dyx * invstd);
    if (dbeta) dbeta[c] = T(sum_dy);
    coef[c] = T((gamma ? double(gamma[c]) : 1.0) * invstd);
    coef[C + c] = T(sum_dy / double(count));
    coef[2 * C + c] = T(sum_dyx * invstd * invstd / double(count));
    coef[3 * C + c] = save_mean[c];
  }
  if (!dx && !dresidual) return;
  const T* wide;
  const int G = widen_rows<T, 7>(C, 4, coef, wide);  // rows in groups of G (see widen_rows)
  const int Cw = G * C;
  auto apply = [&](int64_t r0, int64_t r1, int c, const T* k) {
    if (relu)
      grad_apply_rows<T, true>(x, y, dy, dx, dresidual, k, r0, r1, c);
    else
      grad_apply_rows<T, false>(x, y, dy, dx, dresidual, k, r0, r1, c);
  };
  const int64_t groups = M / G;
  parallel_for(groups, row_grain(Cw), [&](int64_t g0, int64_t g1) { apply(g0, g1, Cw, wide); });
  if (groups * G < M) apply(groups * G, M, C, coef);  // the rows left over
}

#define VB_INSTANTIATE_BN_NHWC(T)                                                                                \
  template void bn_train_fwd_nhwc<T>(int, int, int, const T*, const T*, const T*, const T*, bool, T*, T*, T*, T*, \
                                     T*, double, double);                                                        \
  template void bn_apply_nhwc<T>(int, int, int, const T*, const T*, const T*, const T*, const T*, bool, T*);      \
  template void bn_eval_fwd_nhwc<T>(int, int, int, const T*, const T*, const T*, const T*, const T*, double,      \
                                    const T*, bool, T*);                                                         \
  template void bn_bwd_nhwc<T>(int, int, int, const T*, const T*, const T*, const T*, const T*, const T*, bool,   \
                               T*, T*, T*, T*);
VB_INSTANTIATE_BN_NHWC(float)
VB_INSTANTIATE_BN_NHWC(double)
#undef VB_INSTANTIATE_BN_NHWC

}  // namespace vb::cpu
