// bfloat16 on the host: the storage type of bf16 activations and the conversions the CPU twins use to round
// exactly where the CUDA kernels do. Header-only, no CUDA needed (CPU code includes it).
//
// float -> bf16 is round-to-nearest-even on the upper 16 bits, bit for bit what CUDA's __float2bfloat16_rn
// gives on the host (cuda_bf16.hpp) and on the device (cvt.rn.bf16.f32 on sm_80+): denormals are kept (no
// flush to zero), a value past the largest finite bf16 rounds to +-inf, and every NaN becomes the canonical
// quiet NaN 0x7fff (the sign and payload are dropped). bf16 -> float is exact (the bits shifted up).
//
// vb::bf16 has the size and alignment of CUDA's __nv_bfloat16, so device buffers of either are the same bytes.
#pragma once
#include <cstdint>
#include <cstring>

namespace vb {

struct bf16 {
  uint16_t bits = 0;
};
static_assert(sizeof(bf16) == 2 && alignof(bf16) == 2, "bf16 must have __nv_bfloat16's layout");

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest, ties to even (CUDA's __float2bfloat16_rn).
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN: canonical, as CUDA
  const uint32_t rem = x << 16;                          // the 16 bits dropped, as the top of a word
  uint32_t r = x >> 16;
  if (rem > 0x80000000u || (rem == 0x80000000u && (r & 1u))) ++r;  // carries into the exponent: up to inf
  return uint16_t(r);
}
inline bf16 to_bf16(float f) { return bf16{float_to_bf16_bits(f)}; }
inline float bf16_bits_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }
inline float to_float(bf16 b) { return bf16_bits_to_float(b.bits); }
inline float to_float(float f) { return f; }
// f rounded to bf16's precision, kept as a float.
inline float round_bf16(float f) { return to_float(to_bf16(f)); }

// Storing a float in an activation of type A: rounding for bf16, nothing for float.
template <class A>
inline A from_float(float f);
template <>
inline float from_float<float>(float f) {
  return f;
}
template <>
inline bf16 from_float<bf16>(float f) {
  return to_bf16(f);
}

}  // namespace vb
