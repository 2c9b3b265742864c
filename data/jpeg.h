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

// Limits on what a frame may declare, checked on the header before any pixel memory is allocated (a hostile
// 18 KB file can declare 65500x65500, 12 GB of RGB). data/README.md says why these values:
// - each side at most 16,384 and the frame at most 64 megapixels (2^26 pixels, 192 MiB of RGB): 32x the
//   largest Volleyball frame (1920x1080), and libjpeg-turbo's own ceiling is 65,500 per side;
// - the long side at most 16 times the short one: training resizes the short side to R (256), so the
//   resized frame is R^2 x aspect, and beyond 50/3 no RandomResizedCrop draw fits (scale >= 0.08 of the
//   area at ratio <= 4/3 needs aspect <= (4/3) / 0.08), so every draw would fall back to the centre crop;
//   a 65500x1 frame would otherwise resize to 16.7M x 256 (12.9 GB);
// - the file itself at most 256 MiB (far above any 64-megapixel JPEG) and a regular file.
inline constexpr int kMaxJpegSide = 16384;
inline constexpr int64_t kMaxJpegPixels = int64_t(1) << 26;
inline constexpr int kMaxJpegAspect = 16;
inline constexpr uint64_t kMaxJpegFileBytes = uint64_t(256) << 20;

struct JpegHeader {
  int width = 0, height = 0;
};
// The header's dimensions; an error naming `name` when it is not a JPEG or its dimensions break the limits.
JpegHeader read_jpeg_header(const std::vector<uint8_t>& bytes, const std::string& name);
// The limits above on (width, height): an error naming `name` and the limit broken.
void check_jpeg_dimensions(int width, int height, const std::string& name);

// Reads a whole regular file of at most kMaxJpegFileBytes; a missing, unreadable or special file (a
// directory, a FIFO, a device) is an error naming it, never a hang or a huge allocation.
std::vector<uint8_t> read_file_bytes(const std::string& path);

// Decodes to RGB. `name` only labels errors. When min_width/min_height are > 0, libjpeg's DCT scaling
// (factors M/8) picks the smallest scaled size whose sides are both >= those minimums; 0 disables scaling
// (the exact Pillow decode). The header is checked against the limits above first. DCT scaling changes pixel values (it is a different low-pass than Pillow's
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
