// Batch norm's per-channel affine form y = x * a + b, with a = gamma * invstd and b = beta - mean * a computed in
// double and rounded to T: one definition for every CPU batch-norm kernel (batchnorm.cpp, bn_fused.cpp,
// bn_fused_nhwc.cpp) and for the convolution that folds evaluation's batch norm into its weights
// (engine/backend_cpu.cpp), so that they round alike. gamma / beta may be null (1 / 0).
#pragma once
#include <cmath>
#include <cstdint>

namespace vb::cpu {

// From a mean and 1/std as stored in T (a training forward's statistics).
template <class T>
inline void bn_affine(const T* gamma, const T* beta, int64_t c, T mean, T invstd, T& a, T& b) {
  const double ad = (gamma ? double(gamma[c]) : 1.0) * double(invstd);
  a = T(ad);
  b = T((beta ? double(beta[c]) : 0.0) - double(mean) * ad);
}

// Evaluation: from the running statistics, invstd = 1 / sqrt(running_var + eps) in double.
template <class T>
inline void bn_eval_affine(const T* gamma, const T* beta, const T* running_mean, const T* running_var, double eps,
                           int64_t c, T& a, T& b) {
  const double invstd = 1.0 / std::sqrt(double(running_var[c]) + eps);
  const double ad = (gamma ? double(gamma[c]) : 1.0) * invstd;
  a = T(ad);
  // One rounding, written out (the compiler contracted it to this FMA anyway): the CUDA fold
  // (kernels/cuda/bn_fold.cu) computes the same fma and gets the same bits.
  b = T(std::fma(-double(running_mean[c]), ad, beta ? double(beta[c]) : 0.0));
}

}  // namespace vb::cpu
