// Pooling on the GPU, NHWC, float and bf16 activations (A = float or vb::bf16). Kernels in pool_nhwc.cu.
// CPU twins: vb::cpu::maxpool_nhwc_fwd / maxpool_nhwc_bwd / avgpool_nhwc_fwd / avgpool_nhwc_bwd
// (kernels/cpu/nhwc.h), bit-identical: the same comparisons, the same float sums in the same order, one
// rounding to bf16 on store. 128-bit loads and stores when C % 8 == 0 (bf16) or C % 4 == 0 (float) and the
// pointers are 16-byte aligned, scalar otherwise. No atomics: deterministic.
#pragma once
#include <cuda_runtime.h>

#include "kernels/bf16.h"

namespace vb::cuda {

// Max pool k x k, stride s, padding p: x [N, H, W, C] -> y [N, P, Q, C]. A NaN in a window wins (propagates),
// ties keep the first maximum in scan order, padding never wins (as cuda::maxpool_fwd, NCHW).
template <class A>
void maxpool_nhwc_fwd(cudaStream_t st, int N, int H, int W, int C, int k, int s, int p, const A* x, A* y);
// Gather: each input element sums, in float and in output scan order, dy of the windows whose maximum it is.
template <class A>
void maxpool_nhwc_bwd(cudaStream_t st, int N, int H, int W, int C, int k, int s, int p, const A* x, const A* dy,
                      A* dx);

// Global average pool: x [N, HW, C] -> y [N, C] (float sum over hw in order, divided by HW).
template <class A>
void avgpool_nhwc_fwd(cudaStream_t st, int N, int HW, int C, const A* x, A* y);
template <class A>
void avgpool_nhwc_bwd(cudaStream_t st, int N, int HW, int C, const A* dy, A* dx);

}  // namespace vb::cuda
