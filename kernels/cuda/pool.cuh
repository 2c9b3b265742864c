// Pooling on the GPU, NCHW. CPU twins: vb::cpu::maxpool_fwd / maxpool_bwd / avgpool_fwd / avgpool_bwd
// (kernels/cpu/ops.h). Kernels in maxpool.cu and avgpool.cu.
#pragma once
#include <cuda_runtime.h>

namespace vb::cuda {

// Max pool k x k, stride s, padding p (padding never wins); ties go to the first maximum in scan order, and a
// NaN wins (propagates) as in PyTorch.
void maxpool_fwd(cudaStream_t st, int N, int C, int H, int W, int k, int s, int p, const float* x, float* y);
// Gathers, per input element, the gradients of the windows whose (first) maximum it is, in output scan order
// (no atomics: deterministic). y (the forward output) may be null; it only speeds up the test.
void maxpool_bwd(cudaStream_t st, int N, int C, int H, int W, int k, int s, int p, const float* x, const float* y,
                 const float* dy, float* dx);

// Global average pool: x [N,C,H,W] -> y [N,C].
void avgpool_fwd(cudaStream_t st, int N, int C, int HW, const float* x, float* y);
void avgpool_bwd(cudaStream_t st, int N, int C, int HW, const float* dy, float* dx);

}  // namespace vb::cuda
