// NHWC kernels on the CPU: the twins of kernels/cuda/bn_nhwc.cuh and kernels/cuda/pool_nhwc.cuh, for float and
// bf16 activations (A = float or vb::bf16; statistics, parameters and per-channel coefficients in float32).
//
// A tensor [N, H, W, C] is M = N*H*W rows of C contiguous channels. The twins compute in float32 with the
// same operations in the same order as the kernels, fused multiply-adds written out (std::fma where the
// kernel has fmaf, nothing left for the compiler to contract), and round to bf16 exactly where the kernels
// do (once, when an element is stored). What the kernels reduce in another order (batch-norm statistics and
// the backward's sums) the twins reduce in double: those agree with the GPU to a tight bound, not bitwise, so
// the per-element passes take the reduced coefficients as inputs (bn_nhwc_apply, bn_nhwc_bwd_dx) and, given
// the GPU's coefficients, reproduce the GPU's output bit for bit.
#pragma once
#include <cstdint>

#include "kernels/bf16.h"

namespace vb::cpu {

// ---- batch norm, NHWC -----------------------------------------------------------------------------------
// Batch statistics per channel over the M rows: mean and 1/sqrt(var + eps) (biased variance), rounded to
// float; running_mean / running_var (may be null) become (1 - momentum) r + momentum stat with the unbiased
// variance. M = 1 is refused (as PyTorch does in training).
template <class A>
void bn_nhwc_stats(int64_t M, int C, const A* x, double momentum, double eps, float* mean, float* invstd,
                   float* running_mean, float* running_var);

// y = act(fma(x - mean, gamma * invstd, beta) + residual), computed in float and stored as A. residual may be
// null; act is ReLU (v < 0 ? 0 : v, NaN passes) when relu. y may alias x or residual.
template <class A>
void bn_nhwc_apply(int64_t M, int C, const A* x, const float* gamma, const float* beta, const float* mean,
                   const float* invstd, const A* residual, bool relu, A* y);

// Training forward: bn_nhwc_stats then bn_nhwc_apply from the float statistics. save_mean / save_invstd [C]
// receive them (may be null).
template <class A>
void bn_nhwc_train_fwd(int64_t M, int C, const A* x, const float* gamma, const float* beta, const A* residual,
                       bool relu, A* y, float* save_mean, float* save_invstd, float* running_mean,
                       float* running_var, double momentum, double eps);

// Evaluation forward: invstd = 1.0f / sqrtf(running_var + float(eps)) in float, then as bn_nhwc_apply.
template <class A>
void bn_nhwc_eval_fwd(int64_t M, int C, const A* x, const float* gamma, const float* beta,
                      const float* running_mean, const float* running_var, double eps, const A* residual, bool relu,
                      A* y);

// Backward of the fused training forward, pass 1 (reads x, dy and, with relu, y): g = relu && y <= 0 ? 0 : dy
// (a NaN y passes its gradient); dresidual = g when not null; sums S_g = sum g and S_gx = sum g (x - mean),
// from which dgamma = S_gx * invstd and dbeta = S_g (may be null), and coef [3][C] (required):
//   coef[0][c] = k1 = gamma * invstd,  coef[1][c] = k2 = S_g / M,  coef[2][c] = k3 = S_gx * invstd^2 / M.
template <class A>
void bn_nhwc_bwd_reduce(int64_t M, int C, const A* x, const A* y, const A* dy, const float* gamma,
                        const float* save_mean, const float* save_invstd, bool relu, A* dresidual, float* dgamma,
                        float* dbeta, float* coef);

// Pass 2: dx = fma(-(x - mean), k3, g - k2) * k1. g is read from `g` when not null (the dresidual pass 1
// wrote), else recomputed from y and dy. dx may alias dy or g.
template <class A>
void bn_nhwc_bwd_dx(int64_t M, int C, const A* x, const A* y, const A* dy, const A* g, const float* save_mean,
                    const float* coef, bool relu, A* dx);

// Both passes (coef: 3*C floats of scratch, may be null: then allocated here).
template <class A>
void bn_nhwc_bwd(int64_t M, int C, const A* x, const A* y, const A* dy, const float* gamma, const float* save_mean,
                 const float* save_invstd, bool relu, A* dx, A* dresidual, float* dgamma, float* dbeta,
                 float* coef = nullptr);

// ---- pooling, NHWC --------------------------------------------------------------------------------------
// Max pool k x k, stride s, padding p (padding never wins), per channel as cpu::maxpool_fwd: the window scanned
// in rows then columns, a strictly greater value or a NaN taken (NaN propagates), ties keep the first.
// x [N, H, W, C] -> y [N, P, Q, C], P = (H + 2p - k) / s + 1.
template <class A>
void maxpool_nhwc_fwd(int N, int H, int W, int C, int k, int s, int p, const A* x, A* y);
// dx[i] = sum, in output scan order and in float, of dy over the windows whose maximum i is; stored as A.
template <class A>
void maxpool_nhwc_bwd(int N, int H, int W, int C, int k, int s, int p, const A* x, const A* dy, A* dx);

// Global average pool: x [N, HW, C] -> y [N, C], the float sum in hw order divided by float(HW).
template <class A>
void avgpool_nhwc_fwd(int N, int HW, int C, const A* x, A* y);
// dx[n, hw, c] = dy[n, c] * (1.0f / HW).
template <class A>
void avgpool_nhwc_bwd(int N, int HW, int C, const A* dy, A* dx);

}  // namespace vb::cpu
