// Batch norm fused with what follows it in a ResNet (an optional residual add and an optional ReLU), and its
// backward fused with the ReLU's: what the CPU backend runs. Each is one traversal per pass instead of a
// batch norm followed by separate add / ReLU / ReLU-backward / copy passes over the whole tensor, and walks
// the tensor in its memory order (sample by sample, a block of channels at a time), which matters for the
// small feature maps of the deep stages (2x2 to 7x7 planes).
//
// The results are those of the unfused ops of ops.h composed (batchnorm_* then add, relu_fwd, relu_bwd), bit
// for bit: the same statistics in the same order (per channel: samples in order, each plane's values into 8
// double lanes by index), the same per-element formulas. Thread-count independent like them (channels are
// split over threads; each channel is reduced by one thread in a fixed order).
#pragma once
#include <cstdint>

namespace vb::cpu {

// Training forward: y = act(bn(x) + residual) with batch statistics; saves mean and invstd, updates the
// running statistics (either may be null) as batchnorm_train_fwd. residual may be null; act is ReLU or none.
template <class T>
void bn_train_fwd_fused(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* residual,
                        bool relu, T* y, T* save_mean, T* save_invstd, T* running_mean, T* running_var,
                        double momentum, double eps);
// y = act(bn(x)) from saved statistics: bit-identical to what bn_train_fwd_fused wrote (no residual).
template <class T>
void bn_apply_fused(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* save_mean,
                    const T* save_invstd, bool relu, T* y);
// Evaluation: y = act(bn(x) + residual) with the running statistics.
template <class T>
void bn_eval_fwd_fused(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* running_mean,
                       const T* running_var, double eps, const T* residual, bool relu, T* y);
// Backward of y = act(bn(x) + residual): g = relu ? (y > 0 ? dy : 0) : dy is the gradient of bn's output and
// of the residual (written to dresidual when not null); dx, dgamma, dbeta as batchnorm_bwd. y is only read
// when relu. Any output may be null; dx and dresidual may alias dy.
template <class T>
void bn_bwd_fused(int N, int C, int HW, const T* x, const T* y, const T* dy, const T* gamma, const T* save_mean,
                  const T* save_invstd, bool relu, T* dx, T* dresidual, T* dgamma, T* dbeta);

}  // namespace vb::cpu
