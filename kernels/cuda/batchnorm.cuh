// Batch norm on the GPU, NCHW, fused with the residual add and ReLU at the end of a ResNet bottleneck:
// y = act(bn(x) + residual). CPU twins: vb::cpu::batchnorm_train_fwd / batchnorm_eval_fwd / batchnorm_bwd
// (kernels/cpu/ops.h), followed there by cpu::add and cpu::relu_fwd / preceded by cpu::relu_bwd.
//
// Statistics use a deterministic two-level reduction (no float atomics): blocks reduce fixed slices of a
// channel into partial sums, one thread per channel combines the slices in order (in double). The same inputs
// always give the same bits.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace vb::cuda {

// Floats of device scratch the batch-norm launchers need for C channels (partial sums and per-channel
// coefficients). Stream-ordered: one buffer can serve every call on the same stream.
size_t bn_work_floats(int C);

// Training forward: batch statistics over N*HW per channel (N*HW = 1 is refused, as PyTorch does). save_mean / save_invstd [C] (1/sqrt(var+eps),
// biased variance) may be null; running_mean / running_var [C] are updated in place (unbiased variance,
// r = (1-momentum) r + momentum batch) when not null. residual may be null.
void bn_train_fwd(cudaStream_t st, int N, int C, int HW, const float* x, const float* gamma, const float* beta,
                  const float* residual, bool relu, float* y, float* save_mean, float* save_invstd,
                  float* running_mean, float* running_var, double momentum, double eps, float* work);

// Evaluation forward with running statistics.
void bn_eval_fwd(cudaStream_t st, int N, int C, int HW, const float* x, const float* gamma, const float* beta,
                 const float* running_mean, const float* running_var, double eps, const float* residual, bool relu,
                 float* y);

// Backward of the fused training forward. dy: gradient of y; y: the fused output (ReLU mask, read when relu).
// Writes dx, dresidual (= dy masked by the ReLU), dgamma, dbeta (any may be null). scratch: N*C*HW floats for
// the masked gradient when relu (may be dresidual or dy). dx may alias dy.
// The training forward's output again from its saved statistics (bit-identical: the same apply kernel with
// the same float mean and 1/std). CPU twin: cpu::batchnorm_apply (+ ReLU).
void bn_apply(cudaStream_t st, int N, int C, int HW, const float* x, const float* gamma, const float* beta,
              const float* save_mean, const float* save_invstd, bool relu, float* y);

void bn_bwd(cudaStream_t st, int N, int C, int HW, const float* x, const float* y, const float* dy,
            const float* gamma, const float* save_mean, const float* save_invstd, bool relu, float* dx,
            float* dresidual, float* dgamma, float* dbeta, float* scratch, float* work);

}  // namespace vb::cuda
