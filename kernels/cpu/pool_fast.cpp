// Fast max pooling (see pool_fast.h). Planes (n, c) split over threads as in pool.cpp; no reductions across
// planes, so results don't depend on the thread count.
#include "kernels/cpu/pool_fast.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "kernels/check.h"
#include "kernels/cpu/pool_geom.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

namespace vb::cpu {
namespace {


template <class T>
bool has_nan(const T* x, int64_t n) {
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) nan |= x[i] != x[i];
  return nan;
}

using Geom = PoolGeom;

template <class T>
T* row_scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace

template <class T>
void maxpool_fwd_fast(int N, int C, int H, int W, int k, int s, int p, const T* x, T* y) {
  const Geom g(H, W, k, s, p);
  const int64_t in_plane = int64_t(H) * W, out_plane = int64_t(g.P) * g.Q;
  parallel_for(int64_t(N) * C, plane_grain(in_plane + out_plane * k), [&](int64_t b, int64_t e) {
    T* vm = row_scratch<T>(size_t(W));
    for (int64_t pl = b; pl < e; ++pl) {
      const T* xp = x + pl * in_plane;
      T* yp = y + pl * out_plane;
      if (has_nan(xp, in_plane)) {
        maxpool_fwd<T>(1, 1, H, W, k, s, p, xp, yp);
        continue;
      }
      for (int op = 0; op < g.P; ++op) {
        int h0, h1;
        g.rows(op, h0, h1);
        const T* r0 = xp + int64_t(h0) * W;
        std::copy(r0, r0 + W, vm);
        for (int h = h0 + 1; h < h1; ++h) {
          const T* r = xp + int64_t(h) * W;
          for (int w = 0; w < W; ++w) vm[w] = r[w] > vm[w] ? r[w] : vm[w];
        }
        T* yr = yp + int64_t(op) * g.Q;
        for (int oq = 0; oq < g.Q; ++oq) {
          int w0, w1;
          g.cols(oq, w0, w1);
          T m = vm[w0];
          for (int w = w0 + 1; w < w1; ++w) m = vm[w] > m ? vm[w] : m;
          yr[oq] = m;
        }
      }
    }
  });
}

template <class T>
void maxpool_bwd_fast(int N, int C, int H, int W, int k, int s, int p, const T* x, const T* dy, T* dx) {
  const Geom g(H, W, k, s, p);
  const int64_t in_plane = int64_t(H) * W, out_plane = int64_t(g.P) * g.Q;
  parallel_for(int64_t(N) * C, plane_grain(in_plane + out_plane * k * k), [&](int64_t b, int64_t e) {
    for (int64_t pl = b; pl < e; ++pl) {
      const T* xp = x + pl * in_plane;
      if (has_nan(xp, in_plane)) {
        maxpool_bwd<T>(1, 1, H, W, k, s, p, xp, dy + pl * out_plane, dx + pl * in_plane);
        continue;
      }
      const T* gp = dy + pl * out_plane;
      T* dp = dx + pl * in_plane;
      std::fill(dp, dp + in_plane, T(0));
      for (int op = 0; op < g.P; ++op) {
        int h0, h1;
        g.rows(op, h0, h1);
        for (int oq = 0; oq < g.Q; ++oq) {
          int w0, w1;
          g.cols(oq, w0, w1);
          // maxpool_bwd's choice: from -inf, the first strictly greater value in row-major order (the
          // window's first element when all are -inf).
          int64_t best = int64_t(h0) * W + w0;
          T best_v = -std::numeric_limits<T>::infinity();
          for (int h = h0; h < h1; ++h) {
            const T* r = xp + int64_t(h) * W;
            for (int w = w0; w < w1; ++w) {
              const bool gt = r[w] > best_v;
              best_v = gt ? r[w] : best_v;
              best = gt ? int64_t(h) * W + w : best;
            }
          }
          dp[best] += gp[int64_t(op) * g.Q + oq];
        }
      }
    }
  });
}

#define VB_INSTANTIATE_POOL_FAST(T)                                                               \
  template void maxpool_fwd_fast<T>(int, int, int, int, int, int, int, const T*, T*);           \
  template void maxpool_bwd_fast<T>(int, int, int, int, int, int, int, const T*, const T*, T*);
VB_INSTANTIATE_POOL_FAST(float)
VB_INSTANTIATE_POOL_FAST(double)
#undef VB_INSTANTIATE_POOL_FAST

}  // namespace vb::cpu
