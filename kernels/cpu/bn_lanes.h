// The batch-norm reductions shared by batchnorm.cpp and bn_fused.cpp: sums of one contiguous run into 8 double
// lanes (element i into lane i % 8), so the loops vectorise without reassociating and the order is fixed by the
// data layout alone (the statistics are the same bits whatever the thread count, and in both files).
// The accumulators are copied into locals for the loop so that they stay in registers.
#pragma once
#include <cstdint>

namespace vb::cpu::bn_lanes {

constexpr int kLanes = 8;
struct Lanes {
  double v[kLanes] = {};
  double total() const {
    double t = 0;
    for (double x : v) t += x;
    return t;
  }
};

// sum(x)
template <class T>
inline void add_sum(Lanes& out, const T* x, int64_t n) {
  Lanes acc = out;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc.v[j] += double(x[i + j]);
  for (int j = 0; i < n; ++i, ++j) acc.v[j] += double(x[i]);
  out = acc;
}

// sum((x - mean)^2)
template <class T>
inline void add_sq_dev(Lanes& out, const T* x, int64_t n, double mean) {
  Lanes acc = out;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const double d = double(x[i + j]) - mean;
      acc.v[j] += d * d;
    }
  for (int j = 0; i < n; ++i, ++j) {
    const double d = double(x[i]) - mean;
    acc.v[j] += d * d;
  }
  out = acc;
}

// sum(g) and sum(g * (x - mean)).
template <class T>
inline void add_grad_sums(Lanes& acc_dy, Lanes& acc_dyx, const T* x, const T* g, int64_t n, double mean) {
  Lanes s_dy = acc_dy, s_dyx = acc_dyx;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const double gj = double(g[i + j]);
      s_dy.v[j] += gj;
      s_dyx.v[j] += gj * (double(x[i + j]) - mean);
    }
  for (int j = 0; i < n; ++i, ++j) {
    const double gj = double(g[i]);
    s_dy.v[j] += gj;
    s_dyx.v[j] += gj * (double(x[i]) - mean);
  }
  acc_dy = s_dy;
  acc_dyx = s_dyx;
}

}  // namespace vb::cpu::bn_lanes
