// Batch norm on the GPU, NHWC ([M = N*H*W rows][C channels]), for float and bf16 activations (A = float or
// vb::bf16, which has __nv_bfloat16's layout); statistics, gamma/beta and running statistics in float32.
// Fused as at the end of a ResNet bottleneck: y = act(bn(x) + residual).
// CPU twins: vb::cpu::bn_nhwc_* (kernels/cpu/nhwc.h), which round to bf16 where these kernels do.
//
// Memory traffic (the point of these kernels; issue 11):
// - training forward: one read of x for the statistics (per-channel sum and sum of squares of x - x[row 0],
//   in one pass), then one read of x (+ residual) and one write of y for the apply;
// - backward: pass 1 reads x, dy (and y with relu) and writes dresidual when asked, reducing sum g and
//   sum g (x - mean), from which dgamma/dbeta come in the same finalize; pass 2 reads x and g (dresidual, or y
//   and dy again when there is none) and writes dx.
// Reductions are deterministic (no float atomics): each thread sums its rows in float in order, the block's
// rows combine in a fixed order in double, and the row slices combine in a fixed order in double. The same
// inputs give the same bits on every run. Loads and stores are 128-bit when C % 8 == 0 (bf16) or C % 4 == 0
// (float) and every pointer is 16-byte aligned, scalar otherwise.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/bf16.h"

namespace vb::cuda {

// Bytes of device scratch (`work`) the training forward and the backward need for C channels.
// Stream-ordered: one buffer serves every call on a stream.
size_t bn_nhwc_work_bytes(int C);

// Training forward. save_mean / save_invstd [C] may be null; running_mean / running_var [C] updated in place
// when not null ((1 - momentum) r + momentum stat, unbiased variance). residual may be null. M = 1 refused.
// y may alias x or residual.
template <class A>
void bn_nhwc_train_fwd(cudaStream_t st, int64_t M, int C, const A* x, const float* gamma, const float* beta,
                       const A* residual, bool relu, A* y, float* save_mean, float* save_invstd,
                       float* running_mean, float* running_var, double momentum, double eps, void* work);

// The training forward's output again from saved statistics (bit-identical to it): what the backward of a
// bottleneck can recompute instead of keeping.
template <class A>
void bn_nhwc_apply(cudaStream_t st, int64_t M, int C, const A* x, const float* gamma, const float* beta,
                   const float* mean, const float* invstd, const A* residual, bool relu, A* y);

// Evaluation forward: 1 / sqrtf(running_var + eps) in float.
template <class A>
void bn_nhwc_eval_fwd(cudaStream_t st, int64_t M, int C, const A* x, const float* gamma, const float* beta,
                      const float* running_mean, const float* running_var, double eps, const A* residual, bool relu,
                      A* y);

// Backward of the fused training forward. y: the forward's output (read for the ReLU mask when relu). Writes
// dx, dresidual (= the masked gradient), dgamma, dbeta (any may be null). dx may alias dy or dresidual.
template <class A>
void bn_nhwc_bwd(cudaStream_t st, int64_t M, int C, const A* x, const A* y, const A* dy, const float* gamma,
                 const float* save_mean, const float* save_invstd, bool relu, A* dx, A* dresidual, float* dgamma,
                 float* dbeta, void* work);

// Device pointer to the [3][C] coefficients (k1 = gamma invstd, k2 = sum g / M, k3 = sum g (x - mean) invstd^2
// / M) the last bn_nhwc_bwd on `work` used: with them cpu::bn_nhwc_bwd_dx reproduces its dx bit for bit.
const float* bn_nhwc_bwd_coef(const void* work, int C);

}  // namespace vb::cuda
