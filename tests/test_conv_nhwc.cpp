// The NHWC convolution (kernels/cpu/conv_nhwc.h) against the NCHW one (conv.cpp, itself checked against PyTorch
// and finite differences): forward, data and filter gradients on transposed copies of the same data, for every
// kind of layer ResNet has (3x3 stride 1 and 2, 1x1 stride 1 and 2, the 7x7 stride-2 stem on 3 channels) and for
// awkward ones (channel counts that are not a multiple of the 16-wide tile, pixels not a multiple of 6, padding
// wider than the image, a batch of 1). Double agrees to 1e-13 relative (only the summation order differs);
// float is judged beside the NCHW float against the double result. The bits must not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/conv_nhwc.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "tests/nhwc_util.h"
#include "tests/test_util.h"

using vb::cpu::ConvShape;

namespace {

using vbtest::random_vec;

template <class T>
std::vector<T> to_nhwc(const std::vector<T>& v, int N, int C, int HW) {
  std::vector<T> o(v.size());
  vb::cpu::nchw_to_nhwc<T>(N, C, HW, v.data(), o.data());
  return o;
}
template <class T>
std::vector<T> to_nchw(const std::vector<T>& v, int N, int C, int HW) {
  std::vector<T> o(v.size());
  vb::cpu::nhwc_to_nchw<T>(N, C, HW, v.data(), o.data());
  return o;
}

// max |a - b| / (scale * (1 + |b|)) over elements must be <= 1.
template <class T>
void expect_close(const std::vector<T>& a, const std::vector<T>& b, double tol, const char* what) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - double(b[i])) / (1 + std::fabs(double(b[i])));
    if (!(d <= worst)) {
      worst = d;
      at = i;
    }
  }
  INFO(std::string(what) << ": worst relative difference " << worst << " at " << at << " (" << double(a[at]) << " vs "
            << double(b[at]) << "), bound " << tol);
  CHECK(worst <= tol);
}

// Runs the NHWC kernels on the transposed data and returns their results in NCHW order.
template <class T>
void run_nhwc(const ConvShape& s, const std::vector<T>& x, const std::vector<T>& w, const std::vector<T>& dy,
              std::vector<T>& y, std::vector<T>& dx, std::vector<T>& dw) {
  const int P = s.P(), Q = s.Q();
  const auto xh = to_nhwc(x, s.N, s.C, s.H * s.W), dyh = to_nhwc(dy, s.N, s.K, P * Q);
  std::vector<T> yh(size_t(s.N) * s.K * P * Q, T(7)), dxh(x.size(), T(7));
  dw.assign(w.size(), T(7));
  vb::cpu::conv2d_nhwc_fwd<T>(s, xh.data(), w.data(), yh.data());
  vb::cpu::conv2d_nhwc_bwd_data<T>(s, dyh.data(), w.data(), dxh.data());
  vb::cpu::conv2d_nhwc_bwd_filter<T>(s, xh.data(), dyh.data(), dw.data());
  y = to_nchw(yh, s.N, s.K, P * Q);
  dx = to_nchw(dxh, s.N, s.C, s.H * s.W);
}

template <class T>
std::vector<double> widen(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

// Double: the NHWC results equal the NCHW ones up to the summation order (relative bound `tol`). Float: both
// are judged against the double result of the same inputs, and the NHWC error may be at most twice the NCHW
// error (plus a floor): the same precision, another order.
template <class T>
void check_shape(const ConvShape& s, double tol) {
  INFO("N=" << s.N << " C=" << s.C << " H=" << s.H << " W=" << s.W << " K=" << s.K << " R=" << s.R
            << " stride=" << s.stride << " pad=" << s.pad);
  const int P = s.P(), Q = s.Q();
  const auto x = random_vec<T>(size_t(s.N) * s.C * s.H * s.W, 1);
  const auto w = random_vec<T>(size_t(s.K) * s.C * s.R * s.S, 2);
  const auto dy = random_vec<T>(size_t(s.N) * s.K * P * Q, 3);
  std::vector<T> ry(dy.size()), rdx(x.size()), rdw(w.size());
  vb::cpu::conv2d_fwd<T>(s, x.data(), w.data(), ry.data());
  vb::cpu::conv2d_bwd_data<T>(s, dy.data(), w.data(), rdx.data());
  vb::cpu::conv2d_bwd_filter<T>(s, x.data(), dy.data(), rdw.data());

  std::vector<T> y, dx, dw;
  run_nhwc(s, x, w, dy, y, dx, dw);
  if constexpr (std::is_same_v<T, double>) {
    expect_close(y, ry, tol, "forward");
    expect_close(dx, rdx, tol, "data gradient");
    expect_close(dw, rdw, tol, "filter gradient");
  } else {
    const auto xd = widen(x), wd = widen(w), dyd = widen(dy);
    std::vector<double> ty(dy.size()), tdx(x.size()), tdw(w.size());
    vb::cpu::conv2d_fwd<double>(s, xd.data(), wd.data(), ty.data());
    vb::cpu::conv2d_bwd_data<double>(s, dyd.data(), wd.data(), tdx.data());
    vb::cpu::conv2d_bwd_filter<double>(s, xd.data(), dyd.data(), tdw.data());
    const bool winograd = vb::cpu::conv2d_nhwc_winograd<T>(s, vb::cpu::ConvPass::FilterGradient);
    auto nchw_err = [&](const std::string& what) {
      return what == "forward" ? max_abs_diff(widen(ry), ty)
             : what == "data gradient" ? max_abs_diff(widen(rdx), tdx) : max_abs_diff(widen(rdw), tdw);
    };
    const std::pair<const char*, double> errs[] = {
        {"forward", max_abs_diff(widen(y), ty) - 2 * max_abs_diff(widen(ry), ty)},
        // The NCHW data gradient sums K terms per tap, then the R*S taps (col2im); the NHWC one sums all R*S*K
        // in one chain, whose rounding error grows about sqrt(R*S) times larger.
        {"data gradient", max_abs_diff(widen(dx), tdx) - 2 * std::sqrt(double(s.R * s.S)) * max_abs_diff(widen(rdx), tdx)},
        // Winograd's filter gradient sums products of transformed values (each a sum of up to 4 inputs and 4
        // output gradients) over the tiles, then combines up to 9 of those sums per weight: measured 2.3x the
        // direct error on the 56x56 layer.
        {"filter gradient",
         max_abs_diff(widen(dw), tdw) - (winograd ? 3 : 2) * max_abs_diff(widen(rdw), tdw)}};
    for (const auto& [what, excess] : errs) {
      INFO(std::string(what) << ": NHWC error minus twice the NCHW error = " << excess << " (NCHW error " << nchw_err(what) << ")");
      CHECK(excess <= tol);
    }
  }

  // Thread-count independence: 1 thread and 2 threads give the same bits.
  const int before = vb::cpu::num_threads();
  std::vector<T> y1, dx1, dw1, y2, dx2, dw2;
  vb::cpu::set_num_threads(1);
  run_nhwc(s, x, w, dy, y1, dx1, dw1);
  vb::cpu::set_num_threads(2);
  run_nhwc(s, x, w, dy, y2, dx2, dw2);
  vb::cpu::set_num_threads(before);
  CHECK(y1 == y2);
  CHECK(dx1 == dx2);
  CHECK(dw1 == dw2);
}

// N, C, H, W, K, R, S, stride, pad
const ConvShape kShapes[] = {
    {2, 16, 9, 9, 16, 3, 3, 1, 1},     // 3x3 stride 1
    {2, 32, 10, 10, 32, 3, 3, 2, 1},   // 3x3 stride 2, even map
    {3, 24, 7, 7, 40, 3, 3, 2, 1},     // 3x3 stride 2, odd map, K not a multiple of 16
    {2, 64, 7, 7, 48, 3, 3, 1, 1},     // layer4-like
    {2, 64, 6, 6, 256, 1, 1, 1, 0},    // 1x1 expand
    {2, 96, 5, 5, 20, 1, 1, 1, 0},     // 1x1 reduce, odd K
    {2, 64, 9, 9, 128, 1, 1, 2, 0},    // 1x1 stride-2 downsample, odd map
    {2, 3, 23, 21, 16, 7, 7, 2, 3},    // the stem on a non-square input
    {1, 5, 6, 11, 7, 3, 3, 1, 1},      // few channels (staged rows), tiny K
    {1, 8, 3, 3, 10, 3, 3, 1, 2},      // padding wider than needed
    {4, 17, 2, 2, 33, 3, 3, 2, 1},     // 2x2 map, stride 2 -> 1x1
    {1, 16, 1, 1, 16, 1, 1, 1, 0},     // one pixel
    // Filter gradients: per-block partial sums (8 blocks of 288 pixels; a pointwise one, 7 blocks), and blocks
    // accumulated one after another (a result too large for partial sums).
    {4, 16, 24, 24, 16, 3, 3, 1, 1},
    {4, 16, 20, 20, 32, 1, 1, 1, 0},
    {4, 256, 16, 16, 256, 3, 3, 1, 1},
    // Few input channels (kernel rows as segments) with enough pixels for the partial-sum filter gradient.
    {4, 3, 40, 36, 32, 7, 7, 2, 3},
    {2, 5, 30, 30, 16, 3, 3, 1, 1},
    // The filter gradient by kernel rows (fewer than 8 channels, a row of L = S*C values with W < L <= 3W for W
    // values a vector, K a multiple of 4): L = 9 (2 vectors in float, 3 in double), padding that cuts rows on
    // both sides, padding wider than the kernel (output pixels with no row or column inside the image: a
    // pointer table overrun once), L = 6 (2 vectors in double), L = 16 and 24 (exactly 2 and 3 in float).
    {3, 3, 17, 19, 8, 3, 3, 2, 1},
    {2, 4, 5, 6, 12, 5, 5, 1, 4},
    {4, 3, 1, 1, 4, 3, 3, 1, 5},
    {2, 2, 9, 9, 8, 3, 3, 1, 1},
    {2, 4, 12, 12, 8, 4, 4, 2, 1},
    {2, 3, 20, 20, 8, 8, 8, 2, 3},
    // The data gradient with stride 3 (nine parity classes), Winograd with padding 2, and a 4x5 map (Winograd
    // for the filter gradient only; the layer4-like 7x7 shape above is another: at a batch of 2 it has too few
    // tiles for the forward's and data gradient's Winograd below 8x8).
    {1, 8, 11, 11, 8, 3, 3, 3, 1},
    {1, 32, 10, 10, 32, 3, 3, 1, 2},
    {3, 32, 4, 5, 32, 3, 3, 1, 1},
    // A 1x1 convolution with padding and more channels than a KC pass: its border pixels have no tap at all.
    {1, 384, 3, 3, 16, 1, 1, 1, 1},
    // Winograd F(2x2, 3x3) (3x3 stride 1, at least 32 channels, maps of 8x8 or more, or 6x6 with 48 tiles or
    // more): odd output sizes (edge tiles), no padding (its data gradient pads by 2), a 56-wide map of the first
    // stage, and 7x7 and 6x7 maps with just enough tiles.
    {2, 32, 9, 11, 48, 3, 3, 1, 1},
    {3, 32, 7, 7, 32, 3, 3, 1, 1},
    {4, 32, 6, 7, 48, 3, 3, 1, 1},
    {1, 32, 12, 13, 32, 3, 3, 1, 0},
    {1, 64, 56, 56, 64, 3, 3, 1, 1},
};

}  // namespace

TEST_CASE("NHWC convolution matches the NCHW one in double") {
  for (const ConvShape& s : kShapes) check_shape<double>(s, 1e-13);
}

TEST_CASE("NHWC convolution matches the NCHW one in float") {
  for (const ConvShape& s : kShapes) check_shape<float>(s, 1e-6);
}

TEST_CASE("NHWC convolution: an empty batch leaves a zero filter gradient") {
  const ConvShape s{0, 16, 5, 5, 16, 3, 3, 1, 1};
  std::vector<float> w(16 * 16 * 9, 1.0f), dw(w.size(), 5.0f);
  vb::cpu::conv2d_nhwc_bwd_filter<float>(s, nullptr, nullptr, dw.data());
  for (float v : dw) REQUIRE(v == 0.0f);
}

TEST_CASE("NHWC transposes: the library's against the tests' plain loops, and inverse") {
  const auto v = random_vec<float>(3 * 70 * 13, 9);
  CHECK(to_nhwc(v, 3, 70, 13) == vbtest::to_nhwc(v, 3, 70, 13));
  CHECK(to_nchw(v, 3, 70, 13) == vbtest::to_nchw(v, 3, 70, 13));
  CHECK(to_nchw(to_nhwc(v, 3, 70, 13), 3, 70, 13) == v);
}

TEST_CASE("NHWC convolution with a folded affine epilogue (evaluation's batch norm, residual, ReLU)") {
  // y = act(conv(x, w * scale) + bias + residual) against the plain NHWC convolution followed by the same
  // per-channel arithmetic written out, in double (only the folding's rounding differs) and in float.
  for (const ConvShape& s : {ConvShape{3, 24, 7, 7, 40, 3, 3, 2, 1}, ConvShape{2, 64, 6, 6, 256, 1, 1, 1, 0},
                             ConvShape{2, 3, 23, 21, 16, 7, 7, 2, 3}, ConvShape{2, 32, 9, 11, 48, 3, 3, 1, 1}}) {
    CAPTURE(s.C);
    CAPTURE(s.K);
    const int64_t ny = int64_t(s.N) * s.P() * s.Q() * s.K;
    const auto x = random_vec<double>(size_t(s.N) * s.H * s.W * s.C, 11);
    const auto w = random_vec<double>(size_t(s.K) * s.C * s.R * s.S, 12);
    const auto res = random_vec<double>(size_t(ny), 13);
    auto scale = random_vec<double>(size_t(s.K), 14), bias = random_vec<double>(size_t(s.K), 15);
    for (double& v : scale) v += 1.5;  // away from zero
    std::vector<double> plain(static_cast<size_t>(ny));
    vb::cpu::conv2d_nhwc_fwd<double>(s, x.data(), w.data(), plain.data());
    for (bool with_res : {false, true})
      for (bool relu : {false, true}) {
        std::vector<double> want(static_cast<size_t>(ny)), got(static_cast<size_t>(ny), 7.0);
        int negatives = 0;
        for (int64_t i = 0; i < ny; ++i) {
          const int k = int(i % s.K);
          double v = plain[size_t(i)] * scale[size_t(k)] + bias[size_t(k)];
          if (with_res) v += res[size_t(i)];
          negatives += v < 0;
          want[size_t(i)] = relu && v < 0 ? 0.0 : v;
        }
        REQUIRE(negatives > ny / 10);  // the ReLU has something to do
        vb::cpu::conv2d_nhwc_fwd_affine<double>(s, x.data(), w.data(), scale.data(), bias.data(),
                                                with_res ? res.data() : nullptr, relu, got.data());
        expect_close(got, want, 1e-13, "folded epilogue (double)");
        // Float: the same within float rounding of the folded weights.
        std::vector<float> xf(x.begin(), x.end()), wf(w.begin(), w.end()), rf(res.begin(), res.end()),
            sf(scale.begin(), scale.end()), bf(bias.begin(), bias.end()), gf(static_cast<size_t>(ny));
        vb::cpu::conv2d_nhwc_fwd_affine<float>(s, xf.data(), wf.data(), sf.data(), bf.data(),
                                               with_res ? rf.data() : nullptr, relu, gf.data());
        expect_close(gf, std::vector<float>(want.begin(), want.end()), 2e-5, "folded epilogue (float)");
      }
  }
}

namespace {
// conv2d_nhwc_fwd_prepared against conv2d_nhwc_fwd_affine on the same weights: the same bits, at the batch the
// weights were prepared with and at a smaller one; the prepared values are a copy (later changes to w do not
// reach them); a shape they do not serve is refused.
template <class T>
void check_prepared(const ConvShape& s) {
  const int64_t per_image = int64_t(s.P()) * s.Q() * s.K;
  const auto x = random_vec<T>(size_t(s.N) * s.H * s.W * s.C, 21);
  auto w = random_vec<T>(size_t(s.K) * s.C * s.R * s.S, 22);
  const auto res = random_vec<T>(size_t(s.N * per_image), 23);
  auto scale = random_vec<T>(size_t(s.K), 24);
  const auto bias = random_vec<T>(size_t(s.K), 25);
  for (T& v : scale) v += T(1.5);
  vb::cpu::PreparedConv<T> prepared;
  vb::cpu::conv2d_nhwc_prepare<T>(s, w.data(), scale.data(), prepared);
  CHECK(prepared.winograd == vb::cpu::conv2d_nhwc_winograd<T>(s, vb::cpu::ConvPass::Forward));
  for (int n : {s.N, 1}) {
    ConvShape sn = s;
    sn.N = n;
    for (bool relu : {false, true}) {
      std::vector<T> want(size_t(n * per_image)), got(want.size(), T(7));
      vb::cpu::conv2d_nhwc_fwd_affine<T>(sn, x.data(), w.data(), scale.data(), bias.data(), res.data(), relu,
                                         want.data());
      vb::cpu::conv2d_nhwc_fwd_prepared<T>(sn, x.data(), prepared, bias.data(), res.data(), relu, got.data());
      CHECK(got == want);
    }
  }
  // The weights move after preparing: the prepared values keep the old ones.
  std::vector<T> before(size_t(s.N * per_image)), after(before.size());
  vb::cpu::conv2d_nhwc_fwd_prepared<T>(s, x.data(), prepared, bias.data(), nullptr, false, before.data());
  for (T& v : w) v += T(1);
  vb::cpu::conv2d_nhwc_fwd_prepared<T>(s, x.data(), prepared, bias.data(), nullptr, false, after.data());
  CHECK(after == before);
  ConvShape other = s;
  other.H += 1;
  CHECK_THROWS_WITH_AS(vb::cpu::conv2d_nhwc_fwd_prepared<T>(other, x.data(), prepared, bias.data(), nullptr, false,
                                                            after.data()),
                       doctest::Contains("prepared for another shape"), std::exception);
}
}  // namespace

TEST_CASE("NHWC convolution with prepared weights: the folded forward's bits, any batch") {
  // The stem (few channels: the padded copy), a 1x1, a strided 3x3, and a 3x3 that runs by Winograd.
  const ConvShape wino{3, 32, 9, 11, 48, 3, 3, 1, 1};
  REQUIRE(vb::cpu::conv2d_nhwc_winograd<float>(wino, vb::cpu::ConvPass::Forward));
  for (const ConvShape& s : {ConvShape{3, 3, 23, 21, 16, 7, 7, 2, 3}, ConvShape{2, 64, 6, 6, 256, 1, 1, 1, 0},
                             ConvShape{3, 24, 7, 7, 40, 3, 3, 2, 1}, wino}) {
    CAPTURE(s.C);
    CAPTURE(s.K);
    check_prepared<float>(s);
    check_prepared<double>(s);
  }
}

TEST_CASE("a kernel larger than the padded input is refused, not run past the input") {
  // (2 + 2 - 5) / 3 + 1 is 1 in C++ (the division rounds toward zero), so P() > 0 alone let this through and the
  // few-channel path read past its padded copy.
  const ConvShape s{1, 3, 2, 6, 16, 5, 5, 3, 1};
  std::vector<float> x(size_t(s.N) * s.H * s.W * s.C, 1.f), w(size_t(s.K) * s.C * s.R * s.S, 1.f), y(64);
  CHECK_THROWS_WITH_AS(vb::cpu::conv2d_nhwc_fwd<float>(s, x.data(), w.data(), y.data()),
                       doctest::Contains("bad shape"), std::exception);
  CHECK_THROWS_WITH_AS(vb::cpu::conv2d_fwd<float>(s, x.data(), w.data(), y.data()), doctest::Contains("bad shape"),
                       std::exception);
  ConvShape wide = s;
  wide.W = 2;  // the columns too
  wide.H = 6;
  CHECK_THROWS_WITH_AS(vb::cpu::conv2d_nhwc_fwd<float>(wide, x.data(), w.data(), y.data()),
                       doctest::Contains("bad shape"), std::exception);
}
