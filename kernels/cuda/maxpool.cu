// Max pooling. CPU twins: cpu::maxpool_fwd, cpu::maxpool_bwd (kernels/cpu/ops.h).
#include <cmath>

#include "kernels/check.h"
#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/pool.cuh"

namespace vb::cuda {
namespace {

struct PoolGeom {
  int H, W, P, Q, k, s, p;
};

// Offset (h * W + w) of the maximum of window (ph, pw) within its plane, chosen exactly as the CPU twin and
// PyTorch do: scan rows then columns, take a strictly greater value or a NaN (so NaN propagates, and the last
// NaN of the window is the one that gets the gradient); ties keep the first.
__device__ __forceinline__ int window_argmax(const float* plane, const PoolGeom& g, int ph, int pw, float* best_out) {
  const int h0 = ph * g.s - g.p, w0 = pw * g.s - g.p;
  float best = -INFINITY;
  int arg = -1;
  for (int i = 0; i < g.k; ++i) {
    const int h = h0 + i;
    if (h < 0 || h >= g.H) continue;
    for (int j = 0; j < g.k; ++j) {
      const int w = w0 + j;
      if (w < 0 || w >= g.W) continue;
      const float v = plane[h * g.W + w];
      if (arg < 0 || v > best || isnan(v)) {
        best = v;
        arg = h * g.W + w;
      }
    }
  }
  *best_out = best;
  return arg;
}

__global__ void maxpool_fwd_kernel(int64_t total, PoolGeom g, const float* __restrict__ x, float* __restrict__ y) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < total; o += int64_t(gridDim.x) * blockDim.x) {
    const int pw = int(o % g.Q);
    const int ph = int((o / g.Q) % g.P);
    const int64_t plane = o / (int64_t(g.P) * g.Q);
    float best;
    window_argmax(x + plane * g.H * g.W, g, ph, pw, &best);
    y[o] = best;
  }
}

// One thread per input element: sums dy over the windows that chose it, in (ph, pw) order.
__global__ void maxpool_bwd_kernel(int64_t total, PoolGeom g, const float* __restrict__ x,
                                   const float* __restrict__ y, const float* __restrict__ dy,
                                   float* __restrict__ dx) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int w = int(i % g.W);
    const int h = int((i / g.W) % g.H);
    const int64_t plane = i / (int64_t(g.H) * g.W);
    const float* xp = x + plane * g.H * g.W;
    const int64_t obase = plane * g.P * g.Q;
    const float v = xp[h * g.W + w];
    const int ph0 = h + g.p < g.k ? 0 : (h + g.p - g.k) / g.s + 1;
    const int ph1 = min((h + g.p) / g.s + 1, g.P);
    const int pw0 = w + g.p < g.k ? 0 : (w + g.p - g.k) / g.s + 1;
    const int pw1 = min((w + g.p) / g.s + 1, g.Q);
    float acc = 0.f;
    for (int ph = ph0; ph < ph1; ++ph)
      for (int pw = pw0; pw < pw1; ++pw) {
        const int64_t o = obase + int64_t(ph) * g.Q + pw;
        // Cheap rejection: not this window's maximum value (a NaN input may be: NaN != NaN).
        if (y && y[o] != v && !(isnan(v) && isnan(y[o]))) continue;
        float best;
        if (window_argmax(xp, g, ph, pw, &best) == h * g.W + w) acc += dy[o];
      }
    dx[i] = acc;
  }
}

PoolGeom geom(int H, int W, int k, int s, int p) {
  VB_CHECK(k > 0 && s > 0 && p >= 0 && 2 * p <= k, "maxpool: bad kernel ", k, " stride ", s, " pad ", p);
  PoolGeom g{H, W, (H + 2 * p - k) / s + 1, (W + 2 * p - k) / s + 1, k, s, p};
  VB_CHECK(g.P > 0 && g.Q > 0, "maxpool: input ", H, "x", W, " too small for kernel ", k);
  return g;
}

}  // namespace

void maxpool_fwd(cudaStream_t st, int N, int C, int H, int W, int k, int s, int p, const float* x, float* y) {
  const PoolGeom g = geom(H, W, k, s, p);
  const int64_t total = int64_t(N) * C * g.P * g.Q;
  maxpool_fwd_kernel<<<detail::grid_for(total, 256), 256, 0, st>>>(total, g, x, y);
  VB_CUDA_LAUNCH_CHECK();
}

void maxpool_bwd(cudaStream_t st, int N, int C, int H, int W, int k, int s, int p, const float* x, const float* y,
                 const float* dy, float* dx) {
  const PoolGeom g = geom(H, W, k, s, p);
  const int64_t total = int64_t(N) * C * H * W;
  maxpool_bwd_kernel<<<detail::grid_for(total, 256), 256, 0, st>>>(total, g, x, y, dy, dx);
  VB_CUDA_LAUNCH_CHECK();
}

}  // namespace vb::cuda
