// An 8-bit RGB image in host memory: what the JPEG decoder produces and the uint8 transforms consume.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/check.h"

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

// The network's input size, height x width. An int converts to the square size (the notebook's 224), so
// code written for square inputs keeps working; `224x400` is 224 rows by 400 columns.
struct ImageSize {
  int h = 224, w = 224;
  ImageSize() = default;
  ImageSize(int side) : h(side), w(side) {}  // NOLINT: implicit on purpose (square sizes)
  ImageSize(int height, int width) : h(height), w(width) {}
  bool square() const { return h == w; }
  int min_side() const { return h < w ? h : w; }
  int64_t pixels() const { return int64_t(h) * int64_t(w); }
  bool operator==(const ImageSize&) const = default;
  // "224" or "224x400" (height x width); what parse_image_size reads back.
  std::string str() const { return square() ? std::to_string(h) : std::to_string(h) + "x" + std::to_string(w); }
};

// Reads "S" or "HxW" (also "HXW"); throws vb::Error naming the text on anything else or a side outside
// [1, 16384]. Inline (as the rest of this header), so the engine reads sizes without linking data/.
inline ImageSize parse_image_size(const std::string& text) {
  auto side = [&](const std::string& t) {
    if (t.empty() || t.size() > 6 || t.find_first_not_of("0123456789") != std::string::npos)
      fail("image size '", escape(text), "': expected S or HxW (height x width), e.g. 224 or 224x400");
    const int v = std::stoi(t);
    if (v < 1 || v > 16384) fail("image size '", escape(text), "': each side must be 1..16384");
    return v;
  };
  const size_t x = text.find_first_of("xX");
  if (x == std::string::npos) return ImageSize(side(text));
  return ImageSize(side(text.substr(0, x)), side(text.substr(x + 1)));
}

// JSON (config.json, model metadata): a square size is a number (224, as before), any other "HxW"; reads
// numbers, "S"/"HxW" strings and [h, w] arrays (templates: any nlohmann basic_json, ordered or not).
template <class Json>
void to_json(Json& j, const ImageSize& s) {
  if (s.square()) j = s.h;
  else j = s.str();
}
template <class Json>
void from_json(const Json& j, ImageSize& s) {
  if (j.is_number_integer()) s = ImageSize(j.template get<int>());
  else if (j.is_array() && j.size() == 2 && j[0].is_number_integer() && j[1].is_number_integer())
    s = ImageSize(j[0].template get<int>(), j[1].template get<int>());
  else s = parse_image_size(j.is_string() ? j.template get<std::string>() : std::string("(not a size)"));
}

}  // namespace vb::data
