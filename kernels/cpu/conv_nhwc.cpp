// NHWC convolution (see conv_nhwc.h).
//
// Forward and data gradient, "tap tiles": a tile is MR output pixels (6) of one pass; its inputs are a list of
// live segments, each a run of `len` contiguous input values per pixel (a pointer per pixel, or one to zeros
// when that pixel's tap lies in the padding) and the index k0 of the run's first weight row. For each sliver
// of NR output channels (16 floats, 8 doubles) the micro-kernel sums, segment after segment, len broadcast
// multiply-adds per pixel against the packed weight rows k0 .. k0+len-1, in registers. A segment is one tap
// (r, s) of C channels, or, for inputs with few channels (the stem's 3), one kernel row r of S*C values
// (contiguous in NHWC; such a layer reads a copy of its input with the zero border written out, so no row is
// ever cut). Segments dead for every pixel of a tile (a tap in the padding, a tap of the wrong parity in a
// strided data gradient) are dropped. The sum goes in passes of about KC multiply-adds (whole segments while
// they are short, else KC-long pieces of one), each pass's registers added to the stored tile, as the GEMM adds
// its K blocks: the order of a sum is fixed by the shape and the tile, which the shape fixes. Evaluation's
// epilogue (bias, residual, ReLU: the folded batch norm) is applied by the last pass in registers (a partial
// tile: once its sum is stored).
//
// Filter gradient: a GEMM dw = dy^T im2col(x) over blocks of pixels (a 1x1 stride-1 convolution reads x itself).
// A small result gets one partial sum per block, the blocks split over the threads, the partial sums then added
// in block order; a large one is accumulated block after block, each GEMM split over the threads. Layers with
// at most 32 input or output channels and a small result (at most 16K values), and the stem, sum dy times each
// pixel's input values in a register tile of output channels instead, reading x in place (direct_filter_grad;
// the GEMM's packing cost them as much as their sums), when K is a multiple of two vectors; otherwise the stem
// sums by kernel rows (row_filter_grad), when they fit its tile, and the rest by the GEMM.
//
// Winograd F(2x2, 3x3) takes the 3x3 stride-1 layers with at least 32 channels: all three passes on maps of 8x8
// or more, the forward and data gradient on 6x6 and 7x7 from 48 tiles a call (any batch with prepared weights),
// the filter gradient from 4x4 (see winograd_fits and winograd_pays).
//
// Small output maps (at most 256 pixels) with padding take their forward tiles by edge class, so that no tile
// sums a tap in the padding (fwd_by_edge_class), when that makes less work.
//
// Tiles go in chunks of kChunk; a chunk's pointer tables are built once and reused for every sliver, and the
// sliver's packed weights (C*R*S*NR values) stay in L2 across the chunk's tiles. Threads take (chunk, group
// of slivers) items.
#include "kernels/cpu/conv_nhwc.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "kernels/check.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/simd.h"

namespace vb::cpu {
namespace {

using simd::Traits;
template <class T>
constexpr int kMR = 6;
template <class T>
constexpr int kNR = 2 * Traits<T>::Vec::W;  // two vectors: 16 floats, 8 doubles
constexpr int kChunk = 8;                    // tiles per chunk (48 pixels)
// Below this many input channels a layer (the stem) is run by kernel rows of S*C values, not by taps of C.
constexpr int kFewChannels = 8;

template <class T, int Tag>
T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}
// The calling thread's own V (grow-only lists kept from call to call): taken as a reference on the calling thread,
// so that tile builders running on the pool's threads read this thread's object, not their own.
template <class V>
V& calling_thread_own() {
  thread_local V v;
  return v;
}

// ---- the micro-kernel -------------------------------------------------------------------------------------
// Evaluation's epilogue on a full 6 x NR tile, applied in registers before the store: c = act((c + bias) + res),
// as apply_epilogue computes it (ReLU as max(0, v): 0 for v < 0, v itself for -0 and NaN, as v < 0 ? 0 : v).
template <class T>
struct TileEpilogue {
  const T* bias = nullptr;         // NR values
  const T* const* res = nullptr;  // row i's NR residual values at res[i]; null: no residual
  bool relu = false;
};

// acc[i][j] (i < 6, j < NR) = sum over segments g, then j' in [jb, je), of a[6g + i][j'] * b[(k0[g] + j') * NR + j];
// then c[i][j] = acc (add: c[i][j] + acc), then the epilogue when there is one. A regular tile (soff set: every
// segment of every pixel in the image) has one pointer per pixel, a[i], and segment g of pixel i at a[i] + soff[g]
// instead, so that its segments need no table of their own.
template <bool Reg, class T>
inline const T* seg_row(const T* const* a, const int64_t* soff, int g, int i) {
  if constexpr (Reg) return a[i] + soff[g];
  return a[6 * g + i];
}
// One step of a 6 x 2-vector register tile: ci0 += bcast(qi) * v0 and ci1 += bcast(qi) * v1 for i < 6 (the
// micro-kernel's six pixels at one input value, against two vectors of weights; the direct filter gradient's six
// input values of one pixel, against two vectors of dy). The accumulators are named, not an array of vectors,
// which GCC kept on the stack.
template <class Vec, class T, class V>
inline void fma_6x2(const T* q0, const T* q1, const T* q2, const T* q3, const T* q4, const T* q5, V v0, V v1, V& c00,
                    V& c01, V& c10, V& c11, V& c20, V& c21, V& c30, V& c31, V& c40, V& c41, V& c50, V& c51) {
  V q = Vec::bcast(q0);
  c00 = Vec::fma(q, v0, c00);
  c01 = Vec::fma(q, v1, c01);
  q = Vec::bcast(q1);
  c10 = Vec::fma(q, v0, c10);
  c11 = Vec::fma(q, v1, c11);
  q = Vec::bcast(q2);
  c20 = Vec::fma(q, v0, c20);
  c21 = Vec::fma(q, v1, c21);
  q = Vec::bcast(q3);
  c30 = Vec::fma(q, v0, c30);
  c31 = Vec::fma(q, v1, c31);
  q = Vec::bcast(q4);
  c40 = Vec::fma(q, v0, c40);
  c41 = Vec::fma(q, v1, c41);
  q = Vec::bcast(q5);
  c50 = Vec::fma(q, v0, c50);
  c51 = Vec::fma(q, v1, c51);
}
#ifdef VB_GEMM_AVX2
template <class T, bool Reg>
inline void tap_kernel(int nseg, const int* k0, int jb, int je, const T* const* a, const int64_t* soff, const T* bs,
                       T* const* c, bool add, const TileEpilogue<T>* epi = nullptr) {
  using Vec = typename Traits<T>::Vec;
  using V = typename Vec::V;
  constexpr int W = Vec::W, NR = 2 * W;
  V c00 = Vec::zero(), c01 = Vec::zero(), c10 = Vec::zero(), c11 = Vec::zero(), c20 = Vec::zero(), c21 = Vec::zero(),
    c30 = Vec::zero(), c31 = Vec::zero(), c40 = Vec::zero(), c41 = Vec::zero(), c50 = Vec::zero(), c51 = Vec::zero();
  for (int g = 0; g < nseg; ++g) {
    const T *p0 = seg_row<Reg>(a, soff, g, 0), *p1 = seg_row<Reg>(a, soff, g, 1), *p2 = seg_row<Reg>(a, soff, g, 2),
            *p3 = seg_row<Reg>(a, soff, g, 3), *p4 = seg_row<Reg>(a, soff, g, 4), *p5 = seg_row<Reg>(a, soff, g, 5);
    const T* b = bs + int64_t(k0[g] + jb) * NR;
    for (int j = jb; j < je; ++j, b += NR) {
      fma_6x2<Vec>(p0 + j, p1 + j, p2 + j, p3 + j, p4 + j, p5 + j, Vec::load(b), Vec::load(b + W), c00, c01, c10,
                   c11, c20, c21, c30, c31, c40, c41, c50, c51);
    }
  }
  if (add) {
    c00 = Vec::add(Vec::load(c[0]), c00);
    c01 = Vec::add(Vec::load(c[0] + W), c01);
    c10 = Vec::add(Vec::load(c[1]), c10);
    c11 = Vec::add(Vec::load(c[1] + W), c11);
    c20 = Vec::add(Vec::load(c[2]), c20);
    c21 = Vec::add(Vec::load(c[2] + W), c21);
    c30 = Vec::add(Vec::load(c[3]), c30);
    c31 = Vec::add(Vec::load(c[3] + W), c31);
    c40 = Vec::add(Vec::load(c[4]), c40);
    c41 = Vec::add(Vec::load(c[4] + W), c41);
    c50 = Vec::add(Vec::load(c[5]), c50);
    c51 = Vec::add(Vec::load(c[5] + W), c51);
  }
  if (epi) {
    const V b0 = Vec::load(epi->bias), b1 = Vec::load(epi->bias + W);
    c00 = Vec::add(c00, b0);
    c01 = Vec::add(c01, b1);
    c10 = Vec::add(c10, b0);
    c11 = Vec::add(c11, b1);
    c20 = Vec::add(c20, b0);
    c21 = Vec::add(c21, b1);
    c30 = Vec::add(c30, b0);
    c31 = Vec::add(c31, b1);
    c40 = Vec::add(c40, b0);
    c41 = Vec::add(c41, b1);
    c50 = Vec::add(c50, b0);
    c51 = Vec::add(c51, b1);
    if (const T* const* r = epi->res) {
      c00 = Vec::add(c00, Vec::load(r[0]));
      c01 = Vec::add(c01, Vec::load(r[0] + W));
      c10 = Vec::add(c10, Vec::load(r[1]));
      c11 = Vec::add(c11, Vec::load(r[1] + W));
      c20 = Vec::add(c20, Vec::load(r[2]));
      c21 = Vec::add(c21, Vec::load(r[2] + W));
      c30 = Vec::add(c30, Vec::load(r[3]));
      c31 = Vec::add(c31, Vec::load(r[3] + W));
      c40 = Vec::add(c40, Vec::load(r[4]));
      c41 = Vec::add(c41, Vec::load(r[4] + W));
      c50 = Vec::add(c50, Vec::load(r[5]));
      c51 = Vec::add(c51, Vec::load(r[5] + W));
    }
    if (epi->relu) {
      const V z = Vec::zero();
      c00 = Vec::max(z, c00);
      c01 = Vec::max(z, c01);
      c10 = Vec::max(z, c10);
      c11 = Vec::max(z, c11);
      c20 = Vec::max(z, c20);
      c21 = Vec::max(z, c21);
      c30 = Vec::max(z, c30);
      c31 = Vec::max(z, c31);
      c40 = Vec::max(z, c40);
      c41 = Vec::max(z, c41);
      c50 = Vec::max(z, c50);
      c51 = Vec::max(z, c51);
    }
  }
  Vec::store(c[0], c00);
  Vec::store(c[0] + W, c01);
  Vec::store(c[1], c10);
  Vec::store(c[1] + W, c11);
  Vec::store(c[2], c20);
  Vec::store(c[2] + W, c21);
  Vec::store(c[3], c30);
  Vec::store(c[3] + W, c31);
  Vec::store(c[4], c40);
  Vec::store(c[4] + W, c41);
  Vec::store(c[5], c50);
  Vec::store(c[5] + W, c51);
}
#else
template <class T, bool Reg>
inline void tap_kernel(int nseg, const int* k0, int jb, int je, const T* const* a, const int64_t* soff, const T* bs,
                       T* const* c, bool add, const TileEpilogue<T>* epi = nullptr) {
  constexpr int NR = kNR<T>;
  T acc[6][NR] = {};
  for (int g = 0; g < nseg; ++g) {
    const T* b = bs + int64_t(k0[g] + jb) * NR;
    for (int j = jb; j < je; ++j, b += NR)
      for (int i = 0; i < 6; ++i) {
        const T av = seg_row<Reg>(a, soff, g, i)[j];
        for (int q = 0; q < NR; ++q) acc[i][q] = av * b[q] + acc[i][q];
      }
  }
  for (int i = 0; i < 6; ++i)
    for (int q = 0; q < NR; ++q) {
      T v = add ? c[i][q] + acc[i][q] : acc[i][q];
      if (epi) {
        v = v + epi->bias[q];
        if (epi->res) v = v + epi->res[i][q];
        if (epi->relu) v = v < T(0) ? T(0) : v;
      }
      c[i][q] = v;
    }
}
#endif

// ---- tiles ------------------------------------------------------------------------------------------------
// Pixel index i of an [N, P, Q] map as (n, p, q): 32-bit divisions when they suffice (a tile decodes its first
// pixel; three 64-bit divisions were 5% of a small layer's forward).
inline void decode_pixel(int64_t i, int P, int Q, int64_t& n, int& p, int& q) {
  const int64_t pq = int64_t(P) * Q;
  if (i <= INT32_MAX && pq <= INT32_MAX) {
    const int in = int(i) / int(pq), rem = int(i) - in * int(pq);
    n = in;
    p = rem / Q;
    q = rem - p * Q;
  } else {
    n = i / pq;
    const int64_t rem = i - n * pq;
    p = int(rem / Q);
    q = int(rem - int64_t(p) * Q);
  }
}

// A tile's live segments: k0[g] and the 6 row pointers a[6g .. 6g+5] (a regular tile: a[i] + soff[g], see
// tap_kernel); its m output rows out[i] (i < m).
template <class T>
struct TileView {
  int nseg = 0, m = 0;
  const int* k0 = nullptr;
  const T* const* a = nullptr;
  const int64_t* soff = nullptr;
  T* out[6] = {};
};

// Runs the tiles [0, ntiles): build(t, k0, a, view) fills tile t's segments (at most max_seg) and its TileView
// (filled in place: a returned view, copied, stalled on store forwarding; out[i] only for i < m, the rows the
// view has); packed: the weights, nsl slivers of rows * NR values; n_out: output channels (the last sliver may be
// partial).
// What evaluation applies to each output tile as it is stored: out = act(out + bias (+ residual)), the residual
// row of an output row at the same offset from `residual` as the row is from `y`.
template <class T>
struct Epilogue {
  const T* bias = nullptr;  // null: no epilogue
  const T* residual = nullptr;
  const T* y = nullptr;
  bool relu = false;
};

// Evaluation's epilogue on one output row of K channels: y = act(y + bias (+ residual)), as bn_eval_fwd's
// (x*a + b) + residual, then ReLU.
template <class T>
void apply_epilogue(T* __restrict y, const T* __restrict res, const T* __restrict bias, bool relu, int K) {
  if (res) {
    for (int k = 0; k < K; ++k) {
      const T v = (y[k] + bias[k]) + res[k];
      y[k] = relu && v < T(0) ? T(0) : v;
    }
  } else {
    for (int k = 0; k < K; ++k) {
      const T v = y[k] + bias[k];
      y[k] = relu && v < T(0) ? T(0) : v;
    }
  }
}

// One tile's sum for one sliver: c[i][0..NR) = sum over the segments of a[6g + i][j] * bs[(k0[g] + j) * NR + ...],
// in passes of about KC multiply-adds, each added to the last (as the GEMM's K blocks): whole segments while
// they are short, else each segment in KC-long pieces.
// epi (may be null): applied by the last pass.
template <class T, bool Reg>
void sum_segments_as(int nseg, const int* k0, int len, const T* const* a, const int64_t* soff, const T* bs,
                     T* const* c, const TileEpilogue<T>* epi) {
  constexpr int MR = kMR<T>, KC = Traits<T>::KC;
  // Segments [g, ...) of the tile: a regular tile's pointers stay, its offsets move on.
  const auto from = [&](int g) { return Reg ? a : a + g * MR; };
  const auto soff_from = [&](int g) { return Reg ? soff + g : nullptr; };
  if (nseg == 0) {
    tap_kernel<T, false>(0, k0, 0, len, a, nullptr, bs, c, false, epi);
  } else if (len >= KC) {
    for (int g = 0; g < nseg; ++g)
      for (int jb = 0; jb < len; jb += KC) {
        const bool last = g == nseg - 1 && jb + KC >= len;
        tap_kernel<T, Reg>(1, k0 + g, jb, std::min(len, jb + KC), from(g), soff_from(g), bs, c, g > 0 || jb > 0,
                           last ? epi : nullptr);
      }
  } else {
    const int group = KC / len;
    for (int g = 0; g < nseg; g += group)
      tap_kernel<T, Reg>(std::min(group, nseg - g), k0 + g, 0, len, from(g), soff_from(g), bs, c, g > 0,
                         g + group >= nseg ? epi : nullptr);
  }
}
template <class T>
void sum_segments(int nseg, const int* k0, int len, const T* const* a, const int64_t* soff, const T* bs,
                  T* const* c, const TileEpilogue<T>* epi = nullptr) {
  if (soff)
    sum_segments_as<T, true>(nseg, k0, len, a, soff, bs, c, epi);
  else
    sum_segments_as<T, false>(nseg, k0, len, a, nullptr, bs, c, epi);
}

// The (tile, sliver) items of a chunk run in order, sliver by sliver; the item kPrefetchTiles ahead has its
// output rows (and residual rows) prefetched: each is one cache line per pixel, K values apart, which the
// hardware prefetcher does not foresee, and evaluation's in-register epilogue otherwise waited on every
// residual line (ResNet-50's 64 -> 256-channel layer at 56x56, batch 8: 12.7 -> 10.6-11.2 ms).
constexpr int kPrefetchTiles = 4;
template <class T>
inline void prefetch_tile(const TileView<T>& v, int64_t off, const Epilogue<T>& epi) {
  for (int i = 0; i < v.m; ++i) {
    __builtin_prefetch(v.out[i] + off, 1, 3);
    if (epi.residual) __builtin_prefetch(epi.residual + (v.out[i] - epi.y) + off, 0, 3);
  }
}
template <class T, class Build>
void run_tiles(int64_t ntiles, int max_seg, int len, int64_t rows, const T* packed, int n_out,
               Build&& build, const Epilogue<T>& epi = {}) {
  constexpr int MR = kMR<T>, NR = kNR<T>;
  const int nsl = (n_out + NR - 1) / NR;
  const int64_t nchunks = (ntiles + kChunk - 1) / kChunk;
  const int t = num_threads();
  // Enough items for the threads: split the slivers when there are few chunks (any split gives the same bits).
  const int groups = nchunks >= 4 * t ? 1 : std::min<int>(nsl, int((4 * t + nchunks - 1) / nchunks));
  const int per_group = (nsl + groups - 1) / groups;
  parallel_for(nchunks * groups, 1, [&](int64_t b, int64_t e) {
    const size_t seg_room = size_t(kChunk) * max_seg;
    int* k0 = scratch<int, 0>(seg_room);
    const T** a = scratch<const T*, 1>(seg_room * MR);
    TileView<T> views[kChunk];
    int64_t built = -1;
    for (int64_t item = b; item < e; ++item) {
      const int64_t chunk = item / groups;
      const int grp = int(item % groups);
      const int64_t t0 = chunk * kChunk, t1 = std::min(ntiles, t0 + kChunk);
      if (built != chunk) {
        for (int64_t tt = t0; tt < t1; ++tt) {
          const size_t off = size_t(tt - t0) * max_seg;
          build(tt, k0 + off, a + off * MR, views[tt - t0]);
        }
        built = chunk;
      }
      const int s0 = grp * per_group, s1 = std::min(nsl, s0 + per_group);
      const int nt = int(t1 - t0);
      // The item kPrefetchTiles ahead: tile pt of sliver ps (advanced with the loops, no division per item).
      int ps = s0 + kPrefetchTiles / nt, pt = kPrefetchTiles % nt;
      for (int sl = s0; sl < s1; ++sl) {
        const T* bs = packed + int64_t(sl) * rows * NR;
        const int n = std::min(NR, n_out - sl * NR);
        for (int64_t tt = t0; tt < t1; ++tt) {
          const TileView<T>& v = views[tt - t0];
          if (ps < s1) prefetch_tile(views[pt], int64_t(ps) * NR, epi);
          if (++pt == nt) pt = 0, ++ps;
          const bool direct = v.m == MR && n == NR;
          alignas(64) T tmp[MR * NR];
          T* c[MR];
          for (int i = 0; i < MR; ++i) c[i] = direct ? v.out[i] + sl * NR : tmp + i * NR;
          // A full tile takes the epilogue in registers; a partial one (through tmp) as a pass over its rows.
          TileEpilogue<T> te;
          const T* res[MR];
          if (epi.bias && direct) {
            te.bias = epi.bias + sl * NR;
            te.relu = epi.relu;
            if (epi.residual) {
              for (int i = 0; i < MR; ++i) res[i] = epi.residual + (v.out[i] - epi.y) + sl * NR;
              te.res = res;
            }
          }
          sum_segments<T>(v.nseg, v.k0, len, v.a, v.soff, bs, c, te.bias ? &te : nullptr);
          if (epi.bias && !direct)
            for (int i = 0; i < v.m; ++i)
              apply_epilogue<T>(c[i], epi.residual ? epi.residual + (v.out[i] - epi.y) + sl * NR : nullptr,
                                epi.bias + sl * NR, epi.relu, n);
          if (!direct)
            for (int i = 0; i < v.m; ++i) std::memcpy(v.out[i] + sl * NR, tmp + i * NR, sizeof(T) * size_t(n));
        }
      }
    }
  });
}

// Weights packed for the micro-kernel: sliver sl holds `rows` rows of NR output channels. Forward
// (by_k = false): row (r*S + s)*C + c, channel o = w[o, c, r, s]. Data gradient (by_k = true): the output channels
// are the input channels c, row (r*S + s)*K + k = w[k, c, r, s]. Zero past the last channel.
template <class T>
T* pack_weights(const ConvShape& s, const T* w, bool by_k, const T* scale = nullptr) {
  constexpr int NR = kNR<T>;
  const int RS = s.R * s.S, n_out = by_k ? s.C : s.K, n_in = by_k ? s.K : s.C;
  const int64_t rows = int64_t(RS) * n_in;
  const int nsl = (n_out + NR - 1) / NR;
  T* p = scratch<T, 3>(size_t(nsl) * size_t(rows) * NR);
  // Through a small tile in L1, so that every store to p is a whole NR-wide row and every load from w runs along
  // memory (writing p one float per cache line, NR times over each sliver, made packing 3-8x slower).
  constexpr int MB = 16;  // forward: weight values per output channel per tile
  if (!by_k) {
    // By sliver: output channel o's weights are `rows` contiguous values m = c*RS + rs of w; value m goes to row
    // rs*C + c of o's sliver.
    parallel_for(nsl, 1, [&](int64_t b, int64_t e) {
      T* tile = scratch<T, 11>(size_t(MB) * NR);  // [row][j]
      for (int64_t sl = b; sl < e; ++sl) {
        T* dst = p + sl * rows * NR;
        const int live = std::min(NR, n_out - int(sl) * NR);
        for (int64_t m0 = 0; m0 < rows; m0 += MB) {
          const int mb = int(std::min<int64_t>(MB, rows - m0));
          for (int j = 0; j < NR; ++j) {
            const int o = int(sl) * NR + j;
            if (j >= live) {
              for (int mm = 0; mm < mb; ++mm) tile[mm * NR + j] = T(0);
            } else if (scale) {  // output channel o's weights times scale[o]
              const T* src = w + int64_t(o) * rows + m0;
              const T sc = scale[o];
              for (int mm = 0; mm < mb; ++mm) tile[mm * NR + j] = src[mm] * sc;
            } else {
              const T* src = w + int64_t(o) * rows + m0;
              for (int mm = 0; mm < mb; ++mm) tile[mm * NR + j] = src[mm];
            }
          }
          int c = int(m0 / RS), rs = int(m0 % RS);
          for (int mm = 0; mm < mb; ++mm) {
            std::memcpy(dst + (int64_t(rs) * n_in + c) * NR, tile + mm * NR, sizeof(T) * NR);
            if (++rs == RS) rs = 0, ++c;
          }
        }
      }
    });
  } else {
    // By convolution output channel i = k: w[k] is C*RS contiguous values, channel c's RS taps at c*RS; channel
    // c = sl*NR + j goes to column j of rows rs*K + k of sliver sl. (Going sliver by sliver read one cache line
    // per k, 2 KB apart for 512 channels: a TLB miss every other line, 40% of a stage-4 data gradient.)
    parallel_for(n_in, 16, [&](int64_t b, int64_t e) {
      T* tile = scratch<T, 11>(size_t(RS) * NR);  // [rs][j]
      for (int64_t i = b; i < e; ++i) {
        const T* row = w + i * int64_t(s.C) * RS;
        for (int sl = 0; sl < nsl; ++sl) {
          const int live = std::min(NR, n_out - sl * NR);
          const T* blk = row + int64_t(sl) * NR * RS;
          for (int j = 0; j < NR; ++j)
            for (int rs = 0; rs < RS; ++rs) tile[rs * NR + j] = j < live ? blk[j * RS + rs] : T(0);
          T* dst = p + int64_t(sl) * rows * NR;
          for (int rs = 0; rs < RS; ++rs)
            std::memcpy(dst + (int64_t(rs) * n_in + i) * NR, tile + rs * NR, sizeof(T) * NR);
        }
      }
    });
  }
  return p;
}

// dst[0, n) = src[0, n): short runs (a kernel row of the stem is 21 floats) inline, not through memcpy's call.
template <class T>
inline void copy_run(T* __restrict dst, const T* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

template <class T>
const T* zeros(size_t n) {
  thread_local std::vector<T> z;
  if (z.size() < n) z.assign(n, T(0));
  return z.data();
}

void check_shape(const ConvShape& s) { check_conv_shape(s, "conv2d (NHWC)"); }

}  // namespace

namespace {

// x [N, H, W, C] copied with its zero border of s.pad pixels written out; sp: s for the copy (padding 0, the same
// output map). The copy is the calling thread's grow-only scratch, about the input's size (for ResNet-50's stem,
// (230/224)^2 of it). For the stem's forward, whose tiles then read whole kernel rows in place, and the direct
// filter gradient, which reads every pixel's values at fixed offsets from its top-left tap.
template <class T>
const T* zero_bordered(const ConvShape& s, const T* x, ConvShape& sp) {
  const int pad = s.pad, Hp = s.H + 2 * pad, Wp = s.W + 2 * pad, C = s.C;
  T* xp = scratch<T, 17>(size_t(s.N) * Hp * Wp * C);
  parallel_for(int64_t(s.N) * Hp, 16, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t n = row / Hp;
      const int h = int(row % Hp) - pad;
      T* dst = xp + row * Wp * C;
      if (h < 0 || h >= s.H) {
        std::fill(dst, dst + int64_t(Wp) * C, T(0));
        continue;
      }
      std::fill(dst, dst + int64_t(pad) * C, T(0));
      std::memcpy(dst + int64_t(pad) * C, x + ((n * s.H + h) * s.W) * C, sizeof(T) * size_t(s.W) * C);
      std::fill(dst + int64_t(pad + s.W) * C, dst + int64_t(Wp) * C, T(0));
    }
  });
  sp = ConvShape{s.N, C, Hp, Wp, s.K, s.R, s.S, s.stride, 0};
  return xp;
}

// ---- Winograd F(2x2, 3x3) -------------------------------------------------------------------------------------
// A 3x3 stride-1 convolution as 16 GEMMs: each 2x2 block of outputs ("tile") comes from a 4x4 block of inputs d
// as A^T [ (G g G^T) .* (B^T d B) ] A, the elementwise product summed over input channels, so 16 multiply-adds
// per channel pair give 4 outputs instead of 36 (2.25x fewer). The transforms only add, subtract and halve:
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],  A^T = [1 1 1 0; 0 1 -1 -1].
// Tiles go in blocks of at most kWinoTiles (at least two blocks per thread), each thread taking one block at a
// time: input transform into V [tiles][16][C], the 16 products by the tap micro-kernel (one segment of C
// channels, in KC passes) into M [tiles][16][K], output transform (and evaluation's epilogue) into y.
// Tile-major, so that each transform reads or writes one contiguous block per tile (16 rows far apart were 10%
// of a 64-channel 56x56 layer's forward). Sums in a fixed order; the results differ from the direct
// convolution's by the transforms' rounding.
constexpr int kWinoTiles = 48;

// VB_CPU_WINOGRAD=0 turns it off (for comparisons).
inline bool winograd_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("VB_CPU_WINOGRAD");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

// min_map: the smallest output map. The forward and data gradient need 6x6 (ResNet-50's last stage, 7x7, 4x4
// tiles with a quarter wasted, gains: forward 18.1 -> 15.3 ms, data gradient 18.7 -> 15.6 ms at 512 channels,
// batch 8, one core). That took blocks of tiles large enough to stream their 16 x C x K transformed weights, made
// each call, a few times rather than once per 18 tiles (which had made 7x7 lose, 19.5 -> 29.8 ms, and set the
// limit at 8x8). On 4x4 maps (2x2 tiles, 512 channels) the forward still loses (7.5 -> 8.2-9.2 ms). The filter
// gradient makes no transformed weights and gains from 4x4 up (7x7: 22.4 -> 16.4 ms; 3x3 maps lose).
constexpr int kWinoMinMap = 6, kWinoGradMinMap = 4;
// Below 8x8 the forward and data gradient transform their weights each call for few tiles: from 48 tiles on (7x7
// maps: a batch of 3) that pays; at a batch of 1 it does not (7x7, 512 channels, one core: 4.0-4.3 ms direct,
// 5.2-5.6 by Winograd). Weights prepared once (conv2d_nhwc_prepare) take Winograd at any batch (2.1-2.6 against
// 2.4 ms at a batch of 1).
constexpr int64_t kWinoSmallMapTiles = 48;
inline bool winograd_pays(const ConvShape& s) {
  const int P = s.P(), Q = s.Q();
  return (P >= 8 && Q >= 8) || int64_t(s.N) * ((P + 1) / 2) * ((Q + 1) / 2) >= kWinoSmallMapTiles;
}

// A stride-1 3x3 layer's data gradient as a forward convolution (of dy with the kernel turned half round), when
// it is one.
inline std::optional<ConvShape> winograd_data_grad_shape(const ConvShape& s) {
  if (s.stride != 1 || s.R != 3 || s.S != 3 || s.pad > 2) return std::nullopt;
  return ConvShape{s.N, s.K, s.P(), s.Q(), s.C, 3, 3, 1, 2 - s.pad};
}

template <class T>
bool winograd_fits(const ConvShape& s, int min_map = kWinoMinMap) {
  return s.R == 3 && s.S == 3 && s.stride == 1 && s.pad <= 2 && s.C >= 32 && s.C % Traits<T>::Vec::W == 0 &&
         s.K % kNR<T> == 0 && s.P() >= min_map && s.Q() >= min_map;
}

// Weights: U[xi][sl][c][j] = (G g G^T)[xi] of g = gk(k = sl*NR + j, c) (a 3x3 kernel), times scale[k] when set.
template <class T, class Kernel>
T* winograd_weights(int C, int K, const T* scale, Kernel&& gk) {
  constexpr int NR = kNR<T>;
  const int nsl = K / NR;
  T* U = scratch<T, 7>(size_t(16) * nsl * C * NR);
  // By slivers, not by channels k: a sliver's NR channels share every cache line of U, so splitting them between
  // threads made the two cores fight over each line (measured: the transform took 8x longer on 2 threads).
  // Each (sliver, c) transforms its NR kernels side by side, tap-major (g[tap][j]), so that every step below is
  // one loop over j (vectorised) and each of the 16 results is one contiguous row of NR values: the same
  // operations on each value as one kernel at a time, so the same bits (per kernel, the scalar version wrote 16
  // values to 16 rows far apart and read its 9 from a line of its own: a fifth of a 14x14 layer's forward).
  parallel_for(nsl, 1, [&](int64_t sb, int64_t se) {
    alignas(64) T g[9][NR], t[4][3][NR];
    for (int64_t sl = sb; sl < se; ++sl)
      for (int c = 0; c < C; ++c) {
        for (int j = 0; j < NR; ++j) {
          const int64_t k = sl * NR + j;
          T gj[3][3];
          gk(int(k), c, gj);
          for (int r = 0; r < 3; ++r)
            for (int q = 0; q < 3; ++q) g[r * 3 + q][j] = scale ? gj[r][q] * scale[k] : gj[r][q];
        }
        for (int i = 0; i < 3; ++i)  // G g
          for (int j = 0; j < NR; ++j) {
            const T g0 = g[i][j], g1 = g[3 + i][j], g2 = g[6 + i][j];
            t[0][i][j] = g0;
            t[1][i][j] = (g0 + g1 + g2) * T(0.5);
            t[2][i][j] = (g0 - g1 + g2) * T(0.5);
            t[3][i][j] = g2;
          }
        for (int a = 0; a < 4; ++a) {  // (G g) G^T
          T* u0 = U + ((int64_t(a * 4) * nsl + sl) * C + c) * NR;
          const int64_t xs = int64_t(nsl) * C * NR;  // from one xi's row to the next
          for (int j = 0; j < NR; ++j) {
            const T t0 = t[a][0][j], t1 = t[a][1][j], t2 = t[a][2][j];
            u0[j] = t0;
            u0[xs + j] = (t0 + t1 + t2) * T(0.5);
            u0[2 * xs + j] = (t0 - t1 + t2) * T(0.5);
            u0[3 * xs + j] = t2;
          }
        }
      }
  });
  return U;
}

// The 16 rows of B^T d B for one tile over channels [0, C) (C a multiple of the vector width): d[i*4 + j] points
// at input (i, j)'s C channels; row xi of the result at v + xi*xs.
template <class T>
void winograd_input(const T* const* d, int C, T* v, int64_t xs) {
  using Vec = typename Traits<T>::Vec;
  using V = typename Vec::V;
  for (int c = 0; c < C; c += Vec::W) {
    V r[4][4];
    for (int j = 0; j < 4; ++j) {  // B^T d: rows
      const V d0 = Vec::load(d[j] + c), d1 = Vec::load(d[4 + j] + c), d2 = Vec::load(d[8 + j] + c),
              d3 = Vec::load(d[12 + j] + c);
      r[0][j] = Vec::sub(d0, d2);
      r[1][j] = Vec::add(d1, d2);
      r[2][j] = Vec::sub(d2, d1);
      r[3][j] = Vec::sub(d1, d3);
    }
    for (int a = 0; a < 4; ++a) {  // (B^T d) B: columns
      T* o = v + int64_t(a * 4) * xs + c;
      Vec::store(o, Vec::sub(r[a][0], r[a][2]));
      Vec::store(o + xs, Vec::add(r[a][1], r[a][2]));
      Vec::store(o + 2 * xs, Vec::sub(r[a][2], r[a][1]));
      Vec::store(o + 3 * xs, Vec::sub(r[a][1], r[a][3]));
    }
  }
}

// One tile's 2x2 outputs from its 16 products m[xi * xs + k], k < K (a multiple of the vector width): A^T m A
// into o[0..3] (K values each; a scratch row for outputs outside the image).
template <class T>
void winograd_output(const T* m, int64_t xs, int K, T* const* o) {
  using Vec = typename Traits<T>::Vec;
  using V = typename Vec::V;
  for (int k = 0; k < K; k += Vec::W) {
    V sv[2][4];
    for (int b = 0; b < 4; ++b) {  // A^T m: rows
      const V m0 = Vec::load(m + int64_t(b) * xs + k), m1 = Vec::load(m + int64_t(4 + b) * xs + k),
              m2 = Vec::load(m + int64_t(8 + b) * xs + k), m3 = Vec::load(m + int64_t(12 + b) * xs + k);
      sv[0][b] = Vec::add(Vec::add(m0, m1), m2);
      sv[1][b] = Vec::sub(Vec::sub(m1, m2), m3);
    }
    for (int i = 0; i < 2; ++i) {  // (A^T m) A: columns
      Vec::store(o[i * 2] + k, Vec::add(Vec::add(sv[i][0], sv[i][1]), sv[i][2]));
      Vec::store(o[i * 2 + 1] + k, Vec::sub(Vec::sub(sv[i][1], sv[i][2]), sv[i][3]));
    }
  }
}

// Tile `tile` of the [N, th, tw] grid of 2x2 output tiles: its image and position.
struct WinoTile {
  int64_t n;
  int ty, tx;
};
inline WinoTile winograd_tile_at(int th, int tw, int64_t tile) {
  return WinoTile{tile / (int64_t(tw) * th), int(tile / tw % th), int(tile % tw)};
}
// The same, and in d the pointers to its 4x4 inputs (zero outside the image).
template <class T>
WinoTile winograd_tile(const ConvShape& s, int th, int tw, int64_t tile, const T* x, const T* zero, const T** d) {
  const WinoTile t = winograd_tile_at(th, tw, tile);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int ih = 2 * t.ty - s.pad + i, iw = 2 * t.tx - s.pad + j;
      d[i * 4 + j] = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W ? x + ((t.n * s.H + ih) * s.W + iw) * s.C : zero;
    }
  return t;
}

// y = conv(x, w) for a 3x3 stride-1 shape that winograd_fits (x: C channels in, y: K out), U: winograd_weights'.
template <class T>
void winograd_conv(const ConvShape& s, const T* x, T* y, const T* U, const Epilogue<T>& epi) {
  constexpr int MR = kMR<T>, NR = kNR<T>;
  const int C = s.C, K = s.K, P = s.P(), Q = s.Q(), nsl = K / NR;
  const int th = (P + 1) / 2, tw = (Q + 1) / 2;
  // Blocks of up to kWinoTiles tiles, smaller when there are few, so that each thread gets two (each tile's sums
  // are its own: the block size changes no result). Every block streams all of U, so fewer, larger blocks pay on
  // small maps with many channels (7x7, 512 channels, batch 8, one core: 8 blocks of 18 tiles 22 ms, 3 of 48 15
  // ms, prepared weights).
  const int64_t ntiles = int64_t(s.N) * th * tw;
  const int64_t want = 2 * num_threads();
  const int64_t per_block =
      std::min<int64_t>(kWinoTiles, std::max<int64_t>(MR, ((ntiles + want - 1) / want + MR - 1) / MR * MR));
  const int64_t nblocks = (ntiles + per_block - 1) / per_block;
  const T* zero = zeros<T>(size_t(std::max(C, K)));
  parallel_for(nblocks, 1, [&](int64_t bb, int64_t be) {
    T* V = scratch<T, 8>(size_t(16) * kWinoTiles * C);
    T* M = scratch<T, 9>(size_t(16) * kWinoTiles * K);
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t t0 = blk * per_block;
      const int nt = int(std::min<int64_t>(per_block, ntiles - t0));
      for (int t = 0; t < nt; ++t) {  // input transform
        const T* d[16];
        winograd_tile<T>(s, th, tw, t0 + t, x, zero, d);
        winograd_input<T>(d, C, V + int64_t(t) * 16 * C, C);
      }
      for (int xi = 0; xi < 16; ++xi)  // the 16 products, 6 tiles x NR channels at a time
        for (int sl = 0; sl < nsl; ++sl) {
          const T* bs = U + (int64_t(xi) * nsl + sl) * C * NR;
          for (int g = 0; g < nt; g += MR) {
            const T* a[MR];
            T* c[MR];
            alignas(64) T tmp[MR * NR];
            for (int i = 0; i < MR; ++i) {
              const bool live = g + i < nt;
              a[i] = live ? V + (int64_t(g + i) * 16 + xi) * C : zero;
              c[i] = live ? M + (int64_t(g + i) * 16 + xi) * K + sl * NR : tmp + i * NR;
            }
            const int k0 = 0;
            sum_segments<T>(1, &k0, C, a, nullptr, bs, c);
          }
        }
      T* spare = scratch<T, 10>(size_t(K));  // where outputs past the image's edge go
      for (int t = 0; t < nt; ++t) {          // output transform
        const WinoTile wt = winograd_tile_at(th, tw, t0 + t);
        T* out[4];
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) {
            const int p = 2 * wt.ty + i, q = 2 * wt.tx + j;
            out[i * 2 + j] = p < P && q < Q ? y + ((wt.n * P + p) * Q + q) * K : spare;
          }
        winograd_output<T>(M + int64_t(t) * 16 * K, K, K, out);
        if (epi.bias)
          for (int o = 0; o < 4; ++o)
            if (out[o] != spare)
              apply_epilogue<T>(out[o], epi.residual ? epi.residual + (out[o] - y) : nullptr, epi.bias, epi.relu, K);
      }
    }
  });
}

// The filter gradient of a layer winograd_fits accepts (from 4x4 maps), by the same transforms: as
// y = A^T [(G g G^T) .* V] A for each tile, dL/dg = G^T [(A dy A^T) .* V] G summed over the tiles, so
// dw[k][c] = G^T M G with
// M[xi][k][c] = sum over tiles t of Y[xi][t][k] V[xi][t][c], Y = A dy_t A^T (dy's 2x2 outputs of tile t, zero
// past the map's edge) and V = B^T d_t B (its 4x4 inputs): 16 GEMMs over the tiles, 2.25x fewer multiply-adds
// than the im2col GEMM. Tiles go in blocks of kWinoGradTiles (fixed by the shape; 128 rather than 256 keeps a
// block's transformed tiles, 16 x 128 x (C + K) values, nearer L2: on 2 threads 256-channel layers 6.5 -> 5.3 ms
// at batch 8, 128-channel 7.3 -> 6.2 ms); the 16 GEMMs of a block are split over the threads whole, each
// accumulating into its own M[xi], so the sums do not depend on the threads.
constexpr int kWinoGradTiles = 128;

template <class T>
void winograd_filter_grad(const ConvShape& s, const T* x, const T* dy, T* dw) {
  using Vec = typename Traits<T>::Vec;
  constexpr int W = Vec::W;
  const int C = s.C, K = s.K, P = s.P(), Q = s.Q();
  const int th = (P + 1) / 2, tw = (Q + 1) / 2;
  const int64_t ntiles = int64_t(s.N) * th * tw;
  const int64_t per_block = std::min<int64_t>(kWinoGradTiles, ntiles);
  T* V = scratch<T, 14>(size_t(16) * per_block * C);  // [xi][t][c]
  T* Y = scratch<T, 15>(size_t(16) * per_block * K);  // [xi][t][k]
  T* M = scratch<T, 16>(size_t(16) * K * C);          // [xi][k][c]
  const T* zero = zeros<T>(size_t(std::max(C, K)));
  for (int64_t t0 = 0; t0 < ntiles; t0 += per_block) {
    const int nt = int(std::min<int64_t>(per_block, ntiles - t0));
    parallel_for(nt, 4, [&](int64_t b, int64_t e) {  // the transforms of the block's tiles
      for (int64_t t = b; t < e; ++t) {
        const T* d[16];
        const WinoTile wt = winograd_tile<T>(s, th, tw, t0 + t, x, zero, d);
        winograd_input<T>(d, C, V + t * C, per_block * C);
        const T* g[4];  // dy's 2x2 outputs (i, j) at g[2i + j]
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) {
            const int p = 2 * wt.ty + i, q = 2 * wt.tx + j;
            g[i * 2 + j] = p < P && q < Q ? dy + ((wt.n * P + p) * Q + q) * K : zero;
          }
        // A g A^T with A = [1 0; 1 1; 1 -1; 0 -1]: rows (g0, g0 + g1, g0 - g1, -g1) of the 2x2, each row (u, v)
        // then (u, u + v, u - v, -v).
        T* yt = Y + t * K;
        const int64_t ys = per_block * K;
        for (int k = 0; k < K; k += W) {
          using V_ = typename Vec::V;
          const V_ y00 = Vec::load(g[0] + k), y01 = Vec::load(g[1] + k), y10 = Vec::load(g[2] + k),
                   y11 = Vec::load(g[3] + k), z = Vec::zero();
          const V_ rows[4][2] = {{y00, y01},
                                 {Vec::add(y00, y10), Vec::add(y01, y11)},
                                 {Vec::sub(y00, y10), Vec::sub(y01, y11)},
                                 {Vec::sub(z, y10), Vec::sub(z, y11)}};
          for (int a = 0; a < 4; ++a) {
            const V_ u = rows[a][0], v = rows[a][1];
            T* o = yt + int64_t(a * 4) * ys + k;
            Vec::store(o, u);
            Vec::store(o + ys, Vec::add(u, v));
            Vec::store(o + 2 * ys, Vec::sub(u, v));
            Vec::store(o + 3 * ys, Vec::sub(z, v));
          }
        }
      }
    });
    const bool first = t0 == 0;
    parallel_for(16, 1, [&](int64_t b, int64_t e) {  // M[xi] (+)= Y[xi]^T V[xi]; nested, so each GEMM is serial
      for (int64_t xi = b; xi < e; ++xi)
        gemm<T>(true, false, K, C, nt, T(1), Y + xi * per_block * K, K, V + xi * per_block * C, C,
                first ? T(0) : T(1), M + xi * K * C, C);
    });
  }
  // dw[k][c] = G^T M G, G^T = [1 .5 .5 0; 0 .5 -.5 0; 0 .5 .5 1].
  parallel_for(K, 1, [&](int64_t b, int64_t e) {
    const int64_t xs = int64_t(K) * C;
    for (int64_t k = b; k < e; ++k)
      for (int c = 0; c < C; ++c) {
        T m[4][4];
        for (int xi = 0; xi < 16; ++xi) m[xi / 4][xi % 4] = M[xi * xs + k * C + c];
        T t[3][4];  // G^T m
        for (int j = 0; j < 4; ++j) {
          const T h = (m[1][j] + m[2][j]) * T(0.5);
          t[0][j] = m[0][j] + h;
          t[1][j] = (m[1][j] - m[2][j]) * T(0.5);
          t[2][j] = h + m[3][j];
        }
        T* o = dw + (k * C + c) * 9;
        for (int i = 0; i < 3; ++i) {
          const T h = (t[i][1] + t[i][2]) * T(0.5);
          o[i * 3] = t[i][0] + h;
          o[i * 3 + 1] = (t[i][1] - t[i][2]) * T(0.5);
          o[i * 3 + 2] = h + t[i][3];
        }
      }
  });
}

// Small output maps (at most kEdgeClassMap pixels: the last stages): most pixels lie at an edge, where some of
// their taps fall in the padding. Tiles in (n, p, q) order mix pixels of different edges, and a tile sums the
// union of its pixels' live taps, zeros for the taps a pixel lacks (the small preset's last 3x3 layer, 2x2 maps:
// 9 taps a pixel where 25 of 36 are live). Here the pixels go by edge class, the ranges of live tap rows
// [r0, r1) and columns [c0, c1) (fixed by p and q), a class's pixels in (n, p, q) order, MR at a time: every
// tile sums exactly its pixels' taps, in (r, s) order as the other tiles do. Only when that is less work: each
// class's last tile may be short, and at a batch of 1 or 2 the classes hold few pixels (2x2 maps at N = 1: four
// tiles of one pixel instead of one of four). Returns false, having done nothing, when the (n, p, q) tiles cost
// less: the taps they sum plus kTileCost for each.
constexpr int64_t kEdgeClassMap = 256;
constexpr int64_t kTileCost = 2;  // a tile's fixed cost (its table, epilogue and stores) in taps, about

template <class T>
bool fwd_by_edge_class(const ConvShape& s, const T* x, const T* packed, int64_t rows, const T* zero,
                       const Epilogue<T>& epi, T* y) {
  constexpr int MR = kMR<T>;
  const int P = s.P(), Q = s.Q(), R = s.R, S = s.S, C = s.C, st = s.stride, pad = s.pad;
  // Classes of rows (p) and of columns (q), by their live taps; the calling thread's grow-only lists.
  struct Axis {
    int t0, t1;            // live taps [t0, t1)
    std::vector<int> pos;  // the rows (or columns) of this class, ascending
  };
  struct Class {
    int ri, ci;  // row and column class
    int64_t per_image, first_tile;
  };
  struct Lists {
    std::vector<Axis> rows, cols;
    std::vector<Class> classes;
  };
  Lists& L = calling_thread_own<Lists>();
  // Output row (column) i's live taps [t0, t1) of `taps`, on an input of `size` rows (columns).
  auto live = [&](int i, int taps, int size, int& t0, int& t1) {
    const int first = i * st - pad;  // the input row (column) of tap 0
    t0 = std::max(0, -first);
    t1 = std::min(taps, size - first);
  };
  auto classify = [&](std::vector<Axis>& axis, int n, int taps, int size) {
    size_t used = 0;
    for (int i = 0; i < n; ++i) {
      int t0, t1;
      live(i, taps, size, t0, t1);
      size_t k = 0;
      while (k < used && (axis[k].t0 != t0 || axis[k].t1 != t1)) ++k;
      if (k == used) {
        if (axis.size() <= used) axis.emplace_back();
        axis[used].t0 = t0;
        axis[used].t1 = t1;
        axis[used].pos.clear();
        ++used;
      }
      axis[k].pos.push_back(i);
    }
    return used;
  };
  const size_t nr = classify(L.rows, P, R, s.H), nc = classify(L.cols, Q, S, s.W);
  L.classes.clear();
  int64_t ntiles = 0, cost = 0;
  for (size_t ri = 0; ri < nr; ++ri)
    for (size_t ci = 0; ci < nc; ++ci) {
      const int64_t per_image = int64_t(L.rows[ri].pos.size()) * int64_t(L.cols[ci].pos.size());
      const int64_t tiles = (per_image * s.N + MR - 1) / MR;
      L.classes.push_back({int(ri), int(ci), per_image, ntiles});
      ntiles += tiles;
      cost += tiles * (int64_t(L.rows[ri].t1 - L.rows[ri].t0) * (L.cols[ci].t1 - L.cols[ci].t0) + kTileCost);
    }
  // The (n, p, q) tiles: each sums the taps live for any of its pixels (about: the span of their ranges).
  const int64_t npq = int64_t(s.N) * P * Q;
  int64_t plain = 0;
  for (int64_t first = 0; first < npq; first += MR) {
    int r0 = R, r1 = 0, c0 = S, c1 = 0;
    for (int64_t i = first; i < std::min(npq, first + MR); ++i) {
      int pr0, pr1, pc0, pc1;
      live(int(i / Q % P), R, s.H, pr0, pr1);
      live(int(i % Q), S, s.W, pc0, pc1);
      r0 = std::min(r0, pr0);
      r1 = std::max(r1, pr1);
      c0 = std::min(c0, pc0);
      c1 = std::max(c1, pc1);
    }
    plain += int64_t(std::max(0, r1 - r0)) * std::max(0, c1 - c0) + kTileCost;
    if (plain > cost) break;  // edge classes win
  }
  if (plain <= cost) return false;
  run_tiles<T>(ntiles, R * S, C, rows, packed, s.K, [&](int64_t t, int* k0, const T** a, TileView<T>& v) {
    size_t k = 0;
    while (k + 1 < L.classes.size() && L.classes[k + 1].first_tile <= t) ++k;
    const Class& cl = L.classes[k];
    const Axis &ra = L.rows[size_t(cl.ri)], &ca = L.cols[size_t(cl.ci)];
    const int64_t first = (t - cl.first_tile) * MR;
    const int m = int(std::min<int64_t>(MR, cl.per_image * s.N - first));
    const int ncols = int(ca.pos.size());
    int64_t off[MR];  // the input offset of each pixel's tap (0, 0), which may lie in the padding
    for (int i = 0; i < m; ++i) {
      const int64_t idx = first + i, n = idx / cl.per_image, at = idx % cl.per_image;
      const int p = ra.pos[size_t(at / ncols)], q = ca.pos[size_t(at % ncols)];
      off[i] = ((n * s.H + p * st - pad) * s.W + q * st - pad) * C;
      v.out[i] = y + ((n * P + p) * Q + q) * s.K;
    }
    int nseg = 0;
    for (int r = ra.t0; r < ra.t1; ++r)
      for (int ss = ca.t0; ss < ca.t1; ++ss, ++nseg) {
        const int64_t tap = (int64_t(r) * s.W + ss) * C;
        for (int i = 0; i < MR; ++i) a[nseg * MR + i] = i < m ? x + (off[i] + tap) : zero;
        k0[nseg] = (r * S + ss) * C;
      }
    v.nseg = nseg;
    v.m = m;
    v.k0 = k0;
    v.a = a;
  }, epi);
  return true;
}

// The forward pass's weights as its micro-kernels read them, scaled by `scale` when set: Winograd's transformed
// weights (16 x C x K values, K a multiple of NR) when `winograd`, else the packed slivers (ceil(K / NR) x C x R x
// S x NR). In a scratch buffer of the calling thread, valid until its next call.
template <class T>
const T* forward_weights(const ConvShape& s, const T* w, const T* scale, bool winograd) {
  if (winograd) {
    return winograd_weights<T>(s.C, s.K, scale, [&](int k, int c, T g[3][3]) {
      const T* src = w + (int64_t(k) * s.C + c) * 9;
      for (int r = 0; r < 3; ++r)
        for (int q = 0; q < 3; ++q) g[r][q] = src[r * 3 + q];
    });
  }
  return pack_weights<T>(s, w, false, scale);
}

// The forward pass, with the evaluation epilogue when epi.bias is set (and the weights scaled by `scale`).
// prepared: forward_weights' values made earlier (w and scale then unused), Winograd's when prepared_winograd,
// or null.
template <class T>
void fwd(const ConvShape& s, const T* x, const T* w, const T* scale, const Epilogue<T>& epi, T* y,
         const T* prepared = nullptr, bool prepared_winograd = false) {
  check_shape(s);
  if (prepared ? prepared_winograd : conv2d_nhwc_winograd<T>(s, ConvPass::Forward)) {
    winograd_conv<T>(s, x, y, prepared ? prepared : forward_weights<T>(s, w, scale, true), epi);
    return;
  }
  if (s.C < kFewChannels && s.pad > 0 && s.N > 0 && s.P() > 0 && s.Q() > 0) {
    // Few channels (the stem): the input copied once with its zero border, so that every tile reads its kernel
    // rows in place, with no checks and nothing staged (a third of the stem's forward went to its edge tiles).
    // The rows that fell in the padding now add zeros: the same sums.
    ConvShape sp;
    const T* xp = zero_bordered(s, x, sp);
    fwd<T>(sp, xp, w, scale, epi, y, prepared, false);
    return;
  }
  constexpr int MR = kMR<T>;
  const int P = s.P(), Q = s.Q(), R = s.R, S = s.S, C = s.C, st = s.stride, pad = s.pad;
  const int64_t npq = int64_t(s.N) * P * Q, rows = int64_t(C) * R * S;
  if (npq == 0) return;
  // Rows of the packed weights in (r, s, c) order: the order of the input values in NHWC.
  const T* packed = prepared ? prepared : forward_weights<T>(s, w, scale, false);
  const bool by_row = C < kFewChannels;  // segments: kernel rows of S*C values, else taps of C
  const int len = by_row ? S * C : C, max_seg = by_row ? R : R * S;
  const T* zero = zeros<T>(size_t(len));
  if (!by_row && pad > 0 && int64_t(P) * Q <= kEdgeClassMap && fwd_by_edge_class<T>(s, x, packed, rows, zero, epi, y))
    return;
  // A few-channel layer's tile whose every kernel row lies in the image (all but a short last tile, its input
  // being zero-bordered) is regular: its segments are the same offsets from each pixel's top-left tap, made here
  // once (reg_off, reg_k0) rather than a pointer per pixel and segment per tile. The stem's forward (7 rows of 21
  // values): 1.80 -> 1.63 ms at batch 32, 64x64, one core. Layers with taps of 16 or more channels lost 1-4% by
  // it (the kernel's pointer arithmetic against the tables they fill in a fraction of their sums' time).
  const int64_t row_step = int64_t(s.W) * C;
  int64_t* reg_off = scratch<int64_t, 18>(size_t(R));  // the calling thread's, read by the pool's
  int* reg_k0 = scratch<int, 19>(size_t(R));
  for (int r = 0; r < R; ++r) {
    reg_off[r] = r * row_step;
    reg_k0[r] = r * S * C;
  }
  run_tiles<T>((npq + MR - 1) / MR, max_seg, len, rows, packed, s.K,
               [&](int64_t t, int* k0, const T** a, TileView<T>& v) {
                 // The tile's pixels: the first decoded once, the others by stepping (q, p, n) with carries.
                 // ih0/iw0: the input position of the kernel's top left tap; off: its offset in x.
                 const int64_t first = t * MR;
                 const int m = int(std::min<int64_t>(MR, npq - first));
                 int ih0[MR], iw0[MR];
                 int64_t off[MR];
                 {
                   int64_t n;
                   int p, q;
                   decode_pixel(first, P, Q, n, p, q);
                   for (int i = 0; i < MR; ++i) {
                     ih0[i] = p * st - pad;
                     iw0[i] = q * st - pad;
                     off[i] = ((n * s.H + ih0[i]) * s.W + iw0[i]) * C;
                     if (++q == Q) {
                       q = 0;
                       if (++p == P) p = 0, ++n;
                     }
                   }
                 }
                 int nseg = 0;
                 bool inside = m == MR;  // every tap of every pixel in the image: no checks
                 for (int i = 0; i < MR && inside; ++i)
                   inside = ih0[i] >= 0 && ih0[i] + R <= s.H && iw0[i] >= 0 && iw0[i] + S <= s.W;
                 if (inside && by_row) {
                   for (int i = 0; i < MR; ++i) a[i] = x + off[i];
                   v.nseg = R;
                   v.m = m;
                   v.k0 = reg_k0;
                   v.a = a;
                   v.soff = reg_off;
                   for (int i = 0; i < m; ++i) v.out[i] = y + (first + i) * s.K;
                   return;
                 }
                 if (inside) {
                   for (int r = 0; r < R; ++r)
                     for (int ss = 0; ss < S; ++ss, ++nseg) {
                       const int64_t tap = r * row_step + int64_t(ss) * C;
                       for (int i = 0; i < MR; ++i) a[nseg * MR + i] = x + (off[i] + tap);
                       k0[nseg] = (r * S + ss) * C;
                     }
                 }
                 for (int r = 0; r < R && !inside; ++r) {
                   if (by_row) {  // pad is 0 here (see above): only the rows of a short last tile are missing
                     for (int i = 0; i < MR; ++i) a[nseg * MR + i] = i < m ? x + (off[i] + r * row_step) : zero;
                     k0[nseg++] = r * S * C;
                   } else {
                     bool row_ok[MR];
                     for (int i = 0; i < MR; ++i) row_ok[i] = i < m && unsigned(ih0[i] + r) < unsigned(s.H);
                     for (int ss = 0; ss < S; ++ss) {
                       bool live = false;
                       const int64_t tap = r * row_step + int64_t(ss) * C;
                       for (int i = 0; i < MR; ++i) {
                         const bool ok = row_ok[i] && unsigned(iw0[i] + ss) < unsigned(s.W);
                         a[nseg * MR + i] = ok ? x + (off[i] + tap) : zero;
                         live |= ok;
                       }
                       if (live) k0[nseg++] = (r * S + ss) * C;
                     }
                   }
                 }
                 v.nseg = nseg;
                 v.m = m;
                 v.k0 = k0;
                 v.a = a;
                 v.soff = nullptr;
                 for (int i = 0; i < m; ++i) v.out[i] = y + (first + i) * s.K;
               },
               epi);
}

// dst[i] = the sum of part[blk * outs + i] over blk < nblocks, in block order (thread-count independent): runs of
// kRun values at a time, so that the additions go down whole vectors (one value at a time, striding over the
// blocks, was a fifth of a 16-channel 1x1 layer's filter gradient).
template <class T>
void sum_block_partials(const T* part, int64_t nblocks, int64_t outs, T* dst) {
  constexpr int64_t kRun = 256;
  parallel_for((outs + kRun - 1) / kRun, 1, [&](int64_t b, int64_t e) {
    for (int64_t run = b; run < e; ++run) {
      const int64_t i0 = run * kRun, n = std::min(kRun, outs - i0);
      T* __restrict d = dst + i0;
      std::copy(part + i0, part + i0 + n, d);
      for (int64_t blk = 1; blk < nblocks; ++blk) {
        const T* __restrict p = part + blk * outs + i0;
        for (int64_t i = 0; i < n; ++i) d[i] += p[i];
      }
    }
  });
}

// ---- the filter gradient of a layer with few input channels (the stem) ----------------------------------------
// dw[k][(r, s, c)] = sum over output pixels of dy[pix][k] * x[n, p*st - pad + r, q*st - pad + s, c]. For each
// kernel row r the L = S*C values (s, c) lie contiguous in x, so a register tile of 4 output channels by NV
// vectors of that row sums dy[pix][k] times the row, pixel after pixel: no im2col matrix (12x the image for the
// stem) and no GEMM packing, which took two thirds of the stem's filter gradient. The last vector is loaded
// ending at the row's end (overlapping the one before) so nothing past the row is read. Rows outside the image
// read zeros; rows cut by the padding are staged with zeros outside.
template <class T>
constexpr int kRowGradK = 4;  // output channels per register tile

template <class T>
int row_grad_vectors(const ConvShape& s) {  // NV, or 0 when the layer does not fit the row kernel
  constexpr int W = Traits<T>::Vec::W;
  const int L = s.S * s.C;
  const bool fits = s.C < kFewChannels && L > W && L <= 3 * W && s.K % kRowGradK<T> == 0;
  return fits ? (L + W - 1) / W : 0;
}

// part[k * rsc + r * L + l] = the sum over the nrows pixels whose kernel rows are rows[i * R + r] (i < nrows).
// Three vectors of the row whatever NV (with NV = 2 the third repeats the second): 12 named accumulators, as an
// array of vectors GCC stored them to the stack on every pixel.
template <class T>
void row_grad_block(int NV, int K, int R, int L, int64_t nrows, const T* const* rows, const T* dy, T* part) {
  using Vec = typename Traits<T>::Vec;
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  static_assert(kRowGradK<T> == 4, "the tile below is 4 channels wide");
  const int o1 = NV == 3 ? W : L - W, o2 = L - W;
  const int64_t rsc = int64_t(R) * L;
  for (int r = 0; r < R; ++r)
    for (int k0 = 0; k0 < K; k0 += 4) {
      V a00 = Vec::zero(), a01 = Vec::zero(), a02 = Vec::zero(), a10 = Vec::zero(), a11 = Vec::zero(),
        a12 = Vec::zero(), a20 = Vec::zero(), a21 = Vec::zero(), a22 = Vec::zero(), a30 = Vec::zero(),
        a31 = Vec::zero(), a32 = Vec::zero();
      const T* d = dy + k0;
      const T* const* rp = rows + r;
      for (int64_t i = 0; i < nrows; ++i, d += K, rp += R) {
        const T* xr = *rp;
        const V x0 = Vec::load(xr), x1 = Vec::load(xr + o1), x2 = Vec::load(xr + o2);
        V dv = Vec::bcast(d);
        a00 = Vec::fma(dv, x0, a00);
        a01 = Vec::fma(dv, x1, a01);
        a02 = Vec::fma(dv, x2, a02);
        dv = Vec::bcast(d + 1);
        a10 = Vec::fma(dv, x0, a10);
        a11 = Vec::fma(dv, x1, a11);
        a12 = Vec::fma(dv, x2, a12);
        dv = Vec::bcast(d + 2);
        a20 = Vec::fma(dv, x0, a20);
        a21 = Vec::fma(dv, x1, a21);
        a22 = Vec::fma(dv, x2, a22);
        dv = Vec::bcast(d + 3);
        a30 = Vec::fma(dv, x0, a30);
        a31 = Vec::fma(dv, x1, a31);
        a32 = Vec::fma(dv, x2, a32);
      }
      const V acc[4][3] = {{a00, a01, a02}, {a10, a11, a12}, {a20, a21, a22}, {a30, a31, a32}};
      for (int kk = 0; kk < 4; ++kk) {
        alignas(64) T tmp[3 * W];
        for (int v = 0; v < 3; ++v) Vec::store(tmp + v * W, acc[kk][v]);
        T* out = part + (k0 + kk) * rsc + int64_t(r) * L;
        // Value l from the first vector that holds it: [0, W) the first, then [W, 2W) the second when NV = 3,
        // the rest from the last (which ends at L).
        for (int l = 0; l < L; ++l) out[l] = l < W ? tmp[l] : l < W + (NV == 3 ? W : 0) ? tmp[l] : tmp[2 * W + l - o2];
      }
    }
}

// The filter gradient with the output channels in vectors (K a multiple of two vectors): a register tile of 2
// vectors of channels by 6 of the kernel's (r, s, c) values e, each a broadcast of the pixel's input value
// base[i] + eoff[e]. It reads x in place (zero-bordered when the layer has padding): no im2col matrix, no packing,
// and one pointer per pixel. For the stem it wastes no lane but in the last 6 values (the row tile below used
// 21 of its 24 for the stem's rows); for layers with at most 32 channels in or out it skips the GEMM's packing,
// which cost as much as their sums.
// part[e * K + k] (e in [e_lo, e_hi), k < K) = the sum over i < nrows, in order, of dy[i * K + k] * base[i][eoff[e]].
template <class T>
void grad_tiles_kv(int K, int64_t nrows, const T* const* base, const int64_t* eoff, int e_lo, int e_hi, const T* dy,
                   T* part) {
  using Vec = typename Traits<T>::Vec;
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  for (int k0 = 0; k0 < K; k0 += 2 * W)  // a block's slice of dy stays in L1 across the values e
    for (int e0 = e_lo; e0 < e_hi; e0 += 6) {
      const int m = std::min(6, e_hi - e0);  // a short last tile repeats its last value
      const int64_t o0 = eoff[e0], o1 = eoff[e0 + std::min(1, m - 1)], o2 = eoff[e0 + std::min(2, m - 1)],
                    o3 = eoff[e0 + std::min(3, m - 1)], o4 = eoff[e0 + std::min(4, m - 1)],
                    o5 = eoff[e0 + std::min(5, m - 1)];
      V a00 = Vec::zero(), a01 = Vec::zero(), a10 = Vec::zero(), a11 = Vec::zero(), a20 = Vec::zero(),
        a21 = Vec::zero(), a30 = Vec::zero(), a31 = Vec::zero(), a40 = Vec::zero(), a41 = Vec::zero(),
        a50 = Vec::zero(), a51 = Vec::zero();
      const T* d = dy + k0;
      for (int64_t i = 0; i < nrows; ++i, d += K) {
        const T* b = base[i];
        fma_6x2<Vec>(b + o0, b + o1, b + o2, b + o3, b + o4, b + o5, Vec::load(d), Vec::load(d + W), a00, a01, a10,
                     a11, a20, a21, a30, a31, a40, a41, a50, a51);
      }
      const V acc[6][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
      for (int j = 0; j < m; ++j) {
        T* out = part + int64_t(e0 + j) * K + k0;
        Vec::store(out, acc[j][0]);
        Vec::store(out + W, acc[j][1]);
      }
    }
}

// dwe [(r, s, c), K] by grad_tiles_kv: pixels in blocks of `block` (fixed by the shape), one partial sum each,
// added in block order; a block's tiles split over the threads in runs of e (any split, the same bits).
// Pixel (n, p, q)'s value (r, s, c) at base + r * Wp * C + s * C + c, base its top-left tap in x (zero-bordered
// first when the layer has padding).
template <class T>
void direct_filter_grad(const ConvShape& s, const T* x, const T* dy, T* dwe, int64_t block) {
  const int P = s.P(), Q = s.Q(), C = s.C, K = s.K, st = s.stride;
  const int64_t npq = int64_t(s.N) * P * Q, outs = int64_t(K) * s.R * s.S * C;
  const int rsc = s.R * s.S * C;
  const int64_t nblocks = (npq + block - 1) / block;
  T* part = nblocks > 1 ? scratch<T, 6>(size_t(nblocks * outs)) : dwe;
  ConvShape sp;
  const T* xp = s.pad > 0 ? zero_bordered(s, x, sp) : (sp = s, x);
  int64_t* eoff = scratch<int64_t, 18>(size_t(rsc));  // the calling thread's, read by the pool's
  for (int r = 0; r < s.R; ++r)
    for (int l = 0; l < s.S * C; ++l) eoff[r * s.S * C + l] = int64_t(r) * sp.W * C + l;
  // Items: (block, run of e), enough of them for the threads.
  const int etiles = (rsc + 5) / 6, t = num_threads();
  const int runs = nblocks >= 4 * t ? 1 : std::min<int>(etiles, int((4 * t + nblocks - 1) / nblocks));
  const int per_run = (etiles + runs - 1) / runs;
  parallel_for(nblocks * runs, 1, [&](int64_t b, int64_t e) {
    const T** base = scratch<const T*, 12>(size_t(block));  // the block's pixels' top-left taps
    for (int64_t item = b; item < e; ++item) {
      const int64_t blk = item / runs, b0 = blk * block, mb = std::min(block, npq - b0);
      const int run = int(item % runs), e_lo = std::min(rsc, run * per_run * 6),
                e_hi = std::min(rsc, (run + 1) * per_run * 6);
      if (e_lo >= e_hi) continue;
      int64_t n;
      int p, q;
      decode_pixel(b0, P, Q, n, p, q);
      for (int64_t i = 0; i < mb; ++i) {
        base[i] = xp + ((n * sp.H + int64_t(p) * st) * sp.W + int64_t(q) * st) * C;
        if (++q == Q) {
          q = 0;
          if (++p == P) p = 0, ++n;
        }
      }
      grad_tiles_kv<T>(K, mb, base, eoff, e_lo, e_hi, dy + b0 * K, part + (nblocks > 1 ? blk * outs : 0));
    }
  });
  if (nblocks > 1) sum_block_partials(part, nblocks, outs, dwe);
}

// dw [K, C, R, S] from dwe [(r, s, c), K].
template <class T>
void rsck_to_kcrs(int K, int C, int RS, const T* dwe, T* dw) {
  parallel_for(K, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k)
      for (int c = 0; c < C; ++c)
        for (int rs = 0; rs < RS; ++rs) dw[(k * C + c) * RS + rs] = dwe[(int64_t(rs) * C + c) * K + k];
  });
}

// dwt [K, (r, s, c)] for a layer row_grad_vectors accepts: pixels in blocks fixed by the shape, one partial sum
// each (the blocks go to the threads whole), added in block order.
template <class T>
void row_filter_grad(const ConvShape& s, const T* x, const T* dy, T* dwt) {
  const int P = s.P(), Q = s.Q(), R = s.R, S = s.S, C = s.C, K = s.K, st = s.stride, pad = s.pad, L = S * C;
  const int NV = row_grad_vectors<T>(s);
  const int64_t npq = int64_t(s.N) * P * Q, rsc = int64_t(R) * L, outs = int64_t(K) * rsc;
  const int64_t block = std::max<int64_t>(256, (npq + 63) / 64), nblocks = (npq + block - 1) / block;
  T* part = nblocks > 1 ? scratch<T, 6>(size_t(nblocks * outs)) : dwt;
  const T* zero = zeros<T>(size_t(L));
  parallel_for(nblocks, 1, [&](int64_t bb, int64_t be) {
    const T** rows = scratch<const T*, 12>(size_t(block * R));
    T* stage = scratch<T, 13>(size_t(block * R * L));
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t b0 = blk * block, mb = std::min(block, npq - b0);
      int64_t n;
      int p, q;
      decode_pixel(b0, P, Q, n, p, q);
      for (int64_t i = 0; i < mb; ++i) {
        // Kernel rows [r0, r1) are in the image; their taps [s0, s1).
        const int ih0 = p * st - pad, iw0 = q * st - pad;
        const int r0 = std::min(R, std::max(0, -ih0)), r1 = std::max(r0, std::min(R, s.H - ih0));
        const int s0 = std::max(0, -iw0), s1 = std::min(S, s.W - iw0);
        const T** row = rows + i * R;
        const int64_t at = ((n * s.H + ih0) * s.W + iw0) * C;  // row r at x + at + r * row_step, if in the image
        const int64_t row_step = int64_t(s.W) * C;
        for (int r = 0; r < r0; ++r) row[r] = zero;
        if (s0 == 0 && s1 == S) {
          for (int r = r0; r < r1; ++r) row[r] = x + (at + r * row_step);
        } else {
          for (int r = r0; r < r1; ++r) {  // cut by the padding: the taps in the image, [s0, s1), are one run
            T* st_row = stage + (i * R + r) * L;
            std::fill(st_row, st_row + L, T(0));
            if (s1 > s0) copy_run(st_row + s0 * C, x + (at + r * row_step + int64_t(s0) * C), int64_t(s1 - s0) * C);
            row[r] = st_row;
          }
        }
        for (int r = r1; r < R; ++r) row[r] = zero;
        if (++q == Q) {
          q = 0;
          if (++p == P) p = 0, ++n;
        }
      }
      T* out = part + (nblocks > 1 ? blk * outs : 0);
      const T* d = dy + b0 * K;
      row_grad_block<T>(NV, K, R, L, mb, rows, d, out);
    }
  });
  if (nblocks > 1) sum_block_partials(part, nblocks, outs, dwt);
}

// dw [K, C, R, S] from dwt [K, (r, s, c)].
template <class T>
void krsc_to_kcrs(int K, int C, int RS, const T* dwt, T* dw) {
  parallel_for(K, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k)
      for (int c = 0; c < C; ++c)
        for (int rs = 0; rs < RS; ++rs) dw[(k * C + c) * RS + rs] = dwt[(k * RS + rs) * C + c];
  });
}

}  // namespace

template <class T>
void conv2d_nhwc_fwd(const ConvShape& s, const T* x, const T* w, T* y) {
  fwd<T>(s, x, w, nullptr, Epilogue<T>{}, y);
}

template <class T>
void conv2d_nhwc_fwd_affine(const ConvShape& s, const T* x, const T* w, const T* scale, const T* bias,
                            const T* residual, bool relu, T* y) {
  VB_CHECK(scale && bias, "conv2d_nhwc_fwd_affine: scale and bias are required");
  Epilogue<T> epi;
  epi.bias = bias;
  epi.residual = residual;
  epi.y = y;
  epi.relu = relu;
  fwd<T>(s, x, w, scale, epi, y);
}

template <class T>
void conv2d_nhwc_prepare(const ConvShape& s, const T* w, const T* scale, PreparedConv<T>& out) {
  check_shape(s);
  VB_CHECK(s.N > 0, "conv2d_nhwc_prepare: the shape needs a batch (N > 0)");
  // Winograd wherever the shape fits it, at any batch: the weights' transform is paid once here.
  const bool winograd = winograd_enabled() && winograd_fits<T>(s);
  constexpr int NR = kNR<T>;
  const size_t count = winograd ? size_t(16) * size_t(s.C) * size_t(s.K)
                                : size_t((s.K + NR - 1) / NR) * size_t(s.C) * size_t(s.R) * size_t(s.S) * NR;
  const T* src = forward_weights<T>(s, w, scale, winograd);
  out.shape = s;
  out.winograd = winograd;
  out.values.assign(src, src + count);
}

template <class T>
void conv2d_nhwc_fwd_prepared(const ConvShape& s, const T* x, const PreparedConv<T>& w, const T* bias,
                              const T* residual, bool relu, T* y) {
  VB_CHECK(bias, "conv2d_nhwc_fwd_prepared: the bias is required");
  VB_CHECK(w.serves(s),
           "conv2d_nhwc_fwd_prepared: weights prepared for another shape (C", w.shape.C, " ", w.shape.H, "x",
           w.shape.W, " K", w.shape.K, ") than the call's (C", s.C, " ", s.H, "x", s.W, " K", s.K, ")");
  if (s.N == 0) return;
  Epilogue<T> epi;
  epi.bias = bias;
  epi.residual = residual;
  epi.y = y;
  epi.relu = relu;
  fwd<T>(s, x, nullptr, nullptr, epi, y, w.values.data(), w.winograd);
}

template <class T>
void conv2d_nhwc_bwd_data(const ConvShape& s, const T* dy, const T* w, T* dx) {
  check_shape(s);
  if (conv2d_nhwc_winograd<T>(s, ConvPass::DataGradient)) {
    // A stride-1 3x3 data gradient is the forward convolution of dy (K channels in, C out) with the kernel
    // turned half round and padding 2 - pad (whose output is H x W again): through Winograd when that shape
    // fits it.
    const ConvShape t = *winograd_data_grad_shape(s);
    winograd_conv<T>(t, dy, dx, winograd_weights<T>(t.C, t.K, nullptr, [&](int c, int k, T g[3][3]) {
                       const T* src = w + (int64_t(k) * s.C + c) * 9;
                       for (int r = 0; r < 3; ++r)
                         for (int q = 0; q < 3; ++q) g[r][q] = src[(2 - r) * 3 + (2 - q)];
                     }),
                     Epilogue<T>{});
    return;
  }
  constexpr int MR = kMR<T>;
  const int P = s.P(), Q = s.Q(), R = s.R, S = s.S, C = s.C, K = s.K, st = s.stride, pad = s.pad, H = s.H, W = s.W;
  if (s.N == 0) return;
  const int64_t rows = int64_t(K) * R * S;
  // Rows in (r, s, k) order: a tap's run is one output pixel's K gradients.
  const T* packed = pack_weights<T>(s, w, true);
  // Input pixels go by parity class (h mod st, w mod st): within a class every pixel sees the same taps (up to
  // the edges), so a tile of MR pixels of one class wastes none of its taps. A class no tap reaches (a 1x1
  // stride-2 convolution's odd rows and columns) is zero. With stride 1 there is one class: the pixels in order.
  // The tiles: a class's pixels in (n, h, w) order, MR at a time (across rows and images).
  struct Class {
    int rh, rw;
    int64_t count, first_tile;
  };
  // Grow-only (no allocation once the largest stride has been seen), and the calling thread's.
  std::vector<Class>& classes = calling_thread_own<std::vector<Class>>();
  classes.clear();
  int64_t ntiles = 0;
  for (int rh = 0; rh < std::min(st, H); ++rh)
    for (int rw = 0; rw < std::min(st, W); ++rw) {
      const int64_t hs = (H - rh + st - 1) / st, ws = (W - rw + st - 1) / st;
      bool reached = false;  // does any tap land on this class?
      for (int r = 0; r < R; ++r)
        for (int ss = 0; ss < S; ++ss) reached |= (rh + pad - r) % st == 0 && (rw + pad - ss) % st == 0;
      reached = reached || st == 1;
      const int64_t count = int64_t(s.N) * hs * ws;
      if (!reached) {
        parallel_for(count, 256, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            const int64_t wi = i % ws, hi = i / ws % hs, n = i / (ws * hs);
            T* d = dx + ((n * H + rh + hi * st) * W + rw + wi * st) * C;
            std::fill(d, d + C, T(0));
          }
        });
        continue;
      }
      classes.push_back({rh, rw, count, ntiles});
      ntiles += (count + MR - 1) / MR;
    }
  const T* zero = zeros<T>(size_t(K));
  run_tiles<T>(ntiles, R * S, K, rows, packed, C, [&](int64_t t, int* k0, const T** a, TileView<T>& v) {
    size_t ci = 0;
    while (ci + 1 < classes.size() && classes[ci + 1].first_tile <= t) ++ci;
    const Class& cl = classes[ci];
    const int64_t hs = (H - cl.rh + st - 1) / st, ws = (W - cl.rw + st - 1) / st;
    const int64_t first = (t - cl.first_tile) * MR;
    const int m = int(std::min<int64_t>(MR, cl.count - first));
    // Pixel i: image n[i], row cl.rh + hs_i * st, column cl.rw + ws_i * st, with (hs_i, ws_i) = (hg[i], wg[i]).
    int n[MR], hg[MR], wg[MR];
    {  // the first pixel decoded, the others stepped with carries
      int64_t ni;
      int hi, wi;
      decode_pixel(first, int(hs), int(ws), ni, hi, wi);
      for (int i = 0; i < MR; ++i) {
        wg[i] = int(wi);
        hg[i] = int(hi);
        n[i] = int(ni);
        if (i < m) v.out[i] = dx + ((int64_t(n[i]) * H + cl.rh + hi * st) * W + cl.rw + wi * st) * C;
        if (++wi == ws) {
          wi = 0;
          if (++hi == hs) hi = 0, ++ni;
        }
      }
    }
    // Every tap of the class reaches an output pixel of every tile pixel (the output offsets dp, dq of its taps
    // lie in [dp_lo, dp_hi] x [dq_lo, dq_hi]): pointers by offset, no checks per pixel and tap.
    int dp_lo = INT_MAX, dp_hi = INT_MIN, dq_lo = INT_MAX, dq_hi = INT_MIN;
    for (int r = 0; r < R; ++r)
      if ((cl.rh + pad - r) % st == 0) {
        dp_lo = std::min(dp_lo, (cl.rh + pad - r) / st);
        dp_hi = std::max(dp_hi, (cl.rh + pad - r) / st);
      }
    for (int ss = 0; ss < S; ++ss)
      if ((cl.rw + pad - ss) % st == 0) {
        dq_lo = std::min(dq_lo, (cl.rw + pad - ss) / st);
        dq_hi = std::max(dq_hi, (cl.rw + pad - ss) / st);
      }
    bool inside = m == MR && dp_lo <= dp_hi && dq_lo <= dq_hi;
    for (int i = 0; i < MR && inside; ++i)
      inside = hg[i] + dp_lo >= 0 && hg[i] + dp_hi < P && wg[i] + dq_lo >= 0 && wg[i] + dq_hi < Q;
    int nseg = 0;
    for (int r = 0; r < R; ++r)
      for (int ss = 0; ss < S; ++ss) {
        if ((cl.rh + pad - r) % st != 0 || (cl.rw + pad - ss) % st != 0) continue;  // not this class's tap
        // The output pixel this tap reaches: (h + pad - r) / st, exact for this class's taps, = hg + dp (no
        // division per pixel and tap; the divisions took longer than the sums of a 16-channel layer).
        const int dp = (cl.rh + pad - r) / st, dq = (cl.rw + pad - ss) / st;
        bool live = inside;
        if (inside) {
          for (int i = 0; i < MR; ++i)
            a[nseg * MR + i] = dy + ((int64_t(n[i]) * P + hg[i] + dp) * Q + wg[i] + dq) * K;
        } else {
          for (int i = 0; i < MR; ++i) {
            const int op = hg[i] + dp, oq = wg[i] + dq;
            const bool ok = i < m && op >= 0 && oq >= 0 && op < P && oq < Q;
            a[nseg * MR + i] = ok ? dy + ((int64_t(n[i]) * P + op) * Q + oq) * K : zero;
            live |= ok;
          }
        }
        if (live) k0[nseg++] = (r * S + ss) * K;
      }
    v.nseg = nseg;
    v.m = m;
    v.k0 = k0;
    v.a = a;
  });
}

template <class T>
void conv2d_nhwc_bwd_filter(const ConvShape& s, const T* x, const T* dy, T* dw) {
  check_shape(s);
  if (conv2d_nhwc_winograd<T>(s, ConvPass::FilterGradient)) {
    winograd_filter_grad<T>(s, x, dy, dw);
    return;
  }
  const int P = s.P(), Q = s.Q(), R = s.R, S = s.S, C = s.C, K = s.K, st = s.stride, pad = s.pad;
  const int64_t npq = int64_t(s.N) * P * Q, rsc = int64_t(R) * S * C;
  if (npq == 0) {
    std::fill(dw, dw + K * rsc, T(0));
    return;
  }
  const bool pointwise = R == 1 && S == 1 && st == 1 && pad == 0;  // x is its own im2col
  const int64_t outs = int64_t(K) * rsc;
  const bool reorder = R * S > 1;
  T* dwt = reorder ? scratch<T, 5>(size_t(outs)) : dw;  // [K, (r, s, c)]
  // Direct (register tiles over x in place) for the stem and for small results (at most kSmallOuts values) of
  // layers with at most 32 input or output channels: batch 32, one core, the small preset's layers: 16 -> 16 3x3
  // 0.68 -> 0.42 ms, 16 -> 16 1x1 0.13 -> 0.09, 16 -> 64 1x1 0.32 -> 0.26, 32 -> 128 1x1 0.27 -> 0.23, the stem
  // 2.47 -> 1.84. The GEMM wins from 64 channels in and out (8-130% faster on 2x2 to 8x8 maps) and on larger
  // results (32 -> 256 3x3 stride 2 at 28x28: 9.5 against 14.5 ms; 32 -> 64 3x3: 4.1 against 5.1). The padded
  // layers' zero-bordered copy is at most the stem forward's in a ResNet (a quarter of its side, at most 32
  // channels against 3). VB_CPU_DIRECT_DW=0 / 1: never / wherever K fits (for comparisons).
  constexpr int64_t kSmallOuts = int64_t(16) << 10;
  static const int force = [] {
    const char* e = std::getenv("VB_CPU_DIRECT_DW");
    return e ? std::atoi(e) : -1;
  }();
  const bool kv = K % (2 * Traits<T>::Vec::W) == 0;
  const bool direct = row_grad_vectors<T>(s) > 0 || (std::min(C, K) <= 32 && outs <= kSmallOuts);
  if (kv && (force == 1 || (force != 0 && direct))) {
    T* dwe = scratch<T, 5>(size_t(outs));  // [(r, s, c), K]
    direct_filter_grad<T>(s, x, dy, dwe, std::max<int64_t>(256, (npq + 63) / 64));
    rsck_to_kcrs(K, C, R * S, dwe, dw);
    return;
  }
  if (row_grad_vectors<T>(s) > 0) {
    row_filter_grad<T>(s, x, dy, dwt);
    krsc_to_kcrs(K, C, R * S, dwt, dw);
    return;
  }
  const int P_ = P, Q_ = Q;
  // Rows [b0, b0 + mb) of the im2col matrix [N*P*Q, (r, s, c)] into col.
  auto im2col = [&](int64_t b0, int64_t mb, T* col) {
    parallel_for(mb, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t pix = b0 + i;
        const int q = int(pix % Q_), p = int(pix / Q_ % P_);
        const int64_t n = pix / (int64_t(P_) * Q_);
        T* row = col + i * rsc;
        const int iw0 = q * st - pad;
        for (int r = 0; r < R; ++r) {
          const int ih = p * st - pad + r;
          if (ih >= 0 && ih < s.H && iw0 >= 0 && iw0 + S <= s.W) {  // the kernel row inside: S*C contiguous values
            copy_run(row, x + ((n * s.H + ih) * s.W + iw0) * C, int64_t(S) * C);
            row += int64_t(S) * C;
            continue;
          }
          for (int ss = 0; ss < S; ++ss, row += C) {
            const int iw = q * st - pad + ss;
            if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W)
              std::fill(row, row + C, T(0));
            else
              copy_run(row, x + ((n * s.H + ih) * s.W + iw) * C, C);
          }
        }
      }
    });
  };
  // Blocks of pixels: a block's im2col stays in L2 for the GEMM that reads it (unless that would make the blocks
  // so short that re-reading the K x RSC result for each costs more). A small result (at most kSmallOuts
  // values: the stem's 64 x 147, the 16- to 64-channel layers of small models) is a GEMM too small to split
  // over threads: it gets 8 to 64 blocks, each with its own partial sum. Block sizes depend on the shape only.
  constexpr int64_t kColElems = int64_t(192) << 10;
  const int64_t fit = pointwise ? npq : std::max<int64_t>(256, kColElems / rsc);
  const bool partials = outs <= kSmallOuts && npq >= 512;
  const int64_t block =
      std::min<int64_t>(npq, partials ? std::max<int64_t>(std::min<int64_t>(fit, (npq + 7) / 8), (npq + 63) / 64) : fit);
  const int64_t nblocks = (npq + block - 1) / block;
  if (partials && nblocks > 1) {
    // A small result (the stem's 16 x 147, a 16-channel layer's): its GEMMs are too small to split, so the
    // blocks go to the threads whole, each into its own partial sum, and the partial sums are added in block
    // order.
    T* part = scratch<T, 6>(size_t(nblocks * outs));
    parallel_for(nblocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        const int64_t b0 = blk * block, mb = std::min(block, npq - b0);
        const T* a = x + b0 * C;
        if (!pointwise) {
          T* col = scratch<T, 4>(size_t(block * rsc));
          im2col(b0, mb, col);
          a = col;
        }
        gemm<T>(true, false, K, int(rsc), int(mb), T(1), dy + b0 * K, K, a, int(rsc), T(0), part + blk * outs,
                int(rsc));
      }
    });
    sum_block_partials(part, nblocks, outs, dwt);
  } else if (pointwise) {
    gemm<T>(true, false, K, C, int(npq), T(1), dy, K, x, C, T(0), dw, C);
  } else {
    // One block after another, each GEMM split over the threads and accumulated into dwt.
    T* col = scratch<T, 4>(size_t(block * rsc));
    for (int64_t b0 = 0; b0 < npq; b0 += block) {
      const int64_t mb = std::min(block, npq - b0);
      im2col(b0, mb, col);
      gemm<T>(true, false, K, int(rsc), int(mb), T(1), dy + b0 * K, K, col, int(rsc), b0 == 0 ? T(0) : T(1), dwt,
              int(rsc));
    }
  }
  if (reorder) krsc_to_kcrs(K, C, R * S, dwt, dw);
}

template <class T>
bool conv2d_nhwc_winograd(const ConvShape& s, ConvPass pass) {
  // The one place that decides: the three passes above ask here.
  if (!winograd_enabled() || s.N == 0) return false;
  switch (pass) {
    case ConvPass::Forward: return winograd_fits<T>(s) && winograd_pays(s);
    case ConvPass::DataGradient: {
      const auto t = winograd_data_grad_shape(s);
      return t && winograd_fits<T>(*t) && winograd_pays(*t);
    }
    case ConvPass::FilterGradient: return winograd_fits<T>(s, kWinoGradMinMap);
  }
  return false;
}

template <class T>
void nchw_to_nhwc(int N, int C, int HW, const T* src, T* dst) {
  parallel_for(N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const T* s = src + n * C * HW;
      T* d = dst + n * C * HW;
      for (int i0 = 0; i0 < HW; i0 += 64)
        for (int c = 0; c < C; ++c)
          for (int i = i0; i < std::min(HW, i0 + 64); ++i) d[int64_t(i) * C + c] = s[int64_t(c) * HW + i];
    }
  });
}

template <class T>
void nhwc_to_nchw(int N, int C, int HW, const T* src, T* dst) {
  parallel_for(N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const T* s = src + n * C * HW;
      T* d = dst + n * C * HW;
      for (int c0 = 0; c0 < C; c0 += 64)
        for (int i = 0; i < HW; ++i)
          for (int c = c0; c < std::min(C, c0 + 64); ++c) d[int64_t(c) * HW + i] = s[int64_t(i) * C + c];
    }
  });
}

#define VB_INSTANTIATE(T)                                                         \
  template void conv2d_nhwc_fwd<T>(const ConvShape&, const T*, const T*, T*);      \
  template void conv2d_nhwc_fwd_affine<T>(const ConvShape&, const T*, const T*, const T*, const T*, const T*, bool, \
                                          T*);                                     \
  template void conv2d_nhwc_prepare<T>(const ConvShape&, const T*, const T*, PreparedConv<T>&);                 \
  template void conv2d_nhwc_fwd_prepared<T>(const ConvShape&, const T*, const PreparedConv<T>&, const T*, const T*, \
                                            bool, T*);                                                          \
  template void conv2d_nhwc_bwd_data<T>(const ConvShape&, const T*, const T*, T*); \
  template void conv2d_nhwc_bwd_filter<T>(const ConvShape&, const T*, const T*, T*); \
  template bool conv2d_nhwc_winograd<T>(const ConvShape&, ConvPass);                \
  template void nchw_to_nhwc<T>(int, int, int, const T*, T*);                      \
  template void nhwc_to_nchw<T>(int, int, int, const T*, T*);
VB_INSTANTIATE(float)
VB_INSTANTIATE(double)
#undef VB_INSTANTIATE

}  // namespace vb::cpu
