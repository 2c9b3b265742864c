// Softmax, weighted cross-entropy (torch.nn.CrossEntropyLoss(weight=w, reduction='mean')) and the
// notebook's class weights. Row sums use the max-shifted log-sum-exp in double; the loss is summed over the
// batch in row order. Batches here are small, so these run on the calling thread.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/check.h"
#include "kernels/cpu/ops.h"

namespace vb::cpu {
namespace {

// PyTorch's default ignore_index: such a target contributes to neither the loss nor the weight sum, and its
// row of the gradient is zero.
constexpr int64_t kIgnoreIndex = -100;

// Max and sum(exp(x - max)) of one row, in double.
template <class T>
void row_stats(int C, const T* x, double& max, double& sum) {
  max = -std::numeric_limits<double>::infinity();
  for (int c = 0; c < C; ++c) max = std::max(max, double(x[c]));
  sum = 0;
  for (int c = 0; c < C; ++c) sum += std::exp(double(x[c]) - max);
}

}  // namespace

template <class T>
void softmax(int N, int C, const T* logits, T* probs) {
  for (int n = 0; n < N; ++n) {
    const T* x = logits + int64_t(n) * C;
    T* p = probs + int64_t(n) * C;
    double max, sum;
    row_stats(C, x, max, sum);
    for (int c = 0; c < C; ++c) p[c] = T(std::exp(double(x[c]) - max) / sum);
  }
}

template <class T>
T softmax_wce(int N, int C, const T* logits, const int64_t* labels, const T* class_weights, T* probs, T* dlogits) {
  std::vector<double> row_w(size_t(N), 0.0);  // weight of each row's target (0 when ignored)
  double weight_sum = 0;
  for (int n = 0; n < N; ++n) {
    const int64_t y = labels[n];
    if (y == kIgnoreIndex) continue;
    VB_CHECK(y >= 0 && y < C, "cross-entropy: label ", y, " of row ", n, " is outside [0, ", C, ")");
    row_w[size_t(n)] = class_weights ? double(class_weights[y]) : 1.0;
    weight_sum += row_w[size_t(n)];
  }
  double loss = 0;
  for (int n = 0; n < N; ++n) {
    const T* x = logits + int64_t(n) * C;
    const int64_t y = labels[n];
    double max, sum;
    row_stats(C, x, max, sum);
    if (probs)
      for (int c = 0; c < C; ++c) probs[int64_t(n) * C + c] = T(std::exp(double(x[c]) - max) / sum);
    if (y != kIgnoreIndex) loss += row_w[size_t(n)] * (max + std::log(sum) - double(x[y]));
    if (dlogits) {
      T* d = dlogits + int64_t(n) * C;
      if (y == kIgnoreIndex) {
        std::fill(d, d + C, T(0));
        continue;
      }
      const double scale = row_w[size_t(n)] / weight_sum;  // 0/0 = NaN when no target has weight, as PyTorch
      for (int c = 0; c < C; ++c) {
        const double p = std::exp(double(x[c]) - max) / sum;
        d[c] = T(scale * (p - (c == y ? 1.0 : 0.0)));
      }
    }
  }
  return T(loss / weight_sum);
}

void class_weights_from_labels(int64_t n, const int64_t* labels, int num_classes, float* weights) {
  std::vector<int64_t> count(size_t(num_classes), 0);
  for (int64_t i = 0; i < n; ++i) {
    VB_CHECK(labels[i] >= 0 && labels[i] < num_classes, "class weights: label ", labels[i], " at ", i,
             " is outside [0, ", num_classes, ")");
    ++count[size_t(labels[i])];
  }
  for (int c = 0; c < num_classes; ++c)
    weights[c] = count[size_t(c)] > 0 ? float(double(n) / double(count[size_t(c)])) : 0.0f;
}

#define VB_INSTANTIATE_LOSS(T)                      \
  template void softmax<T>(int, int, const T*, T*); \
  template T softmax_wce<T>(int, int, const T*, const int64_t*, const T*, T*, T*);
VB_INSTANTIATE_LOSS(float)
VB_INSTANTIATE_LOSS(double)
#undef VB_INSTANTIATE_LOSS

}  // namespace vb::cpu
