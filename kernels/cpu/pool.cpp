// Max pooling (k x k, stride s, padding p; padding never wins) and global average pooling. Every op splits
// over (n, c) planes, so each output element is computed by one thread in a fixed order.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/check.h"
#include "kernels/cpu/pool_geom.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

namespace vb::cpu {
namespace {


// Index (in the plane) of the maximum of window (op, oq), as PyTorch's CPU kernel picks it: scan rows then
// columns of the clipped window, take a strictly greater value or a NaN; start from the first element.
template <class T>
inline int64_t window_argmax(const PoolGeom& g, const T* x, int op, int oq) {
  int h0, h1, w0, w1;
  g.rows(op, h0, h1);
  g.cols(oq, w0, w1);
  int64_t best = int64_t(h0) * g.W + w0;
  T best_v = -std::numeric_limits<T>::infinity();
  for (int h = h0; h < h1; ++h)
    for (int w = w0; w < w1; ++w) {
      const int64_t i = int64_t(h) * g.W + w;
      const T v = x[i];
      if (v > best_v || std::isnan(v)) {
        best_v = v;
        best = i;
      }
    }
  return best;
}

}  // namespace

template <class T>
void maxpool_fwd(int N, int C, int H, int W, int k, int s, int p, const T* x, T* y) {
  const PoolGeom g(H, W, k, s, p);
  const int64_t in_plane = int64_t(H) * W, out_plane = int64_t(g.P) * g.Q;
  parallel_for(int64_t(N) * C, plane_grain(out_plane * k * k), [&](int64_t b, int64_t e) {
    for (int64_t pl = b; pl < e; ++pl) {
      const T* xp = x + pl * in_plane;
      T* yp = y + pl * out_plane;
      for (int op = 0; op < g.P; ++op)
        for (int oq = 0; oq < g.Q; ++oq) yp[op * g.Q + oq] = xp[window_argmax(g, xp, op, oq)];
    }
  });
}

template <class T>
void maxpool_bwd(int N, int C, int H, int W, int k, int s, int p, const T* x, const T* dy, T* dx) {
  const PoolGeom g(H, W, k, s, p);
  const int64_t in_plane = int64_t(H) * W, out_plane = int64_t(g.P) * g.Q;
  parallel_for(int64_t(N) * C, plane_grain(out_plane * k * k), [&](int64_t b, int64_t e) {
    for (int64_t pl = b; pl < e; ++pl) {
      const T* xp = x + pl * in_plane;
      const T* gp = dy + pl * out_plane;
      T* dp = dx + pl * in_plane;
      std::fill(dp, dp + in_plane, T(0));
      for (int op = 0; op < g.P; ++op)
        for (int oq = 0; oq < g.Q; ++oq) dp[window_argmax(g, xp, op, oq)] += gp[op * g.Q + oq];
    }
  });
}

template <class T>
void avgpool_fwd(int N, int C, int HW, const T* x, T* y) {
  parallel_for(int64_t(N) * C, plane_grain(HW), [&](int64_t b, int64_t e) {
    for (int64_t pl = b; pl < e; ++pl) {
      const T* xp = x + pl * HW;
      double sum = 0;
      for (int i = 0; i < HW; ++i) sum += double(xp[i]);
      y[pl] = T(sum / double(HW));
    }
  });
}

template <class T>
void avgpool_bwd(int N, int C, int HW, const T* dy, T* dx) {
  parallel_for(int64_t(N) * C, plane_grain(HW), [&](int64_t b, int64_t e) {
    for (int64_t pl = b; pl < e; ++pl) {
      const T g = dy[pl] / T(HW);
      std::fill(dx + pl * HW, dx + (pl + 1) * HW, g);
    }
  });
}

#define VB_INSTANTIATE_POOL(T)                                                             \
  template void maxpool_fwd<T>(int, int, int, int, int, int, int, const T*, T*);           \
  template void maxpool_bwd<T>(int, int, int, int, int, int, int, const T*, const T*, T*); \
  template void avgpool_fwd<T>(int, int, int, const T*, T*);                               \
  template void avgpool_bwd<T>(int, int, int, const T*, T*);
VB_INSTANTIATE_POOL(float)
VB_INSTANTIATE_POOL(double)
#undef VB_INSTANTIATE_POOL

}  // namespace vb::cpu
