#include "data/jpeg.h"

#include <turbojpeg.h>

#include <algorithm>
#include <cstdio>
#include <memory>

#include "engine/file_io.h"
#include "kernels/check.h"

namespace vb::data {

BadImagePolicy parse_bad_image_policy(const std::string& s) {
  if (s == "skip") return BadImagePolicy::Skip;
  if (s == "fail") return BadImagePolicy::Fail;
  fail("unknown bad-image policy '", s, "' (expected skip or fail)");
}
const char* bad_image_policy_name(BadImagePolicy p) { return p == BadImagePolicy::Skip ? "skip" : "fail"; }

namespace {

struct TjHandle {
  tjhandle h = nullptr;
  bool compress;
  explicit TjHandle(bool c) : compress(c) { init(); }
  ~TjHandle() { tjDestroy(h); }
  void init() {
    h = compress ? tjInitCompress() : tjInitDecompress();
    if (!h) fail("TurboJPEG: cannot create a ", compress ? "compressor" : "decompressor", ": ", tjGetErrorStr2(nullptr));
  }
  // After a failed call a decompressor can be left mid-stream, and the next image it is given fails too
  // ("tjDecompress2(): Invalid argument"): a fresh handle after every error.
  void reset() {
    tjDestroy(h);
    init();
  }
};
// One handle per thread: TurboJPEG handles are not thread-safe, and creating one per image costs.
TjHandle& decompressor_handle() {
  thread_local TjHandle t(false);
  return t;
}
tjhandle decompressor() { return decompressor_handle().h; }
// Throws "<name>: <what>: <TurboJPEG's message>" and leaves this thread's decompressor usable.
[[noreturn]] void fail_decode(const std::string& name, const char* what) {
  std::string msg = tjGetErrorStr2(decompressor());
  decompressor_handle().reset();
  fail(name, ": ", what, ": ", msg);
}
tjhandle compressor() {
  thread_local TjHandle t(true);
  return t.h;
}

// Pillow's cmyk2rgb on Adobe-inverted samples (Pillow reads them as "CMYK;I", i.e. inverts first):
// with k' = 255 - k, out = k' - round(c * k' / 255), computed as Pillow's MULDIV255.
inline uint8_t cmyk_channel(int inv_c, int inv_k) {
  int c = 255 - inv_c, nk = inv_k;
  int tmp = c * nk + 128;
  int prod = ((tmp >> 8) + tmp) >> 8;
  int v = nk - prod;
  return uint8_t(v < 0 ? 0 : v > 255 ? 255 : v);
}

}  // namespace

std::vector<uint8_t> read_file_bytes(const std::string& path) {
  return read_whole_file<std::vector<uint8_t>>(path, kMaxJpegFileBytes);
}

void check_jpeg_dimensions(int w, int h, const std::string& name) {
  if (w <= 0 || h <= 0) fail(escape(name), ": JPEG header declares an empty frame (", w, "x", h, ")");
  if (w > kMaxJpegSide || h > kMaxJpegSide)
    fail(escape(name), ": frame of ", w, "x", h, " is too large (the limit is ", kMaxJpegSide, " pixels per side)");
  if (int64_t(w) * h > kMaxJpegPixels)
    fail(escape(name), ": frame of ", w, "x", h, " is too large (", int64_t(w) * h, " pixels; the limit is ",
         kMaxJpegPixels, ")");
  const int lo = std::min(w, h), hi = std::max(w, h);
  if (int64_t(hi) > int64_t(kMaxJpegAspect) * lo)
    fail(escape(name), ": frame of ", w, "x", h, " is too elongated (the long side may be at most ", kMaxJpegAspect,
         " times the short one; no training crop fits such a frame)");
}

namespace {
// The header of a file that starts as a JPEG, its dimensions checked; leaves the subsampling and colour space.
void header(const std::vector<uint8_t>& bytes, const std::string& name, int& w, int& h, int& sub, int& cs) {
  if (bytes.empty()) fail(escape(name), ": empty file");
  if (bytes.size() < 3 || bytes[0] != 0xFF || bytes[1] != 0xD8)
    fail(escape(name), ": not a JPEG file (no SOI marker; first bytes ", int(bytes[0]), " ",
         bytes.size() > 1 ? int(bytes[1]) : -1, ")");
  if (tjDecompressHeader3(decompressor(), bytes.data(), (unsigned long)bytes.size(), &w, &h, &sub, &cs) != 0)
    fail_decode(escape(name), "bad JPEG header");
  check_jpeg_dimensions(w, h, name);
}
}  // namespace

JpegHeader read_jpeg_header(const std::vector<uint8_t>& bytes, const std::string& name) {
  int w = 0, h = 0, sub = 0, cs = 0;
  header(bytes, name, w, h, sub, cs);
  return {w, h};
}

Image decode_jpeg(const std::vector<uint8_t>& bytes, const std::string& name, int min_width, int min_height) {
  int w = 0, h = 0, sub = 0, cs = 0;
  header(bytes, name, w, h, sub, cs);  // the limits hold before a pixel is allocated
  tjhandle d = decompressor();
  int sw = w, sh = h;
  if (min_width > 0 || min_height > 0) {
    int n = 0;
    tjscalingfactor* f = tjGetScalingFactors(&n);
    for (int i = 0; i < n; ++i) {
      if (f[i].num > f[i].denom) continue;  // enlarging factors are never wanted
      int tw = TJSCALED(w, f[i]), th = TJSCALED(h, f[i]);
      if (tw >= min_width && th >= min_height && int64_t(tw) * th < int64_t(sw) * sh) sw = tw, sh = th;
    }
  }
  const bool cmyk = cs == TJCS_CMYK || cs == TJCS_YCCK;
  std::vector<uint8_t> tmp;
  Image img(sw, sh);
  // TJFLAG_STOPONWARNING: a truncated or corrupt stream stops with an error instead of grey filling.
  int flags = TJFLAG_ACCURATEDCT | TJFLAG_STOPONWARNING;
  int rc;
  if (cmyk) {
    tmp.resize(size_t(sw) * sh * 4);
    rc = tjDecompress2(d, bytes.data(), (unsigned long)bytes.size(), tmp.data(), sw, 0, sh, TJPF_CMYK, flags);
  } else {
    rc = tjDecompress2(d, bytes.data(), (unsigned long)bytes.size(), img.pixels.data(), sw, 0, sh, TJPF_RGB, flags);
  }
  if (rc != 0) fail_decode(escape(name), "JPEG decode failed");
  if (cmyk) {
    size_t n = size_t(sw) * sh;
    for (size_t i = 0; i < n; ++i) {
      const uint8_t* p = &tmp[i * 4];
      uint8_t* o = &img.pixels[i * 3];
      o[0] = cmyk_channel(p[0], p[3]);
      o[1] = cmyk_channel(p[1], p[3]);
      o[2] = cmyk_channel(p[2], p[3]);
    }
  }
  return img;
}

Image decode_jpeg_file(const std::string& path, int min_width, int min_height) {
  return decode_jpeg(read_file_bytes(path), path, min_width, min_height);
}

namespace {
std::vector<uint8_t> compress(const uint8_t* src, int w, int h, int pf, int sub, int quality) {
  VB_CHECK(w > 0 && h > 0, "cannot encode an empty image");
  tjhandle c = compressor();
  unsigned char* out = nullptr;
  unsigned long n = 0;
  if (tjCompress2(c, src, w, 0, h, pf, &out, &n, sub, quality, TJFLAG_ACCURATEDCT) != 0) {
    std::string msg = tjGetErrorStr2(c);
    tjFree(out);
    fail("JPEG encode of a ", w, "x", h, " image failed: ", msg);
  }
  std::vector<uint8_t> r(out, out + n);
  tjFree(out);
  return r;
}
}  // namespace

std::vector<uint8_t> encode_jpeg(const Image& img, int quality) {
  return compress(img.pixels.data(), img.width, img.height, TJPF_RGB, TJSAMP_420, quality);
}
std::vector<uint8_t> encode_jpeg_cmyk(const uint8_t* cmyk, int width, int height, int quality) {
  return compress(cmyk, width, height, TJPF_CMYK, TJSAMP_444, quality);
}
std::vector<uint8_t> encode_jpeg_gray(const uint8_t* gray, int width, int height, int quality) {
  return compress(gray, width, height, TJPF_GRAY, TJSAMP_GRAY, quality);
}

}  // namespace vb::data
