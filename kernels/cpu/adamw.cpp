// One AdamW step in torch.optim.AdamW's order of operations (torch/optim/adam.py, _single_tensor_adam with
// decoupled weight decay), element-wise in T (float stays float, as PyTorch's CPU kernels):
//   p.mul_(1 - lr*wd)                                  p = p * T(1 - lr*wd)
//   exp_avg.lerp_(g, 1 - b1)                           m = fma(w, g - m, m)   (w < 0.5; else g - (g - m)*(1 - w))
//   exp_avg_sq.mul_(b2).addcmul_(g, g, value=1-b2)     v = v * T(b2); v = v + T(1 - b2) * g * g
//   denom = (exp_avg_sq.sqrt() / sqrt(bc2)).add_(eps)  d = sqrt(v) / T(sqrt(bc2)) + T(eps)
//   p.addcdiv_(exp_avg, denom, value=-lr/bc1)          p = p + T(-lr/bc1) * m / d
// with bc1 = 1 - b1^step, bc2 = 1 - b2^step and the scalars computed in double as Python does. Contraction
// into fused multiply-adds is switched off for this file so that each step rounds where PyTorch's does.
#include <cmath>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#endif
// GCC: -ffp-contract=off for this file in CMakeLists.txt.

namespace vb::cpu {
namespace {

template <class T>
struct Coeffs {
  T decay, w1, b2, w2, bc2_sqrt, eps, neg_step_size;
};

// Elements [b, e): one function per (weight decay, lerp form) pair so that the loop has no branch and, with
// restrict pointers, vectorises; sqrt and division vectorise to the same correctly rounded results (the file is
// compiled with -fno-math-errno: see CMakeLists.txt), so the bits are those of a scalar loop.
template <class T, bool kDecay, bool kSmallW1>
void adamw_range(int64_t b, int64_t e, T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
                 const Coeffs<T> c) {
  for (int64_t i = b; i < e; ++i) {
    T pi = p[i];
    if constexpr (kDecay) pi = pi * c.decay;
    const T gi = g[i];
    T mi = m[i];
    if constexpr (kSmallW1)
      mi = std::fma(c.w1, gi - mi, mi);
    else
      mi = gi - (gi - mi) * (T(1) - c.w1);
    T vi = v[i] * c.b2;
    vi = vi + c.w2 * gi * gi;
    const T denom = std::sqrt(vi) / c.bc2_sqrt + c.eps;
    pi = pi + c.neg_step_size * mi / denom;
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

}  // namespace

template <class T>
void adamw_step(int64_t n, T* p, const T* g, T* m, T* v, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t step) {
  const double bc1 = 1.0 - std::pow(beta1, double(step));
  const double bc2 = 1.0 - std::pow(beta2, double(step));
  Coeffs<T> c;
  c.decay = T(1.0 - lr * weight_decay);
  c.w1 = T(1.0 - beta1);
  const bool small_w1 = std::fabs(double(c.w1)) < 0.5;
  c.b2 = T(beta2);
  c.w2 = T(1.0 - beta2);
  c.bc2_sqrt = T(std::sqrt(bc2));
  c.eps = T(eps);
  c.neg_step_size = T(-(lr / bc1));
  auto* range = weight_decay != 0 ? (small_w1 ? adamw_range<T, true, true> : adamw_range<T, true, false>)
                                  : (small_w1 ? adamw_range<T, false, true> : adamw_range<T, false, false>);
  parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) { range(b, e, p, g, m, v, c); });
}

template void adamw_step<float>(int64_t, float*, const float*, float*, float*, double, double, double, double, double,
                                int64_t);
template void adamw_step<double>(int64_t, double*, const double*, double*, double*, double, double, double, double,
                                 double, int64_t);

}  // namespace vb::cpu
