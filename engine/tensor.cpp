#include "engine/tensor.h"

namespace vb {
namespace {
float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      u = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp - 15 + 127) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace

std::vector<double> HostTensor::to_f64() const {
  const int64_t n = numel();
  std::vector<double> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::F32: out[i] = as<float>()[i]; break;
      case DType::F64: out[i] = as<double>()[i]; break;
      case DType::BF16: out[i] = bf16_to_f32(as<uint16_t>()[i]); break;
      case DType::F16: out[i] = f16_to_f32(as<uint16_t>()[i]); break;
      case DType::I64: out[i] = double(as<int64_t>()[i]); break;
      case DType::I32: out[i] = as<int32_t>()[i]; break;
      case DType::U8: case DType::BOOL: out[i] = as<uint8_t>()[i]; break;
    }
  }
  return out;
}

std::vector<float> HostTensor::to_f32() const {
  if (dtype == DType::F32) return std::vector<float>(as<float>(), as<float>() + numel());
  std::vector<double> d = to_f64();
  return std::vector<float>(d.begin(), d.end());
}

HostTensor HostTensor::from_f32(const Shape& s, const float* v) {
  HostTensor t(s, DType::F32);
  std::memcpy(t.bytes.data(), v, t.bytes.size());
  return t;
}
HostTensor HostTensor::from_i64(const Shape& s, const int64_t* v) {
  HostTensor t(s, DType::I64);
  std::memcpy(t.bytes.data(), v, t.bytes.size());
  return t;
}

}  // namespace vb
