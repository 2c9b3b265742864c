// GPU image transforms (see transforms.cuh). CPU twins: vb::data::train_random_part and
// vb::data::to_normalized_chw (data/transforms.cpp), whose arithmetic is mirrored step by step:
// - Pillow's antialiased bilinear resample: double weights normalised to sum 1, then 22-bit fixed point;
//   horizontal pass rounded to 8 bits before the vertical pass. Here each output pixel recomputes the taps
//   it needs (no intermediate image): the same integers, hence the same bytes. Double arithmetic uses the
//   _rn intrinsics so that nvcc cannot fuse it into multiply-adds that Pillow never does.
// - Rotation: 16.16 fixed-point coordinates; Pillow steps by adding the coefficients, which equals the
//   closed form a2 + y*a1 + x*a0 exactly (integer arithmetic).
// - Normalisation: float32 (u / 255 - mean) / std with IEEE division, as torchvision.
// The per-pixel code is __host__ __device__: augment_frames_host runs it on the CPU, so that the arithmetic is
// checked against data/transforms on machines without a GPU too.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "kernels/check.h"
#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/nhwc_vec.cuh"
#include "kernels/cuda/transforms.cuh"
#include "kernels/normalize.h"

namespace vb::cuda {
namespace {

constexpr int kPrecisionBits = 22;  // Pillow's PRECISION_BITS for 8-bit images
constexpr int kMaxTaps = 16;        // taps per axis: enough for a downscale of up to 7x
constexpr int kMaxScale = 7;

// One correctly rounded operation each, never fused: the _rn intrinsics on the device, a volatile result on
// the host (where the same code runs for the no-GPU check of the arithmetic).
__host__ __device__ __forceinline__ double d_add(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  volatile double r = a + b;
  return r;
#endif
}
__host__ __device__ __forceinline__ double d_sub(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  volatile double r = a - b;
  return r;
#endif
}
__host__ __device__ __forceinline__ double d_mul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  volatile double r = a * b;
  return r;
#endif
}
__host__ __device__ __forceinline__ double d_div(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  volatile double r = a / b;
  return r;
#endif
}
__host__ __device__ __forceinline__ float f_sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  volatile float r = a - b;
  return r;
#endif
}
__host__ __device__ __forceinline__ float f_div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  volatile float r = a / b;
  return r;
#endif
}

// The constants of kernels/normalize.h (which device code cannot read), checked equal at compile time.
static_assert(kImageNetMean[0] == 0.485f && kImageNetMean[1] == 0.456f && kImageNetMean[2] == 0.406f &&
                  kImageNetStd[0] == 0.229f && kImageNetStd[1] == 0.224f && kImageNetStd[2] == 0.225f,
              "normalize_u8's constants must be kernels/normalize.h's");
__host__ __device__ __forceinline__ float normalize_u8(int u, int c) {
  const float mean = c == 0 ? 0.485f : (c == 1 ? 0.456f : 0.406f);
  const float std = c == 0 ? 0.229f : (c == 1 ? 0.224f : 0.225f);
  return f_div(f_sub(f_div(float(u), 255.0f), mean), std);
}

__host__ __device__ __forceinline__ int clip8(int v) {
  v >>= kPrecisionBits;
  return v < 0 ? 0 : (v > 255 ? 255 : v);
}

// Pillow's precompute_coeffs for output index i of an axis in_size -> out_size: first tap and the fixed-point
// weights k[0..count). Returns count.
__host__ __device__ int axis_taps(int in_size, int out_size, int i, int* first, int* k) {
  const double scale = d_div(double(in_size), double(out_size));
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = filterscale;  // bilinear support 1
  const double center = d_mul(double(i) + 0.5, scale);
  const double ss = d_div(1.0, filterscale);
  int xmin = int(d_add(d_sub(center, support), 0.5));
  if (xmin < 0) xmin = 0;
  int xmax = int(d_add(d_add(center, support), 0.5));
  if (xmax > in_size) xmax = in_size;
  xmax -= xmin;
  if (xmax > kMaxTaps) xmax = kMaxTaps;  // unreachable: make_aug_sample bounds the scale
  double w[kMaxTaps];
  double ww = 0.0;
  for (int x = 0; x < xmax; ++x) {
    double t = d_mul(d_add(d_sub(double(x + xmin), center), 0.5), ss);
    if (t < 0.0) t = -t;
    const double v = t < 1.0 ? d_sub(1.0, t) : 0.0;
    w[x] = v;
    ww = d_add(ww, v);
  }
  for (int x = 0; x < xmax; ++x) {
    const double v = ww != 0.0 ? d_div(w[x], ww) : w[x];
    const double scaled = d_mul(v, double(1 << kPrecisionBits));
    k[x] = v < 0 ? int(d_add(-0.5, scaled)) : int(d_add(0.5, scaled));
  }
  *first = xmin;
  return xmax;
}

// The horizontal pass's value at box row r, channel c (8 bits, as Pillow's intermediate image).
__host__ __device__ __forceinline__ int hval(const uint8_t* img, size_t stride, const AugSample& a, bool need_h,
                                             int xin, int hfirst, const int* hk, int hcount, int r, int c) {
  const uint8_t* row = img + size_t(a.top + r) * stride + size_t(a.left) * 3;
  if (!need_h) return row[size_t(xin) * 3 + c];
  int s = 1 << (kPrecisionBits - 1);
  for (int t = 0; t < hcount; ++t) s += int(row[size_t(hfirst + t) * 3 + c]) * hk[t];
  return clip8(s);
}

// Output pixel (x, y) of sample a: rotation source, then the resized crop's value there, normalised.
__host__ __device__ void augment_pixel(const uint8_t* frames, const AugSample& a, int size, int x, int y,
                                       float* o /* channel c at o[c * plane] */, size_t plane) {
  const int xin = (a.r2 + y * a.r1 + x * a.r0) >> 16;
  const int yin = (a.r5 + y * a.r4 + x * a.r3) >> 16;
  int rgb[3] = {0, 0, 0};  // black fill outside the rotated image
  if (xin >= 0 && xin < size && yin >= 0 && yin < size) {
    const uint8_t* img = frames + a.src_offset;
    const size_t stride = size_t(a.src_w) * 3;
    const bool need_h = size != a.width, need_v = size != a.height;
    int hfirst = 0, hk[kMaxTaps], hcount = 0;
    if (need_h) hcount = axis_taps(a.width, size, xin, &hfirst, hk);
    if (!need_v) {
      for (int c = 0; c < 3; ++c) rgb[c] = hval(img, stride, a, need_h, xin, hfirst, hk, hcount, yin, c);
    } else {
      int vfirst = 0, vk[kMaxTaps];
      const int vcount = axis_taps(a.height, size, yin, &vfirst, vk);
      for (int c = 0; c < 3; ++c) {
        int s = 1 << (kPrecisionBits - 1);
        for (int t = 0; t < vcount; ++t) s += hval(img, stride, a, need_h, xin, hfirst, hk, hcount, vfirst + t, c) * vk[t];
        rgb[c] = clip8(s);
      }
    }
  }
  for (int c = 0; c < 3; ++c) o[size_t(c) * plane] = normalize_u8(rgb[c], c);
}

// One output pixel per thread; blockIdx.y is the sample.
__global__ void augment_kernel(int size, const uint8_t* __restrict__ frames, const AugSample* __restrict__ samples,
                               float* __restrict__ out) {
  const int b = blockIdx.y;
  const int pix = blockIdx.x * blockDim.x + threadIdx.x;
  if (pix >= size * size) return;
  const size_t plane = size_t(size) * size;
  augment_pixel(frames, samples[b], size, pix % size, pix / size, out + size_t(b) * 3 * plane + pix, plane);
}

__global__ void normalize_kernel(int64_t pixels_per_image, int64_t total, const uint8_t* __restrict__ src,
                                 float* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / pixels_per_image, p = i - n * pixels_per_image;
    const uint8_t* s = src + i * 3;
    float* o = out + n * 3 * pixels_per_image + p;
    for (int c = 0; c < 3; ++c) o[c * pixels_per_image] = normalize_u8(s[c], c);
  }
}

// The same values channels-last: out (N, H, W, 3), the pixels' own order (one pixel per thread); O = float, or
// vb::bf16 (rounded to nearest even by store_vec).
template <class O>
__global__ void normalize_nhwc_kernel(int64_t total, const uint8_t* __restrict__ src, O* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t* s = src + i * 3;
    float v[3];
    for (int c = 0; c < 3; ++c) v[c] = normalize_u8(s[c], c);
    detail::store_vec<3>(out + i * 3, v);
  }
}

// Python's round(x, 15), as Pillow rounds its rotation matrix (glibc's printf rounds correctly).
double round15(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.15f", x);
  return std::strtod(buf, nullptr);
}

int fix16(double v) {
  volatile double t = v * 65536.0;  // volatile: no multiply-add contraction, as in Pillow's build
  const double u = t + 0.5;
  return u < 0.0 ? int(std::floor(u)) : int(u);
}

}  // namespace

AugSample make_aug_sample(int64_t src_offset, int src_w, int src_h, int top, int left, int height, int width,
                          double angle_degrees, int size) {
  VB_CHECK(size > 0 && size < 16384, "augment: output size ", size);
  VB_CHECK(top >= 0 && left >= 0 && height > 0 && width > 0 && top + height <= src_h && left + width <= src_w,
           "augment: crop box (top ", top, ", left ", left, ", h ", height, ", w ", width, ") outside a ", src_w,
           "x", src_h, " frame");
  VB_CHECK(width <= kMaxScale * size && height <= kMaxScale * size, "augment: crop ", width, "x", height,
           " is more than ", kMaxScale, "x the output size ", size);
  AugSample a;
  a.src_offset = src_offset;
  a.src_w = src_w;
  a.src_h = src_h;
  a.top = top;
  a.left = left;
  a.height = height;
  a.width = width;
  // Pillow's rotate(angle) of the size x size crop (data/transforms.cpp, rotation_coeffs).
  double angle = std::fmod(angle_degrees, 360.0);
  if (angle < 0) angle += 360.0;
  const double cx = size / 2.0, cy = size / 2.0;
  const double rad = -(angle * (M_PI / 180.0));
  const double m0 = round15(std::cos(rad)), m1 = round15(std::sin(rad)), m3 = round15(-std::sin(rad)),
               m4 = round15(std::cos(rad));
  volatile double p0 = m0 * -cx, p1 = m1 * -cy, p3 = m3 * -cx, p4 = m4 * -cy;
  const double m2 = (p0 + p1 + 0.0) + cx;
  const double m5 = (p3 + p4 + 0.0) + cy;
  a.r0 = fix16(m0);
  a.r1 = fix16(m1);
  a.r3 = fix16(m3);
  a.r4 = fix16(m4);
  volatile double h0 = m0 * 0.5, h1 = m1 * 0.5, h3 = m3 * 0.5, h4 = m4 * 0.5;
  a.r2 = fix16(m2 + h0 + h1);
  a.r5 = fix16(m5 + h3 + h4);
  return a;
}

void augment_frames(cudaStream_t st, int N, int size, const uint8_t* frames, const AugSample* samples, float* out) {
  if (N <= 0) return;
  VB_CHECK(N <= 65535, "augment: batch ", N, " above 65535");
  const int threads = 256;
  const dim3 grid(unsigned((size * size + threads - 1) / threads), unsigned(N));
  augment_kernel<<<grid, threads, 0, st>>>(size, frames, samples, out);
  VB_CUDA_LAUNCH_CHECK();
}

void augment_frames_host(int N, int size, const uint8_t* frames, const AugSample* samples, float* out) {
  const size_t plane = size_t(size) * size;
  for (int b = 0; b < N; ++b)
    for (int y = 0; y < size; ++y)
      for (int x = 0; x < size; ++x)
        augment_pixel(frames, samples[b], size, x, y, out + size_t(b) * 3 * plane + size_t(y) * size + x, plane);
}

void normalize_frames(cudaStream_t st, int N, int H, int W, const uint8_t* src, float* out) {
  const int64_t ppi = int64_t(H) * W, total = ppi * N;
  if (total <= 0) return;
  normalize_kernel<<<detail::grid_for(total, 256), 256, 0, st>>>(ppi, total, src, out);
  VB_CUDA_LAUNCH_CHECK();
}

namespace {
template <class O>
void launch_normalize_nhwc(cudaStream_t st, int N, int H, int W, const uint8_t* src, O* out) {
  const int64_t total = int64_t(H) * W * N;
  if (total <= 0) return;
  normalize_nhwc_kernel<O><<<detail::grid_for(total, 256), 256, 0, st>>>(total, src, out);
  VB_CUDA_LAUNCH_CHECK();
}
}  // namespace

void normalize_frames_nhwc(cudaStream_t st, int N, int H, int W, const uint8_t* src, float* out) {
  launch_normalize_nhwc(st, N, H, W, src, out);
}
void normalize_frames_nhwc_bf16(cudaStream_t st, int N, int H, int W, const uint8_t* src, vb::bf16* out) {
  launch_normalize_nhwc(st, N, H, W, src, out);
}

}  // namespace vb::cuda
