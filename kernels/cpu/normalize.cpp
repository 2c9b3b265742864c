#include "kernels/cpu/normalize.h"

#include "kernels/cpu/parallel.h"
#include "kernels/normalize.h"

namespace vb::cpu {

namespace {
// Pixels per chunk handed to a thread: large enough that a chunk is worth the hand-off.
constexpr int64_t kGrain = 16384;
}  // namespace

template <class T>
void normalize_u8_nhwc(int N, int64_t HW, const uint8_t* src, T* dst) {
  const NormTable& L = norm_table();
  parallel_for(int64_t(N) * HW, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const uint8_t* s = src + 3 * i;
      T* d = dst + 3 * i;
      d[0] = T(L.v[0][s[0]]);
      d[1] = T(L.v[1][s[1]]);
      d[2] = T(L.v[2][s[2]]);
    }
  });
}

template <class T>
void normalize_u8_nchw(int N, int64_t HW, const uint8_t* src, T* dst) {
  const NormTable& L = norm_table();
  parallel_for(int64_t(N) * HW, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = i / HW, p = i - n * HW;
      const uint8_t* s = src + 3 * i;
      T* d = dst + n * 3 * HW + p;
      d[0] = T(L.v[0][s[0]]);
      d[HW] = T(L.v[1][s[1]]);
      d[2 * HW] = T(L.v[2][s[2]]);
    }
  });
}

template void normalize_u8_nhwc<float>(int, int64_t, const uint8_t*, float*);
template void normalize_u8_nhwc<double>(int, int64_t, const uint8_t*, double*);
template void normalize_u8_nchw<float>(int, int64_t, const uint8_t*, float*);
template void normalize_u8_nchw<double>(int, int64_t, const uint8_t*, double*);

}  // namespace vb::cpu
