// float <-> bf16 over a device buffer (weights to their bf16 copies, activations in and out of bf16).
// CPU twins: vb::to_bf16 / vb::to_float (kernels/bf16.h), bit-identical (round to nearest even, NaN to 0x7fff).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/bf16.h"

namespace vb::cuda {

void float_to_bf16(cudaStream_t st, int64_t n, const float* x, vb::bf16* y);
void bf16_to_float(cudaStream_t st, int64_t n, const vb::bf16* x, float* y);

// The CUDA backend's bf16 mode (engine/backend_cuda.cu, the CPU twin engine/backend_bf16.h):
// y = round_bf16(a + b) over bf16 activations, the sum in float (y may alias a or b);
void add_bf16(cudaStream_t st, int64_t n, const vb::bf16* a, const vb::bf16* b, vb::bf16* y);
// y = max(x, 0) over bf16 (exact; NaN passes, as cpu::relu_fwd; y may alias x);
void relu_bf16(cudaStream_t st, int64_t n, const vb::bf16* x, vb::bf16* y);
// y = round_bf16(x) kept as float: the head's operands and outputs, which stay float32 buffers (y may alias x).
void round_to_bf16(cudaStream_t st, int64_t n, const float* x, float* y);

}  // namespace vb::cuda
