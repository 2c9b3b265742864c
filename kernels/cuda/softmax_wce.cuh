// Softmax + weighted cross-entropy as one kernel: loss, dlogits and probabilities in one launch, the loss
// written to device memory (no host synchronisation). CPU twin: vb::cpu::softmax_wce (kernels/cpu/ops.h),
// torch.nn.CrossEntropyLoss(weight=w, reduction='mean').
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace vb::cuda {

// logits [N,C], labels [N] (int64, device), class_weights [C]; probs [N,C] and dlogits [N,C] may be null.
// loss: one float. A label outside [0, C) makes the loss NaN. One block: meant for N up to a few thousand.
void softmax_wce(cudaStream_t st, int N, int C, const float* logits, const int64_t* labels,
                 const float* class_weights, float* probs, float* dlogits, float* loss);

}  // namespace vb::cuda
