// Batch norm kernels (see batchnorm.cuh). CPU twins: cpu::batchnorm_train_fwd, cpu::batchnorm_eval_fwd,
// cpu::batchnorm_bwd in kernels/cpu/ops.h.
//
// Work layout (NCHW): a channel's M = N*HW elements are N planes of HW contiguous floats.
// - Reductions: grid (C, splits); block (c, s) walks slice s of channel c's M elements in order j = n*HW + hw,
//   each thread stepping by blockDim.x with an incremental (n, hw) so that no division sits in the loop.
// - Element-wise passes: one block per (n, c) plane, float4 when HW % 4 == 0.
#include "kernels/check.h"
#include "kernels/cuda/batchnorm.cuh"
#include "kernels/cuda/bn_stats.cuh"
#include "kernels/cuda/block_reduce.cuh"

namespace vb::cuda {
namespace {

constexpr int kRedThreads = 256;
constexpr int kMaxSplits = 32;

// Work buffer layout, in floats: partial [C][kMaxSplits][2], then five per-channel arrays.
struct BnWork {
  float* partial;
  float* mean;    // [C] batch mean (forward)
  float* invstd;  // [C] 1/sqrt(var + eps) (forward)
  float* k1;      // [C] backward: gamma * invstd
  float* k2;      // [C] backward: mean of the masked gradient
  float* k3;      // [C] backward: sum(g * xhat) / M
  BnWork(float* w, int C)
      : partial(w),
        mean(w + size_t(C) * kMaxSplits * 2),
        invstd(mean + C),
        k1(invstd + C),
        k2(k1 + C),
        k3(k2 + C) {}
};

// Slices per channel: enough blocks to fill the GPU (about 1024), but at least 16K elements per slice.
int choose_splits(int C, int64_t M) {
  int64_t want = (1024 + C - 1) / C;
  int64_t cap = M / 16384;
  int64_t s = want < cap ? want : cap;
  if (s > kMaxSplits) s = kMaxSplits;
  return int(s < 1 ? 1 : s);
}

// Threads for a plane of HW floats (vec floats per thread-step): a multiple of 32, 32..256.
int plane_threads(int HW, int vec) {
  int t = (HW / vec + 31) / 32 * 32;
  return t < 32 ? 32 : (t > 256 ? 256 : t);
}

// Partial sums of (x - shift) and (x - shift)^2 over slice blockIdx.y of channel blockIdx.x. The shift (the
// channel's first element) keeps E[x^2] - E[x]^2 from cancelling when the mean is large next to the spread.
// VEC: HW % 4 == 0 and 16-byte alignment, the channel walked in float4 units (more bytes in flight per load).
template <bool VEC>
__global__ void bn_stats_partial_kernel(const float* __restrict__ x, int N, int C, int HW, int splits,
                                        float* __restrict__ partial) {
  constexpr int V = VEC ? 4 : 1;
  const int c = blockIdx.x, s = blockIdx.y;
  const int HWv = HW / V;
  const int64_t M = int64_t(N) * HWv;
  const int64_t j0 = M * s / splits, j1 = M * (s + 1) / splits;
  const float shift = x[int64_t(c) * HW];
  float sum = 0.f, sq = 0.f;
  int64_t j = j0 + threadIdx.x;
  if (j < j1) {
    int n = int(j / HWv), hw = int(j - int64_t(n) * HWv);
    const int step = blockDim.x, sn = step / HWv, shw = step - sn * HWv;
#pragma unroll 4
    for (; j < j1; j += step) {
      const int64_t idx = (int64_t(n) * C + c) * HWv + hw;
      if (VEC) {
        const float4 q = reinterpret_cast<const float4*>(x)[idx];
        const float a = q.x - shift, b = q.y - shift, d = q.z - shift, e = q.w - shift;
        sum += (a + b) + (d + e);
        sq = fmaf(a, a, fmaf(b, b, fmaf(d, d, fmaf(e, e, sq))));
      } else {
        const float v = x[idx] - shift;
        sum += v;
        sq = fmaf(v, v, sq);
      }
      hw += shw;
      n += sn;
      if (hw >= HWv) {
        hw -= HWv;
        ++n;
      }
    }
  }
  detail::block_sum2(sum, sq);
  if (threadIdx.x == 0) {
    partial[(size_t(c) * kMaxSplits + s) * 2 + 0] = sum;
    partial[(size_t(c) * kMaxSplits + s) * 2 + 1] = sq;
  }
}

// One thread per channel: combines the slices in order (double), writes mean / invstd, updates running stats.
__global__ void bn_stats_finalize_kernel(const float* __restrict__ x, const float* __restrict__ partial, int C,
                                         int HW, int splits, int64_t M, double momentum, double eps,
                                         float* __restrict__ mean_out, float* __restrict__ invstd_out,
                                         float* save_mean, float* save_invstd, float* running_mean,
                                         float* running_var) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double s = 0, q = 0;
  for (int k = 0; k < splits; ++k) {
    s += partial[(size_t(c) * kMaxSplits + k) * 2 + 0];
    q += partial[(size_t(c) * kMaxSplits + k) * 2 + 1];
  }
  bn_write_channel_stats(c, s, q, M, double(x[int64_t(c) * HW]), momentum, eps, mean_out, invstd_out, save_mean,
                         save_invstd, running_mean, running_var);
}

// y = act((x - mean) * gamma * invstd + beta + residual) over one (n, c) plane per block. invstd null: use
// 1/sqrt(var + eps) (evaluation). y may alias x (Backend::conv_bn_eval's default runs it in place): each element
// is read by the thread that writes it, and x, residual and y are not declared __restrict__.
template <bool VEC>
__global__ void bn_apply_kernel(const float* x, const float* residual, float* y, int C, int HW, const float* __restrict__ mean,
                                const float* __restrict__ invstd, const float* __restrict__ var, float eps,
                                const float* __restrict__ gamma, const float* __restrict__ beta, bool relu) {
  const int64_t plane = blockIdx.x;
  const int c = int(plane % C);
  const float m = mean[c];
  const float is = invstd ? invstd[c] : 1.0f / sqrtf(var[c] + eps);
  const float sc = gamma[c] * is, b = beta[c];
  const int64_t base = plane * HW;
  if (VEC) {
    const float4* x4 = reinterpret_cast<const float4*>(x + base);
    const float4* r4 = residual ? reinterpret_cast<const float4*>(residual + base) : nullptr;
    float4* y4 = reinterpret_cast<float4*>(y + base);
    for (int i = threadIdx.x; i < HW / 4; i += blockDim.x) {
      float4 v = x4[i];
      v.x = fmaf(v.x - m, sc, b);
      v.y = fmaf(v.y - m, sc, b);
      v.z = fmaf(v.z - m, sc, b);
      v.w = fmaf(v.w - m, sc, b);
      if (r4) {
        const float4 r = r4[i];
        v.x += r.x;
        v.y += r.y;
        v.z += r.z;
        v.w += r.w;
      }
      if (relu) {  // v < 0 ? 0 : v lets NaN through, as cpu::relu_fwd and torch.relu
        v.x = v.x < 0.f ? 0.f : v.x;
        v.y = v.y < 0.f ? 0.f : v.y;
        v.z = v.z < 0.f ? 0.f : v.z;
        v.w = v.w < 0.f ? 0.f : v.w;
      }
      y4[i] = v;
    }
  } else {
    for (int i = threadIdx.x; i < HW; i += blockDim.x) {
      float v = fmaf(x[base + i] - m, sc, b);
      if (residual) v += residual[base + i];
      if (relu) v = v < 0.f ? 0.f : v;
      y[base + i] = v;
    }
  }
}

void launch_apply(cudaStream_t st, int N, int C, int HW, const float* x, const float* residual, float* y,
                  const float* mean, const float* invstd, const float* var, double eps, const float* gamma,
                  const float* beta, bool relu) {
  const bool vec = HW % 4 == 0 && detail::aligned16(x) && detail::aligned16(y) &&
                   (!residual || detail::aligned16(residual));
  const unsigned blocks = unsigned(int64_t(N) * C);
  const int threads = plane_threads(HW, vec ? 4 : 1);
  if (vec)
    bn_apply_kernel<true><<<blocks, threads, 0, st>>>(x, residual, y, C, HW, mean, invstd, var, float(eps), gamma,
                                                      beta, relu);
  else
    bn_apply_kernel<false><<<blocks, threads, 0, st>>>(x, residual, y, C, HW, mean, invstd, var, float(eps),
                                                       gamma, beta, relu);
  VB_CUDA_LAUNCH_CHECK();
}

// Backward slice sums: g = relu ? (y > 0 ? dy : 0) : dy; sum g and sum g * (x - mean). g is written to out1 /
// out2 when they are not null (the masked gradient for the second pass, dresidual). VEC as above.
// Zero only where y <= 0: a NaN y passes its gradient, as cpu::relu_bwd (torch's threshold_backward).
__device__ __forceinline__ float relu_mask(bool relu, float y, float g) { return relu && y <= 0.f ? 0.f : g; }

template <bool VEC>
__global__ void bn_bwd_partial_kernel(const float* __restrict__ x, const float* __restrict__ y, const float* dy,
                                      const float* __restrict__ save_mean, int N, int C, int HW, int splits,
                                      bool relu, float* out1, float* out2, float* __restrict__ partial) {
  constexpr int V = VEC ? 4 : 1;
  const int c = blockIdx.x, s = blockIdx.y;
  const int HWv = HW / V;
  const int64_t M = int64_t(N) * HWv;
  const int64_t j0 = M * s / splits, j1 = M * (s + 1) / splits;
  const float m = save_mean[c];
  float sg = 0.f, sgx = 0.f;
  int64_t j = j0 + threadIdx.x;
  if (j < j1) {
    int n = int(j / HWv), hw = int(j - int64_t(n) * HWv);
    const int step = blockDim.x, sn = step / HWv, shw = step - sn * HWv;
#pragma unroll 2
    for (; j < j1; j += step) {
      const int64_t idx = (int64_t(n) * C + c) * HWv + hw;
      if (VEC) {
        float4 g = reinterpret_cast<const float4*>(dy)[idx];
        if (relu) {
          const float4 yv = reinterpret_cast<const float4*>(y)[idx];
          g.x = relu_mask(true, yv.x, g.x);
          g.y = relu_mask(true, yv.y, g.y);
          g.z = relu_mask(true, yv.z, g.z);
          g.w = relu_mask(true, yv.w, g.w);
        }
        if (out1) reinterpret_cast<float4*>(out1)[idx] = g;
        if (out2) reinterpret_cast<float4*>(out2)[idx] = g;
        const float4 xv = reinterpret_cast<const float4*>(x)[idx];
        sg += (g.x + g.y) + (g.z + g.w);
        sgx = fmaf(g.x, xv.x - m, fmaf(g.y, xv.y - m, fmaf(g.z, xv.z - m, fmaf(g.w, xv.w - m, sgx))));
      } else {
        const float g = relu ? relu_mask(true, y[idx], dy[idx]) : dy[idx];
        if (out1) out1[idx] = g;
        if (out2) out2[idx] = g;
        sg += g;
        sgx = fmaf(g, x[idx] - m, sgx);
      }
      hw += shw;
      n += sn;
      if (hw >= HWv) {
        hw -= HWv;
        ++n;
      }
    }
  }
  detail::block_sum2(sg, sgx);
  if (threadIdx.x == 0) {
    partial[(size_t(c) * kMaxSplits + s) * 2 + 0] = sg;
    partial[(size_t(c) * kMaxSplits + s) * 2 + 1] = sgx;
  }
}

__global__ void bn_bwd_finalize_kernel(const float* __restrict__ partial, int C, int splits, int64_t M,
                                       const float* __restrict__ gamma, const float* __restrict__ save_invstd,
                                       float* dgamma, float* dbeta, float* k1, float* k2, float* k3) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sg = 0, sgx = 0;
  for (int k = 0; k < splits; ++k) {
    sg += partial[(size_t(c) * kMaxSplits + k) * 2 + 0];
    sgx += partial[(size_t(c) * kMaxSplits + k) * 2 + 1];
  }
  const double is = save_invstd[c];
  const double dg = sgx * is;  // sum g * xhat
  if (dgamma) dgamma[c] = float(dg);
  if (dbeta) dbeta[c] = float(sg);
  k1[c] = float(double(gamma[c]) * is);
  k2[c] = float(sg / double(M));
  k3[c] = float(dg / double(M));
}

// dx = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)), one (n, c) plane per block.
template <bool VEC>
__global__ void bn_bwd_dx_kernel(const float* __restrict__ x, const float* g, float* dx, int C, int HW,
                                 const float* __restrict__ save_mean, const float* __restrict__ save_invstd,
                                 const float* __restrict__ k1, const float* __restrict__ k2,
                                 const float* __restrict__ k3) {
  const int64_t plane = blockIdx.x;
  const int c = int(plane % C);
  const float m = save_mean[c], is = save_invstd[c], a = k1[c], gm = k2[c], b = k3[c];
  const int64_t base = plane * HW;
  if (VEC) {
    const float4* x4 = reinterpret_cast<const float4*>(x + base);
    const float4* g4 = reinterpret_cast<const float4*>(g + base);
    float4* d4 = reinterpret_cast<float4*>(dx + base);
    for (int i = threadIdx.x; i < HW / 4; i += blockDim.x) {
      const float4 xv = x4[i], gv = g4[i];
      float4 o;
      o.x = a * (gv.x - gm - (xv.x - m) * is * b);
      o.y = a * (gv.y - gm - (xv.y - m) * is * b);
      o.z = a * (gv.z - gm - (xv.z - m) * is * b);
      o.w = a * (gv.w - gm - (xv.w - m) * is * b);
      d4[i] = o;
    }
  } else {
    for (int i = threadIdx.x; i < HW; i += blockDim.x)
      dx[base + i] = a * (g[base + i] - gm - (x[base + i] - m) * is * b);
  }
}

}  // namespace

size_t bn_work_floats(int C) { return size_t(C) * (kMaxSplits * 2 + 5); }

void bn_train_fwd(cudaStream_t st, int N, int C, int HW, const float* x, const float* gamma, const float* beta,
                  const float* residual, bool relu, float* y, float* save_mean, float* save_invstd,
                  float* running_mean, float* running_var, double momentum, double eps, float* work) {
  VB_CHECK(N > 0 && C > 0 && HW > 0, "bn_train_fwd: bad shape N=", N, " C=", C, " HW=", HW);
  VB_CHECK(x && gamma && beta && y && work, "bn_train_fwd: null input, parameter, output or work buffer");
  const int64_t M = int64_t(N) * HW;
  // As PyTorch ("Expected more than 1 value per channel when training") and the CPU twin: one value has no
  // variance, the output would be beta whatever the input and the gradient zero.
  VB_CHECK(M > 1, "batch norm in training mode needs more than one value per channel (N*H*W = ", M, ")");
  BnWork w(work, C);
  const int splits = choose_splits(C, M);
  const dim3 grid{unsigned(C), unsigned(splits), 1u};
  if (HW % 4 == 0 && detail::aligned16(x))
    bn_stats_partial_kernel<true><<<grid, kRedThreads, 0, st>>>(x, N, C, HW, splits, w.partial);
  else
    bn_stats_partial_kernel<false><<<grid, kRedThreads, 0, st>>>(x, N, C, HW, splits, w.partial);
  VB_CUDA_LAUNCH_CHECK();
  bn_stats_finalize_kernel<<<unsigned((C + 127) / 128), 128, 0, st>>>(x, w.partial, C, HW, splits, M, momentum, eps,
                                                                      w.mean, w.invstd, save_mean, save_invstd,
                                                                      running_mean, running_var);
  VB_CUDA_LAUNCH_CHECK();
  launch_apply(st, N, C, HW, x, residual, y, w.mean, w.invstd, nullptr, eps, gamma, beta, relu);
}

void bn_eval_fwd(cudaStream_t st, int N, int C, int HW, const float* x, const float* gamma, const float* beta,
                 const float* running_mean, const float* running_var, double eps, const float* residual, bool relu,
                 float* y) {
  VB_CHECK(N > 0 && C > 0 && HW > 0, "bn_eval_fwd: bad shape N=", N, " C=", C, " HW=", HW);
  VB_CHECK(x && gamma && beta && running_mean && running_var && y, "bn_eval_fwd: null input or parameter");
  launch_apply(st, N, C, HW, x, residual, y, running_mean, nullptr, running_var, eps, gamma, beta, relu);
}

void bn_apply(cudaStream_t st, int N, int C, int HW, const float* x, const float* gamma, const float* beta,
              const float* save_mean, const float* save_invstd, bool relu, float* y) {
  VB_CHECK(N > 0 && C > 0 && HW > 0, "bn_apply: bad shape N=", N, " C=", C, " HW=", HW);
  VB_CHECK(x && gamma && beta && save_mean && save_invstd && y, "bn_apply: null input, parameter or statistics");
  launch_apply(st, N, C, HW, x, nullptr, y, save_mean, save_invstd, nullptr, 0.0, gamma, beta, relu);
}

void bn_bwd(cudaStream_t st, int N, int C, int HW, const float* x, const float* y, const float* dy,
            const float* gamma, const float* save_mean, const float* save_invstd, bool relu, float* dx,
            float* dresidual, float* dgamma, float* dbeta, float* scratch, float* work) {
  VB_CHECK(N > 0 && C > 0 && HW > 0, "bn_bwd: bad shape N=", N, " C=", C, " HW=", HW);
  VB_CHECK(x && dy && gamma && save_mean && save_invstd && work, "bn_bwd: null input or saved statistics");
  VB_CHECK(!relu || (y && (scratch || dresidual)), "bn_bwd: relu needs y and a scratch buffer");
  BnWork w(work, C);
  const int64_t M = int64_t(N) * HW;
  const int splits = choose_splits(C, M);
  // g: the gradient of bn's own output. With relu it is materialised (in scratch, else dresidual); without,
  // it is dy itself and dresidual is a copy.
  const float* g = dy;
  float* out1 = nullptr;
  float* out2 = nullptr;
  if (relu) {
    float* gbuf = scratch ? scratch : dresidual;
    out1 = gbuf;
    if (dresidual && dresidual != gbuf) out2 = dresidual;
    g = gbuf;
  } else if (dresidual && dresidual != dy) {
    out1 = dresidual;
  }
  const dim3 grid{unsigned(C), unsigned(splits), 1u};
  const bool vec_red = HW % 4 == 0 && detail::aligned16(x) && detail::aligned16(dy) && (!relu || detail::aligned16(y)) &&
                       (!out1 || detail::aligned16(out1)) && (!out2 || detail::aligned16(out2));
  if (vec_red)
    bn_bwd_partial_kernel<true><<<grid, kRedThreads, 0, st>>>(x, y, dy, save_mean, N, C, HW, splits, relu, out1,
                                                             out2, w.partial);
  else
    bn_bwd_partial_kernel<false><<<grid, kRedThreads, 0, st>>>(x, y, dy, save_mean, N, C, HW, splits, relu, out1,
                                                              out2, w.partial);
  VB_CUDA_LAUNCH_CHECK();
  bn_bwd_finalize_kernel<<<unsigned((C + 127) / 128), 128, 0, st>>>(w.partial, C, splits, M, gamma, save_invstd,
                                                                    dgamma, dbeta, w.k1, w.k2, w.k3);
  VB_CUDA_LAUNCH_CHECK();
  if (!dx) return;
  const bool vec = HW % 4 == 0 && detail::aligned16(x) && detail::aligned16(g) && detail::aligned16(dx);
  const unsigned blocks = unsigned(int64_t(N) * C);
  const int threads = plane_threads(HW, vec ? 4 : 1);
  if (vec)
    bn_bwd_dx_kernel<true><<<blocks, threads, 0, st>>>(x, g, dx, C, HW, save_mean, save_invstd, w.k1, w.k2, w.k3);
  else
    bn_bwd_dx_kernel<false><<<blocks, threads, 0, st>>>(x, g, dx, C, HW, save_mean, save_invstd, w.k1, w.k2, w.k3);
  VB_CUDA_LAUNCH_CHECK();
}

}  // namespace vb::cuda
