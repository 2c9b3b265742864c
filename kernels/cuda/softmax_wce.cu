// Softmax + weighted cross-entropy (see softmax_wce.cuh). CPU twin: cpu::softmax_wce (kernels/cpu/ops.h).
#include <cmath>

#include "kernels/check.h"
#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/softmax_wce.cuh"

namespace vb::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kIgnoreIndex = -100;  // torch.nn.CrossEntropyLoss's default ignore_index, as the CPU twin

__device__ __forceinline__ void row_stats(const float* row, int C, float* mx, float* sum) {
  float m = row[0];
  for (int c = 1; c < C; ++c) m = fmaxf(m, row[c]);
  float s = 0.f;
  for (int c = 0; c < C; ++c) s += expf(row[c] - m);
  *mx = m;
  *sum = s;
}

// One block; thread t handles rows t, t + blockDim, ...; the weighted sums are reduced in a fixed order.
__global__ void softmax_wce_kernel(int N, int C, const float* __restrict__ logits, const int64_t* __restrict__ labels,
                                   const float* __restrict__ cw, float* __restrict__ probs,
                                   float* __restrict__ dlogits, float* __restrict__ loss) {
  float num = 0.f, den = 0.f, bad = 0.f;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const float* row = logits + int64_t(i) * C;
    float mx, s;
    row_stats(row, C, &mx, &s);
    const int64_t y = labels[i];
    if (probs)
      for (int c = 0; c < C; ++c) probs[int64_t(i) * C + c] = expf(row[c] - mx) / s;
    if (y == kIgnoreIndex) continue;  // PyTorch's ignore_index: out of both sums
    if (y < 0 || y >= C) {
      bad += 1.f;
      continue;
    }
    const float w = cw ? cw[y] : 1.f;
    num += w * (mx + logf(s) - row[y]);  // w * -log softmax(row)[y]
    den += w;
  }
  detail::block_sum2(num, den);
  float bad_total = bad, unused = 0.f;
  detail::block_sum2(bad_total, unused);
  if (threadIdx.x == 0) *loss = bad_total > 0.f ? NAN : num / den;
  if (!dlogits) return;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const float* row = logits + int64_t(i) * C;
    float* d = dlogits + int64_t(i) * C;
    const int64_t y = labels[i];
    if (y == kIgnoreIndex) {
      for (int c = 0; c < C; ++c) d[c] = 0.f;
      continue;
    }
    if (y < 0 || y >= C) {  // the CPU twin throws; a kernel cannot, so the loss and this row are NaN
      for (int c = 0; c < C; ++c) d[c] = NAN;
      continue;
    }
    float mx, s;
    row_stats(row, C, &mx, &s);
    const float g = (cw ? cw[y] : 1.f) / den;
    for (int c = 0; c < C; ++c) d[c] = g * (expf(row[c] - mx) / s - (c == y ? 1.f : 0.f));
  }
}

}  // namespace

void softmax_wce(cudaStream_t st, int N, int C, const float* logits, const int64_t* labels,
                 const float* class_weights, float* probs, float* dlogits, float* loss) {
  VB_CHECK(N > 0 && C > 0, "softmax_wce: bad shape N=", N, " C=", C);
  VB_CHECK(logits && labels && loss, "softmax_wce: null logits, labels or loss");  // null weights: all 1
  softmax_wce_kernel<<<1, kThreads, 0, st>>>(N, C, logits, labels, class_weights, probs, dlogits, loss);
  VB_CUDA_LAUNCH_CHECK();
}

}  // namespace vb::cuda
