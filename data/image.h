// An 8-bit RGB image in host memory: what the JPEG decoder produces and the uint8 transforms consume.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace vb::data {

struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> pixels;  // (H, W, 3) RGB, rows contiguous, no padding

  Image() = default;
  Image(int w, int h) : width(w), height(h), pixels(size_t(w) * size_t(h) * 3) {}
  uint8_t* row(int y) { return pixels.data() + size_t(y) * size_t(width) * 3; }
  const uint8_t* row(int y) const { return pixels.data() + size_t(y) * size_t(width) * 3; }
  bool empty() const { return width == 0 || height == 0; }
};

}  // namespace vb::data
