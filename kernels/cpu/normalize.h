// The uint8 frames a loader hands over (N, H, W, 3), normalised into a backend's activations: the CPU twin of
// kernels/cuda/transforms.cu's normalize_frames. Each value is norm_table()'s (kernels/normalize.h), so the
// result equals data/transforms' ToTensor + Normalize bit for bit, in float and (converted) in double.
#pragma once
#include <cstdint>

namespace vb::cpu {

// dst (N, H, W, 3): channels-last, the order the pixels already have.
template <class T>
void normalize_u8_nhwc(int N, int64_t HW, const uint8_t* src, T* dst);
// dst (N, 3, H, W).
template <class T>
void normalize_u8_nchw(int N, int64_t HW, const uint8_t* src, T* dst);

}  // namespace vb::cpu
