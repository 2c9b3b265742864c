// Layout changes on the GPU: a batch of row-major matrices transposed, [B][R][S] -> [B][S][R], float.
// For the CUDA backend in NHWC: NCHW activations to NHWC and back (B = N, R = C, S = H*W), and torchvision's
// OIHW weights to the KRSC (O, H, W, I) filters cuDNN's NHWC convolutions read, and the filter gradient back
// (B = K, R = C, S = R*S). CPU twins: cpu::nchw_to_nhwc / cpu::nhwc_to_nchw (kernels/cpu/conv_nhwc.h);
// a transpose only moves values, so the results are bit-identical.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace vb::cuda {

// dst[b][s][r] = src[b][r][s]; src and dst must not overlap.
void transpose_batched(cudaStream_t st, int64_t B, int R, int S, const float* src, float* dst);

// [N][C][HW] -> [N][HW][C] and back: cpu::nchw_to_nhwc, cpu::nhwc_to_nchw.
inline void nchw_to_nhwc(cudaStream_t st, int N, int C, int HW, const float* src, float* dst) {
  transpose_batched(st, N, C, HW, src, dst);
}
inline void nhwc_to_nchw(cudaStream_t st, int N, int C, int HW, const float* src, float* dst) {
  transpose_batched(st, N, HW, C, src, dst);
}

}  // namespace vb::cuda
