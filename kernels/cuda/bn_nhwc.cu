// NHWC batch norm kernels (see bn_nhwc.cuh). CPU twins: cpu::bn_nhwc_stats / bn_nhwc_apply /
// bn_nhwc_train_fwd / bn_nhwc_eval_fwd / bn_nhwc_bwd_reduce / bn_nhwc_bwd_dx (kernels/cpu/nhwc.h).
//
// Work layout: x is M rows of C channels. Every kernel here uses a 2-D block (lanes, R): lane l handles V
// consecutive channels (a 128-bit access when V > 1) of column tile blockIdx.x, the R thread rows walk rows.
// A warp therefore reads whole consecutive rows when C is small (C = 64 bf16: 4 rows of 128 bytes per warp).
// - Reductions (statistics, backward pass 1): grid (column tiles, splits); block (tile, s) walks rows
//   [s * rows_per_split, ...) with stride R, each thread summing in float in row order; the R partial sums
//   of a channel combine in t order in double, and a finalize kernel combines the splits in s order in double.
// - Element-wise passes (apply, backward pass 2): grid (column tiles, row blocks), rows grid-strided; each
//   thread loads its V channels' coefficients once.
// Arithmetic that the twins reproduce bit for bit: fmaf written out wherever a product meets a sum (nothing
// left for nvcc to contract), one rounding to bf16 per stored element.
#include <algorithm>
#include <type_traits>

#include "kernels/check.h"
#include "kernels/cuda/bn_nhwc.cuh"
#include "kernels/cuda/bn_stats.cuh"
#include "kernels/cuda/nhwc_vec.cuh"

namespace vb::cuda {
namespace {

using detail::kVec;
using detail::with_vec;
using detail::load1;
using detail::load_vec;
using detail::store_vec;

constexpr int kThreads = 256;
constexpr int kRedBlocks = 132 * 4;   // reduction blocks to aim for (H200: 132 SMs)
constexpr int kElemBlocks = 132 * 8;  // element-wise blocks to aim for
constexpr int kFinRows = 16;          // finalize: thread rows combining the splits

struct Tile {
  int V, Cv, lanes, R, col_blocks;
};
Tile make_tile(int C, int V) {
  Tile t;
  t.V = V;
  t.Cv = C / V;
  t.lanes = std::min(t.Cv, 32);
  t.R = kThreads / t.lanes;
  t.col_blocks = (t.Cv + t.lanes - 1) / t.lanes;
  return t;
}

// The most splits any tile of C channels gets: the fewest column tiles are ceil(C / 256) (32 lanes x 8).
int max_splits(int C) { return kRedBlocks / ((C + 255) / 256) + 1; }

struct Work {
  double* partial;  // [splits][C][2]
  float* mean;      // [C]
  float* invstd;    // [C]
  float* coef;      // [3][C] backward: k1, k2, k3
  Work(void* w, int C)
      : partial(static_cast<double*>(w)),
        mean(reinterpret_cast<float*>(partial + size_t(max_splits(C)) * C * 2)),
        invstd(mean + C),
        coef(invstd + C) {}
};

struct Split {
  int splits;
  int64_t rows;  // per split
};
Split make_split(int64_t M, int C, const Tile& t) {
  int64_t s = (kRedBlocks + t.col_blocks - 1) / t.col_blocks;
  s = std::min<int64_t>(s, std::max<int64_t>(1, M / (int64_t(t.R) * 8)));  // at least ~8 rows per thread
  s = std::min<int64_t>(s, max_splits(C));
  const int64_t rows = (M + s - 1) / s;
  return {int((M + rows - 1) / rows), rows};
}

unsigned elem_row_blocks(int64_t M, const Tile& t) {
  const int64_t want = std::max(1, kElemBlocks / t.col_blocks);
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(want, (M + t.R - 1) / t.R)));
}

// Per-thread (s, q) sums of V channels -> combined over the block's R thread rows in t order (double) ->
// partial[split][c][0..1]. Shared memory: 2 * R * V * lanes floats, laid out [t][k][lane] (no bank conflicts).
template <int V>
__device__ __forceinline__ void block_combine(const float (&a)[V], const float (&b)[V], int C, int cv, bool active,
                                              double* __restrict__ partial) {
  extern __shared__ float sh[];
  const int lanes = blockDim.x, R = blockDim.y, lane = threadIdx.x, ty = threadIdx.y;
  float* sa = sh;
  float* sb = sh + R * V * lanes;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    sa[(ty * V + k) * lanes + lane] = a[k];
    sb[(ty * V + k) * lanes + lane] = b[k];
  }
  __syncthreads();
  if (ty == 0 && active) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      double da = 0, db = 0;
      for (int t = 0; t < R; ++t) {
        da += double(sa[(t * V + k) * lanes + lane]);
        db += double(sb[(t * V + k) * lanes + lane]);
      }
      const size_t o = (size_t(blockIdx.y) * C + size_t(cv) * V + k) * 2;
      partial[o] = da;
      partial[o + 1] = db;
    }
  }
}

// Statistics, one read of x: sums of d = x - x[row 0] and d^2 (the shift keeps E[d^2] - E[d]^2 from
// cancelling when the mean is large next to the spread).
template <class A, int V>
__global__ void __launch_bounds__(kThreads) stats_partial_kernel(const A* __restrict__ x, int64_t M, int C,
                                                                 int64_t rows_per_split, double* __restrict__ partial) {
  const int cv = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = cv < C / V;
  float s[V], q[V];
#pragma unroll
  for (int k = 0; k < V; ++k) s[k] = q[k] = 0.f;
  if (active) {
    float shift[V];
    load_vec<V>(x + size_t(cv) * V, shift);
    const int64_t r0 = int64_t(blockIdx.y) * rows_per_split, r1 = min(M, r0 + rows_per_split);
#pragma unroll 4
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      float v[V];
      load_vec<V>(x + r * C + size_t(cv) * V, v);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float d = v[k] - shift[k];
        s[k] += d;
        q[k] = fmaf(d, d, q[k]);
      }
    }
  }
  block_combine<V>(s, q, C, cv, active, partial);
}

// Combines the splits of kFinRows x 32 channels: thread (l, t) sums splits t, t + kFinRows, ... in order
// (double), then row 0 sums the kFinRows results in t order. Returns true on the thread that holds channel c.
__device__ __forceinline__ bool finalize_sums(const double* __restrict__ partial, int C, int splits, int& c,
                                              double& a, double& b) {
  __shared__ double fa[kFinRows][32], fb[kFinRows][32];
  c = blockIdx.x * 32 + threadIdx.x;
  a = 0;
  b = 0;
  if (c < C)
    for (int s = threadIdx.y; s < splits; s += kFinRows) {
      a += partial[(size_t(s) * C + c) * 2];
      b += partial[(size_t(s) * C + c) * 2 + 1];
    }
  fa[threadIdx.y][threadIdx.x] = a;
  fb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y != 0 || c >= C) return false;
  a = 0;
  b = 0;
  for (int t = 0; t < kFinRows; ++t) {
    a += fa[t][threadIdx.x];
    b += fb[t][threadIdx.x];
  }
  return true;
}

template <class A>
__global__ void stats_finalize_kernel(const A* __restrict__ x, const double* __restrict__ partial, int C, int splits,
                                      int64_t M, double momentum, double eps, float* __restrict__ mean_out,
                                      float* __restrict__ invstd_out, float* save_mean, float* save_invstd,
                                      float* running_mean, float* running_var) {
  int c;
  double s, q;
  if (!finalize_sums(partial, C, splits, c, s, q)) return;
  bn_write_channel_stats(c, s, q, M, double(load1(x + c)), momentum, eps, mean_out, invstd_out, save_mean,
                         save_invstd, running_mean, running_var);
}

// y = act(fma(x - mean, gamma * invstd, beta) + residual). invstd null: 1 / sqrtf(var + eps) (evaluation).
template <class A, int V>
__global__ void __launch_bounds__(kThreads) apply_kernel(const A* x, const A* residual, A* y, int64_t M, int C,
                                                         const float* __restrict__ mean,
                                                         const float* __restrict__ invstd,
                                                         const float* __restrict__ var, float eps,
                                                         const float* __restrict__ gamma,
                                                         const float* __restrict__ beta, bool relu) {
  const int cv = blockIdx.x * blockDim.x + threadIdx.x;
  if (cv >= C / V) return;
  float m[V], sc[V], b[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = cv * V + k;
    const float is = invstd ? invstd[c] : 1.0f / sqrtf(var[c] + eps);
    m[k] = mean[c];
    sc[k] = gamma[c] * is;
    b[k] = beta[c];
  }
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < M; r += int64_t(gridDim.y) * blockDim.y) {
    const int64_t o = r * C + int64_t(cv) * V;
    float v[V];
    load_vec<V>(x + o, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = fmaf(v[k] - m[k], sc[k], b[k]);
    if (residual) {
      float rv[V];
      load_vec<V>(residual + o, rv);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] += rv[k];
    }
    if (relu) {  // v < 0 ? 0 : v lets NaN through, as cpu::relu_fwd
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = v[k] < 0.f ? 0.f : v[k];
    }
    store_vec<V>(y + o, v);
  }
}

__device__ __forceinline__ float relu_mask(float y, float g) { return y <= 0.f ? 0.f : g; }

// Backward pass 1: g = relu && y <= 0 ? 0 : dy; dresidual = g; sums of g and g (x - mean).
template <class A, int V>
__global__ void __launch_bounds__(kThreads) bwd_partial_kernel(const A* __restrict__ x, const A* y, const A* dy,
                                                               const float* __restrict__ save_mean, int64_t M, int C,
                                                               int64_t rows_per_split, bool relu, A* dresidual,
                                                               double* __restrict__ partial) {
  const int cv = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = cv < C / V;
  float sg[V], sgx[V];
#pragma unroll
  for (int k = 0; k < V; ++k) sg[k] = sgx[k] = 0.f;
  if (active) {
    float m[V];
#pragma unroll
    for (int k = 0; k < V; ++k) m[k] = save_mean[cv * V + k];
    const int64_t r0 = int64_t(blockIdx.y) * rows_per_split, r1 = min(M, r0 + rows_per_split);
#pragma unroll 2
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      const int64_t o = r * C + int64_t(cv) * V;
      float g[V], xv[V];
      load_vec<V>(dy + o, g);
      if (relu) {
        float yv[V];
        load_vec<V>(y + o, yv);
#pragma unroll
        for (int k = 0; k < V; ++k) g[k] = relu_mask(yv[k], g[k]);
      }
      if (dresidual) store_vec<V>(dresidual + o, g);
      load_vec<V>(x + o, xv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        sg[k] += g[k];
        sgx[k] = fmaf(g[k], xv[k] - m[k], sgx[k]);
      }
    }
  }
  block_combine<V>(sg, sgx, C, cv, active, partial);
}

__global__ void bwd_finalize_kernel(const double* __restrict__ partial, int C, int splits, int64_t M,
                                    const float* __restrict__ gamma, const float* __restrict__ save_invstd,
                                    float* dgamma, float* dbeta, float* __restrict__ coef) {
  int c;
  double sg, sgx;
  if (!finalize_sums(partial, C, splits, c, sg, sgx)) return;
  const double is = save_invstd[c];
  if (dgamma) dgamma[c] = float(sgx * is);
  if (dbeta) dbeta[c] = float(sg);
  coef[c] = float(double(gamma[c]) * is);
  coef[C + c] = float(sg / double(M));
  coef[2 * C + c] = float(sgx * is * is / double(M));
}

// Backward pass 2: dx = fma(-(x - mean), k3, g - k2) * k1, g from `g` or recomputed from y and dy.
template <class A, int V>
__global__ void __launch_bounds__(kThreads) bwd_dx_kernel(const A* __restrict__ x, const A* y, const A* dy,
                                                          const A* g, const float* __restrict__ save_mean,
                                                          const float* __restrict__ coef, int64_t M, int C,
                                                          bool relu, A* dx) {
  const int cv = blockIdx.x * blockDim.x + threadIdx.x;
  if (cv >= C / V) return;
  float m[V], k1[V], k2[V], k3[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = cv * V + k;
    m[k] = save_mean[c];
    k1[k] = coef[c];
    k2[k] = coef[C + c];
    k3[k] = coef[2 * C + c];
  }
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < M; r += int64_t(gridDim.y) * blockDim.y) {
    const int64_t o = r * C + int64_t(cv) * V;
    float gv[V], xv[V];
    if (g) {
      load_vec<V>(g + o, gv);
    } else {
      load_vec<V>(dy + o, gv);
      if (relu) {
        float yv[V];
        load_vec<V>(y + o, yv);
#pragma unroll
        for (int k = 0; k < V; ++k) gv[k] = relu_mask(yv[k], gv[k]);
      }
    }
    load_vec<V>(x + o, xv);
#pragma unroll
    for (int k = 0; k < V; ++k) gv[k] = fmaf(-(xv[k] - m[k]), k3[k], gv[k] - k2[k]) * k1[k];
    store_vec<V>(dx + o, gv);
  }
}


template <class A>
void launch_apply(cudaStream_t st, int64_t M, int C, const A* x, const A* residual, A* y, const float* mean,
                  const float* invstd, const float* var, double eps, const float* gamma, const float* beta, bool relu) {
  const bool vec = detail::nhwc_vec_ok<A>(C, {x, residual, y});
  with_vec<A>(vec, [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    const Tile t = make_tile(C, V);
    const dim3 grid{unsigned(t.col_blocks), elem_row_blocks(M, t), 1u}, block{unsigned(t.lanes), unsigned(t.R), 1u};
    apply_kernel<A, V><<<grid, block, 0, st>>>(x, residual, y, M, C, mean, invstd, var, float(eps), gamma, beta, relu);
    VB_CUDA_LAUNCH_CHECK();
  });
}

void check_shape(const char* what, int64_t M, int C) {
  VB_CHECK(M > 0 && C > 0 && M * C < (int64_t(1) << 40), what, ": bad shape M=", M, " C=", C);
}

}  // namespace

size_t bn_nhwc_work_bytes(int C) {
  return size_t(max_splits(C)) * size_t(C) * 2 * sizeof(double) + size_t(5) * size_t(C) * sizeof(float);
}

const float* bn_nhwc_bwd_coef(const void* work, int C) { return Work(const_cast<void*>(work), C).coef; }

template <class A>
void bn_nhwc_train_fwd(cudaStream_t st, int64_t M, int C, const A* x, const float* gamma, const float* beta,
                       const A* residual, bool relu, A* y, float* save_mean, float* save_invstd,
                       float* running_mean, float* running_var, double momentum, double eps, void* work) {
  check_shape("bn_nhwc_train_fwd", M, C);
  VB_CHECK(x && gamma && beta && y && work, "bn_nhwc_train_fwd: null input, parameter, output or work buffer");
  // As PyTorch and the twin: one value has no variance.
  VB_CHECK(M > 1, "batch norm in training mode needs more than one value per channel (N*H*W = ", M, ")");
  Work w(work, C);
  const bool vec = detail::nhwc_vec_ok<A>(C, {x});
  int splits = 0;
  with_vec<A>(vec, [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    const Tile t = make_tile(C, V);
    const Split sp = make_split(M, C, t);
    splits = sp.splits;
    const dim3 grid{unsigned(t.col_blocks), unsigned(sp.splits), 1u}, block{unsigned(t.lanes), unsigned(t.R), 1u};
    const size_t shmem = size_t(2) * t.R * V * t.lanes * sizeof(float);
    stats_partial_kernel<A, V><<<grid, block, shmem, st>>>(x, M, C, sp.rows, w.partial);
    VB_CUDA_LAUNCH_CHECK();
  });
  stats_finalize_kernel<A><<<unsigned((C + 31) / 32), dim3{32u, unsigned(kFinRows), 1u}, 0, st>>>(
      x, w.partial, C, splits, M, momentum, eps, w.mean, w.invstd, save_mean, save_invstd, running_mean, running_var);
  VB_CUDA_LAUNCH_CHECK();
  launch_apply<A>(st, M, C, x, residual, y, w.mean, w.invstd, nullptr, eps, gamma, beta, relu);
}

template <class A>
void bn_nhwc_apply(cudaStream_t st, int64_t M, int C, const A* x, const float* gamma, const float* beta,
                   const float* mean, const float* invstd, const A* residual, bool relu, A* y) {
  check_shape("bn_nhwc_apply", M, C);
  VB_CHECK(x && gamma && beta && mean && invstd && y, "bn_nhwc_apply: null input, parameter or statistics");
  launch_apply<A>(st, M, C, x, residual, y, mean, invstd, nullptr, 0.0, gamma, beta, relu);
}

template <class A>
void bn_nhwc_eval_fwd(cudaStream_t st, int64_t M, int C, const A* x, const float* gamma, const float* beta,
                      const float* running_mean, const float* running_var, double eps, const A* residual, bool relu,
                      A* y) {
  check_shape("bn_nhwc_eval_fwd", M, C);
  VB_CHECK(x && gamma && beta && running_mean && running_var && y, "bn_nhwc_eval_fwd: null input or parameter");
  launch_apply<A>(st, M, C, x, residual, y, running_mean, nullptr, running_var, eps, gamma, beta, relu);
}

template <class A>
void bn_nhwc_bwd(cudaStream_t st, int64_t M, int C, const A* x, const A* y, const A* dy, const float* gamma,
                 const float* save_mean, const float* save_invstd, bool relu, A* dx, A* dresidual, float* dgamma,
                 float* dbeta, void* work) {
  check_shape("bn_nhwc_bwd", M, C);
  VB_CHECK(x && dy && gamma && save_mean && save_invstd && work, "bn_nhwc_bwd: null input, statistics or work");
  VB_CHECK(!relu || y, "bn_nhwc_bwd: relu needs y");
  Work w(work, C);
  int splits = 0;
  {
    const bool vec = detail::nhwc_vec_ok<A>(C, {x, y, dy, dresidual});
    with_vec<A>(vec, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      const Tile t = make_tile(C, V);
      const Split sp = make_split(M, C, t);
      splits = sp.splits;
      const dim3 grid{unsigned(t.col_blocks), unsigned(sp.splits), 1u}, block{unsigned(t.lanes), unsigned(t.R), 1u};
      const size_t shmem = size_t(2) * t.R * V * t.lanes * sizeof(float);
      bwd_partial_kernel<A, V><<<grid, block, shmem, st>>>(x, relu ? y : nullptr, dy, save_mean, M, C, sp.rows, relu,
                                                           dresidual, w.partial);
      VB_CUDA_LAUNCH_CHECK();
    });
  }
  bwd_finalize_kernel<<<unsigned((C + 31) / 32), dim3{32u, unsigned(kFinRows), 1u}, 0, st>>>(
      w.partial, C, splits, M, gamma, save_invstd, dgamma, dbeta, w.coef);
  VB_CUDA_LAUNCH_CHECK();
  if (!dx) return;
  // Pass 2 reads g from dresidual (one tensor) when pass 1 wrote it, else y and dy again.
  const A* g = dresidual;
  const bool vec = detail::nhwc_vec_ok<A>(C, {x, g, g ? nullptr : dy, g || !relu ? nullptr : y, dx});
  with_vec<A>(vec, [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    const Tile t = make_tile(C, V);
    const dim3 grid{unsigned(t.col_blocks), elem_row_blocks(M, t), 1u}, block{unsigned(t.lanes), unsigned(t.R), 1u};
    bwd_dx_kernel<A, V><<<grid, block, 0, st>>>(x, relu ? y : nullptr, dy, g, save_mean, w.coef, M, C, relu, dx);
    VB_CUDA_LAUNCH_CHECK();
  });
}

#define VB_INSTANTIATE_BN_NHWC(A)                                                                                    \
  template void bn_nhwc_train_fwd<A>(cudaStream_t, int64_t, int, const A*, const float*, const float*, const A*,    \
                                     bool, A*, float*, float*, float*, float*, double, double, void*);              \
  template void bn_nhwc_apply<A>(cudaStream_t, int64_t, int, const A*, const float*, const float*, const float*,   \
                                 const float*, const A*, bool, A*);                                                \
  template void bn_nhwc_eval_fwd<A>(cudaStream_t, int64_t, int, const A*, const float*, const float*,              \
                                    const float*, const float*, double, const A*, bool, A*);                       \
  template void bn_nhwc_bwd<A>(cudaStream_t, int64_t, int, const A*, const A*, const A*, const float*, const float*, \
                               const float*, bool, A*, A*, float*, float*, void*);
VB_INSTANTIATE_BN_NHWC(float)
VB_INSTANTIATE_BN_NHWC(vb::bf16)
#undef VB_INSTANTIATE_BN_NHWC

}  // namespace vb::cuda
