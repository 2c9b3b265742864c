// Tensors: a description (shape, dtype, layout, device) and either a non-owning view of memory that an
// arena owns (the training step never allocates) or, for file I/O on the host, an owning byte buffer.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/check.h"

namespace vb {

enum class DType : uint8_t { F32, F64, BF16, F16, I64, I32, U8, BOOL };
enum class Layout : uint8_t { NCHW, NHWC };  // for 4-D activations; other ranks are plain row-major
enum class Device : uint8_t { CPU, CUDA };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::BF16: case DType::F16: return 2;
    case DType::U8: case DType::BOOL: return 1;
  }
  return 0;
}
// Names as safetensors writes them.
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
  }
  return "?";
}
inline DType dtype_from_name(const std::string& s) {
  for (DType t : {DType::F32, DType::F64, DType::BF16, DType::F16, DType::I64, DType::I32, DType::U8, DType::BOOL})
    if (s == dtype_name(t)) return t;
  fail("unsupported dtype '", s, "'");
}
inline const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

using Shape = std::vector<int64_t>;
inline int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}
inline std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// A non-owning view: what layers and kernels receive.
struct TensorView {
  void* data = nullptr;
  Shape shape;
  DType dtype = DType::F32;
  Layout layout = Layout::NCHW;
  Device device = Device::CPU;

  int64_t numel() const { return vb::numel(shape); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  template <class T>
  T* as() const { return static_cast<T*>(data); }
};

// An owning host tensor, for weights and reference files (contiguous, row-major, little-endian).
struct HostTensor {
  Shape shape;
  DType dtype = DType::F32;
  std::vector<uint8_t> bytes;

  HostTensor() = default;
  HostTensor(Shape s, DType t) : shape(std::move(s)), dtype(t), bytes(size_t(vb::numel(shape)) * dtype_size(t)) {}
  int64_t numel() const { return vb::numel(shape); }
  template <class T>
  T* as() { return reinterpret_cast<T*>(bytes.data()); }
  template <class T>
  const T* as() const { return reinterpret_cast<const T*>(bytes.data()); }
  // Values converted to double, whatever the stored dtype (for comparisons and conversions).
  std::vector<double> to_f64() const;
  // Values converted to float (F32/F64/BF16/F16/integers).
  std::vector<float> to_f32() const;
  static HostTensor from_f32(const Shape& s, const float* v);
  static HostTensor from_i64(const Shape& s, const int64_t* v);
};

}  // namespace vb
