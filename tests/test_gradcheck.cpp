// Finite-difference checks of every backward of kernels/cpu, in double. For an op y = f(inputs) and a fixed
// random dy, the scalar objective L = sum(dy * y) has dL/dinput = the op's backward applied to dy; each
// input element is moved by +-h (h = 1e-6) and (L(+h) - L(-h)) / 2h is compared to the analytic gradient.
//
// Tolerance: ||analytic - numeric|| / ||numeric|| <= 1e-6 per gradient tensor, and every element within
// 1e-6 * max|numeric| + 1e-6 * |numeric|. Central differences have a truncation error of order h^2 and a
// rounding error of order 1e-16 * |L| / h, both far below that; a wrong index or formula is far above.
// ReLU and max pooling are not differentiable at ties or zero: their inputs keep every value at least 1e-3
// away from a kink, so a step of 1e-6 never crosses one.
#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cpu/ops.h"
#include "tests/test_util.h"

using namespace vb;
using Vec = std::vector<double>;

namespace {

constexpr double kStep = 1e-6, kTol = 1e-6;

Vec randn(size_t n, uint32_t seed, double scale = 1.0) {
  std::mt19937 g(seed);
  std::normal_distribution<double> d(0, scale);
  Vec v(n);
  for (auto& x : v) x = d(g);
  return v;
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Compares `analytic` with central differences of `objective` with respect to `input` (perturbed in place
// and restored).
void gradcheck(const std::string& what, Vec& input, const Vec& analytic, const std::function<double()>& objective) {
  REQUIRE(analytic.size() == input.size());
  Vec numeric(input.size());
  for (size_t i = 0; i < input.size(); ++i) {
    const double x0 = input[i];
    input[i] = x0 + kStep;
    const double lp = objective();
    input[i] = x0 - kStep;
    const double lm = objective();
    input[i] = x0;
    numeric[i] = (lp - lm) / (2 * kStep);
  }
  double max_abs = 0;
  for (double v : numeric) max_abs = std::max(max_abs, std::fabs(v));
  const double r = vbtest::rel_err(analytic, numeric);
  INFO(what << ": rel_err " << r << " (max |grad| " << max_abs << ")");
  CHECK(max_abs > 0);  // a gradient that is zero everywhere checks nothing
  CHECK(r <= kTol);
  vbtest::check_close(what, analytic, numeric, kTol * max_abs, kTol);
}

// Values far from each other (>= `gap` apart) in a random order: no ties, no kinks crossed by a small step.
Vec distinct_values(size_t n, uint32_t seed, double gap) {
  Vec v(n);
  for (size_t i = 0; i < n; ++i) v[i] = (double(i) - double(n) / 2) * gap;
  std::shuffle(v.begin(), v.end(), std::mt19937(seed));
  return v;
}

}  // namespace

TEST_CASE("conv2d: data and filter gradients match finite differences") {
  // {N, C, H, W, K, R, S, stride, pad}: odd sizes, every kernel/stride/pad combination of ResNet and more.
  const cpu::ConvShape shapes[] = {
      {2, 3, 7, 5, 4, 3, 3, 1, 1},   // 3x3 s1 p1
      {2, 3, 9, 8, 2, 3, 3, 2, 1},   // 3x3 s2 p1, odd and even sides
      {1, 2, 11, 9, 3, 7, 7, 2, 3},  // the stem: 7x7 s2 p3
      {2, 5, 4, 3, 3, 1, 1, 1, 0},   // 1x1 s1: the GEMM-only path
      {2, 4, 7, 6, 3, 1, 1, 2, 0},   // 1x1 s2: the downsample
      {1, 2, 8, 7, 2, 5, 5, 3, 2},   // 5x5 s3 p2
      {2, 3, 6, 7, 2, 2, 2, 2, 0},   // 2x2 s2, no padding
      {1, 2, 5, 6, 3, 3, 1, 1, 1},   // 3x1: R != S
      {1, 3, 3, 3, 2, 3, 3, 1, 2},   // padding larger than needed: outputs bigger than the input
  };
  for (const auto& s : shapes) {
    std::ostringstream os;
    os << "N" << s.N << " C" << s.C << " " << s.H << "x" << s.W << " K" << s.K << " " << s.R << "x" << s.S << " s"
       << s.stride << " p" << s.pad;
    const std::string tag = os.str();
    Vec x = randn(size_t(s.N) * s.C * s.H * s.W, 1), w = randn(size_t(s.K) * s.C * s.R * s.S, 2);
    const Vec dy = randn(size_t(s.N) * s.K * s.P() * s.Q(), 3);
    Vec y(dy.size());
    auto objective = [&] {
      cpu::conv2d_fwd<double>(s, x.data(), w.data(), y.data());
      return dot(dy, y);
    };
    Vec dx(x.size()), dw(w.size());
    vbtest::poison(dx);
    vbtest::poison(dw);
    cpu::conv2d_bwd_data<double>(s, dy.data(), w.data(), dx.data());
    cpu::conv2d_bwd_filter<double>(s, x.data(), dy.data(), dw.data());
    gradcheck("conv dx " + tag, x, dx, objective);
    gradcheck("conv dw " + tag, w, dw, objective);
  }
}

TEST_CASE("batch norm (training): dx, dgamma and dbeta match finite differences") {
  for (auto [N, C, HW] : {std::tuple{3, 4, 5}, std::tuple{1, 3, 7}, std::tuple{4, 2, 1}}) {
    INFO("N=" << N << " C=" << C << " HW=" << HW);
    Vec x = randn(size_t(N) * C * HW, 4, 2.0), gamma = randn(static_cast<size_t>(C), 5),
        beta = randn(static_cast<size_t>(C), 6);
    for (auto& v : x) v += 0.5;  // a non-zero mean
    const Vec dy = randn(x.size(), 7);
    Vec y(x.size()), mean(static_cast<size_t>(C)), invstd(static_cast<size_t>(C));
    auto objective = [&] {
      cpu::batchnorm_train_fwd<double>(N, C, HW, x.data(), gamma.data(), beta.data(), y.data(), mean.data(),
                                       invstd.data(), nullptr, nullptr, 0.1, 1e-5);
      return dot(dy, y);
    };
    objective();
    Vec dx(x.size()), dgamma(static_cast<size_t>(C)), dbeta(static_cast<size_t>(C));
    cpu::batchnorm_bwd<double>(N, C, HW, x.data(), dy.data(), gamma.data(), mean.data(), invstd.data(), dx.data(),
                               dgamma.data(), dbeta.data());
    gradcheck("bn dx", x, dx, objective);
    gradcheck("bn dgamma", gamma, dgamma, objective);
    gradcheck("bn dbeta", beta, dbeta, objective);
  }
}

TEST_CASE("max pool: the gradient matches finite differences") {
  struct P {
    int N, C, H, W, k, s, p;
  };
  for (const P& q : {P{2, 2, 9, 11, 3, 2, 1}, P{1, 3, 8, 8, 3, 2, 1}, P{1, 2, 7, 6, 2, 2, 0}, P{1, 1, 5, 5, 3, 1, 1}}) {
    INFO("N=" << q.N << " C=" << q.C << " " << q.H << "x" << q.W << " k" << q.k << " s" << q.s << " p" << q.p);
    const int P_ = (q.H + 2 * q.p - q.k) / q.s + 1, Q_ = (q.W + 2 * q.p - q.k) / q.s + 1;
    Vec x = distinct_values(size_t(q.N) * q.C * q.H * q.W, 8, 1e-2);
    const Vec dy = randn(size_t(q.N) * q.C * P_ * Q_, 9);
    Vec y(dy.size());
    auto objective = [&] {
      cpu::maxpool_fwd<double>(q.N, q.C, q.H, q.W, q.k, q.s, q.p, x.data(), y.data());
      return dot(dy, y);
    };
    Vec dx(x.size());
    vbtest::poison(dx);
    cpu::maxpool_bwd<double>(q.N, q.C, q.H, q.W, q.k, q.s, q.p, x.data(), dy.data(), dx.data());
    gradcheck("maxpool dx", x, dx, objective);
  }
}

TEST_CASE("global average pool: the gradient matches finite differences") {
  const int N = 2, C = 3, HW = 7;
  Vec x = randn(size_t(N) * C * HW, 10);
  const Vec dy = randn(size_t(N) * C, 11);
  Vec y(dy.size());
  auto objective = [&] {
    cpu::avgpool_fwd<double>(N, C, HW, x.data(), y.data());
    return dot(dy, y);
  };
  Vec dx(x.size());
  vbtest::poison(dx);
  cpu::avgpool_bwd<double>(N, C, HW, dy.data(), dx.data());
  gradcheck("avgpool dx", x, dx, objective);
}

TEST_CASE("linear: dx, dw and db match finite differences") {
  const int N = 5, IN = 7, OUT = 3;
  Vec x = randn(size_t(N) * IN, 12), w = randn(size_t(OUT) * IN, 13), b = randn(size_t(OUT), 14);
  const Vec dy = randn(size_t(N) * OUT, 15);
  Vec y(dy.size());
  auto objective = [&] {
    cpu::linear_fwd<double>(N, IN, OUT, x.data(), w.data(), b.data(), y.data());
    return dot(dy, y);
  };
  Vec dx(x.size()), dw(w.size()), db(b.size());
  cpu::linear_bwd<double>(N, IN, OUT, x.data(), w.data(), dy.data(), dx.data(), dw.data(), db.data());
  gradcheck("linear dx", x, dx, objective);
  gradcheck("linear dw", w, dw, objective);
  gradcheck("linear db", b, db, objective);
}

TEST_CASE("relu: the gradient matches finite differences") {
  Vec x = distinct_values(40, 16, 1e-2);  // multiples of 1e-2; the one at zero moves to 5e-3
  for (auto& v : x)
    if (v == 0) v = 5e-3;
  const Vec dy = randn(x.size(), 17);
  Vec y(x.size());
  auto objective = [&] {
    cpu::relu_fwd<double>(int64_t(x.size()), x.data(), y.data());
    return dot(dy, y);
  };
  objective();
  Vec dx(x.size());
  cpu::relu_bwd<double>(int64_t(x.size()), y.data(), dy.data(), dx.data());
  gradcheck("relu dx", x, dx, objective);
}

TEST_CASE("weighted cross-entropy: dlogits matches finite differences, a zero-weight class included") {
  const int N = 7, C = 5;
  Vec logits = randn(size_t(N) * C, 18, 2.0);
  const Vec weights = {0.5, 2.0, 0.0, 1.5, 1.0};  // class 2 weighs nothing
  const std::vector<int64_t> labels = {0, 2, 1, 4, 2, 3, 1};
  auto objective = [&] {
    return cpu::softmax_wce<double>(N, C, logits.data(), labels.data(), weights.data(), nullptr, nullptr);
  };
  Vec dlogits(logits.size());
  cpu::softmax_wce<double>(N, C, logits.data(), labels.data(), weights.data(), nullptr, dlogits.data());
  gradcheck("wce dlogits", logits, dlogits, objective);
  // Rows whose target weighs nothing get no gradient at all.
  for (int c = 0; c < C; ++c) {
    CHECK(dlogits[1 * C + c] == 0);
    CHECK(dlogits[4 * C + c] == 0);
  }

  SUBCASE("an ignored row (label -100) and no class weights") {
    const std::vector<int64_t> with_ignored = {0, -100, 1, 4, 2, 3, 1};
    auto obj2 = [&] {
      return cpu::softmax_wce<double>(N, C, logits.data(), with_ignored.data(), nullptr, nullptr, nullptr);
    };
    Vec d2(logits.size());
    cpu::softmax_wce<double>(N, C, logits.data(), with_ignored.data(), nullptr, nullptr, d2.data());
    gradcheck("wce dlogits (ignore_index, unweighted)", logits, d2, obj2);
  }
}
