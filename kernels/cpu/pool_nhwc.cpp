// NHWC pooling on the CPU: the twins of kernels/cuda/pool_nhwc.cu (see kernels/cpu/nhwc.h for the contract).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/check.h"
#include "kernels/cpu/pool_geom.h"
#include "kernels/cpu/nhwc.h"

namespace vb::cpu {
namespace {

// The NHWC twins also refuse an empty plane.
struct Geom : PoolGeom {
  Geom(int H_, int W_, int k_, int s_, int p_) : PoolGeom(checked(H_, W_), W_, k_, s_, p_, "max pool NHWC") {}
  static int checked(int H_, int W_) {
    VB_CHECK(H_ > 0 && W_ > 0, "max pool NHWC: bad input ", H_, "x", W_);
    return H_;
  }
};

// Pixel (h * W + w) holding the maximum of channel c over window (op, oq) of one image: rows then columns of
// the clipped window, a strictly greater value or a NaN taken, starting from the first element.
template <class A>
int64_t window_argmax(const Geom& g, const A* img, int C, int c, int op, int oq) {
  int h0, h1, w0, w1;
  g.rows(op, h0, h1);
  g.cols(oq, w0, w1);
  int64_t best = int64_t(h0) * g.W + w0;
  float best_v = -std::numeric_limits<float>::infinity();
  for (int h = h0; h < h1; ++h)
    for (int w = w0; w < w1; ++w) {
      const int64_t i = int64_t(h) * g.W + w;
      const float v = to_float(img[i * C + c]);
      if (v > best_v || std::isnan(v)) {
        best_v = v;
        best = i;
      }
    }
  return best;
}

}  // namespace

template <class A>
void maxpool_nhwc_fwd(int N, int H, int W, int C, int k, int s, int p, const A* x, A* y) {
  const Geom g(H, W, k, s, p);
  VB_CHECK(N > 0 && C > 0, "max pool NHWC: bad N=", N, " C=", C);
  for (int n = 0; n < N; ++n) {
    const A* img = x + int64_t(n) * H * W * C;
    A* out = y + int64_t(n) * g.P * g.Q * C;
    for (int op = 0; op < g.P; ++op)
      for (int oq = 0; oq < g.Q; ++oq)
        for (int c = 0; c < C; ++c)
          out[(int64_t(op) * g.Q + oq) * C + c] = img[window_argmax(g, img, C, c, op, oq) * C + c];
  }
}

template <class A>
void maxpool_nhwc_bwd(int N, int H, int W, int C, int k, int s, int p, const A* x, const A* dy, A* dx) {
  const Geom g(H, W, k, s, p);
  VB_CHECK(N > 0 && C > 0, "max pool NHWC: bad N=", N, " C=", C);
  const int64_t in_img = int64_t(H) * W * C;
  std::vector<float> acc(static_cast<size_t>(in_img));
  for (int n = 0; n < N; ++n) {
    const A* img = x + n * in_img;
    const A* gimg = dy + int64_t(n) * g.P * g.Q * C;
    std::fill(acc.begin(), acc.end(), 0.f);
    // Output scan order: each input element receives its windows' gradients in (op, oq) order, as the
    // kernel's gather adds them.
    for (int op = 0; op < g.P; ++op)
      for (int oq = 0; oq < g.Q; ++oq)
        for (int c = 0; c < C; ++c)
          acc[size_t(window_argmax(g, img, C, c, op, oq) * C + c)] += to_float(gimg[(int64_t(op) * g.Q + oq) * C + c]);
    for (int64_t i = 0; i < in_img; ++i) dx[n * in_img + i] = from_float<A>(acc[size_t(i)]);
  }
}

template <class A>
void avgpool_nhwc_fwd(int N, int HW, int C, const A* x, A* y) {
  VB_CHECK(N > 0 && HW > 0 && C > 0, "avgpool NHWC: bad shape N=", N, " HW=", HW, " C=", C);
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) {
      float s = 0.f;
      for (int i = 0; i < HW; ++i) s += to_float(x[(int64_t(n) * HW + i) * C + c]);
      y[int64_t(n) * C + c] = from_float<A>(s / float(HW));
    }
}

template <class A>
void avgpool_nhwc_bwd(int N, int HW, int C, const A* dy, A* dx) {
  VB_CHECK(N > 0 && HW > 0 && C > 0, "avgpool NHWC: bad shape N=", N, " HW=", HW, " C=", C);
  const float inv = 1.0f / float(HW);
  for (int n = 0; n < N; ++n)
    for (int i = 0; i < HW; ++i)
      for (int c = 0; c < C; ++c)
        dx[(int64_t(n) * HW + i) * C + c] = from_float<A>(to_float(dy[int64_t(n) * C + c]) * inv);
}

#define VB_INSTANTIATE_POOL_NHWC(A)                                                                 \
  template void maxpool_nhwc_fwd<A>(int, int, int, int, int, int, int, const A*, A*);               \
  template void maxpool_nhwc_bwd<A>(int, int, int, int, int, int, int, const A*, const A*, A*);     \
  template void avgpool_nhwc_fwd<A>(int, int, int, const A*, A*);                                   \
  template void avgpool_nhwc_bwd<A>(int, int, int, const A*, A*);
VB_INSTANTIATE_POOL_NHWC(float)
VB_INSTANTIATE_POOL_NHWC(bf16)
#undef VB_INSTANTIATE_POOL_NHWC

}  // namespace vb::cpu
