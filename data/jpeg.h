// JPEG decoding and encoding with libjpeg-turbo's TurboJPEG API (thread-safe: one handle per thread).
//
// Decoding reproduces Pillow's `Image.open(path).convert("RGB")` on the same libjpeg-turbo: accurate
// integer IDCT (JDCT_ISLOW) and fancy (smooth) chroma upsampling, which are the library defaults Pillow
// keeps. Greyscale files become RGB by replication; CMYK/YCCK files (Adobe-inverted, as Photoshop and
// TurboJPEG write them) are converted as Pillow's cmyk2rgb does. Any libjpeg warning (a truncated file,
// corrupt data) is an error, as Pillow raises "image file is truncated".
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/image.h"

namespace vb::data {

// What to do with a frame that cannot be decoded (missing, empty, truncated, not a JPEG).
enum class BadImagePolicy : uint8_t { Skip, Fail };
BadImagePolicy parse_bad_image_policy(const std::string& s);  // "skip" | "fail"
const char* bad_image_policy_name(BadImagePolicy p);

struct JpegHeader {
  int width = 0, height = 0;
};
JpegHeader read_jpeg_header(const std::vector<uint8_t>& bytes, const std::string& name);

// Reads a whole file; a missing or unreadable file is an error naming it.
std::vector<uint8_t> read_file_bytes(const std::string& path);

// Decodes to RGB. `name` only labels errors. When min_width/min_height are > 0, libjpeg's DCT scaling
// (factors M/8) picks the smallest scaled size whose sides are both >= those minimums; 0 disables scaling
// (the exact Pillow decode). DCT scaling changes pixel values (it is a different low-pass than Pillow's
// resize), so the exact pipelines leave it off.
Image decode_jpeg(const std::vector<uint8_t>& bytes, const std::string& name, int min_width = 0, int min_height = 0);
Image decode_jpeg_file(const std::string& path, int min_width = 0, int min_height = 0);

// Baseline JPEG, 4:2:0 chroma subsampling (the Volleyball frames' format).
std::vector<uint8_t> encode_jpeg(const Image& img, int quality = 95);
// Encodes a 4-channel CMYK buffer (H, W, 4) as TurboJPEG does (YCCK, Adobe-inverted); for tests.
std::vector<uint8_t> encode_jpeg_cmyk(const uint8_t* cmyk, int width, int height, int quality = 95);
// Encodes a greyscale buffer (H, W); for tests.
std::vector<uint8_t> encode_jpeg_gray(const uint8_t* gray, int width, int height, int quality = 95);

}  // namespace vb::data
