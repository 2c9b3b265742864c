// float <-> bf16 over a device buffer (weights to their bf16 copies, activations in and out of bf16).
// CPU twins: vb::to_bf16 / vb::to_float (kernels/bf16.h), bit-identical (round to nearest even, NaN to 0x7fff).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/bf16.h"

namespace vb::cuda {

void float_to_bf16(cudaStream_t st, int64_t n, const float* x, vb::bf16* y);
void bf16_to_float(cudaStream_t st, int64_t n, const vb::bf16* x, float* y);

}  // namespace vb::cuda
