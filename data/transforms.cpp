// Bit-exact Pillow/torchvision arithmetic: the double-precision steps must not be contracted into fused
// multiply-adds, which Pillow's x86-64 builds never use. The file is compiled with -ffp-contract=off
// (CMakeLists.txt); a GCC optimize pragma would do that too but also drops the target's vector ISA for the file.
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
#include "data/transforms.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "kernels/check.h"

namespace vb::data {

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's PRECISION_BITS for 8-bit images

std::atomic<int> g_simd_limit{2};

// Per output pixel of one axis: first tap, tap count, and ksize fixed-point weights.
struct AxisCoeffs {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<int32_t> k;  // (out, ksize)
};

AxisCoeffs precompute_coeffs(int in_size, int out_size) {
  AxisCoeffs c;
  double scale = double(in_size) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = 1.0 * filterscale;  // bilinear support 1
  c.ksize = int(std::ceil(support)) * 2 + 1;
  c.first.resize(size_t(out_size));
  c.count.resize(size_t(out_size));
  c.k.assign(size_t(out_size) * size_t(c.ksize), 0);
  std::vector<double> w(size_t(c.ksize));
  for (int xx = 0; xx < out_size; ++xx) {
    double center = 0.0 + (xx + 0.5) * scale;
    double ww = 0.0;
    double ss = 1.0 / filterscale;
    int xmin = int(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = int(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      double t = ((x + xmin) - center + 0.5) * ss;
      if (t < 0.0) t = -t;
      double v = t < 1.0 ? 1.0 - t : 0.0;
      w[size_t(x)] = v;
      ww += v;
    }
    int32_t* k = &c.k[size_t(xx) * size_t(c.ksize)];
    for (int x = 0; x < xmax; ++x) {
      double v = ww != 0.0 ? w[size_t(x)] / ww : w[size_t(x)];
      k[x] = v < 0 ? int32_t(-0.5 + v * (1 << kPrecisionBits)) : int32_t(0.5 + v * (1 << kPrecisionBits));
    }
    c.first[size_t(xx)] = xmin;
    c.count[size_t(xx)] = xmax;
  }
  return c;
}

inline uint8_t clip8(int32_t v) {
  v >>= kPrecisionBits;
  return uint8_t(v < 0 ? 0 : v > 255 ? 255 : v);
}

// One row of the horizontal pass, plain loops: Pillow's ImagingResampleHorizontal_8bpc.
void horizontal_row_scalar(const uint8_t* in, const AxisCoeffs& ch, int x_begin, int x_end, uint8_t* out) {
  for (int xx = x_begin; xx < x_end; ++xx) {
    const int32_t* k = &ch.k[size_t(xx) * size_t(ch.ksize)];
    const uint8_t* p = in + size_t(ch.first[size_t(xx)]) * 3;
    int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
    for (int x = 0, n = ch.count[size_t(xx)]; x < n; ++x) {
      s0 += p[3 * x + 0] * k[x];
      s1 += p[3 * x + 1] * k[x];
      s2 += p[3 * x + 2] * k[x];
    }
    out[3 * xx + 0] = clip8(s0);
    out[3 * xx + 1] = clip8(s1);
    out[3 * xx + 2] = clip8(s2);
  }
}

#ifdef __AVX2__
// The horizontal pass with AVX2, bit-exact: each 22-bit weight k is split as k = kh * 2^11 + kl (both fit
// int16), so sum(v * k) = 2^11 * sum(v * kh) + sum(v * kl) is computed exactly with 16-bit multiply-adds
// (vpmaddwd) over pairs of taps. A 256-bit register holds two output pixels (one per 128-bit lane); each lane
// holds one pair of taps as int16 (R0 R1 G0 G1 B0 B1 0 0). Taps are padded to an even count K (the largest
// tap count, rounded up) with zero weights; the loads read 8 bytes per pair, i.e. up to 3 * (first + K) + 2 bytes from the row start
// (callers check that this stays inside the image).
struct Lanes16 {
  alignas(32) int16_t v[16];
};
struct SimdCoeffs {
  int pairs = 0;                  // K / 2
  std::vector<Lanes16> hi, lo;    // (ceil(out_w / 2), pairs)
  std::vector<int> first;         // (out_w)
};

SimdCoeffs simd_coeffs(const AxisCoeffs& c, int out_w) {
  SimdCoeffs s;
  int max_count = 1;
  for (int n : c.count) max_count = std::max(max_count, n);
  s.pairs = (max_count + 1) / 2;
  const int groups = (out_w + 1) / 2;
  s.hi.resize(size_t(groups) * size_t(s.pairs));
  s.lo.resize(size_t(groups) * size_t(s.pairs));
  s.first = c.first;
  for (int g = 0; g < groups; ++g)
    for (int j = 0; j < s.pairs; ++j) {
      int16_t* h = s.hi[size_t(g) * size_t(s.pairs) + size_t(j)].v;
      int16_t* l = s.lo[size_t(g) * size_t(s.pairs) + size_t(j)].v;
      std::fill(h, h + 16, int16_t(0));
      std::fill(l, l + 16, int16_t(0));
      for (int lane = 0; lane < 2; ++lane) {
        const int xx = std::min(2 * g + lane, out_w - 1);
        const int32_t* k = &c.k[size_t(xx) * size_t(c.ksize)];
        for (int t = 0; t < 2; ++t) {
          const int tap = 2 * j + t;
          const int32_t w = tap < c.count[size_t(xx)] ? k[tap] : 0;
          for (int ch = 0; ch < 3; ++ch) {
            h[lane * 8 + ch * 2 + t] = int16_t(w >> 11);
            l[lane * 8 + ch * 2 + t] = int16_t(w & 2047);
          }
        }
      }
    }
  return s;
}

// Two output pixels (group g: outputs 2g, 2g + 1), before rounding: lane 0 and lane 1 hold R G B 0 as int32.
inline __m256i horizontal_pair(const uint8_t* in, const SimdCoeffs& c, int g, int out_w, __m256i shuf) {
  const int xa = 2 * g, xb = std::min(xa + 1, out_w - 1);
  const uint8_t* pa = in + size_t(c.first[size_t(xa)]) * 3;
  const uint8_t* pb = in + size_t(c.first[size_t(xb)]) * 3;
  const Lanes16* kh = &c.hi[size_t(g) * size_t(c.pairs)];
  const Lanes16* kl = &c.lo[size_t(g) * size_t(c.pairs)];
  __m256i acc_h = _mm256_setzero_si256(), acc_l = _mm256_setzero_si256();
  for (int j = 0; j < c.pairs; ++j) {
    const __m128i a = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(pa + 6 * j));
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(pb + 6 * j));
    const __m256i v = _mm256_shuffle_epi8(_mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1), shuf);
    acc_h = _mm256_add_epi32(acc_h, _mm256_madd_epi16(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(kh[j].v))));
    acc_l = _mm256_add_epi32(acc_l, _mm256_madd_epi16(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(kl[j].v))));
  }
  const __m256i acc = _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(acc_h, 11), acc_l),
                                       _mm256_set1_epi32(1 << (kPrecisionBits - 1)));
  return _mm256_srai_epi32(acc, kPrecisionBits);
}

// Writes 16 bytes at out + 3 * (first output): the caller's buffer has 4 bytes of slack per row beyond the
// last pixel written this way, and rows are written in increasing order, so the spill is overwritten.
void horizontal_row_avx2(const uint8_t* in, const SimdCoeffs& c, int out_w, uint8_t* out) {
  const __m256i shuf = _mm256_setr_epi8(0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,  //
                                        0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1);
  const __m128i compress = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
  int xa = 0;
  for (; xa + 4 <= out_w; xa += 4) {
    const __m256i r1 = horizontal_pair(in, c, xa / 2, out_w, shuf);      // outputs xa, xa + 1
    const __m256i r2 = horizontal_pair(in, c, xa / 2 + 1, out_w, shuf);  // outputs xa + 2, xa + 3
    // Saturating packs clamp to 0..255 exactly as Pillow's clip8.
    const __m256i p8 = _mm256_packus_epi16(_mm256_packs_epi32(r1, r2), _mm256_setzero_si256());
    const __m128i abcd = _mm_unpacklo_epi32(_mm256_castsi256_si128(p8), _mm256_extracti128_si256(p8, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + size_t(xa) * 3), _mm_shuffle_epi8(abcd, compress));
  }
  for (; xa < out_w; xa += 2) {
    const __m256i r = horizontal_pair(in, c, xa / 2, out_w, shuf);
    const __m128i w8 = _mm_packus_epi16(_mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)),
                                        _mm_setzero_si128());
    alignas(16) uint8_t px[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(px), w8);
    std::memcpy(out + size_t(xa) * 3, px, 3);
    if (xa + 1 < out_w) std::memcpy(out + size_t(xa + 1) * 3, px + 4, 3);
  }
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define VB_AVX512_RESAMPLE 1
// The horizontal pass with AVX-512 (VBMI byte permutes, VNNI dot products), same arithmetic as the AVX2
// path: four consecutive outputs per 512-bit register (one per 128-bit lane, laid out as there), all their
// taps gathered with one byte permute from a single 64-byte window starting at the group's first tap.
// Used when every group's taps fit the window (true for the usual reductions up to about 3x) and the CPU
// has the instructions; otherwise the AVX2 path runs.
struct Lanes64 {
  alignas(64) uint8_t b[64];
};
struct Lanes32x16 {
  alignas(64) int16_t v[32];
};
struct Avx512Coeffs {
  int pairs = 0, groups = 0;       // groups of four outputs
  std::vector<int> base;           // (groups) first input pixel of each group's window
  std::vector<Lanes64> idx;        // (groups, pairs) byte permutes
  std::vector<Lanes32x16> hi, lo;  // (groups, pairs)
};

bool avx512_coeffs(const AxisCoeffs& c, int out_w, Avx512Coeffs& s) {
  int max_count = 1;
  for (int n : c.count) max_count = std::max(max_count, n);
  s.pairs = (max_count + 1) / 2;
  s.groups = out_w / 4;
  const size_t n = size_t(s.groups) * size_t(s.pairs);
  s.base.resize(size_t(s.groups));
  s.idx.resize(n);
  s.hi.resize(n);
  s.lo.resize(n);
  for (int g = 0; g < s.groups; ++g) {
    const int base = c.first[size_t(4 * g)];
    s.base[size_t(g)] = base;
    for (int j = 0; j < s.pairs; ++j) {
      const size_t e = size_t(g) * size_t(s.pairs) + size_t(j);
      std::fill(std::begin(s.idx[e].b), std::end(s.idx[e].b), uint8_t(0));
      std::fill(std::begin(s.hi[e].v), std::end(s.hi[e].v), int16_t(0));
      std::fill(std::begin(s.lo[e].v), std::end(s.lo[e].v), int16_t(0));
      for (int lane = 0; lane < 4; ++lane) {
        const int xx = 4 * g + lane;
        const int32_t* k = &c.k[size_t(xx) * size_t(c.ksize)];
        for (int t = 0; t < 2; ++t) {
          const int tap = 2 * j + t;
          if (tap >= c.count[size_t(xx)]) continue;
          const int off = (c.first[size_t(xx)] - base + tap) * 3;
          if (off + 2 >= 64) return false;
          for (int ch = 0; ch < 3; ++ch) {
            s.idx[e].b[lane * 16 + 2 * (2 * ch + t)] = uint8_t(off + ch);
            s.hi[e].v[lane * 8 + 2 * ch + t] = int16_t(k[tap] >> 11);
            s.lo[e].v[lane * 8 + 2 * ch + t] = int16_t(k[tap] & 2047);
          }
        }
      }
    }
  }
  return true;
}

// GCC 12 reports its own intrinsics' deliberately undefined registers as maybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vnni"))) void horizontal_row_avx512(
    const uint8_t* in, const Avx512Coeffs& c, const AxisCoeffs& ch, int out_w, uint8_t* out) {
  const __mmask64 low_bytes = 0x0555055505550555ull;  // the low byte of int16 slots 0..5 of each lane
  const __m512i half = _mm512_set1_epi32(1 << (kPrecisionBits - 1));
  const __m128i compress = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
  for (int g = 0; g < c.groups; ++g) {
    const __m512i win = _mm512_loadu_si512(in + size_t(c.base[size_t(g)]) * 3);
    const size_t e0 = size_t(g) * size_t(c.pairs);
    __m512i acc_h = _mm512_setzero_si512(), acc_l = _mm512_setzero_si512();
    for (int j = 0; j < c.pairs; ++j) {
      const __m512i v = _mm512_maskz_permutexvar_epi8(low_bytes, _mm512_load_si512(c.idx[e0 + size_t(j)].b), win);
      acc_h = _mm512_dpwssd_epi32(acc_h, v, _mm512_load_si512(c.hi[e0 + size_t(j)].v));
      acc_l = _mm512_dpwssd_epi32(acc_l, v, _mm512_load_si512(c.lo[e0 + size_t(j)].v));
    }
    __m512i acc = _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(acc_h, 11), acc_l), half);
    acc = _mm512_srai_epi32(acc, kPrecisionBits);
    // Non-negative sums: unsigned saturation to 0..255 is Pillow's clip8.
    const __m128i px = _mm512_cvtusepi32_epi8(acc);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + size_t(4 * g) * 3), _mm_shuffle_epi8(px, compress));
  }
  horizontal_row_scalar(in, ch, 4 * c.groups, out_w, out);
}
#pragma GCC diagnostic pop

bool cpu_has_avx512_resample() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni");
  return ok;
}
#endif

// The outputs [begin, begin + n) of an axis: each output's taps and weights do not depend on the others.
AxisCoeffs slice(const AxisCoeffs& c, int begin, int n) {
  AxisCoeffs s;
  s.ksize = c.ksize;
  s.first.assign(c.first.begin() + begin, c.first.begin() + begin + n);
  s.count.assign(c.count.begin() + begin, c.count.begin() + begin + n);
  s.k.assign(c.k.begin() + long(begin) * c.ksize, c.k.begin() + long(begin + n) * c.ksize);
  return s;
}

// Pillow's two-pass resample of the box of `src` to (out_w, out_h), into `dst`. With `window`, only that
// part of the output is computed (same values: the horizontal pass is per output column and the vertical
// per output row), and dst is (window.height, window.width, 3); otherwise dst is (out_h, out_w, 3).
void resample_box(const Image& src, const CropBox& box, int out_w, int out_h, uint8_t* dst, bool simd = true,
                  const CropBox* window = nullptr) {
  VB_CHECK(box.top >= 0 && box.left >= 0 && box.height > 0 && box.width > 0 &&
               box.top + box.height <= src.height && box.left + box.width <= src.width,
           "crop box (top ", box.top, ", left ", box.left, ", h ", box.height, ", w ", box.width,
           ") outside a ", src.width, "x", src.height, " image");
  VB_CHECK(out_w > 0 && out_h > 0, "resize to ", out_w, "x", out_h);
  const bool need_h = out_w != box.width, need_v = out_h != box.height;
  const int simd_limit = g_simd_limit.load(std::memory_order_relaxed);
  const CropBox win = window ? *window : CropBox{0, 0, out_h, out_w};
  VB_CHECK(win.top >= 0 && win.left >= 0 && win.height > 0 && win.width > 0 && win.top + win.height <= out_h &&
               win.left + win.width <= out_w,
           "output window outside a ", out_w, "x", out_h, " resize");
  const int full_w = out_w, full_h = out_h;
  out_w = win.width;
  out_h = win.height;
  // Identity axes keep Pillow's identity coefficients (first = output index), which map window rows too.
  AxisCoeffs cv = slice(precompute_coeffs(box.height, full_h), win.top, win.height);
  // Rows of the box the vertical pass reads.
  const int y_first = cv.first[0];
  const int y_last = cv.first[size_t(out_h) - 1] + cv.count[size_t(out_h) - 1];
  const size_t src_stride = size_t(src.width) * 3;

  // Horizontal pass into an 8-bit intermediate (rows y_first..y_last of the box), as Pillow's imTemp.
  std::vector<uint8_t> tmp;  // (y_last - y_first, out_w, 3)
  const uint8_t* rows;       // the vertical pass's input, row r = box row (y_first + r) when need_h
  size_t rows_stride;
  int row_offset;  // box row index of rows[0]
  if (need_h) {
    AxisCoeffs ch = slice(precompute_coeffs(box.width, full_w), win.left, win.width);
    const int nrows = y_last - y_first;
    tmp.resize(size_t(nrows) * size_t(out_w) * 3 + 16);  // + slack for the vectorised stores
#ifdef VB_AVX512_RESAMPLE
    Avx512Coeffs wc;
    size_t reach512 = 0;
    const bool use512 = simd && simd_limit >= 2 && cpu_has_avx512_resample() && avx512_coeffs(ch, out_w, wc);
    if (use512 && wc.groups > 0)
      reach512 = (size_t(box.left) + size_t(wc.base[size_t(wc.groups) - 1])) * 3 + 64;
#endif
#ifdef __AVX2__
    SimdCoeffs sc;
    // The farthest byte a vectorised row reads, from the row's start (see horizontal_row_avx2).
    size_t reach = 0;
    if (simd && simd_limit >= 1) {
      sc = simd_coeffs(ch, out_w);
      reach = (size_t(box.left) + size_t(ch.first[size_t(out_w) - 1]) + 2 * size_t(sc.pairs)) * 3 + 2;
    }
#endif
    for (int r = 0; r < nrows; ++r) {
      const size_t row_start = size_t(box.top + y_first + r) * src_stride;
      const uint8_t* in = src.pixels.data() + row_start + size_t(box.left) * 3;
      uint8_t* out = tmp.data() + size_t(r) * size_t(out_w) * 3;
#ifdef VB_AVX512_RESAMPLE
      if (use512 && row_start + reach512 <= src.pixels.size()) {
        horizontal_row_avx512(in, wc, ch, out_w, out);
        continue;
      }
#endif
#ifdef __AVX2__
      if (simd && simd_limit >= 1 && row_start + reach <= src.pixels.size()) {
        horizontal_row_avx2(in, sc, out_w, out);
        continue;
      }
#endif
      horizontal_row_scalar(in, ch, 0, out_w, out);
    }
    rows = tmp.data();
    rows_stride = size_t(out_w) * 3;
    row_offset = y_first;
  } else {
    rows = src.pixels.data() + size_t(box.top) * src_stride + size_t(box.left + win.left) * 3;
    rows_stride = src_stride;
    row_offset = 0;
  }

  const size_t n = size_t(out_w) * 3;
  if (!need_v) {
    for (int yy = 0; yy < out_h; ++yy)
      std::memcpy(dst + size_t(yy) * n, rows + size_t(cv.first[size_t(yy)] - row_offset) * rows_stride, n);
    return;
  }
  // Vertical pass: accumulate whole rows (contiguous, vectorisable).
  std::vector<int32_t> acc(n);
  for (int yy = 0; yy < out_h; ++yy) {
    const int32_t* k = &cv.k[size_t(yy) * size_t(cv.ksize)];
    std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
    const int ymin = cv.first[size_t(yy)] - row_offset;
    for (int y = 0, cnt = cv.count[size_t(yy)]; y < cnt; ++y) {
      const uint8_t* r = rows + size_t(ymin + y) * rows_stride;
      const int32_t ky = k[y];
      int32_t* a = acc.data();
      for (size_t i = 0; i < n; ++i) a[i] += int32_t(r[i]) * ky;
    }
    uint8_t* out = dst + size_t(yy) * n;
    for (size_t i = 0; i < n; ++i) out[i] = clip8(acc[i]);
  }
}

// Python's round(x, 15): the correctly rounded 15-decimal value (glibc's printf rounds exactly).
double round15(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.15f", x);
  return std::strtod(buf, nullptr);
}

// Pillow's 16.16 fixed-point affine coefficients for rotate(angle) of a (w, h) image.
struct FixedAffine {
  int a0, a1, a2, a3, a4, a5;
};

int fix16(double v) {
  double t = v * 65536.0 + 0.5;
  return t < 0.0 ? int(std::floor(t)) : int(t);
}

FixedAffine rotation_coeffs(int w, int h, double angle_degrees) {
  double angle = std::fmod(angle_degrees, 360.0);
  if (angle < 0) angle += 360.0;  // Python's % takes the divisor's sign
  const double cx = w / 2.0, cy = h / 2.0;
  const double rad = -(angle * (M_PI / 180.0));
  double m[6] = {round15(std::cos(rad)), round15(std::sin(rad)), 0.0, round15(-std::sin(rad)), round15(std::cos(rad)), 0.0};
  // Python: matrix[2], matrix[5] = transform(-cx, -cy); then += cx, cy. transform = a*x + b*y + c.
  double x = -cx, y = -cy;
  double t2 = m[0] * x + m[1] * y + m[2];
  double t5 = m[3] * x + m[4] * y + m[5];
  m[2] = t2 + cx;
  m[5] = t5 + cy;
  VB_CHECK(w < 16384 && h < 16384, "rotation of a ", w, "x", h, " image is outside Pillow's fixed-point range");
  FixedAffine f;
  f.a0 = fix16(m[0]);
  f.a1 = fix16(m[1]);
  f.a3 = fix16(m[3]);
  f.a4 = fix16(m[4]);
  f.a2 = fix16(m[2] + m[0] * 0.5 + m[1] * 0.5);
  f.a5 = fix16(m[5] + m[3] * 0.5 + m[4] * 0.5);
  return f;
}

// Calls put(x, y, src_pixel_or_null) for every output pixel of the rotation, in Pillow's stepping order.
template <class Put>
void rotate_walk(const Image& src, double angle_degrees, Put&& put) {
  const int w = src.width, h = src.height;
  // Locals, not src's members: a put that stores bytes (the uint8 output) may alias anything, which made the
  // compiler reload src's width and pixel pointer after every pixel (17% of the random part).
  const uint8_t* const base = src.pixels.data();
  const size_t stride = size_t(w) * 3;
  FixedAffine f = rotation_coeffs(w, h, angle_degrees);
  int a2 = f.a2, a5 = f.a5;
  for (int y = 0; y < h; ++y) {
    int xx = a2, yy = a5;
    for (int x = 0; x < w; ++x) {
      const int xin = xx >> 16, yin = yy >> 16;
      const uint8_t* p = (xin >= 0 && xin < w && yin >= 0 && yin < h) ? base + size_t(yin) * stride + size_t(xin) * 3 : nullptr;
      put(x, y, p);
      xx += f.a0;
      yy += f.a3;
    }
    a2 += f.a1;
    a5 += f.a4;
  }
}

// Python's round() for a non-negative half-integer-or-integer value: half to even.
int round_half_even(double x) { return int(std::nearbyint(x)); }

}  // namespace

Image resize_bilinear(const Image& src, int out_w, int out_h) {
  Image out(out_w, out_h);
  resample_box(src, CropBox{0, 0, src.height, src.width}, out_w, out_h, out.pixels.data());
  return out;
}

void set_resample_simd_limit(int level) { g_simd_limit.store(level); }

Image resized_crop_reference(const Image& src, const CropBox& box, int out_w, int out_h) {
  Image out(out_w, out_h);
  resample_box(src, box, out_w, out_h, out.pixels.data(), false);
  return out;
}

CropBox resize_shorter_size(int width, int height, int short_side) {
  VB_CHECK(width > 0 && height > 0 && short_side > 0, "resize of a ", width, "x", height, " image to ", short_side);
  const int short_ = std::min(width, height), long_ = std::max(width, height);
  const int new_long = int(double(int64_t(short_side) * long_) / short_);
  return width <= height ? CropBox{0, 0, new_long, short_side} : CropBox{0, 0, short_side, new_long};
}

Image resize_shorter(const Image& src, int short_side) {
  VB_CHECK(!src.empty(), "resize_shorter of an empty image");
  const CropBox s = resize_shorter_size(src.width, src.height, short_side);
  if (s.width == src.width && s.height == src.height) return src;
  return resize_bilinear(src, s.width, s.height);
}

Image train_resize_crop(const Image& decoded, ImageSize image_size, const CropBox& box) {
  VB_CHECK(!decoded.empty(), "train_resize_crop of an empty image");
  const CropBox s = resize_shorter_size(decoded.width, decoded.height, train_resize_side(image_size));
  Image out(box.width, box.height);
  resample_box(decoded, CropBox{0, 0, decoded.height, decoded.width}, s.width, s.height, out.pixels.data(), true, &box);
  return out;
}

Image crop(const Image& src, const CropBox& b) {
  VB_CHECK(b.top >= 0 && b.left >= 0 && b.height > 0 && b.width > 0 && b.top + b.height <= src.height &&
               b.left + b.width <= src.width,
           "crop box outside a ", src.width, "x", src.height, " image");
  Image out(b.width, b.height);
  for (int y = 0; y < b.height; ++y)
    std::memcpy(out.row(y), src.row(b.top + y) + size_t(b.left) * 3, size_t(b.width) * 3);
  return out;
}

Image center_crop(const Image& src, int size) {
  VB_CHECK(src.width >= size && src.height >= size, "center crop ", size, " of a ", src.width, "x", src.height, " image");
  CropBox b{round_half_even((src.height - size) / 2.0), round_half_even((src.width - size) / 2.0), size, size};
  return crop(src, b);
}

Image resized_crop(const Image& src, const CropBox& box, int size) {
  Image out(size, size);
  resample_box(src, box, size, size, out.pixels.data());
  return out;
}

Image rotate_nearest(const Image& src, double angle_degrees) {
  Image out(src.width, src.height);
  rotate_walk(src, angle_degrees, [&](int x, int y, const uint8_t* p) {
    uint8_t* o = out.row(y) + size_t(x) * 3;
    if (p) o[0] = p[0], o[1] = p[1], o[2] = p[2];
    else o[0] = o[1] = o[2] = 0;
  });
  return out;
}

void to_normalized_chw(const Image& src, float* out) {
  const NormTable& L = norm_table();
  const size_t hw = size_t(src.width) * size_t(src.height);
  const uint8_t* p = src.pixels.data();
  for (size_t i = 0; i < hw; ++i) {
    out[i] = L.v[0][p[3 * i + 0]];
    out[hw + i] = L.v[1][p[3 * i + 1]];
    out[2 * hw + i] = L.v[2][p[3 * i + 2]];
  }
}

CropBox center_crop_fallback(int width, int height) {
  const double min_ratio = 3.0 / 4.0, max_ratio = 4.0 / 3.0;
  double in_ratio = double(width) / double(height);
  int w, h;
  if (in_ratio < min_ratio) {
    w = width;
    h = round_half_even(w / min_ratio);
  } else if (in_ratio > max_ratio) {
    h = height;
    w = round_half_even(h * max_ratio);
  } else {
    w = width;
    h = height;
  }
  return CropBox{(height - h) / 2, (width - w) / 2, h, w};
}

CropBox random_resized_crop_params(int width, int height, CounterRng& rng) {
  const double area = double(width) * double(height);
  const double log_lo = std::log(3.0 / 4.0), log_hi = std::log(4.0 / 3.0);
  for (int attempt = 0; attempt < 10; ++attempt) {
    double target_area = area * rng.uniform(0.08, 1.0);
    double aspect = std::exp(rng.uniform(log_lo, log_hi));
    int w = round_half_even(std::sqrt(target_area * aspect));
    int h = round_half_even(std::sqrt(target_area / aspect));
    if (0 < w && w <= width && 0 < h && h <= height) {
      int top = int(rng.below(uint64_t(height - h + 1)));
      int left = int(rng.below(uint64_t(width - w + 1)));
      return CropBox{top, left, h, w};
    }
  }
  return center_crop_fallback(width, height);
}

TrainDraw draw_train_params(uint64_t seed, int64_t epoch, int64_t sample, int width, int height) {
  CounterRng rng(seed, RngStream::Augment, uint64_t(epoch), uint64_t(sample));
  TrainDraw d;
  d.box = random_resized_crop_params(width, height, rng);
  d.angle = rng.uniform(-5.0, 5.0);
  return d;
}

Image eval_crop(const Image& decoded, ImageSize image_size) {
  const ImageSize r = resize_size(image_size);
  // Only the central h x w of the R_h x R_w resize is computed (CenterCrop's offsets, as center_crop).
  const int off_y = round_half_even((r.h - image_size.h) / 2.0), off_x = round_half_even((r.w - image_size.w) / 2.0);
  VB_CHECK(r.h >= image_size.h && r.w >= image_size.w, "resize size ", r.str(), " below the crop ", image_size.str());
  const CropBox window{off_y, off_x, image_size.h, image_size.w};
  Image out(image_size.w, image_size.h);
  resample_box(decoded, CropBox{0, 0, decoded.height, decoded.width}, r.w, r.h, out.pixels.data(), true, &window);
  return out;
}

void eval_transform(const Image& decoded, ImageSize image_size, float* out) {
  to_normalized_chw(eval_crop(decoded, image_size), out);
}

Image train_resize(const Image& decoded, ImageSize image_size) {
  return resize_shorter(decoded, train_resize_side(image_size));
}

namespace {
// The random part's geometry, pixel by pixel: put(i, p) receives the output position y * w + x and the rotated
// source pixel (RGB), or nullptr where the rotation leaves black fill.
template <class Put>
void train_random_walk(const Image& resized, ImageSize image_size, const TrainDraw& draw, Put put) {
  const int H = image_size.h, W = image_size.w;
  thread_local Image cropped;
  if (cropped.width != W || cropped.height != H) cropped = Image(W, H);
  resample_box(resized, draw.box, W, H, cropped.pixels.data());
  const size_t row = size_t(W);
  rotate_walk(cropped, draw.angle, [row, &put](int x, int y, const uint8_t* p) { put(size_t(y) * row + size_t(x), p); });
}
}  // namespace

void train_random_part(const Image& resized, ImageSize image_size, const TrainDraw& draw, float* out) {
  const NormTable& L = norm_table();
  const size_t hw = size_t(image_size.h) * size_t(image_size.w);
  train_random_walk(resized, image_size, draw, [&](size_t i, const uint8_t* p) {
    out[i] = L.v[0][p ? p[0] : 0];
    out[hw + i] = L.v[1][p ? p[1] : 0];
    out[2 * hw + i] = L.v[2][p ? p[2] : 0];
  });
}

void train_random_part_u8(const Image& resized, ImageSize image_size, const TrainDraw& draw, uint8_t* out) {
  static constexpr uint8_t kBlack[3] = {0, 0, 0};
  // out by value: through a reference, every byte stored could change it (bytes alias anything).
  train_random_walk(resized, image_size, draw, [out](size_t i, const uint8_t* p) {
    std::memcpy(out + 3 * i, p ? p : kBlack, 3);
  });
}

}  // namespace vb::data
