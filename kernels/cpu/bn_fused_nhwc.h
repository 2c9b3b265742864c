// Batch norm fused with the residual add and ReLU around it, channels-last: the NHWC twins of bn_fused.h for the
// CPU backend, with exactly its semantics and argument lists. Layout: x, y, residual, dy, dx, dresidual are
// [N, H, W, C] = M = N*HW rows of C contiguous values; (N, C, HW) give the shape as in bn_fused.h. Per-channel
// arrays (gamma, beta, statistics, dgamma, dbeta) are [C] of type T.
//
// Differences from bn_fused.h, by design:
// - Reduction order. The rows are cut into fixed chunks (chunk length a function of C alone); each chunk's
//   per-channel sums are accumulated in double, rows in order, and the chunks' partial sums are added in chunk
//   order. The order depends on (M, C) only, never on the thread count, so results are the same bits with any
//   number of threads; they are not the bits of bn_fused.cpp's statistics (8 lanes per plane), only as
//   accurate (double sums of M values; a few ulps of T). The variance is as safe as bn_fused.cpp's two passes
//   (mean, then squared deviations from it): each chunk does those two passes while in cache, and the chunks
//   are combined with Chan et al.'s formula (sum of the chunks' M2 plus n_k (mean_k - mean)^2).
// - Per-element passes (bn_apply_nhwc, bn_eval_fwd_nhwc, the output of bn_train_fwd_nhwc given its saved
//   statistics, dresidual) use bn_fused.cpp's per-element expressions and per-channel coefficients: given the
//   same statistics they are bit-identical to bn_fused.h's (transposed).
#pragma once
#include <cstdint>

namespace vb::cpu {

// Training forward: y = act(bn(x) + residual) with batch statistics over the M rows; saves mean and invstd
// (1/sqrt(biased var + eps)), updates the running statistics (either may be null; the running variance takes
// the unbiased variance, r = (1 - momentum) r + momentum stat). residual may be null; act is ReLU or none.
template <class T>
void bn_train_fwd_nhwc(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* residual,
                       bool relu, T* y, T* save_mean, T* save_invstd, T* running_mean, T* running_var,
                       double momentum, double eps);
// y = act(bn(x)) from saved statistics: bit-identical to what bn_train_fwd_nhwc wrote (no residual).
template <class T>
void bn_apply_nhwc(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* save_mean,
                   const T* save_invstd, bool relu, T* y);
// Evaluation: y = act(bn(x) + residual) with the running statistics.
template <class T>
void bn_eval_fwd_nhwc(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* running_mean,
                      const T* running_var, double eps, const T* residual, bool relu, T* y);
// Backward of y = act(bn(x) + residual): g = relu ? (y > 0 ? dy : 0) : dy (a NaN y passes dy) is the gradient
// of bn's output and of the residual (written to dresidual when not null); dx, dgamma, dbeta as batchnorm_bwd.
// y is only read when relu. Any output may be null; dx and dresidual may alias dy.
template <class T>
void bn_bwd_nhwc(int N, int C, int HW, const T* x, const T* y, const T* dy, const T* gamma, const T* save_mean,
                 const T* save_invstd, bool relu, T* dx, T* dresidual, T* dgamma, T* dbeta);

}  // namespace vb::cpu
