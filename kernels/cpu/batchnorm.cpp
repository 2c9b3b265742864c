// Batch norm over (N, HW) per channel, as torch.nn.functional.batch_norm on the CPU.
//
// Statistics are accumulated in double whatever T is (two passes: the mean, then the sum of squared
// deviations), each channel by one thread in a fixed order, so they don't depend on the thread count.
// The per-element passes use per-channel coefficients (PyTorch's form):
//   forward   y  = x * a + b,                 a = gamma * invstd, b = beta - mean * a
//   backward  dx = (dy - k_dy - (x - mean) * k_x) * a,   k_dy = sum(dy) / n,
//                                              k_x = sum(dy * (x - mean)) * invstd^2 / n
//   dgamma = sum(dy * (x - mean)) * invstd,   dbeta = sum(dy)
// Running statistics: r = (1 - momentum) * r + momentum * stat, with the unbiased variance.
#include <algorithm>
#include <cmath>

#include "kernels/check.h"
#include "kernels/cpu/bn_coeffs.h"
#include "kernels/cpu/bn_lanes.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

namespace vb::cpu {
namespace {

using bn_lanes::add_grad_sums;
using bn_lanes::add_sq_dev;
using bn_lanes::add_sum;
using bn_lanes::Lanes;

template <class T>
void affine(const T* x, T* y, int64_t n, T a, T b) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * a + b;
}

// Channels per parallel chunk: at least ~16k elements of work.
int64_t channel_grain(int64_t per_channel) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(per_channel, 1)); }

}  // namespace

template <class T>
void batchnorm_train_fwd(int N, int C, int HW, const T* x, const T* gamma, const T* beta, T* y, T* save_mean,
                         T* save_invstd, T* running_mean, T* running_var, double momentum, double eps) {
  const int64_t count = int64_t(N) * HW;
  VB_CHECK(count > 1, "batch norm in training mode needs more than one value per channel (N*H*W = ", count, ")");
  const int64_t cstride = int64_t(C) * HW;
  parallel_for(C, channel_grain(count), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Lanes s;
      for (int n = 0; n < N; ++n) add_sum(s, x + n * cstride + c * HW, HW);
      const double mean = s.total() / double(count);
      Lanes q;
      for (int n = 0; n < N; ++n) add_sq_dev(q, x + n * cstride + c * HW, HW, mean);
      const double var = q.total() / double(count);  // biased: what the normalisation uses
      const double invstd = 1.0 / std::sqrt(var + eps);
      if (save_mean) save_mean[c] = T(mean);
      if (save_invstd) save_invstd[c] = T(invstd);
      if (running_mean) running_mean[c] = T(momentum * mean + (1.0 - momentum) * double(running_mean[c]));
      if (running_var) {
        const double unbiased = q.total() / double(count - 1);
        running_var[c] = T(momentum * unbiased + (1.0 - momentum) * double(running_var[c]));
      }
      if (y) {
        // From the statistics as saved (rounded to T), so that batchnorm_apply reproduces y bit for bit.
        T a, b;
        bn_affine(gamma, beta, c, T(mean), T(invstd), a, b);
        for (int n = 0; n < N; ++n) affine(x + n * cstride + c * HW, y + n * cstride + c * HW, HW, a, b);
      }
    }
  });
}

template <class T>
void batchnorm_apply(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* save_mean,
                     const T* save_invstd, T* y) {
  const int64_t cstride = int64_t(C) * HW;
  parallel_for(C, channel_grain(int64_t(N) * HW), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T a, b;
      bn_affine(gamma, beta, c, save_mean[c], save_invstd[c], a, b);
      for (int n = 0; n < N; ++n) affine(x + n * cstride + c * HW, y + n * cstride + c * HW, HW, a, b);
    }
  });
}

template <class T>
void batchnorm_eval_fwd(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* running_mean,
                        const T* running_var, double eps, T* y) {
  parallel_for(int64_t(N) * C, channel_grain(HW), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % C;
      T a, b;
      bn_eval_affine(gamma, beta, running_mean, running_var, eps, c, a, b);
      affine(x + p * HW, y + p * HW, HW, a, b);
    }
  });
}

template <class T>
void batchnorm_bwd(int N, int C, int HW, const T* x, const T* dy, const T* gamma, const T* save_mean,
                   const T* save_invstd, T* dx, T* dgamma, T* dbeta) {
  const int64_t count = int64_t(N) * HW;
  const int64_t cstride = int64_t(C) * HW;
  parallel_for(C, channel_grain(count), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const double mean = double(save_mean[c]), invstd = double(save_invstd[c]);
      Lanes s_dy, s_dyx;
      for (int n = 0; n < N; ++n)
        add_grad_sums(s_dy, s_dyx, x + n * cstride + c * HW, dy + n * cstride + c * HW, HW, mean);
      const double sum_dy = s_dy.total(), sum_dyx = s_dyx.total();
      if (dgamma) dgamma[c] = T(sum_dyx * invstd);
      if (dbeta) dbeta[c] = T(sum_dy);
      if (!dx) continue;
      // Every element is read before it is written, so dx may alias dy.
      const T a = T((gamma ? double(gamma[c]) : 1.0) * invstd);
      const T k_dy = T(sum_dy / double(count));
      const T k_x = T(sum_dyx * invstd * invstd / double(count));
      const T m = T(mean);
      for (int n = 0; n < N; ++n) {
        const T* xn = x + n * cstride + c * HW;
        const T* gn = dy + n * cstride + c * HW;
        T* dn = dx + n * cstride + c * HW;
        for (int64_t i = 0; i < HW; ++i) dn[i] = (gn[i] - k_dy - (xn[i] - m) * k_x) * a;
      }
    }
  });
}

#define VB_INSTANTIATE_BN(T)                                                                                        \
  template void batchnorm_train_fwd<T>(int, int, int, const T*, const T*, const T*, T*, T*, T*, T*, T*, double,     \
                                       double);                                                                     \
  template void batchnorm_eval_fwd<T>(int, int, int, const T*, const T*, const T*, const T*, const T*, double, T*); \
  template void batchnorm_apply<T>(int, int, int, const T*, const T*, const T*, const T*, const T*, T*);            \
  template void batchnorm_bwd<T>(int, int, int, const T*, const T*, const T*, const T*, const T*, T*, T*, T*);
VB_INSTANTIATE_BN(float)
VB_INSTANTIATE_BN(double)
#undef VB_INSTANTIATE_BN

}  // namespace vb::cpu
