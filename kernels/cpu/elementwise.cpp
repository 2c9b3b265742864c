// Element-wise ops: ReLU and its backward, addition. Split over threads in fixed chunks; no reductions.
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

namespace vb::cpu {
namespace {
constexpr int64_t kGrain = 1 << 15;
}

// x < 0 ? 0 : x lets NaN through, as torch.relu (clamp_min) does.
template <class T>
void relu_fwd(int64_t n, const T* x, T* y) {
  parallel_for(n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) y[i] = x[i] < T(0) ? T(0) : x[i];
  });
}

// torch's threshold_backward: zero where y <= 0, dy elsewhere (a NaN y passes dy).
template <class T>
void relu_bwd(int64_t n, const T* y, const T* dy, T* dx) {
  parallel_for(n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T g = dy[i];  // loaded unconditionally, so the loop vectorises as a select instead of branching
      dx[i] = y[i] <= T(0) ? T(0) : g;
    }
  });
}

template <class T>
void add(int64_t n, const T* a, const T* b, T* y) {
  parallel_for(n, kGrain, [&](int64_t b0, int64_t e) {
    for (int64_t i = b0; i < e; ++i) y[i] = a[i] + b[i];
  });
}

#define VB_INSTANTIATE_ELEMENTWISE(T)                         \
  template void relu_fwd<T>(int64_t, const T*, T*);           \
  template void relu_bwd<T>(int64_t, const T*, const T*, T*); \
  template void add<T>(int64_t, const T*, const T*, T*);
VB_INSTANTIATE_ELEMENTWISE(float)
VB_INSTANTIATE_ELEMENTWISE(double)
#undef VB_INSTANTIATE_ELEMENTWISE

}  // namespace vb::cpu
