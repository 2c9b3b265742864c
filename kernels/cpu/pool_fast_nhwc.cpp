// Pooling, NHWC (see pool_fast_nhwc.h). Every loop runs over a pixel's C contiguous channels, so it vectorises
// with the per-channel choices (maximum, NaN, argmax) as selects. Work splits over output rows (max pool
// forward) or (image, channel block) (max pool backward, average pool); no sum crosses a split.
#include "kernels/cpu/pool_fast_nhwc.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/check.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/pool_geom.h"
#include "kernels/cpu/simd.h"

namespace vb::cpu {
namespace {

constexpr int kChannelBlock = 64;

template <class V, int Tag = 0>
V* scratch(size_t n) {
  thread_local std::vector<V> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// maxpool_fwd's window scan (pool.cpp's window_argmax), per channel: from -inf, take v when v > best or v is a
// NaN. An all -inf window leaves -inf, the value of its first element.
template <class T>
inline void take_max(T* __restrict best, const T* __restrict v, int n) {
  for (int c = 0; c < n; ++c) {
    const T b = best[c], x = v[c];
    const bool take = (x > b) | (x != x);
    best[c] = take ? x : b;
  }
}

#ifdef VB_GEMM_AVX2
// Float windows of 8 channels with intrinsics, for C a multiple of 8: the same scan and selects as take_max and
// maxpool_nhwc_bwd_fast's loops (so the same bits), 2-3x faster than what GCC made of those loops for the
// stem's pool with its few channels (a loop of C per window element). x points at the window's channel block in
// the image, W * C apart per row, C per column.
struct MaxWindow8 {
  __m256 best, idx;  // the maximum so far and its element's number in the window (as a float)
  MaxWindow8(const float* x, int W, int C, int h0, int h1, int w0, int w1)
      : best(_mm256_set1_ps(-std::numeric_limits<float>::infinity())), idx(_mm256_setzero_ps()) {
    float j = 0;
    for (int h = h0; h < h1; ++h)
      for (int w = w0; w < w1; ++w, ++j) {
        const __m256 v = _mm256_loadu_ps(x + (int64_t(h) * W + w) * C);
        const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        best = _mm256_blendv_ps(best, v, take);
        idx = _mm256_blendv_ps(idx, _mm256_set1_ps(j), take);
      }
  }
};
#endif

}  // namespace

template <class T>
void maxpool_nhwc_fwd_fast(int N, int C, int H, int W, int k, int s, int p, const T* x, T* y) {
  const PoolGeom g(H, W, k, s, p);
  VB_CHECK(N > 0 && C > 0 && H > 0 && W > 0, "max pool NHWC: bad shape N=", N, " C=", C, " ", H, "x", W);
  const int64_t row_work = int64_t(g.Q) * k * k * C;
  parallel_for(int64_t(N) * g.P, std::max<int64_t>(1, 16384 / row_work), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / g.P;
      const int op = int(t % g.P);
      const T* img = x + n * H * W * C;
      int h0, h1;
      g.rows(op, h0, h1);
      for (int oq = 0; oq < g.Q; ++oq) {
        int w0, w1;
        g.cols(oq, w0, w1);
        T* out = y + ((n * g.P + op) * g.Q + oq) * C;
#ifdef VB_GEMM_AVX2
        if constexpr (std::is_same_v<T, float>) {
          if (C % 8 == 0) {
            for (int c = 0; c < C; c += 8) _mm256_storeu_ps(out + c, MaxWindow8(img + c, W, C, h0, h1, w0, w1).best);
            continue;
          }
        }
#endif
        std::fill(out, out + C, -std::numeric_limits<T>::infinity());
        for (int h = h0; h < h1; ++h)
          for (int w = w0; w < w1; ++w) take_max(out, img + (int64_t(h) * W + w) * C, C);
      }
    }
  });
}

template <class T>
void maxpool_nhwc_bwd_fast(int N, int C, int H, int W, int k, int s, int p, const T* x, const T* dy, T* dx) {
  const PoolGeom g(H, W, k, s, p);
  VB_CHECK(N > 0 && C > 0 && H > 0 && W > 0, "max pool NHWC: bad shape N=", N, " C=", C, " ", H, "x", W);
  // The index in the window as an integer of T's width, so that the selects vectorise alongside T's.
  using I = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
  const int ncb = (C + kChannelBlock - 1) / kChannelBlock;
  const int64_t in_img = int64_t(H) * W * C, out_img = int64_t(g.P) * g.Q * C;
  parallel_for(int64_t(N) * ncb, std::max<int64_t>(1, 16384 / (out_img / C * k * k * kChannelBlock + 1)),
               [&](int64_t b, int64_t e) {
    alignas(64) T best[kChannelBlock];
    alignas(64) I idx[kChannelBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / ncb;
      const int c0 = int(t % ncb) * kChannelBlock, nc = std::min(kChannelBlock, C - c0);
      const T* img = x + n * in_img + c0;
      const T* gimg = dy + n * out_img + c0;
      T* dimg = dx + n * in_img + c0;
      if (nc == C)
        std::fill(dimg, dimg + in_img, T(0));
      else
        for (int64_t i = 0; i < int64_t(H) * W; ++i) std::fill(dimg + i * C, dimg + i * C + nc, T(0));
      for (int op = 0; op < g.P; ++op) {
        int h0, h1;
        g.rows(op, h0, h1);
        for (int oq = 0; oq < g.Q; ++oq) {
          int w0, w1;
          g.cols(oq, w0, w1);
          const T* gr = gimg + (int64_t(op) * g.Q + oq) * C;
#ifdef VB_GEMM_AVX2
          if constexpr (std::is_same_v<T, float>) {
            if (nc % 8 == 0) {
              for (int c = 0; c < nc; c += 8) {
                const __m256 at = MaxWindow8(img + c, W, C, h0, h1, w0, w1).idx, gv = _mm256_loadu_ps(gr + c);
                float j = 0;
                for (int h = h0; h < h1; ++h)
                  for (int w = w0; w < w1; ++w, ++j) {
                    float* d = dimg + (int64_t(h) * W + w) * C + c;
                    const __m256 hit = _mm256_cmp_ps(at, _mm256_set1_ps(j), _CMP_EQ_OQ);
                    _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), _mm256_and_ps(hit, gv)));
                  }
              }
              continue;
            }
          }
#endif
          // maxpool_bwd's choice: from -inf, the last v > best or NaN in row-major order; the window's first
          // element when none.
          std::fill(best, best + nc, -std::numeric_limits<T>::infinity());
          std::fill(idx, idx + nc, I(0));
          I j = 0;
          for (int h = h0; h < h1; ++h)
            for (int w = w0; w < w1; ++w, ++j) {
              const T* v = img + (int64_t(h) * W + w) * C;
              for (int c = 0; c < nc; ++c) {
                const T bv = best[c], xv = v[c];
                const bool take = (xv > bv) | (xv != xv);
                best[c] = take ? xv : bv;
                idx[c] = take ? j : idx[c];
              }
            }
          // Each window element gets the gradient where it is the argmax, +0 elsewhere: adding +0 leaves the
          // sum's bits as they are (it starts at +0 and so is never -0), so the sums are maxpool_bwd's.
          j = 0;
          for (int h = h0; h < h1; ++h)
            for (int w = w0; w < w1; ++w, ++j) {
              T* d = dimg + (int64_t(h) * W + w) * C;
              for (int c = 0; c < nc; ++c) d[c] += idx[c] == j ? gr[c] : T(0);
            }
        }
      }
    }
  });
}

template <class T>
void avgpool_nhwc_fwd_fast(int N, int C, int HW, const T* x, T* y) {
  VB_CHECK(N > 0 && C > 0 && HW > 0, "avgpool NHWC: bad shape N=", N, " C=", C, " HW=", HW);
  const int ncb = (C + kChannelBlock - 1) / kChannelBlock;
  parallel_for(int64_t(N) * ncb, std::max<int64_t>(1, 16384 / (int64_t(HW) * kChannelBlock)),
               [&](int64_t b, int64_t e) {
    alignas(64) double acc[kChannelBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / ncb;
      const int c0 = int(t % ncb) * kChannelBlock, nc = std::min(kChannelBlock, C - c0);
      std::fill(acc, acc + nc, 0.0);
      for (int i = 0; i < HW; ++i) {
        const T* xr = x + (n * HW + i) * C + c0;
        for (int c = 0; c < nc; ++c) acc[c] += double(xr[c]);
      }
      T* yr = y + n * C + c0;
      for (int c = 0; c < nc; ++c) yr[c] = T(acc[c] / double(HW));
    }
  });
}

template <class T>
void avgpool_nhwc_bwd_fast(int N, int C, int HW, const T* dy, T* dx) {
  VB_CHECK(N > 0 && C > 0 && HW > 0, "avgpool NHWC: bad shape N=", N, " C=", C, " HW=", HW);
  parallel_for(int64_t(N) * HW, std::max<int64_t>(1, 16384 / C), [&](int64_t b, int64_t e) {
    T* g = scratch<T>(size_t(C));
    int64_t n_cur = -1;
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / HW;
      if (n != n_cur) {
        for (int c = 0; c < C; ++c) g[c] = dy[n * C + c] / T(HW);
        n_cur = n;
      }
      std::copy(g, g + C, dx + r * C);
    }
  });
}

#define VB_INSTANTIATE_POOL_NHWC_FAST(T)                                                            \
  template void maxpool_nhwc_fwd_fast<T>(int, int, int, int, int, int, int, const T*, T*);         \
  template void maxpool_nhwc_bwd_fast<T>(int, int, int, int, int, int, int, const T*, const T*, T*); \
  template void avgpool_nhwc_fwd_fast<T>(int, int, int, const T*, T*);                                  \
  template void avgpool_nhwc_bwd_fast<T>(int, int, int, const T*, T*);
VB_INSTANTIATE_POOL_NHWC_FAST(float)
VB_INSTANTIATE_POOL_NHWC_FAST(double)
#undef VB_INSTANTIATE_POOL_NHWC_FAST

}  // namespace vb::cpu
