// Element-wise kernels and the linear layer's bias. CPU twins (kernels/cpu/ops.h): cpu::relu_fwd,
// cpu::relu_bwd (relu.cu); cpu::add (add.cu); the bias parts of cpu::linear_fwd / cpu::linear_bwd
// (linear_bias.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace vb::cuda {

void relu_fwd(cudaStream_t st, int64_t n, const float* x, float* y);                  // y may alias x
void relu_bwd(cudaStream_t st, int64_t n, const float* y, const float* dy, float* dx);  // dx may alias dy
void add(cudaStream_t st, int64_t n, const float* a, const float* b, float* y);          // y may alias a or b

// y [N,OUT] += b [OUT] (row-major), after the cuBLAS product.
void bias_add(cudaStream_t st, int N, int OUT, const float* b, float* y);
// db [OUT] = sum over rows of dy [N,OUT], rows summed in order.
void bias_grad(cudaStream_t st, int N, int OUT, const float* dy, float* db);

}  // namespace vb::cuda
