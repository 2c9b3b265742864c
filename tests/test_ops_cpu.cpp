// The CPU reference ops (float) against PyTorch (tests/fixtures/ops.safetensors, computed in float64 from
// float32 inputs and stored as float32; see tests/fixtures/PYTORCH_REFERENCE.md), and the ops' results
// being bit-identical for 1, 2 and 3 threads.
//
// Tolerances: every tensor within rel_err = ||got - want|| / ||want|| <= 1e-5 (kRel), and every element
// within 1e-5 + 1e-4 * |want| (kAbs, kElemRel). fp32 lands near 1e-7 relative on these sizes, so these fail on
// any wrong index, stride or formula while leaving room for float rounding. AdamW is held to a few ulps.
// steplr.lr_per_epoch_50 belongs to the optimizer's tests.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/conv_algo_cache.h"
#include "engine/state_dict.h"
#include "kernels/cpu/bn_fused.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/pool_fast.h"
#include "tests/test_util.h"

using namespace vb;

namespace {

constexpr double kRel = 1e-5, kAbs = 1e-5, kElemRel = 1e-4;

const StateDict& ops() {
  static StateDict sd = load_safetensors(vbtest::fixture("ops.safetensors"));
  return sd;
}
std::vector<float> f32(const std::string& key) { return ops().at(key).to_f32(); }
std::vector<int64_t> i64(const std::string& key) {
  const HostTensor& t = ops().at(key);
  REQUIRE(t.dtype == DType::I64);
  return std::vector<int64_t>(t.as<int64_t>(), t.as<int64_t>() + t.numel());
}
template <class T>
std::vector<T> poisoned(size_t n) {
  std::vector<T> v(n);
  vbtest::poison(v);
  return v;
}

// Both the whole-tensor and the element-wise check.
void expect_close(const std::string& what, const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE_MESSAGE(got.size() == want.size(), what);
  const double r = vbtest::rel_err(got, want);
  INFO(what << ": rel_err " << r);
  CHECK(r <= kRel);
  vbtest::check_close(what, got, want, kAbs, kElemRel);
}

cpu::ConvShape conv_shape(const std::string& tag) {
  const auto p = i64(tag + ".params");  // [N, C, H, W, K, k, stride, pad]
  return cpu::ConvShape{int(p[0]), int(p[1]), int(p[2]), int(p[3]), int(p[4]),
                        int(p[5]), int(p[5]), int(p[6]), int(p[7])};
}

}  // namespace

TEST_CASE("conv2d forward, data and filter gradients match PyTorch") {
  for (const char* tag : {"conv7x7s2p3", "conv3x3s1p1", "conv3x3s2p1", "conv1x1s1p0", "conv1x1s2p0"}) {
    const std::string t = tag;
    INFO(t);
    const cpu::ConvShape s = conv_shape(t);
    const auto x = f32(t + ".x"), w = f32(t + ".w"), dy = f32(t + ".dy");
    const auto want_y = f32(t + ".y"), want_dx = f32(t + ".dx"), want_dw = f32(t + ".dw");
    REQUIRE(want_y.size() == size_t(s.N) * s.K * s.P() * s.Q());
    auto y = poisoned<float>(want_y.size()), dx = poisoned<float>(x.size()), dw = poisoned<float>(w.size());
    cpu::conv2d_fwd<float>(s, x.data(), w.data(), y.data());
    cpu::conv2d_bwd_data<float>(s, dy.data(), w.data(), dx.data());
    cpu::conv2d_bwd_filter<float>(s, x.data(), dy.data(), dw.data());
    expect_close(t + ".y", y, want_y);
    expect_close(t + ".dx", dx, want_dx);
    expect_close(t + ".dw", dw, want_dw);
  }
}

TEST_CASE("batch norm training forward, running statistics and backward match PyTorch") {
  const auto x = f32("bn_train.x"), gamma = f32("bn_train.gamma"), beta = f32("bn_train.beta");
  const auto dy = f32("bn_train.dy");
  const auto& shape = ops().at("bn_train.x").shape;
  const int N = int(shape[0]), C = int(shape[1]), HW = int(shape[2] * shape[3]);
  auto rm = f32("bn_train.running_mean_in"), rv = f32("bn_train.running_var_in");
  auto y = poisoned<float>(x.size()), mean = poisoned<float>(size_t(C)), invstd = poisoned<float>(size_t(C));
  cpu::batchnorm_train_fwd<float>(N, C, HW, x.data(), gamma.data(), beta.data(), y.data(), mean.data(), invstd.data(),
                                  rm.data(), rv.data(), 0.1, 1e-5);
  expect_close("bn_train.y", y, f32("bn_train.y"));
  expect_close("bn_train.running_mean_out", rm, f32("bn_train.running_mean_out"));
  expect_close("bn_train.running_var_out", rv, f32("bn_train.running_var_out"));

  // The saved statistics, from the definition (biased variance) in double.
  for (int c = 0; c < C; ++c) {
    double s = 0, q = 0;
    for (int n = 0; n < N; ++n)
      for (int i = 0; i < HW; ++i) s += x[(size_t(n) * C + c) * HW + i];
    const double m = s / (N * HW);
    for (int n = 0; n < N; ++n)
      for (int i = 0; i < HW; ++i) q += std::pow(x[(size_t(n) * C + c) * HW + i] - m, 2);
    CHECK(mean[c] == doctest::Approx(m).epsilon(1e-6));
    CHECK(invstd[c] == doctest::Approx(1 / std::sqrt(q / (N * HW) + 1e-5)).epsilon(1e-6));
  }

  auto dx = poisoned<float>(x.size()), dgamma = poisoned<float>(size_t(C)), dbeta = poisoned<float>(size_t(C));
  cpu::batchnorm_bwd<float>(N, C, HW, x.data(), dy.data(), gamma.data(), mean.data(), invstd.data(), dx.data(),
                            dgamma.data(), dbeta.data());
  expect_close("bn_train.dx", dx, f32("bn_train.dx"));
  expect_close("bn_train.dgamma", dgamma, f32("bn_train.dgamma"));
  expect_close("bn_train.dbeta", dbeta, f32("bn_train.dbeta"));

  SUBCASE("dx may alias dy") {
    auto inplace = dy;
    cpu::batchnorm_bwd<float>(N, C, HW, x.data(), inplace.data(), gamma.data(), mean.data(), invstd.data(),
                              inplace.data(), nullptr, nullptr);
    CHECK(std::memcmp(inplace.data(), dx.data(), dx.size() * sizeof(float)) == 0);
  }
  SUBCASE("null running statistics and null outputs are skipped") {
    auto y2 = poisoned<float>(x.size());
    cpu::batchnorm_train_fwd<float>(N, C, HW, x.data(), gamma.data(), beta.data(), y2.data(), nullptr, nullptr, nullptr,
                                    nullptr, 0.1, 1e-5);
    CHECK(std::memcmp(y2.data(), y.data(), y.size() * sizeof(float)) == 0);
    auto dg = poisoned<float>(size_t(C));
    cpu::batchnorm_bwd<float>(N, C, HW, x.data(), dy.data(), gamma.data(), mean.data(), invstd.data(), nullptr,
                              dg.data(), nullptr);
    CHECK(std::memcmp(dg.data(), dgamma.data(), dg.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("batch norm in evaluation mode matches PyTorch") {
  const auto x = f32("bn_train.x");
  const auto& shape = ops().at("bn_train.x").shape;
  const int N = int(shape[0]), C = int(shape[1]), HW = int(shape[2] * shape[3]);
  auto y = poisoned<float>(x.size());
  cpu::batchnorm_eval_fwd<float>(N, C, HW, x.data(), f32("bn_train.gamma").data(), f32("bn_train.beta").data(),
                                 f32("bn_train.running_mean_in").data(), f32("bn_train.running_var_in").data(), 1e-5,
                                 y.data());
  expect_close("bn_eval.y", y, f32("bn_eval.y"));
}

TEST_CASE("max pool 3x3 stride 2 padding 1 matches PyTorch") {
  const auto x = f32("maxpool3x3s2p1.x"), dy = f32("maxpool3x3s2p1.dy");
  const auto& sh = ops().at("maxpool3x3s2p1.x").shape;
  const int N = int(sh[0]), C = int(sh[1]), H = int(sh[2]), W = int(sh[3]);
  auto y = poisoned<float>(f32("maxpool3x3s2p1.y").size()), dx = poisoned<float>(x.size());
  cpu::maxpool_fwd<float>(N, C, H, W, 3, 2, 1, x.data(), y.data());
  cpu::maxpool_bwd<float>(N, C, H, W, 3, 2, 1, x.data(), dy.data(), dx.data());
  // Max pooling selects values: the forward is exact.
  CHECK(y == f32("maxpool3x3s2p1.y"));
  expect_close("maxpool.dx", dx, f32("maxpool3x3s2p1.dx"));
}

TEST_CASE("max pool: ties go to the first maximum, NaN wins, padding never wins") {
  // One 3x4 plane; 2x2 windows, stride 2, padding 1 -> 2x3 outputs.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> x = {-5, -5,  1, 1,  //
                                -5, -9,  1, 2,  //
                                -7, nan, 3, 3};
  std::vector<float> y(6), dy = {1, 2, 3, 4, 5, 6}, dx(12);
  cpu::maxpool_fwd<float>(1, 1, 3, 4, 2, 2, 1, x.data(), y.data());
  cpu::maxpool_bwd<float>(1, 1, 3, 4, 2, 2, 1, x.data(), dy.data(), dx.data());
  // Windows (rows x cols, clipped): {0}x{0} | {0}x{1,2} | {0}x{3} / {1,2}x{0} | {1,2}x{1,2} | {1,2}x{3}
  CHECK(y[0] == -5);
  CHECK(y[1] == 1);
  CHECK(y[2] == 1);
  CHECK(y[3] == -5);
  CHECK(std::isnan(y[4]));
  CHECK(y[5] == 3);
  const std::vector<float> want_dx = {1, 0, 2, 3,  //
                                      4, 0, 0, 0,  //
                                      0, 5, 0, 6};
  CHECK(dx == want_dx);
  // Ties: all equal, the first of each window takes the gradient.
  const std::vector<float> flat(16, 2.0f);
  std::vector<float> fdy = {1, 1, 1, 1}, fdx(16);
  cpu::maxpool_bwd<float>(1, 1, 4, 4, 3, 2, 1, flat.data(), fdy.data(), fdx.data());
  // Windows start at rows/cols {0, 1}: first elements (0,0), (0,1), (1,0), (1,1).
  const std::vector<float> want_fdx = {1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  CHECK(fdx == want_fdx);
}

TEST_CASE("global average pool matches PyTorch") {
  const auto x = f32("avgpool.x"), dy = f32("avgpool.dy");
  const auto& sh = ops().at("avgpool.x").shape;
  const int N = int(sh[0]), C = int(sh[1]), HW = int(sh[2] * sh[3]);
  auto y = poisoned<float>(size_t(N) * C), dx = poisoned<float>(x.size());
  cpu::avgpool_fwd<float>(N, C, HW, x.data(), y.data());
  cpu::avgpool_bwd<float>(N, C, HW, dy.data(), dx.data());
  expect_close("avgpool.y", y, f32("avgpool.y"));
  expect_close("avgpool.dx", dx, f32("avgpool.dx"));
}

TEST_CASE("linear forward and backward match PyTorch") {
  const auto x = f32("linear.x"), w = f32("linear.w"), b = f32("linear.b"), dy = f32("linear.dy");
  const int N = int(ops().at("linear.x").shape[0]), IN = int(ops().at("linear.x").shape[1]);
  const int OUT = int(ops().at("linear.w").shape[0]);
  auto y = poisoned<float>(size_t(N) * OUT), dx = poisoned<float>(x.size()), dw = poisoned<float>(w.size()),
       db = poisoned<float>(b.size());
  cpu::linear_fwd<float>(N, IN, OUT, x.data(), w.data(), b.data(), y.data());
  cpu::linear_bwd<float>(N, IN, OUT, x.data(), w.data(), dy.data(), dx.data(), dw.data(), db.data());
  expect_close("linear.y", y, f32("linear.y"));
  expect_close("linear.dx", dx, f32("linear.dx"));
  expect_close("linear.dw", dw, f32("linear.dw"));
  expect_close("linear.db", db, f32("linear.db"));
}

TEST_CASE("weighted cross-entropy, softmax and class weights match PyTorch") {
  const auto train_labels = i64("wce.train_labels");
  std::vector<float> cw(8);
  cpu::class_weights_from_labels(int64_t(train_labels.size()), train_labels.data(), 8, cw.data());
  expect_close("wce.class_weights", cw, f32("wce.class_weights"));
  CHECK(cw[6] == 0.0f);  // class 6 never appears

  const auto logits = f32("wce.logits");
  const auto labels = i64("wce.labels");
  const int N = int(labels.size()), C = 8;
  const auto weights = f32("wce.class_weights");
  auto probs = poisoned<float>(logits.size()), dlogits = poisoned<float>(logits.size());
  const float loss =
      cpu::softmax_wce<float>(N, C, logits.data(), labels.data(), weights.data(), probs.data(), dlogits.data());
  const std::vector<float> got_loss = {loss};
  expect_close("wce.loss", got_loss, f32("wce.loss"));
  expect_close("wce.dlogits", dlogits, f32("wce.dlogits"));
  expect_close("wce.softmax (softmax_wce)", probs, f32("wce.softmax"));
  auto probs2 = poisoned<float>(logits.size());
  cpu::softmax<float>(N, C, logits.data(), probs2.data());
  expect_close("wce.softmax (softmax)", probs2, f32("wce.softmax"));
  // Outputs not asked for are not needed.
  CHECK(cpu::softmax_wce<float>(N, C, logits.data(), labels.data(), weights.data(), nullptr, nullptr) == loss);
}

TEST_CASE("cross-entropy edge cases: all target weights zero gives NaN, ignore_index -100, large logits") {
  const std::vector<float> logits = {1000, 0, -1000, 3, 2, 1};
  const std::vector<float> w = {0, 1, 1};
  const std::vector<int64_t> zero_weight = {0, 0};
  std::vector<float> d(6);
  CHECK(std::isnan(cpu::softmax_wce<float>(2, 3, logits.data(), zero_weight.data(), w.data(), nullptr, d.data())));
  // Row 0 ignored: the loss is row 1's alone and row 0's gradient is zero.
  const std::vector<int64_t> ignore = {-100, 1};
  const float loss = cpu::softmax_wce<float>(2, 3, logits.data(), ignore.data(), w.data(), nullptr, d.data());
  const double lse = 3 + std::log(1 + std::exp(-1.0) + std::exp(-2.0));
  CHECK(loss == doctest::Approx(lse - 2).epsilon(1e-6));
  CHECK(d[0] == 0);
  CHECK(d[1] == 0);
  CHECK(d[2] == 0);
  // Huge logits stay finite (log-sum-exp is shifted by the maximum).
  const std::vector<int64_t> big = {2, 1};
  CHECK(cpu::softmax_wce<float>(2, 3, logits.data(), big.data(), nullptr, nullptr, d.data()) ==
        doctest::Approx((2000 + (lse - 2)) / 2).epsilon(1e-6));
  CHECK_THROWS(
      cpu::softmax_wce<float>(2, 3, logits.data(), std::vector<int64_t>{0, 3}.data(), nullptr, nullptr, nullptr));
}

TEST_CASE("AdamW steps match torch.optim.AdamW") {
  const auto lr = f32("adamw.lr_used");
  const auto p0 = f32("adamw.p0");
  const size_t n = p0.size();
  // float: within a few ulps of PyTorch's float64 trajectory (rounded to float32).
  {
    std::vector<float> p = p0, m(n, 0.0f), v(n, 0.0f);
    for (int t = 1; t <= 5; ++t) {
      const auto g = f32("adamw.g" + std::to_string(t));
      cpu::adamw_step<float>(int64_t(n), p.data(), g.data(), m.data(), v.data(), double(lr[t - 1]), 0.9, 0.999, 1e-8,
                             0.01, t);
      const auto want = f32("adamw.p" + std::to_string(t));
      vbtest::check_close("adamw float p" + std::to_string(t), p, want, 1e-7, 1e-6);
      // The update itself (tiny next to p) to 0.1%.
      std::vector<double> du, dw;
      for (size_t i = 0; i < n; ++i) {
        du.push_back(double(p[i]) - p0[i]);
        dw.push_back(double(want[i]) - p0[i]);
      }
      INFO("adamw float update after step " << t << ": rel_err " << vbtest::rel_err(du, dw));
      CHECK(vbtest::rel_err(du, dw) <= 1e-3);
    }
  }
  // double: PyTorch's own arithmetic, so within float32 rounding of the stored values.
  {
    std::vector<double> p(p0.begin(), p0.end()), m(n, 0.0), v(n, 0.0);
    for (int t = 1; t <= 5; ++t) {
      const auto g32 = f32("adamw.g" + std::to_string(t));
      const std::vector<double> g(g32.begin(), g32.end());
      cpu::adamw_step<double>(int64_t(n), p.data(), g.data(), m.data(), v.data(), double(lr[t - 1]), 0.9, 0.999, 1e-8,
                              0.01, t);
      vbtest::check_close("adamw double p" + std::to_string(t), p, f32("adamw.p" + std::to_string(t)), 0, 6e-8);
    }
  }
}

// ---- thread-count determinism --------------------------------------------------------------------------

namespace {

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0, 1);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

// Runs fn with 1, 2 and 3 threads and checks the outputs are the same bits.
template <class F>
void same_bits_for_1_2_3_threads(const std::string& what, F&& fn) {
  const int saved = cpu::num_threads();
  std::vector<std::vector<float>> outs;
  for (int threads : {1, 2, 3}) {
    cpu::set_num_threads(threads);
    outs.push_back(fn());
  }
  cpu::set_num_threads(saved);
  INFO(what);
  REQUIRE(outs[0].size() == outs[1].size());
  CHECK(std::memcmp(outs[0].data(), outs[1].data(), outs[0].size() * sizeof(float)) == 0);
  CHECK(std::memcmp(outs[0].data(), outs[2].data(), outs[0].size() * sizeof(float)) == 0);
}

}  // namespace

TEST_CASE("conv2d on shapes that take the banded and grouped paths matches the definition (direct loops in double)") {
  // The PyTorch fixtures' shapes are small; these take conv.cpp's other paths: im2col a band of output rows
  // at a time (C*R*S*P*Q over 64k elements: 16x3x3 on 24x24, the stem's 7x7/2 on 80x72) and several samples
  // per GEMM (4x4, 7x7 maps).
  const cpu::ConvShape shapes[] = {{2, 16, 24, 24, 8, 3, 3, 1, 1},
                                   {2, 3, 80, 72, 8, 7, 7, 2, 3},
                                   {3, 24, 30, 26, 8, 3, 3, 2, 1},
                                   {5, 12, 7, 7, 10, 3, 3, 1, 1},
                                   {6, 20, 4, 4, 12, 1, 1, 1, 0}};
  for (const auto& s : shapes) {
    const int P = s.P(), Q = s.Q();
    const size_t nx = size_t(s.N) * s.C * s.H * s.W, nw = size_t(s.K) * s.C * s.R * s.S, ny = size_t(s.N) * s.K * P * Q;
    const auto x = random_floats(nx, 41), w = random_floats(nw, 42), dy = random_floats(ny, 43);
    std::vector<double> ry(ny, 0.0), rdx(nx, 0.0), rdw(nw, 0.0);
    for (int n = 0; n < s.N; ++n)
      for (int k = 0; k < s.K; ++k)
        for (int p = 0; p < P; ++p)
          for (int q = 0; q < Q; ++q) {
            const size_t yi = ((size_t(n) * s.K + k) * P + p) * Q + q;
            for (int c = 0; c < s.C; ++c)
              for (int r = 0; r < s.R; ++r)
                for (int t = 0; t < s.S; ++t) {
                  const int h = p * s.stride - s.pad + r, ww = q * s.stride - s.pad + t;
                  if (h < 0 || h >= s.H || ww < 0 || ww >= s.W) continue;
                  const size_t xi = ((size_t(n) * s.C + c) * s.H + h) * s.W + ww;
                  const size_t wi = ((size_t(k) * s.C + c) * s.R + r) * s.S + t;
                  ry[yi] += double(x[xi]) * w[wi];
                  rdx[xi] += double(dy[yi]) * w[wi];
                  rdw[wi] += double(dy[yi]) * x[xi];
                }
          }
    std::vector<float> y(ny), dx(nx), dw(nw);
    cpu::conv2d_fwd<float>(s, x.data(), w.data(), y.data());
    cpu::conv2d_bwd_data<float>(s, dy.data(), w.data(), dx.data());
    cpu::conv2d_bwd_filter<float>(s, x.data(), dy.data(), dw.data());
    INFO("N" << s.N << " C" << s.C << " " << s.H << "x" << s.W << " K" << s.K << " " << s.R << "x" << s.S << " s"
             << s.stride);
    auto f = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
    CHECK(vbtest::rel_err(y, f(ry)) <= 1e-6);
    CHECK(vbtest::rel_err(dx, f(rdx)) <= 1e-6);
    CHECK(vbtest::rel_err(dw, f(rdw)) <= 1e-6);
  }
}

TEST_CASE("conv on a batch (samples grouped into one GEMM on small maps) matches the convolution of each sample") {
  // Small feature maps take several samples per GEMM (kernels/cpu/conv.cpp): the forward and data gradient
  // must be the per-sample results bit for bit, the filter gradient their sum up to rounding. Shapes: 20x20
  // (3 samples per group, so a batch of 4 ends with a group of 1), 7x7, 2x2, 1x1 and strided variants.
  const cpu::ConvShape shapes[] = {{4, 16, 20, 20, 24, 3, 3, 1, 1}, {5, 32, 7, 7, 16, 3, 3, 1, 1},
                                   {6, 24, 4, 4, 40, 3, 3, 2, 1},   {5, 48, 7, 7, 64, 1, 1, 1, 0},
                                   {3, 40, 2, 2, 24, 1, 1, 1, 0},   {4, 32, 8, 8, 48, 1, 1, 2, 0}};
  for (const auto& s : shapes) {
    const int64_t xs = int64_t(s.C) * s.H * s.W, ys = int64_t(s.K) * s.P() * s.Q(), ws = int64_t(s.K) * s.C * s.R * s.S;
    const auto x = random_floats(size_t(s.N * xs), 11), w = random_floats(size_t(ws), 12),
               dy = random_floats(size_t(s.N * ys), 13);
    std::vector<float> y(size_t(s.N * ys)), dx(size_t(s.N * xs)), dw(static_cast<size_t>(ws));
    cpu::conv2d_fwd<float>(s, x.data(), w.data(), y.data());
    cpu::conv2d_bwd_data<float>(s, dy.data(), w.data(), dx.data());
    cpu::conv2d_bwd_filter<float>(s, x.data(), dy.data(), dw.data());
    cpu::ConvShape one = s;
    one.N = 1;
    std::vector<float> y1(size_t(s.N * ys)), dx1(size_t(s.N * xs)), dw_sum(static_cast<size_t>(ws), 0.0f), dw1(static_cast<size_t>(ws));
    for (int n = 0; n < s.N; ++n) {
      cpu::conv2d_fwd<float>(one, x.data() + n * xs, w.data(), y1.data() + n * ys);
      cpu::conv2d_bwd_data<float>(one, dy.data() + n * ys, w.data(), dx1.data() + n * xs);
      cpu::conv2d_bwd_filter<float>(one, x.data() + n * xs, dy.data() + n * ys, dw1.data());
      for (size_t i = 0; i < dw1.size(); ++i) dw_sum[i] += dw1[i];
    }
    INFO("N" << s.N << " C" << s.C << " " << s.H << "x" << s.W << " K" << s.K << " " << s.R << "x" << s.S << " s"
             << s.stride);
    CHECK(std::memcmp(y.data(), y1.data(), y.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(dx.data(), dx1.data(), dx.size() * sizeof(float)) == 0);
    // Sums of thousands of products, some cancelling to near zero: held to the tensor's scale, not per element.
    const double r = vbtest::rel_err(dw, dw_sum);
    double worst = 0, scale = 0;
    for (size_t i = 0; i < dw.size(); ++i) {
      worst = std::max(worst, double(std::fabs(dw[i] - dw_sum[i])));
      scale = std::max(scale, double(std::fabs(dw_sum[i])));
    }
    INFO("filter gradient: rel_err " << r << ", largest difference " << worst << " of largest value " << scale);
    CHECK(r <= 1e-6);
    CHECK(worst <= 1e-6 * scale);
  }
}

TEST_CASE("fused batch norm (+ residual + ReLU, and its backward) is the unfused ops composed, bit for bit") {
  // bn_fused.h against batchnorm_* followed by add / relu_fwd / relu_bwd (which are checked against PyTorch
  // above): planes of 2x2 (the deep stages of a small input), odd 5x3, and 17x16, with and without each part.
  struct Case {
    int N, C, HW;
  };
  const bool bools[] = {false, true};
  for (const Case& k : {Case{6, 70, 4}, Case{3, 5, 15}, Case{2, 9, 272}}) {
    const size_t n = size_t(k.N) * k.C * k.HW, nc = size_t(k.C);
    const auto x = random_floats(n, 21), r = random_floats(n, 22), dy = random_floats(n, 23);
    const auto gamma = random_floats(nc, 24), beta = random_floats(nc, 25);
    for (bool use_res : bools)
      for (bool relu : bools) {
        INFO("N" << k.N << " C" << k.C << " HW" << k.HW << (use_res ? " residual" : "") << (relu ? " relu" : ""));
        const float* res = use_res ? r.data() : nullptr;
        auto epilogue = [&](std::vector<float>& y) {
          if (res) cpu::add<float>(int64_t(n), y.data(), res, y.data());
          if (relu) cpu::relu_fwd<float>(int64_t(n), y.data(), y.data());
        };
        auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
          return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
        };
        // Training forward.
        std::vector<float> y0(n), m0(nc), s0(nc), rm0(nc, 0.5f), rv0(nc, 2.0f);
        cpu::batchnorm_train_fwd<float>(k.N, k.C, k.HW, x.data(), gamma.data(), beta.data(), y0.data(), m0.data(),
                                        s0.data(), rm0.data(), rv0.data(), 0.1, 1e-5);
        epilogue(y0);
        std::vector<float> y1(n), m1(nc), s1(nc), rm1(nc, 0.5f), rv1(nc, 2.0f);
        cpu::bn_train_fwd_fused<float>(k.N, k.C, k.HW, x.data(), gamma.data(), beta.data(), res, relu, y1.data(),
                                       m1.data(), s1.data(), rm1.data(), rv1.data(), 0.1, 1e-5);
        CHECK(same(y0, y1));
        CHECK(same(m0, m1));
        CHECK(same(s0, s1));
        CHECK(same(rm0, rm1));
        CHECK(same(rv0, rv1));
        // Evaluation forward (running statistics).
        std::vector<float> e0(n), e1(n);
        cpu::batchnorm_eval_fwd<float>(k.N, k.C, k.HW, x.data(), gamma.data(), beta.data(), rm0.data(), rv0.data(),
                                       1e-5, e0.data());
        epilogue(e0);
        cpu::bn_eval_fwd_fused<float>(k.N, k.C, k.HW, x.data(), gamma.data(), beta.data(), rm0.data(), rv0.data(),
                                      1e-5, res, relu, e1.data());
        CHECK(same(e0, e1));
        // Recomputation from the saved statistics (no residual), as backward does.
        if (!use_res) {
          std::vector<float> a1(n);
          cpu::bn_apply_fused<float>(k.N, k.C, k.HW, x.data(), gamma.data(), beta.data(), m1.data(), s1.data(), relu,
                                     a1.data());
          CHECK(same(y1, a1));
        }
        // Backward of y = act(bn(x) + residual).
        std::vector<float> g(dy), dx0(n), dg0(nc), db0(nc);
        if (relu) cpu::relu_bwd<float>(int64_t(n), y0.data(), dy.data(), g.data());
        cpu::batchnorm_bwd<float>(k.N, k.C, k.HW, x.data(), g.data(), gamma.data(), m0.data(), s0.data(), dx0.data(),
                                  dg0.data(), db0.data());
        std::vector<float> dx1(n), dr1(n), dg1(nc), db1(nc);
        cpu::bn_bwd_fused<float>(k.N, k.C, k.HW, x.data(), y1.data(), dy.data(), gamma.data(), m1.data(), s1.data(),
                                 relu, dx1.data(), dr1.data(), dg1.data(), db1.data());
        CHECK(same(dx0, dx1));
        CHECK(same(g, dr1));
        CHECK(same(dg0, dg1));
        CHECK(same(db0, db1));
        // dx written over dy, as the model's scratch plan may do.
        std::vector<float> inplace(dy);
        cpu::bn_bwd_fused<float>(k.N, k.C, k.HW, x.data(), y1.data(), inplace.data(), gamma.data(), m1.data(),
                                 s1.data(), relu, inplace.data(), nullptr, nullptr, nullptr);
        CHECK(same(dx0, inplace));
      }
  }
}

TEST_CASE("fast max pooling gives maxpool_fwd / maxpool_bwd's results") {
  // pool_fast.h against pool.cpp's definitions (checked against PyTorch above): values on a coarse grid, so
  // windows tie often (the backward must pick the same first maximum), planes all -inf, planes with a NaN
  // (handed to the definitions), and the stem's 3x3/2/1 as well as other kernels, strides and paddings.
  struct Case {
    int N, C, H, W, k, s, p;
  };
  for (const Case& t : {Case{2, 3, 32, 32, 3, 2, 1}, Case{3, 2, 17, 13, 3, 2, 1}, Case{2, 2, 9, 10, 2, 2, 0},
                        Case{1, 3, 11, 7, 5, 3, 2}, Case{2, 2, 6, 6, 3, 1, 1}}) {
    const size_t in = size_t(t.N) * t.C * t.H * t.W;
    std::mt19937 gen(31);
    std::uniform_int_distribution<int> level(-3, 3);
    std::vector<float> x(in);
    for (float& v : x) v = 0.5f * float(level(gen));
    const size_t plane = size_t(t.H) * t.W;
    std::fill(x.begin() + plane, x.begin() + 2 * plane, -std::numeric_limits<float>::infinity());  // plane 1
    x[2 * plane + 5] = std::numeric_limits<float>::quiet_NaN();                                      // plane 2
    const int P = (t.H + 2 * t.p - t.k) / t.s + 1, Q = (t.W + 2 * t.p - t.k) / t.s + 1;
    const size_t out = size_t(t.N) * t.C * P * Q;
    const auto dy = random_floats(out, 32);
    std::vector<float> y0(out), y1(out), dx0(in), dx1(in);
    cpu::maxpool_fwd<float>(t.N, t.C, t.H, t.W, t.k, t.s, t.p, x.data(), y0.data());
    cpu::maxpool_fwd_fast<float>(t.N, t.C, t.H, t.W, t.k, t.s, t.p, x.data(), y1.data());
    cpu::maxpool_bwd<float>(t.N, t.C, t.H, t.W, t.k, t.s, t.p, x.data(), dy.data(), dx0.data());
    cpu::maxpool_bwd_fast<float>(t.N, t.C, t.H, t.W, t.k, t.s, t.p, x.data(), dy.data(), dx1.data());
    INFO(t.H << "x" << t.W << " k" << t.k << " s" << t.s << " p" << t.p);
    CHECK(std::memcmp(y0.data(), y1.data(), out * sizeof(float)) == 0);
    CHECK(std::memcmp(dx0.data(), dx1.data(), in * sizeof(float)) == 0);
  }
}

TEST_CASE("conv and batch norm results are bit-identical for 1, 2 and 3 threads") {
  // Batches of 1, 3 and 4 take both paths (batch split or not) depending on the thread count; C*R*S = 576
  // spans two K blocks of the GEMM.
  const cpu::ConvShape shapes[] = {{1, 64, 20, 19, 48, 3, 3, 1, 1},
                                   {3, 64, 20, 19, 48, 3, 3, 1, 1},
                                   {4, 32, 15, 15, 40, 3, 3, 2, 1},
                                   {4, 96, 9, 9, 80, 1, 1, 1, 0},
                                   {7, 16, 20, 20, 24, 3, 3, 1, 1},  // groups of 3 samples: 3 + 3 + 1
                                   {5, 64, 4, 4, 32, 3, 3, 2, 1},
                                   {2, 3, 41, 37, 16, 7, 7, 2, 3}};
  for (const auto& s : shapes) {
    const auto x = random_floats(size_t(s.N) * s.C * s.H * s.W, 1);
    const auto w = random_floats(size_t(s.K) * s.C * s.R * s.S, 2);
    const auto dy = random_floats(size_t(s.N) * s.K * s.P() * s.Q(), 3);
    const std::string tag = "N=" + std::to_string(s.N) + " C=" + std::to_string(s.C) + " K=" + std::to_string(s.K) +
                            " R=" + std::to_string(s.R) + " stride=" + std::to_string(s.stride);
    same_bits_for_1_2_3_threads("conv fwd " + tag, [&] {
      std::vector<float> y(dy.size());
      cpu::conv2d_fwd<float>(s, x.data(), w.data(), y.data());
      return y;
    });
    same_bits_for_1_2_3_threads("conv bwd data " + tag, [&] {
      std::vector<float> dx(x.size());
      cpu::conv2d_bwd_data<float>(s, dy.data(), w.data(), dx.data());
      return dx;
    });
    same_bits_for_1_2_3_threads("conv bwd filter " + tag, [&] {
      std::vector<float> dw(w.size());
      cpu::conv2d_bwd_filter<float>(s, x.data(), dy.data(), dw.data());
      return dw;
    });
  }
  const int N = 3, C = 40, HW = 33 * 31;
  const auto x = random_floats(size_t(N) * C * HW, 4), dy = random_floats(size_t(N) * C * HW, 5);
  const auto gamma = random_floats(size_t(C), 6), beta = random_floats(size_t(C), 7);
  same_bits_for_1_2_3_threads("batch norm", [&] {
    const size_t nc = C;
    std::vector<float> y(x.size()), mean(nc), invstd(nc), rm(nc, 0.0f), rv(nc, 1.0f), dx(x.size()), dg(nc), db(nc);
    cpu::batchnorm_train_fwd<float>(N, C, HW, x.data(), gamma.data(), beta.data(), y.data(), mean.data(), invstd.data(),
                                    rm.data(), rv.data(), 0.1, 1e-5);
    cpu::batchnorm_bwd<float>(N, C, HW, x.data(), dy.data(), gamma.data(), mean.data(), invstd.data(), dx.data(),
                              dg.data(), db.data());
    std::vector<float> all = y;
    for (const auto* v : {&mean, &invstd, &rm, &rv, &dx, &dg, &db}) all.insert(all.end(), v->begin(), v->end());
    return all;
  });
}

TEST_CASE("relu and add: values, NaN propagation as torch, in-place use") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> x = {-2, -0.0f, 0, 3, nan, 1e-30f};
  std::vector<float> y(x.size());
  cpu::relu_fwd<float>(int64_t(x.size()), x.data(), y.data());
  CHECK(y[0] == 0);
  CHECK(y[2] == 0);
  CHECK(y[3] == 3);
  CHECK(std::isnan(y[4]));  // torch.relu(nan) is nan
  CHECK(y[5] == 1e-30f);
  std::vector<float> dy = {1, 2, 3, 4, 5, 6}, dx(6);
  cpu::relu_bwd<float>(6, y.data(), dy.data(), dx.data());
  CHECK(dx == std::vector<float>{0, 0, 0, 4, 5, 6});        // zero where y <= 0; a NaN output passes the gradient
  cpu::relu_bwd<float>(6, y.data(), dy.data(), dy.data());  // dx may alias dy
  CHECK(dy == dx);
  // Large enough to be split over threads; y aliases x.
  const int64_t n = 1 << 20;
  std::vector<float> a(n), b(n);
  for (int64_t i = 0; i < n; ++i) {
    a[size_t(i)] = float(i % 7) - 3;
    b[size_t(i)] = float(i % 5);
  }
  auto a0 = a;
  cpu::add<float>(n, a.data(), b.data(), a.data());
  cpu::relu_fwd<float>(n, a.data(), a.data());
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += a[size_t(i)] != std::max(0.0f, a0[size_t(i)] + b[size_t(i)]);
  CHECK(bad == 0);
}

TEST_CASE("max pool with NaN: as PyTorch, the window's last NaN is its maximum and takes the gradient") {
  // PyTorch 2 (CPU), torch.nn.functional.max_pool2d(x, 2, 1, 0, return_indices=True) on this 3x3 plane:
  // y = [[nan, nan], [nan, 5]], indices [[3, 1], [3, 4]]; with dy = [[1, 2], [3, 4]],
  // x.grad = [[0, 2, 0], [4, 4, 0], [0, 0, 0]]. A window of -inf only yields -inf at its first element.
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const std::vector<float> x = {1, nan, 2, nan, 5, -inf, -inf, -inf, -inf};
  std::vector<float> y = poisoned<float>(4), dy = {1, 2, 3, 4}, dx = poisoned<float>(9);
  cpu::maxpool_fwd<float>(1, 1, 3, 3, 2, 1, 0, x.data(), y.data());
  cpu::maxpool_bwd<float>(1, 1, 3, 3, 2, 1, 0, x.data(), dy.data(), dx.data());
  CHECK(std::isnan(y[0]));
  CHECK(std::isnan(y[1]));
  CHECK(std::isnan(y[2]));
  CHECK(y[3] == 5);
  CHECK(dx == std::vector<float>{0, 2, 0, 4, 4, 0, 0, 0, 0});
  const std::vector<float> minf(4, -inf);
  std::vector<float> y1(1), d1(4), g1 = {7};
  cpu::maxpool_fwd<float>(1, 1, 2, 2, 2, 1, 0, minf.data(), y1.data());
  cpu::maxpool_bwd<float>(1, 1, 2, 2, 2, 1, 0, minf.data(), g1.data(), d1.data());
  CHECK(y1[0] == -inf);
  CHECK(d1 == std::vector<float>{7, 0, 0, 0});
}

TEST_CASE("training batch norm refuses one value per channel, as PyTorch does; two are enough") {
  // torch.nn.BatchNorm2d(3).train()(torch.randn(1, 3, 1, 1)) raises "Expected more than 1 value per channel
  // when training"; (1, 3, 1, 2) is accepted. Both the kernel and the backend refuse, with a message that says why.
  const std::vector<float> x = {0.5f, -1.f, 2.f, 3.f, 4.f, 5.f}, g(3, 1.f), b(3, 0.f);
  std::vector<float> y(6), sm(3), si(3);
  for (int W : {1, 2}) {
    auto run_kernel = [&] {
      cpu::batchnorm_train_fwd<float>(1, 3, W, x.data(), g.data(), b.data(), y.data(), sm.data(), si.data(),
                                      nullptr, nullptr, 0.1, 1e-5);
    };
    if (W == 1) {
      CHECK_THROWS_WITH_AS(run_kernel(), doctest::Contains("more than one value per channel"), Error);
    } else {
      CHECK_NOTHROW(run_kernel());
      CHECK(sm[0] == doctest::Approx(-0.25));  // channel 0 holds 0.5 and -1
    }
    for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
      std::unique_ptr<Backend> be = make_cpu_backend(1, layout);
      auto run_backend = [&] {
        be->bn_train_fwd(1, 3, 1, W, x.data(), g.data(), b.data(), nullptr, true, y.data(), sm.data(), si.data(),
                         nullptr, nullptr, 0.1, 1e-5);
      };
      if (W == 1) {
        CHECK_THROWS_WITH_AS(run_backend(), doctest::Contains("more than one value per channel"), Error);
      } else {
        CHECK_NOTHROW(run_backend());
        // NCHW: channel 0 holds x[0] and x[1] (0.5 and -1); NHWC: x[0] and x[3] (0.5 and 3).
        CHECK(sm[0] == doctest::Approx(layout == Layout::NCHW ? -0.25 : 1.75));
      }
    }
  }
  // Evaluation mode has no such limit.
  std::vector<float> rm(3, 0.f), rv(3, 1.f);
  CHECK_NOTHROW(cpu::batchnorm_eval_fwd<float>(1, 3, 1, x.data(), g.data(), b.data(), rm.data(), rv.data(), 1e-5,
                                               y.data()));
}

TEST_CASE("convolution algorithm cache: one search per layer for the largest batch, reused for smaller ones") {
  ConvAlgoCache cache;
  const ConvLayerKey fwd{64, 56, 56, 64, 3, 3, 1, 1, int(Precision::TF32), 0, 0};
  ConvLayerKey bwd = fwd;
  bwd.direction = 2;
  ConvLayerKey fp32 = fwd;
  fp32.precision = int(Precision::FP32);
  CHECK_FALSE(cache.find(fwd, 150).has_value());  // never seen: search
  cache.record(fwd, 150, ConvAlgoChoice{6, 1, 1000});
  // The run's batches: full ones, the last partial batch of each split, batches that lost skipped images.
  for (int n : {150, 149, 37, 1}) {
    auto hit = cache.find(fwd, n);
    REQUIRE(hit.has_value());
    CHECK(hit->batch == 150);
    CHECK(hit->choice.algo == 6);
    CHECK(hit->choice.workspace == 1000);
  }
  // Other directions, precisions and determinism are other choices.
  CHECK_FALSE(cache.find(bwd, 10).has_value());
  CHECK_FALSE(cache.find(fp32, 10).has_value());
  ConvLayerKey det = fwd;
  det.deterministic = 1;
  CHECK_FALSE(cache.find(det, 10).has_value());
  // A larger batch searches again; a choice refused for a smaller shape is searched and kept for it exactly,
  // and the nearest larger search serves each batch.
  CHECK_FALSE(cache.find(fwd, 151).has_value());
  cache.record(fwd, 300, ConvAlgoChoice{1, 0, 5000});
  cache.record(fwd, 12, ConvAlgoChoice{0, 0, 0});
  CHECK(cache.find(fwd, 200)->batch == 300);
  CHECK(cache.find(fwd, 150)->batch == 150);
  CHECK(cache.find(fwd, 13)->batch == 150);
  CHECK(cache.find(fwd, 12)->batch == 12);
  CHECK(cache.find(fwd, 3)->choice.algo == 0);
  CHECK(cache.searches() == 3);
}

TEST_CASE("backend scalars read back in order, and a memory limit refuses allocations beyond it (CPU)") {
  std::unique_ptr<Backend> be = make_cpu_backend(1);
  float* d = static_cast<float*>(be->alloc(3 * sizeof(float)));
  const float vals[3] = {1.5f, -2.f, std::numeric_limits<float>::quiet_NaN()};
  be->upload(d, vals, sizeof vals);
  float v = 0;
  CHECK_FALSE(be->scalar_pop(&v, true));  // nothing queued
  for (int i = 0; i < 3; ++i) be->scalar_push(d + i);
  be->wait_uploads();
  CHECK(be->scalar_pop(&v, false));
  CHECK(v == 1.5f);
  CHECK(be->scalar_pop(&v, true));
  CHECK(v == -2.f);
  CHECK(be->scalar_pop(&v, false));
  CHECK(std::isnan(v));
  CHECK_FALSE(be->scalar_pop(&v, false));
  // The value as it stood at the push, not as it is at the pop.
  be->scalar_push(d);
  const float later = 9.f;
  be->upload(d, &later, sizeof later);
  CHECK(be->scalar_pop(&v, true));
  CHECK(v == 1.5f);

  const size_t held = be->memory_in_use();
  be->set_memory_limit(held + 1024);
  void* ok = be->alloc(1000);
  CHECK_THROWS_WITH_AS(be->alloc(1000), doctest::Contains("out of memory"), Error);
  CHECK(be->memory_in_use() == held + 1024);  // the failed allocation holds nothing
  be->set_memory_limit(0);
  void* more = be->alloc(1000);
  be->release(more);
  be->release(ok);
  be->release(d);
}
