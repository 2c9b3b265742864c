// Evaluation's batch norm folded into the convolution before it (the CUDA backend's conv_bn_eval):
// bn(conv(x, w)) = conv(x, w * a) + b per output channel k, with
//   a[k] = gamma[k] / sqrt(running_var[k] + eps),  b[k] = beta[k] - running_mean[k] * a[k],
// computed in double (b as one fma) and rounded to float, then w * a in float: cpu::bn_eval_affine's arithmetic and the CPU
// backend's folded weights (kernels/cpu/bn_coeffs.h, conv_nhwc.cpp's pack_weights with a scale), so the
// folded weights are the same bits on both devices.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace vb::cuda {

// w: [K][C][RS] (OIHW). wf: the folded weights, [K][C][RS] or, when krsc, [K][RS][C] (cuDNN's NHWC filter);
// bias: [K] (b above). gamma / beta may be null (1 / 0). wf must not overlap w.
void bn_fold_weights(cudaStream_t st, int K, int C, int RS, const float* w, const float* gamma, const float* beta,
                     const float* running_mean, const float* running_var, double eps, bool krsc, float* wf,
                     float* bias);

}  // namespace vb::cuda
