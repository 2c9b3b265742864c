// Helpers shared by the NHWC test suites (test_nhwc_cpu.cpp, test_cuda_nhwc.cpp): layout transposes, random
// inputs, float <-> bf16 vectors, and a bitwise comparison that reports the first difference.
#pragma once
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/bf16.h"

namespace vbtest {

// [N, C, HW] -> [N, HW, C] and back.
template <class T>
std::vector<T> to_nhwc(const std::vector<T>& x, int N, int C, int HW) {
  std::vector<T> y(x.size());
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int i = 0; i < HW; ++i) y[(size_t(n) * HW + i) * C + c] = x[(size_t(n) * C + c) * HW + i];
  return y;
}
template <class T>
std::vector<T> to_nchw(const std::vector<T>& y, int N, int C, int HW) {
  std::vector<T> x(y.size());
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int i = 0; i < HW; ++i) x[(size_t(n) * C + c) * HW + i] = y[(size_t(n) * HW + i) * C + c];
  return x;
}

inline std::vector<float> uniform(size_t n, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

inline std::vector<vb::bf16> to_bf16(const std::vector<float>& v) {
  std::vector<vb::bf16> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = vb::to_bf16(v[i]);
  return o;
}
inline std::vector<float> to_f32(const std::vector<vb::bf16>& v) {
  std::vector<float> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = vb::to_float(v[i]);
  return o;
}
inline const std::vector<float>& to_f32(const std::vector<float>& v) { return v; }

// Same bits (NaN == NaN when the bits agree); reports the first element that differs.
template <class T>
void check_bits(const std::string& what, const std::vector<T>& got, const std::vector<T>& want) {
  REQUIRE_MESSAGE(got.size() == want.size(), what << ": size " << got.size() << " vs " << want.size());
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0 && bad++ == 0) first = i;
  INFO(what << ": " << bad << " of " << got.size() << " elements differ; first at " << first << ": got "
            << (bad ? double(vb::to_float(got[first])) : 0.0) << ", want "
            << (bad ? double(vb::to_float(want[first])) : 0.0));
  CHECK(bad == 0);
}

}  // namespace vbtest
