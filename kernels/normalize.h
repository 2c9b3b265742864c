// ToTensor + Normalize of one uint8 pixel value, exactly as torchvision computes it in float32:
// x = u / 255 (a float32 division), then (x - mean[c]) / std[c] with ImageNet's mean and std. Header-only and
// below everything: the transforms (data/), the CPU backend's uint8 upload (kernels/cpu/normalize.cpp) and the
// CUDA kernels (kernels/cuda/transforms.cu, which computes the same two operations per pixel) give the same bits.
#pragma once
#include <cstdint>

namespace vb {

inline constexpr float kImageNetMean[3] = {0.485f, 0.456f, 0.406f};
inline constexpr float kImageNetStd[3] = {0.229f, 0.224f, 0.225f};

// Every value of every channel, computed once.
struct NormTable {
  float v[3][256];
};
inline const NormTable& norm_table() {
  static const NormTable table = [] {
    NormTable t{};
    for (int c = 0; c < 3; ++c)
      for (int u = 0; u < 256; ++u) {
        volatile float x = float(u) / 255.0f;  // volatile: each step rounds to float32, whatever the flags
        volatile float d = x - kImageNetMean[c];
        t.v[c][u] = d / kImageNetStd[c];
      }
    return t;
  }();
  return table;
}

}  // namespace vb
