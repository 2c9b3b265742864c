// NHWC batch norm on the CPU: the twins of kernels/cuda/bn_nhwc.cu (see kernels/cpu/nhwc.h for the contract).
// Serial and simple on purpose: these are references for the GPU kernels, not the CPU training path.
#include <cmath>
#include <vector>

#include "kernels/check.h"
#include "kernels/cpu/nhwc.h"

namespace vb::cpu {
namespace {

inline float relu_f(float v) { return v < 0.f ? 0.f : v; }  // NaN passes, as cpu::relu_fwd
inline float masked(bool relu, float y, float g) { return relu && y <= 0.f ? 0.f : g; }

void check_shape(const char* what, int64_t M, int C) {
  VB_CHECK(M > 0 && C > 0, what, ": bad shape M=", M, " C=", C);
}

}  // namespace

template <class A>
void bn_nhwc_stats(int64_t M, int C, const A* x, double momentum, double eps, float* mean, float* invstd,
                   float* running_mean, float* running_var) {
  check_shape("bn_nhwc_stats", M, C);
  VB_CHECK(M > 1, "batch norm in training mode needs more than one value per channel (N*H*W = ", M, ")");
  VB_CHECK(x && mean && invstd, "bn_nhwc_stats: null input or output");
  std::vector<double> s(size_t(C), 0.0), q(size_t(C), 0.0);
  for (int64_t r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) s[size_t(c)] += double(to_float(x[r * C + c]));
  for (int c = 0; c < C; ++c) s[size_t(c)] /= double(M);
  for (int64_t r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) {
      const double d = double(to_float(x[r * C + c])) - s[size_t(c)];
      q[size_t(c)] += d * d;
    }
  for (int c = 0; c < C; ++c) {
    const double m = s[size_t(c)], var = q[size_t(c)] / double(M);
    mean[c] = float(m);
    invstd[c] = float(1.0 / std::sqrt(var + eps));
    if (running_mean) running_mean[c] = float((1.0 - momentum) * double(running_mean[c]) + momentum * m);
    if (running_var) {
      const double unbiased = var * double(M) / double(M - 1);
      running_var[c] = float((1.0 - momentum) * double(running_var[c]) + momentum * unbiased);
    }
  }
}

template <class A>
void bn_nhwc_apply(int64_t M, int C, const A* x, const float* gamma, const float* beta, const float* mean,
                   const float* invstd, const A* residual, bool relu, A* y) {
  check_shape("bn_nhwc_apply", M, C);
  VB_CHECK(x && gamma && beta && mean && invstd && y, "bn_nhwc_apply: null input, parameter or statistics");
  std::vector<float> sc(static_cast<size_t>(C));
  for (int c = 0; c < C; ++c) sc[size_t(c)] = gamma[c] * invstd[c];
  for (int64_t r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) {
      const int64_t i = r * C + c;
      float v = std::fma(to_float(x[i]) - mean[c], sc[size_t(c)], beta[c]);
      if (residual) v += to_float(residual[i]);
      if (relu) v = relu_f(v);
      y[i] = from_float<A>(v);
    }
}

template <class A>
void bn_nhwc_train_fwd(int64_t M, int C, const A* x, const float* gamma, const float* beta, const A* residual,
                       bool relu, A* y, float* save_mean, float* save_invstd, float* running_mean,
                       float* running_var, double momentum, double eps) {
  std::vector<float> m(static_cast<size_t>(C)), is(static_cast<size_t>(C));
  bn_nhwc_stats(M, C, x, momentum, eps, m.data(), is.data(), running_mean, running_var);
  if (save_mean)
    for (int c = 0; c < C; ++c) save_mean[c] = m[size_t(c)];
  if (save_invstd)
    for (int c = 0; c < C; ++c) save_invstd[c] = is[size_t(c)];
  bn_nhwc_apply(M, C, x, gamma, beta, m.data(), is.data(), residual, relu, y);
}

template <class A>
void bn_nhwc_eval_fwd(int64_t M, int C, const A* x, const float* gamma, const float* beta,
                      const float* running_mean, const float* running_var, double eps, const A* residual, bool relu,
                      A* y) {
  check_shape("bn_nhwc_eval_fwd", M, C);
  VB_CHECK(running_mean && running_var, "bn_nhwc_eval_fwd: null running statistics");
  std::vector<float> is(static_cast<size_t>(C));
  for (int c = 0; c < C; ++c) is[size_t(c)] = 1.0f / std::sqrt(running_var[c] + float(eps));
  bn_nhwc_apply(M, C, x, gamma, beta, running_mean, is.data(), residual, relu, y);
}

template <class A>
void bn_nhwc_bwd_reduce(int64_t M, int C, const A* x, const A* y, const A* dy, const float* gamma,
                        const float* save_mean, const float* save_invstd, bool relu, A* dresidual, float* dgamma,
                        float* dbeta, float* coef) {
  check_shape("bn_nhwc_bwd", M, C);
  VB_CHECK(x && dy && gamma && save_mean && save_invstd && coef, "bn_nhwc_bwd: null input, statistics or coef");
  VB_CHECK(!relu || y, "bn_nhwc_bwd: relu needs y");
  std::vector<double> sg(size_t(C), 0.0), sgx(size_t(C), 0.0);
  for (int64_t r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) {
      const int64_t i = r * C + c;
      const float g = masked(relu, relu ? to_float(y[i]) : 0.f, to_float(dy[i]));
      if (dresidual) dresidual[i] = from_float<A>(g);  // exact: g is dy or 0
      sg[size_t(c)] += double(g);
      sgx[size_t(c)] += double(g) * double(to_float(x[i]) - save_mean[c]);
    }
  for (int c = 0; c < C; ++c) {
    const double is = save_invstd[c];
    if (dgamma) dgamma[c] = float(sgx[size_t(c)] * is);
    if (dbeta) dbeta[c] = float(sg[size_t(c)]);
    coef[c] = float(double(gamma[c]) * is);
    coef[C + c] = float(sg[size_t(c)] / double(M));
    coef[2 * C + c] = float(sgx[size_t(c)] * is * is / double(M));
  }
}

template <class A>
void bn_nhwc_bwd_dx(int64_t M, int C, const A* x, const A* y, const A* dy, const A* g, const float* save_mean,
                    const float* coef, bool relu, A* dx) {
  check_shape("bn_nhwc_bwd_dx", M, C);
  VB_CHECK(x && save_mean && coef && dx && (g || (dy && (!relu || y))), "bn_nhwc_bwd_dx: null input");
  for (int64_t r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) {
      const int64_t i = r * C + c;
      const float gv = g ? to_float(g[i]) : masked(relu, relu ? to_float(y[i]) : 0.f, to_float(dy[i]));
      const float t = std::fma(-(to_float(x[i]) - save_mean[c]), coef[2 * C + c], gv - coef[C + c]);
      dx[i] = from_float<A>(t * coef[c]);
    }
}

template <class A>
void bn_nhwc_bwd(int64_t M, int C, const A* x, const A* y, const A* dy, const float* gamma, const float* save_mean,
                 const float* save_invstd, bool relu, A* dx, A* dresidual, float* dgamma, float* dbeta,
                 float* coef) {
  std::vector<float> own;
  if (!coef) {
    own.resize(size_t(3) * size_t(C));
    coef = own.data();
  }
  bn_nhwc_bwd_reduce(M, C, x, y, dy, gamma, save_mean, save_invstd, relu, dresidual, dgamma, dbeta, coef);
  // A dresidual holds g after pass 1: pass 2 reads it (one tensor) instead of y and dy.
  if (dx) bn_nhwc_bwd_dx(M, C, x, y, dy, dresidual, save_mean, coef, relu, dx);
}

#define VB_INSTANTIATE_BN_NHWC(A)                                                                                  \
  template void bn_nhwc_stats<A>(int64_t, int, const A*, double, double, float*, float*, float*, float*);         \
  template void bn_nhwc_apply<A>(int64_t, int, const A*, const float*, const float*, const float*, const float*, \
                                 const A*, bool, A*);                                                            \
  template void bn_nhwc_train_fwd<A>(int64_t, int, const A*, const float*, const float*, const A*, bool, A*,      \
                                     float*, float*, float*, float*, double, double);                            \
  template void bn_nhwc_eval_fwd<A>(int64_t, int, const A*, const float*, const float*, const float*,             \
                                    const float*, double, const A*, bool, A*);                                   \
  template void bn_nhwc_bwd_reduce<A>(int64_t, int, const A*, const A*, const A*, const float*, const float*,     \
                                      const float*, bool, A*, float*, float*, float*);                           \
  template void bn_nhwc_bwd_dx<A>(int64_t, int, const A*, const A*, const A*, const A*, const float*,             \
                                  const float*, bool, A*);                                                       \
  template void bn_nhwc_bwd<A>(int64_t, int, const A*, const A*, const A*, const float*, const float*,            \
                               const float*, bool, A*, A*, float*, float*, float*);
VB_INSTANTIATE_BN_NHWC(float)
VB_INSTANTIATE_BN_NHWC(bf16)
#undef VB_INSTANTIATE_BN_NHWC

}  // namespace vb::cpu
