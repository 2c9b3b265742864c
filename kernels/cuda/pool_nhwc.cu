// NHWC pooling kernels (see pool_nhwc.cuh). CPU twins: cpu::maxpool_nhwc_fwd, cpu::maxpool_nhwc_bwd,
// cpu::avgpool_nhwc_fwd, cpu::avgpool_nhwc_bwd (kernels/cpu/nhwc.h). Each thread handles V consecutive
// channels of one pixel (one 128-bit access when V > 1), so a warp reads whole rows of channels.
#include <algorithm>
#include <type_traits>

#include "kernels/check.h"
#include "kernels/cuda/nhwc_vec.cuh"
#include "kernels/cuda/pool_nhwc.cuh"

namespace vb::cuda {
namespace {

using detail::kVec;
using detail::with_vec;
using detail::load_vec;
using detail::store_vec;

struct Geom {
  int H, W, P, Q, k, s, p;
};

Geom geom(int N, int H, int W, int C, int k, int s, int p) {
  VB_CHECK(N > 0 && H > 0 && W > 0 && C > 0, "maxpool NHWC: bad shape N=", N, " H=", H, " W=", W, " C=", C);
  VB_CHECK(k > 0 && s > 0 && p >= 0 && 2 * p <= k, "maxpool NHWC: bad kernel ", k, " stride ", s, " pad ", p);
  Geom g{H, W, (H + 2 * p - k) / s + 1, (W + 2 * p - k) / s + 1, k, s, p};
  VB_CHECK(g.P > 0 && g.Q > 0, "maxpool NHWC: input ", H, "x", W, " too small for kernel ", k);
  return g;
}

// Per channel, the pixel (h * W + w) of window (ph, pw)'s maximum and its value, chosen as the twin does:
// rows then columns, the first element, then a strictly greater value or a NaN.
template <class A, int V>
__device__ __forceinline__ void window_max(const A* img, const Geom& g, int C, int cv, int ph, int pw,
                                           float (&best)[V], int (&arg)[V]) {
  bool first = true;
  for (int i = 0; i < g.k; ++i) {
    const int h = ph * g.s - g.p + i;
    if (h < 0 || h >= g.H) continue;
    for (int j = 0; j < g.k; ++j) {
      const int w = pw * g.s - g.p + j;
      if (w < 0 || w >= g.W) continue;
      float v[V];
      load_vec<V>(img + (int64_t(h) * g.W + w) * C + int64_t(cv) * V, v);
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (first || v[k] > best[k] || isnan(v[k])) {
          best[k] = v[k];
          arg[k] = h * g.W + w;
        }
      first = false;
    }
  }
}

template <class A, int V>
__global__ void maxpool_fwd_kernel(int64_t total, Geom g, int C, const A* __restrict__ x, A* __restrict__ y) {
  const int Cv = C / V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int cv = int(i % Cv);
    const int64_t pix = i / Cv;
    const int pw = int(pix % g.Q), ph = int(pix / g.Q % g.P);
    const int64_t n = pix / (int64_t(g.P) * g.Q);
    float best[V];
    int arg[V];
    window_max<A, V>(x + n * g.H * g.W * C, g, C, cv, ph, pw, best, arg);
    store_vec<V>(y + i * V, best);
  }
}

// One thread per V channels of an input pixel: sums dy over the windows (in (ph, pw) order) whose maximum it is.
template <class A, int V>
__global__ void maxpool_bwd_kernel(int64_t total, Geom g, int C, const A* __restrict__ x, const A* __restrict__ dy,
                                   A* __restrict__ dx) {
  const int Cv = C / V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int cv = int(i % Cv);
    const int64_t pix = i / Cv;
    const int w = int(pix % g.W), h = int(pix / g.W % g.H);
    const int64_t n = pix / (int64_t(g.H) * g.W);
    const A* img = x + n * g.H * g.W * C;
    const A* gimg = dy + n * g.P * g.Q * C;
    const int ph0 = h + g.p < g.k ? 0 : (h + g.p - g.k) / g.s + 1, ph1 = min((h + g.p) / g.s + 1, g.P);
    const int pw0 = w + g.p < g.k ? 0 : (w + g.p - g.k) / g.s + 1, pw1 = min((w + g.p) / g.s + 1, g.Q);
    float acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = 0.f;
    for (int ph = ph0; ph < ph1; ++ph)
      for (int pw = pw0; pw < pw1; ++pw) {
        float best[V], gv[V];
        int arg[V];
        window_max<A, V>(img, g, C, cv, ph, pw, best, arg);
        load_vec<V>(gimg + (int64_t(ph) * g.Q + pw) * C + int64_t(cv) * V, gv);
#pragma unroll
        for (int k = 0; k < V; ++k)
          if (arg[k] == h * g.W + w) acc[k] += gv[k];
      }
    store_vec<V>(dx + i * V, acc);
  }
}

// One thread per V channels of an image: the float sum over hw in order, divided by HW.
template <class A, int V>
__global__ void avgpool_fwd_kernel(int64_t total, int HW, int C, const A* __restrict__ x, A* __restrict__ y) {
  const int Cv = C / V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / Cv;
    const int cv = int(i % Cv);
    float s[V];
#pragma unroll
    for (int k = 0; k < V; ++k) s[k] = 0.f;
    for (int j = 0; j < HW; ++j) {
      float v[V];
      load_vec<V>(x + (n * HW + j) * C + int64_t(cv) * V, v);
#pragma unroll
      for (int k = 0; k < V; ++k) s[k] += v[k];
    }
#pragma unroll
    for (int k = 0; k < V; ++k) s[k] = s[k] / float(HW);
    store_vec<V>(y + i * V, s);
  }
}

template <class A, int V>
__global__ void avgpool_bwd_kernel(int64_t total, int HW, int C, const A* __restrict__ dy, A* __restrict__ dx) {
  const int Cv = C / V;
  const float inv = 1.0f / float(HW);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / (int64_t(HW) * Cv);
    const int cv = int(i % Cv);
    float v[V];
    load_vec<V>(dy + n * C + int64_t(cv) * V, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = v[k] * inv;
    store_vec<V>(dx + i * V, v);
  }
}


}  // namespace

template <class A>
void maxpool_nhwc_fwd(cudaStream_t st, int N, int H, int W, int C, int k, int s, int p, const A* x, A* y) {
  const Geom g = geom(N, H, W, C, k, s, p);
  VB_CHECK(x && y, "maxpool NHWC: null input or output");
  with_vec<A>(detail::nhwc_vec_ok<A>(C, {x, y}), [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    const int64_t total = int64_t(N) * g.P * g.Q * (C / V);
    maxpool_fwd_kernel<A, V><<<detail::grid_for(total, 256), 256, 0, st>>>(total, g, C, x, y);
    VB_CUDA_LAUNCH_CHECK();
  });
}

template <class A>
void maxpool_nhwc_bwd(cudaStream_t st, int N, int H, int W, int C, int k, int s, int p, const A* x, const A* dy,
                      A* dx) {
  const Geom g = geom(N, H, W, C, k, s, p);
  VB_CHECK(x && dy && dx, "maxpool NHWC backward: null input or output");
  with_vec<A>(detail::nhwc_vec_ok<A>(C, {x, dy, dx}), [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    const int64_t total = int64_t(N) * H * W * (C / V);
    maxpool_bwd_kernel<A, V><<<detail::grid_for(total, 256), 256, 0, st>>>(total, g, C, x, dy, dx);
    VB_CUDA_LAUNCH_CHECK();
  });
}

template <class A>
void avgpool_nhwc_fwd(cudaStream_t st, int N, int HW, int C, const A* x, A* y) {
  VB_CHECK(N > 0 && HW > 0 && C > 0, "avgpool NHWC: bad shape N=", N, " HW=", HW, " C=", C);
  VB_CHECK(x && y, "avgpool NHWC: null input or output");
  with_vec<A>(detail::nhwc_vec_ok<A>(C, {x, y}), [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    const int64_t total = int64_t(N) * (C / V);
    avgpool_fwd_kernel<A, V><<<detail::grid_for(total, 128), 128, 0, st>>>(total, HW, C, x, y);
    VB_CUDA_LAUNCH_CHECK();
  });
}

template <class A>
void avgpool_nhwc_bwd(cudaStream_t st, int N, int HW, int C, const A* dy, A* dx) {
  VB_CHECK(N > 0 && HW > 0 && C > 0, "avgpool NHWC: bad shape N=", N, " HW=", HW, " C=", C);
  VB_CHECK(dy && dx, "avgpool NHWC backward: null input or output");
  with_vec<A>(detail::nhwc_vec_ok<A>(C, {dy, dx}), [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    const int64_t total = int64_t(N) * HW * (C / V);
    avgpool_bwd_kernel<A, V><<<detail::grid_for(total, 256), 256, 0, st>>>(total, HW, C, dy, dx);
    VB_CUDA_LAUNCH_CHECK();
  });
}

#define VB_INSTANTIATE_POOL_NHWC(A)                                                                              \
  template void maxpool_nhwc_fwd<A>(cudaStream_t, int, int, int, int, int, int, int, const A*, A*);             \
  template void maxpool_nhwc_bwd<A>(cudaStream_t, int, int, int, int, int, int, int, const A*, const A*, A*);   \
  template void avgpool_nhwc_fwd<A>(cudaStream_t, int, int, int, const A*, A*);                                 \
  template void avgpool_nhwc_bwd<A>(cudaStream_t, int, int, int, const A*, A*);
VB_INSTANTIATE_POOL_NHWC(float)
VB_INSTANTIATE_POOL_NHWC(vb::bf16)
#undef VB_INSTANTIATE_POOL_NHWC

}  // namespace vb::cuda
