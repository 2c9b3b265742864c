// The host bf16 conversions (kernels/bf16.h) on their edge cases, and the NHWC CPU twins (kernels/cpu/nhwc.h)
// against the NCHW CPU ops (kernels/cpu/ops.h, batch norm in their double instantiation) on transposed data:
// float twins within a few float ulps, bf16 twins within bf16's rounding of the float result (the twins compute in float and round once when they store). These twins are
// what tests/test_cuda_nhwc.cpp holds the GPU kernels to.
#include <array>
#include <cmath>
#include <cstring>
#include <ios>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/bf16.h"
#include "kernels/check.h"
#include "kernels/cpu/nhwc.h"
#include "kernels/cpu/ops.h"
#include "tests/nhwc_util.h"
#include "tests/test_util.h"

#ifdef VB_WITH_CUDA
#include <cuda_bf16.h>
#endif

using namespace vb;
using vbtest::check_close;

namespace {

uint16_t rn(uint32_t float_bits_) { return float_to_bf16_bits(bits_float(float_bits_)); }

}  // namespace

TEST_CASE("bf16: round to nearest even, NaN, infinities, denormals, overflow") {
  CHECK(rn(0x3f800000u) == 0x3f80);  // 1
  CHECK(rn(0x3f807fffu) == 0x3f80);  // just below the half: down
  CHECK(rn(0x3f808000u) == 0x3f80);  // tie, even below: down
  CHECK(rn(0x3f808001u) == 0x3f81);  // just above the half: up
  CHECK(rn(0x3f818000u) == 0x3f82);  // tie, odd below: up to even
  CHECK(rn(0xbf818000u) == 0xbf82);  // the same, negative
  CHECK(rn(0x3fffffffu) == 0x4000);  // carry into the exponent
  CHECK(rn(0x00000000u) == 0x0000);
  CHECK(rn(0x80000000u) == 0x8000);  // -0 keeps its sign
  // Denormals are kept, not flushed: rounded on the same bits.
  CHECK(rn(0x00000001u) == 0x0000);
  CHECK(rn(0x80000001u) == 0x8000);
  CHECK(rn(0x00008000u) == 0x0000);  // tie, even: down to zero
  CHECK(rn(0x00018000u) == 0x0002);  // tie, odd: up
  CHECK(rn(0x00010000u) == 0x0001);  // the smallest bf16 denormal, exact
  CHECK(rn(0x007fffffu) == 0x0080);  // the largest float denormal rounds up to the smallest normal
  // Infinities stay; past the largest finite bf16 (0x7f7f) the rounding overflows to inf.
  CHECK(rn(0x7f800000u) == 0x7f80);
  CHECK(rn(0xff800000u) == 0xff80);
  CHECK(rn(0x7f7f7fffu) == 0x7f7f);
  CHECK(rn(0x7f7f8000u) == 0x7f80);  // tie with an odd 0x7f7f: to inf
  CHECK(rn(0x7f7fffffu) == 0x7f80);  // FLT_MAX
  CHECK(rn(0xff7fffffu) == 0xff80);
  // NaN: every NaN, quiet or signalling, either sign, becomes the canonical 0x7fff (as CUDA).
  for (uint32_t nan : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu, 0x7f80ffffu})
    CHECK(rn(nan) == 0x7fff);
  CHECK(std::isnan(bf16_bits_to_float(0x7fff)));
  // bf16 -> float -> bf16 is the identity on every non-NaN value, and the float is exactly the bits << 16.
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const float f = bf16_bits_to_float(uint16_t(b));
    CHECK(float_bits(f) == b << 16);
    if (!std::isnan(f)) REQUIRE(float_to_bf16_bits(f) == b);
  }
  CHECK(round_bf16(1.00390625f) == 1.0f);  // 1 + 2^-8: a tie, to even
  CHECK(round_bf16(1.01171875f) == 1.015625f);
}

#ifdef VB_WITH_CUDA
TEST_CASE("bf16: bit-identical to CUDA's host __float2bfloat16_rn on a sweep of all float bit patterns") {
  // Every 251st bit pattern (17 million values over every exponent, NaNs and denormals), plus each pattern's
  // neighbours around the rounding point of its upper half.
  size_t bad = 0;
  uint32_t first = 0;
  auto one = [&](uint32_t u) {
    const float f = bits_float(u);
    const __nv_bfloat16 c = __float2bfloat16_rn(f);
    uint16_t cb;
    std::memcpy(&cb, &c, sizeof cb);
    if (cb != float_to_bf16_bits(f) && bad++ == 0) first = u;
  };
  for (uint64_t u = 0; u <= 0xffffffffull; u += 251) one(uint32_t(u));
  for (uint32_t hi = 0; hi < 0x10000u; hi += 7)
    for (uint32_t lo : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) one(hi << 16 | lo);
  INFO(bad << " patterns differ; first 0x" << std::hex << first);
  CHECK(bad == 0);
}
#endif

namespace {

struct BnCase {
  int N, C, H, W;
  bool residual, relu;
};
const BnCase kBnCases[] = {
    {3, 5, 7, 6, false, false}, {2, 8, 5, 5, true, true}, {4, 3, 3, 9, false, true},
    {1, 16, 4, 3, true, false}, {5, 1, 2, 2, true, true}, {2, 12, 1, 1, false, true},
};

// The NCHW reference of the fused forward and its backward, computed in double (the NCHW ops' double
// instantiation) on the values of the inputs: float's own x * a + b (b = beta - mean * a) cancels when the
// mean is large next to the spread, so the float NCHW ops would be the looser side of the comparison.
struct NchwBn {
  std::vector<double> y, mean, invstd, rm, rv, dx, dres, dgamma, dbeta;
};
std::vector<double> dbl(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }
NchwBn nchw_bn(const BnCase& k, const std::vector<float>& xf, const std::vector<float>& resf,
               const std::vector<float>& gammaf, const std::vector<float>& betaf, const std::vector<float>& dyf,
               const std::vector<float>& rm0, const std::vector<float>& rv0) {
  const int HW = k.H * k.W;
  const auto x = dbl(xf), res = dbl(resf), gamma = dbl(gammaf), beta = dbl(betaf), dy = dbl(dyf);
  const size_t n = x.size();
  NchwBn r;
  r.rm = dbl(rm0);
  r.rv = dbl(rv0);
  r.y.resize(n);
  r.mean.resize(size_t(k.C));
  r.invstd.resize(size_t(k.C));
  cpu::batchnorm_train_fwd<double>(k.N, k.C, HW, x.data(), gamma.data(), beta.data(), r.y.data(), r.mean.data(),
                                   r.invstd.data(), r.rm.data(), r.rv.data(), 0.1, 1e-5);
  if (k.residual) cpu::add<double>(int64_t(n), r.y.data(), res.data(), r.y.data());
  if (k.relu) cpu::relu_fwd<double>(int64_t(n), r.y.data(), r.y.data());
  r.dres = dy;
  if (k.relu) cpu::relu_bwd<double>(int64_t(n), r.y.data(), dy.data(), r.dres.data());
  r.dx.resize(n);
  r.dgamma.resize(size_t(k.C));
  r.dbeta.resize(size_t(k.C));
  cpu::batchnorm_bwd<double>(k.N, k.C, HW, x.data(), r.dres.data(), gamma.data(), r.mean.data(), r.invstd.data(),
                             r.dx.data(), r.dgamma.data(), r.dbeta.data());
  return r;
}

// Runs the NHWC twins with activations of type A on inputs that are exactly representable in A, and compares
// with the NCHW reference on the same values: float outputs within a few float ulps of the O(1) terms they
// sum (2e-6 absolute and relative), bf16 outputs within bf16's rounding (2^-8 relative) on top.
template <class A>
void check_bn_twins(const BnCase& k, uint32_t seed) {
  CAPTURE(k.N);
  CAPTURE(k.C);
  CAPTURE(k.H);
  CAPTURE(k.W);
  CAPTURE(k.residual);
  CAPTURE(k.relu);
  const bool is_bf16 = std::is_same_v<A, bf16>;
  const int HW = k.H * k.W;
  const int64_t M = int64_t(k.N) * HW;
  const size_t n = size_t(M) * k.C;
  auto cast = [&](std::vector<float> v) {  // values representable in A
    if (is_bf16)
      for (auto& f : v) f = round_bf16(f);
    return v;
  };
  // A mean far from zero next to the spread: the statistics must not cancel.
  const auto x = cast(vbtest::uniform(n, seed, 2.f, 4.f)), res = cast(vbtest::uniform(n, seed + 1)),
             dy = cast(vbtest::uniform(n, seed + 2));
  const auto gamma = vbtest::uniform(size_t(k.C), seed + 3, 0.5f, 1.5f), beta = vbtest::uniform(size_t(k.C), seed + 4);
  const auto rm0 = vbtest::uniform(size_t(k.C), seed + 5), rv0 = vbtest::uniform(size_t(k.C), seed + 6, 0.5f, 2.f);
  const NchwBn ref = nchw_bn(k, x, res, gamma, beta, dy, rm0, rv0);

  auto store = [&](const std::vector<float>& v) {
    std::vector<A> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = from_float<A>(v[i]);
    return o;
  };
  const auto xa = store(vbtest::to_nhwc(x, k.N, k.C, HW)), ra = store(vbtest::to_nhwc(res, k.N, k.C, HW)),
             dya = store(vbtest::to_nhwc(dy, k.N, k.C, HW));
  std::vector<A> y(n), dx(n), dres(n);
  std::vector<float> mean(size_t(k.C)), invstd(size_t(k.C)), rm = rm0, rv = rv0, dg(size_t(k.C)), db(size_t(k.C));
  cpu::bn_nhwc_train_fwd<A>(M, k.C, xa.data(), gamma.data(), beta.data(), k.residual ? ra.data() : nullptr, k.relu,
                            y.data(), mean.data(), invstd.data(), rm.data(), rv.data(), 0.1, 1e-5);
  // Statistics: both in double from the same values; they differ by float rounding at most.
  check_close("mean", mean, ref.mean, 1e-6, 1e-6);
  check_close("invstd", invstd, ref.invstd, 0, 1e-6);
  check_close("running_mean", rm, ref.rm, 1e-6, 1e-6);
  check_close("running_var", rv, ref.rv, 1e-6, 1e-6);
  // The stored activations: a float's few ulps, or bf16's rounding (half an ulp, 2^-9 relative) plus them.
  const double rel = is_bf16 ? 1.0 / 256 : 2e-6, abs = 2e-6;
  const auto y_nchw = vbtest::to_nchw(vbtest::to_f32(y), k.N, k.C, HW);
  check_close("y", y_nchw, ref.y, abs, rel);

  // The apply from the saved statistics is the forward's output bit for bit (what backward recomputes).
  std::vector<A> y2(n);
  cpu::bn_nhwc_apply<A>(M, k.C, xa.data(), gamma.data(), beta.data(), mean.data(), invstd.data(),
                        k.residual ? ra.data() : nullptr, k.relu, y2.data());
  vbtest::check_bits("apply == train forward", y2, y);

  // Backward, with y as the twin computed it (its ReLU mask: the reference's y is the same up to rounding, and
  // an element whose sign differs would flip the mask; with these inputs none is within rounding of 0).
  std::vector<float> coef(size_t(3) * k.C);
  cpu::bn_nhwc_bwd<A>(M, k.C, xa.data(), y.data(), dya.data(), gamma.data(), mean.data(), invstd.data(), k.relu,
                      dx.data(), dres.data(), dg.data(), db.data(), coef.data());
  check_close("dresidual", vbtest::to_nchw(vbtest::to_f32(dres), k.N, k.C, HW), ref.dres, 0, 0);
  check_close("dgamma", dg, ref.dgamma, 1e-5, 1e-5);
  check_close("dbeta", db, ref.dbeta, 1e-5, 1e-5);
  // dx = k1 (g - k2 - (x - mean) k3) is a difference of terms that cancel (completely, in exact arithmetic,
  // for two values per channel): bounded against the size of those terms.
  double scale = 0;
  for (int64_t r = 0; r < M; ++r)
    for (int c = 0; c < k.C; ++c) {
      const size_t i = size_t(r) * k.C + c;
      const double xm = std::fabs(double(to_float(xa[i])) - mean[size_t(c)]);
      scale = std::max(scale, std::fabs(coef[size_t(c)]) * (std::fabs(to_float(dya[i])) + std::fabs(coef[size_t(k.C + c)]) +
                                                            xm * std::fabs(coef[size_t(2 * k.C + c)])));
    }
  check_close("dx", vbtest::to_nchw(vbtest::to_f32(dx), k.N, k.C, HW), ref.dx, 2e-6 * scale, rel);

  // Pass 2 reading g from dresidual, or recomputing it from y and dy, and in place over dy: the same bits.
  std::vector<A> dx2(n), dy_inplace = dya;
  cpu::bn_nhwc_bwd_dx<A>(M, k.C, xa.data(), y.data(), dya.data(), nullptr, mean.data(), coef.data(), k.relu,
                         dx2.data());
  vbtest::check_bits("dx without dresidual", dx2, dx);
  cpu::bn_nhwc_bwd<A>(M, k.C, xa.data(), y.data(), dy_inplace.data(), gamma.data(), mean.data(), invstd.data(),
                      k.relu, dy_inplace.data(), nullptr, nullptr, nullptr);
  vbtest::check_bits("dx in place over dy", dy_inplace, dx);

  // Evaluation forward against the NCHW one (+ residual, ReLU).
  std::vector<double> ye(n);
  const auto xd = dbl(x), resd = dbl(res), gd = dbl(gamma), bd = dbl(beta), rmd = dbl(rm0), rvd = dbl(rv0);
  cpu::batchnorm_eval_fwd<double>(k.N, k.C, HW, xd.data(), gd.data(), bd.data(), rmd.data(), rvd.data(), 1e-5,
                                  ye.data());
  if (k.residual) cpu::add<double>(int64_t(n), ye.data(), resd.data(), ye.data());
  if (k.relu) cpu::relu_fwd<double>(int64_t(n), ye.data(), ye.data());
  std::vector<A> yea(n);
  cpu::bn_nhwc_eval_fwd<A>(M, k.C, xa.data(), gamma.data(), beta.data(), rm0.data(), rv0.data(), 1e-5,
                           k.residual ? ra.data() : nullptr, k.relu, yea.data());
  check_close("eval y", vbtest::to_nchw(vbtest::to_f32(yea), k.N, k.C, HW), ye, abs, rel);
}

}  // namespace

TEST_CASE("NHWC batch norm twins, float: the NCHW CPU ops (in double) on transposed data, tightly") {
  uint32_t seed = 10;
  for (const BnCase& k : kBnCases) check_bn_twins<float>(k, seed += 10);
}

TEST_CASE("NHWC batch norm twins, bf16: the NCHW CPU ops (in double) on the same values, within bf16's rounding") {
  uint32_t seed = 110;
  for (const BnCase& k : kBnCases) check_bn_twins<bf16>(k, seed += 10);
}

TEST_CASE("NHWC batch norm twins refuse one value per channel in training, and null buffers") {
  std::vector<float> x(4, 1.f), g(4, 1.f), b(4, 0.f), m(4), is(4), y(4);
  CHECK_THROWS_WITH_AS(cpu::bn_nhwc_train_fwd<float>(1, 4, x.data(), g.data(), b.data(), nullptr, false, y.data(),
                                                     m.data(), is.data(), nullptr, nullptr, 0.1, 1e-5),
                       doctest::Contains("more than one value per channel"), Error);
  CHECK_THROWS_AS(cpu::bn_nhwc_apply<float>(1, 4, nullptr, g.data(), b.data(), m.data(), is.data(), nullptr, false,
                                            y.data()),
                  Error);
}

namespace {

template <class A>
void check_pool_twins(int N, int C, int H, int W, uint32_t seed) {
  CAPTURE(N);
  CAPTURE(C);
  CAPTURE(H);
  CAPTURE(W);
  const bool is_bf16 = std::is_same_v<A, bf16>;
  const int k = 3, s = 2, p = 1, P = (H + 2 * p - k) / s + 1, Q = (W + 2 * p - k) / s + 1;
  auto cast = [&](std::vector<float> v) {
    if (is_bf16)
      for (auto& f : v) f = round_bf16(f);
    return v;
  };
  auto x = cast(vbtest::uniform(size_t(N) * C * H * W, seed));
  // Ties (the first maximum wins) and a NaN, which must propagate and take the gradient.
  for (size_t i = 0; i < x.size(); i += 7) x[i] = 0.5f;
  x[x.size() / 3] = std::numeric_limits<float>::quiet_NaN();
  const auto dy = cast(vbtest::uniform(size_t(N) * C * P * Q, seed + 1));
  std::vector<float> y(dy.size()), dx(x.size());
  cpu::maxpool_fwd<float>(N, C, H, W, k, s, p, x.data(), y.data());
  cpu::maxpool_bwd<float>(N, C, H, W, k, s, p, x.data(), dy.data(), dx.data());

  auto store = [&](const std::vector<float>& v) {
    std::vector<A> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = from_float<A>(v[i]);
    return o;
  };
  const auto xa = store(vbtest::to_nhwc(x, N, C, H * W)), dya = store(vbtest::to_nhwc(dy, N, C, P * Q));
  std::vector<A> ya(dy.size()), dxa(x.size());
  cpu::maxpool_nhwc_fwd<A>(N, H, W, C, k, s, p, xa.data(), ya.data());
  cpu::maxpool_nhwc_bwd<A>(N, H, W, C, k, s, p, xa.data(), dya.data(), dxa.data());
  // The maximum is a value of x, and the gradient sums run in the same order: bit for bit (bf16: the NCHW
  // float result rounded once).
  vbtest::check_bits("maxpool y", vbtest::to_nchw(ya, N, C, P * Q), store(y));
  vbtest::check_bits("maxpool dx", vbtest::to_nchw(dxa, N, C, H * W), store(dx));

  // Global average pool (on x without the NaN).
  x[x.size() / 3] = 0.25f;
  const auto xb = store(vbtest::to_nhwc(x, N, C, H * W));
  std::vector<float> ap(size_t(N) * C), apd(x.size());
  cpu::avgpool_fwd<float>(N, C, H * W, x.data(), ap.data());
  std::vector<A> apa(ap.size()), apda(x.size());
  cpu::avgpool_nhwc_fwd<A>(N, H * W, C, xb.data(), apa.data());
  check_close("avgpool y", vbtest::to_f32(apa), ap, 1e-6, is_bf16 ? 1.0 / 256 : 1e-6);
  const auto gy = cast(vbtest::uniform(ap.size(), seed + 2));
  cpu::avgpool_bwd<float>(N, C, H * W, gy.data(), apd.data());
  cpu::avgpool_nhwc_bwd<A>(N, H * W, C, store(gy).data(), apda.data());
  check_close("avgpool dx", vbtest::to_nchw(vbtest::to_f32(apda), N, C, H * W), apd, 1e-7,
              is_bf16 ? 1.0 / 256 : 1e-6);
}

}  // namespace

TEST_CASE("NHWC max pool 3x3/2/1 and global average pool twins: the NCHW CPU ops on transposed data") {
  uint32_t seed = 500;
  for (auto [N, C, H, W] : {std::array{2, 5, 9, 7}, std::array{1, 8, 8, 8}, std::array{3, 3, 4, 11},
                            std::array{2, 16, 1, 1}, std::array{1, 1, 2, 3}}) {
    check_pool_twins<float>(N, C, H, W, seed += 3);
    check_pool_twins<bf16>(N, C, H, W, seed += 3);
  }
}
