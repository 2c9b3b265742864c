// Batch norm folded into convolution weights for evaluation (see bn_fold.cuh). One thread per weight; each
// recomputes its channel's scale (a few double operations, cheaper than a second launch for ResNet's 25M weights
// read once); the channel's first weight's thread also writes the bias.
#include <algorithm>

#include "kernels/check.h"
#include "kernels/cuda/bn_fold.cuh"

namespace vb::cuda {
namespace {

__device__ __forceinline__ double fold_scale(const float* gamma, const float* running_var, double eps, int k) {
  const double invstd = 1.0 / sqrt(double(running_var[k]) + eps);
  return (gamma ? double(gamma[k]) : 1.0) * invstd;
}

__global__ void fold_kernel(int K, int C, int RS, const float* __restrict__ w, const float* __restrict__ gamma,
                            const float* __restrict__ beta, const float* __restrict__ running_mean,
                            const float* __restrict__ running_var, double eps, bool krsc, float* __restrict__ wf,
                            float* __restrict__ bias) {
  const int64_t per_k = int64_t(C) * RS;
  const int64_t n = per_k * K;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int k = int(i / per_k);
    const int64_t rem = i - k * per_k;
    const double ad = fold_scale(gamma, running_var, eps, k);
    const float a = float(ad);
    const int64_t dst = krsc ? k * per_k + (rem % RS) * C + rem / RS : i;
    wf[dst] = w[i] * a;
    if (rem == 0) bias[k] = float(fma(-double(running_mean[k]), ad, beta ? double(beta[k]) : 0.0));  // bn_eval_affine's
  }
}

}  // namespace

void bn_fold_weights(cudaStream_t st, int K, int C, int RS, const float* w, const float* gamma, const float* beta,
                     const float* running_mean, const float* running_var, double eps, bool krsc, float* wf,
                     float* bias) {
  VB_CHECK(K > 0 && C > 0 && RS > 0, "bn_fold_weights: bad shape K=", K, " C=", C, " RS=", RS);
  VB_CHECK(w && running_mean && running_var && wf && bias, "bn_fold_weights: null weights, statistics or output");
  const int64_t n = int64_t(K) * C * RS;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65536);
  fold_kernel<<<unsigned(blocks), threads, 0, st>>>(K, C, RS, w, gamma, beta, running_mean, running_var, eps, krsc,
                                                    wf, bias);
  VB_CUDA_LAUNCH_CHECK();
}

}  // namespace vb::cuda
