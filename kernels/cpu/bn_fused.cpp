// Batch norm fused with the residual add and ReLU around it (see bn_fused.h).
//
// Loop order: each thread owns a block of channels [c0, c1) (parallel_for over C, chunks fixed by C alone) and
// walks it sample by sample, so it reads the contiguous run x[n, c0:c1, :] each time. Per channel, the values
// still arrive in the order batchnorm.cpp sums them (samples in order, plane index i into lane i % 8), so the
// statistics are the same bits; the element formulas are the same expressions as batchnorm.cpp's followed by
// elementwise.cpp's add and ReLU.
#include "kernels/cpu/bn_fused.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/check.h"
#include "kernels/cpu/bn_coeffs.h"
#include "kernels/cpu/bn_lanes.h"
#include "kernels/cpu/parallel.h"

namespace vb::cpu {
namespace {

using bn_lanes::add_grad_sums;
using bn_lanes::add_sq_dev;
using bn_lanes::add_sum;
using bn_lanes::kLanes;
using bn_lanes::Lanes;

// The ReLU's backward (elementwise.cpp's relu_bwd: 0 where y <= 0, dy elsewhere, NaN y passing dy), or dy.
// dy is loaded unconditionally: as a conditional load the loop stays scalar and branches on every element
// (5 ns per element on random signs), as a select it vectorises.
template <class T, bool kRelu>
inline T relu_grad(const T* y, const T* dy, int64_t i) {
  const T g = dy[i];
  if constexpr (kRelu) return y[i] <= T(0) ? T(0) : g;
  return g;
}

// y = act(x * a + b + r): batchnorm.cpp's affine, then elementwise.cpp's add and relu_fwd.
template <class T>
inline void affine_act(const T* x, const T* r, T* y, int64_t n, T a, T b, bool relu) {
  if (r) {
    if (relu)
      for (int64_t i = 0; i < n; ++i) {
        T v = x[i] * a + b;
        v = v + r[i];
        y[i] = v < T(0) ? T(0) : v;
      }
    else
      for (int64_t i = 0; i < n; ++i) {
        const T v = x[i] * a + b;
        y[i] = v + r[i];
      }
  } else {
    if (relu)
      for (int64_t i = 0; i < n; ++i) {
        const T v = x[i] * a + b;
        y[i] = v < T(0) ? T(0) : v;
      }
    else
      for (int64_t i = 0; i < n; ++i) y[i] = x[i] * a + b;
  }
}

// dres = g; dx = (g - k_dy - (x - m) * k_x) * a, g as in add_grad_sums. Element i is read before it is written.
template <class T, bool kRelu>
inline void grad_apply(const T* x, const T* y, const T* dy, T* dx, T* dres, int64_t n, T a, T k_dy, T k_x, T m) {
  for (int64_t i = 0; i < n; ++i) {
    const T g = relu_grad<T, kRelu>(y, dy, i);
    if (dres) dres[i] = g;
    if (dx) dx[i] = (g - k_dy - (x[i] - m) * k_x) * a;
  }
}

// The same with g = the ReLU's backward of dy, made kChunk values at a time in a small buffer (a select in
// float vectorises; inside the double accumulation it does not). kChunk is a multiple of the 8 lanes, so each
// value lands in the lane of its index in the plane, as above.
template <class T>
inline void add_relu_grad_sums(Lanes& acc_dy, Lanes& acc_dyx, const T* x, const T* y, const T* dy, int64_t n,
                               double mean) {
  constexpr int64_t kChunk = 512;
  static_assert(kChunk % kLanes == 0);
  alignas(64) T g[kChunk];
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t m = std::min(kChunk, n - i0);
    for (int64_t i = 0; i < m; ++i) g[i] = relu_grad<T, true>(y + i0, dy + i0, i);
    add_grad_sums(acc_dy, acc_dyx, x + i0, g, m, mean);
  }
}

// Calls f(n, c) for every plane of the channel block [c0, c1), each channel's planes in sample order: sample
// by sample, one contiguous run of memory per sample.
template <class F>
inline void for_planes(int N, int64_t c0, int64_t c1, int HW, F&& f) {
  for (int n = 0; n < N; ++n)
    for (int64_t c = c0; c < c1; ++c) f(n, c);
}

// The same over a channel block's planes into one accumulator per channel (acc[c - c0], of type A). Planes of
// 8 to 63 values go channel by channel instead, the accumulator in a local across the samples (measured: 2-3x
// faster there; slower for planes under 8 values, whose tail lanes are indexed at run time).
template <class A, class F>
inline void reduce_planes(int N, int64_t c0, int64_t c1, int HW, A* acc, F&& f) {
  if (HW >= 64 || HW < 8) {
    for (int n = 0; n < N; ++n)
      for (int64_t c = c0; c < c1; ++c) f(acc[c - c0], n, c);
  } else {
    for (int64_t c = c0; c < c1; ++c) {
      A local = acc[c - c0];
      for (int n = 0; n < N; ++n) f(local, n, c);
      acc[c - c0] = local;
    }
  }
}
struct LanePair {
  Lanes dy, dyx;
};

int64_t channel_grain(int64_t per_channel) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(per_channel, 1)); }

// Per-thread scratch for a block of channels; one buffer per (type, tag).
template <class V, int Tag = 0>
V* block_scratch(size_t n) {
  thread_local std::vector<V> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace

template <class T>
void bn_train_fwd_fused(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* residual,
                        bool relu, T* y, T* save_mean, T* save_invstd, T* running_mean, T* running_var,
                        double momentum, double eps) {
  const int64_t count = int64_t(N) * HW;
  VB_CHECK(count > 1, "batch norm in training mode needs more than one value per channel (N*H*W = ", count, ")");
  const int64_t cstride = int64_t(C) * HW;
  parallel_for(C, channel_grain(count), [&](int64_t c0, int64_t c1) {
    const int64_t nc = c1 - c0;
    Lanes* acc = block_scratch<Lanes>(size_t(nc));
    double* mean = block_scratch<double, 1>(size_t(nc));
    std::fill(acc, acc + nc, Lanes{});
    reduce_planes(N, c0, c1, HW, acc, [&](Lanes& a, int n, int64_t c) { add_sum(a, x + n * cstride + c * HW, HW); });
    for (int64_t k = 0; k < nc; ++k) {
      mean[k] = acc[k].total() / double(count);
      acc[k] = Lanes{};
    }
    reduce_planes(N, c0, c1, HW, acc,
                  [&](Lanes& a, int n, int64_t c) { add_sq_dev(a, x + n * cstride + c * HW, HW, mean[c - c0]); });
    T* a = block_scratch<T>(2 * size_t(nc));
    T* b = a + nc;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k = c - c0;
      const double sq = acc[k].total();
      const double invstd = 1.0 / std::sqrt(sq / double(count) + eps);  // biased variance
      if (save_mean) save_mean[c] = T(mean[k]);
      if (save_invstd) save_invstd[c] = T(invstd);
      if (running_mean) running_mean[c] = T(momentum * mean[k] + (1.0 - momentum) * double(running_mean[c]));
      if (running_var)
        running_var[c] = T(momentum * (sq / double(count - 1)) + (1.0 - momentum) * double(running_var[c]));
      // From the statistics as saved (rounded to T), so that bn_apply_fused reproduces y bit for bit.
      bn_affine(gamma, beta, c, T(mean[k]), T(invstd), a[k], b[k]);
    }
    if (!y) return;
    for_planes(N, c0, c1, HW, [&](int n, int64_t c) {
      const int64_t o = n * cstride + c * HW;
      affine_act(x + o, residual ? residual + o : nullptr, y + o, HW, a[c - c0], b[c - c0], relu);
    });
  });
}

template <class T>
void bn_apply_fused(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* save_mean,
                    const T* save_invstd, bool relu, T* y) {
  const int64_t cstride = int64_t(C) * HW;
  parallel_for(C, channel_grain(int64_t(N) * HW), [&](int64_t c0, int64_t c1) {
    const int64_t nc = c1 - c0;
    T* a = block_scratch<T>(2 * size_t(nc));
    T* b = a + nc;
    for (int64_t c = c0; c < c1; ++c) bn_affine(gamma, beta, c, save_mean[c], save_invstd[c], a[c - c0], b[c - c0]);
    for_planes(N, c0, c1, HW, [&](int n, int64_t c) {
      const int64_t o = n * cstride + c * HW;
      affine_act<T>(x + o, nullptr, y + o, HW, a[c - c0], b[c - c0], relu);
    });
  });
}

template <class T>
void bn_eval_fwd_fused(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* running_mean,
                       const T* running_var, double eps, const T* residual, bool relu, T* y) {
  // batchnorm_eval_fwd's coefficients (computed in double, rounded to T), once per channel, in the calling
  // thread's grow-only scratch (no allocation per call).
  T* coef = block_scratch<T, 2>(2 * size_t(C));
  for (int c = 0; c < C; ++c)
    bn_eval_affine(gamma, beta, running_mean, running_var, eps, c, coef[2 * size_t(c)], coef[2 * size_t(c) + 1]);
  parallel_for(int64_t(N) * C, channel_grain(HW), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % C;
      affine_act(x + p * HW, residual ? residual + p * HW : nullptr, y + p * HW, HW, coef[2 * c], coef[2 * c + 1],
                 relu);
    }
  });
}

template <class T>
void bn_bwd_fused(int N, int C, int HW, const T* x, const T* y, const T* dy, const T* gamma, const T* save_mean,
                  const T* save_invstd, bool relu, T* dx, T* dresidual, T* dgamma, T* dbeta) {
  const int64_t count = int64_t(N) * HW;
  const int64_t cstride = int64_t(C) * HW;
  parallel_for(C, channel_grain(count), [&](int64_t c0, int64_t c1) {
    const int64_t nc = c1 - c0;
    LanePair* acc = block_scratch<LanePair>(size_t(nc));  // sum(g), sum(g * (x - mean))
    std::fill(acc, acc + nc, LanePair{});
    reduce_planes(N, c0, c1, HW, acc, [&](LanePair& a, int n, int64_t c) {
      const int64_t o = n * cstride + c * HW;
      const double mean = double(save_mean[c]);
      if (relu)
        add_relu_grad_sums(a.dy, a.dyx, x + o, y + o, dy + o, HW, mean);
      else
        add_grad_sums(a.dy, a.dyx, x + o, dy + o, HW, mean);
    });
    T* coef = block_scratch<T>(4 * size_t(nc));  // a, k_dy, k_x, mean per channel
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k = c - c0;
      const double invstd = double(save_invstd[c]);
      const double sum_dy = acc[k].dy.total(), sum_dyx = acc[k].dyx.total();
      if (dgamma) dgamma[c] = T(sum_dyx * invstd);
      if (dbeta) dbeta[c] = T(sum_dy);
      coef[4 * k] = T((gamma ? double(gamma[c]) : 1.0) * invstd);
      coef[4 * k + 1] = T(sum_dy / double(count));
      coef[4 * k + 2] = T(sum_dyx * invstd * invstd / double(count));
      coef[4 * k + 3] = save_mean[c];
    }
    if (!dx && !dresidual) return;
    for_planes(N, c0, c1, HW, [&](int n, int64_t c) {
      const int64_t o = n * cstride + c * HW, k = c - c0;
      T* dxo = dx ? dx + o : nullptr;
      T* dro = dresidual ? dresidual + o : nullptr;
      if (relu)
        grad_apply<T, true>(x + o, y + o, dy + o, dxo, dro, HW, coef[4 * k], coef[4 * k + 1], coef[4 * k + 2],
                            coef[4 * k + 3]);
      else
        grad_apply<T, false>(x + o, nullptr, dy + o, dxo, dro, HW, coef[4 * k], coef[4 * k + 1], coef[4 * k + 2],
                             coef[4 * k + 3]);
    });
  });
}

#define VB_INSTANTIATE_BN_FUSED(T)                                                                                \
  template void bn_train_fwd_fused<T>(int, int, int, const T*, const T*, const T*, const T*, bool, T*, T*, T*, T*, \
                                      T*, double, double);                                                        \
  template void bn_apply_fused<T>(int, int, int, const T*, const T*, const T*, const T*, const T*, bool, T*);      \
  template void bn_eval_fwd_fused<T>(int, int, int, const T*, const T*, const T*, const T*, const T*, double,      \
                                     const T*, bool, T*);                                                         \
  template void bn_bwd_fused<T>(int, int, int, const T*, const T*, const T*, const T*, const T*, const T*, bool,   \
                                T*, T*, T*, T*);
VB_INSTANTIATE_BN_FUSED(float)
VB_INSTANTIATE_BN_FUSED(double)
#undef VB_INSTANTIATE_BN_FUSED

}  // namespace vb::cpu
