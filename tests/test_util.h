// Shared test helpers: fixture paths, tolerant comparisons that report the worst element and never pass on
// NaN, relative error as the fixtures define it (||a-b|| / ||b||), and output poisoning.
#pragma once
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace vbtest {

// n values uniform in [-1, 1), drawn in double and rounded to T: the same values for float and double suites.
template <class T>
std::vector<T> random_vec(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<double> d(-1, 1);
  std::vector<T> v(n);
  for (auto& x : v) x = T(d(g));
  return v;
}


inline std::string fixture(const std::string& name) { return std::string(VB_FIXTURES) + "/" + name; }
inline std::string binary_dir() { return VB_BINARY_DIR; }

// ||a - b||_2 / ||b||_2 (|| a - b || when b is all zero). NaN anywhere gives +inf.
template <class A, class B>
double rel_err(const A* a, const B* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    double x = double(a[i]), y = double(b[i]);
    if (!std::isfinite(x) || !std::isfinite(y)) return std::numeric_limits<double>::infinity();
    num += (x - y) * (x - y);
    den += y * y;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
template <class A, class B>
double rel_err(const std::vector<A>& a, const std::vector<B>& b) {
  REQUIRE(a.size() == b.size());
  return rel_err(a.data(), b.data(), a.size());
}

// Every element within abs + rel * |want|; reports the worst one. Fails on NaN or Inf in `got`.
template <class A, class B>
void check_close(const std::string& what, const A* got, const B* want, size_t n, double abs_tol, double rel_tol) {
  size_t worst = 0, bad = 0;
  double worst_excess = -1;
  for (size_t i = 0; i < n; ++i) {
    double g = double(got[i]), w = double(want[i]);
    double tol = abs_tol + rel_tol * std::fabs(w);
    double err = std::fabs(g - w);
    double excess = std::isfinite(g) ? err - tol : std::numeric_limits<double>::infinity();
    if (excess > 0) ++bad;
    if (excess > worst_excess) { worst_excess = excess; worst = i; }
  }
  INFO(what << ": " << bad << " of " << n << " elements out of tolerance (abs " << abs_tol << ", rel " << rel_tol
            << "); worst at " << worst << ": got " << (n ? double(got[worst]) : 0.0) << ", want "
            << (n ? double(want[worst]) : 0.0));
  CHECK(bad == 0);
}
template <class A, class B>
void check_close(const std::string& what, const std::vector<A>& got, const std::vector<B>& want, double abs_tol,
                 double rel_tol) {
  REQUIRE_MESSAGE(got.size() == want.size(), what << ": size " << got.size() << " vs " << want.size());
  check_close(what, got.data(), want.data(), got.size(), abs_tol, rel_tol);
}

// Fills a buffer with NaN so that an element a kernel forgot to write shows up.
template <class T>
void poison(std::vector<T>& v) {
  for (auto& x : v) x = std::numeric_limits<T>::quiet_NaN();
}

}  // namespace vbtest
