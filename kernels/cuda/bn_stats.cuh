// The last step of batch norm's training statistics, shared by the NCHW (batchnorm.cu) and NHWC (bn_nhwc.cu)
// kernels: from one channel's sums s = sum(x - shift) and q = sum((x - shift)^2) over M values (the shift, a
// value of the channel, keeps E[d^2] - E[d]^2 from cancelling), the mean and 1/std (biased variance) and the
// running statistics (unbiased variance), in double, as PyTorch updates them. CPU twin: cpu::batchnorm_train_fwd.
#pragma once
#include <cstdint>

namespace vb::cuda {

__device__ inline void bn_write_channel_stats(int c, double s, double q, int64_t M, double shift, double momentum,
                                              double eps, float* __restrict__ mean_out,
                                              float* __restrict__ invstd_out, float* save_mean, float* save_invstd,
                                              float* running_mean, float* running_var) {
  const double ms = s / double(M);
  double var = q / double(M) - ms * ms;  // biased
  if (var < 0) var = 0;
  const double mean = shift + ms;
  const float invstd = float(1.0 / sqrt(var + eps));
  mean_out[c] = float(mean);
  invstd_out[c] = invstd;
  if (save_mean) save_mean[c] = float(mean);
  if (save_invstd) save_invstd[c] = invstd;
  if (running_mean) running_mean[c] = float((1.0 - momentum) * double(running_mean[c]) + momentum * mean);
  if (running_var) {
    const double unbiased = M > 1 ? var * double(M) / double(M - 1) : var;
    running_var[c] = float((1.0 - momentum) * double(running_var[c]) + momentum * unbiased);
  }
}

}  // namespace vb::cuda
