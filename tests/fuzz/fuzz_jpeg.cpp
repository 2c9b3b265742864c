// libFuzzer target: a frame's bytes through the header check, then the decoder (exact and DCT-scaled).
// Every input must decode or give a vb::Error. The limits of data/jpeg.h hold before decoding; this harness
// decodes only frames of at most 1 megapixel so that each run stays fast (larger ones are header-checked).
#include <cstddef>
#include <cstdint>
#include <vector>

#include "data/jpeg.h"
#include "kernels/check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<uint8_t> bytes(data, data + size);
  try {
    const vb::data::JpegHeader h = vb::data::read_jpeg_header(bytes, "fuzz.jpg");
    if (int64_t(h.width) * h.height > (int64_t(1) << 20)) return 0;
    (void)vb::data::decode_jpeg(bytes, "fuzz.jpg");
    (void)vb::data::decode_jpeg(bytes, "fuzz.jpg", 16, 16);
  } catch (const vb::Error&) {
  }
  return 0;
}
