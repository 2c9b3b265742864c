// The NHWC CUDA kernels of issue 11 (kernels/cuda/bn_nhwc.cuh, pool_nhwc.cuh, layout.cuh) and evaluation's
// weight folding (bn_fold.cuh) against their CPU twins
// (kernels/cpu/nhwc.h, themselves checked against the NCHW ops by test_nhwc_cpu), float and bf16, on odd
// shapes: C a multiple of the 128-bit width and not, several column tiles, reductions over one and several row
// slices, and pointers one element off 16-byte alignment (the scalar paths). Every device output is poisoned
// (all bits set: NaN in float and bf16) before the launch.
//
// What is compared how:
// - bit for bit: every element-wise pass given the same per-channel coefficients (the twins' apply with the
//   GPU's saved mean and 1/std, the twins' backward pass 2 with the GPU's k1, k2, k3), the evaluation forward,
//   dresidual, both pooling ops in both directions, and the GPU against itself (same bits on a second run,
//   pass 2 reading dresidual or recomputing g from y and dy);
// - tightly (1e-5 relative): what is reduced in another order (statistics in float per thread then double on
//   the GPU, double in the twins): mean, 1/std, running statistics, dgamma, dbeta and the coefficients.
// No case is slow under compute-sanitizer (the largest tensor has 0.4 M elements).
//
// Without a GPU only the host-side argument checks run; when they pass the binary prints
// "[GPU tests skipped: no CUDA device]" (CTest reports SKIPPED) and exits 0.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "engine/backend.h"
#include "kernels/bf16.h"
#include "kernels/check.h"
#include "kernels/cpu/bn_coeffs.h"
#include "kernels/cpu/conv_nhwc.h"
#include "kernels/cpu/nhwc.h"
#include "tests/nhwc_util.h"
#include "tests/gpu_test_util.h"
#include "tests/test_util.h"

#ifdef VB_WITH_CUDA
#include "kernels/cuda/bf16_convert.cuh"
#include "kernels/cuda/bn_fold.cuh"
#include "kernels/cuda/bn_nhwc.cuh"
#include "kernels/cuda/layout.cuh"
#include "kernels/cuda/pool_nhwc.cuh"
#endif

using namespace vb;

namespace {

using vbtest::has_gpu;

}  // namespace

#ifdef VB_WITH_CUDA

TEST_CASE("NHWC kernels check their arguments on the host, before any launch") {
  std::vector<float> v(16);
  float* f = v.data();
  CHECK_THROWS_WITH_AS(cuda::bn_nhwc_train_fwd<float>(nullptr, 1, 4, f, f, f, nullptr, false, f, nullptr, nullptr,
                                                      nullptr, nullptr, 0.1, 1e-5, f),
                       doctest::Contains("more than one value per channel"), Error);
  CHECK_THROWS_AS(cuda::bn_nhwc_apply<bf16>(nullptr, 0, 8, nullptr, f, f, f, f, nullptr, false, nullptr), Error);
  CHECK_THROWS_AS(cuda::bn_nhwc_bwd<float>(nullptr, 4, 4, f, nullptr, f, f, f, f, true, f, nullptr, nullptr, nullptr,
                                           f),
                  Error);  // relu without y
  CHECK_THROWS_AS(cuda::maxpool_nhwc_fwd<float>(nullptr, 1, 1, 1, 4, 3, 2, 2, f, f), Error);  // padding > k/2
  CHECK_THROWS_AS(cuda::avgpool_nhwc_fwd<bf16>(nullptr, 1, 0, 8, nullptr, nullptr), Error);
  // The scratch grows with C and stays small at ResNet-50's widths (the partial sums of the row slices).
  CHECK(cuda::bn_nhwc_work_bytes(64) >= 64 * 5 * sizeof(float));
  CHECK(cuda::bn_nhwc_work_bytes(2048) < (size_t(8) << 20));
  CHECK_THROWS_AS(cuda::transpose_batched(nullptr, 1, -1, 4, nullptr, nullptr), Error);
  CHECK_THROWS_AS(cuda::bn_fold_weights(nullptr, 0, 4, 9, f, f, f, f, f, 1e-5, false, f, f), Error);
  CHECK_THROWS_AS(cuda::bn_fold_weights(nullptr, 4, 4, 9, f, f, f, nullptr, f, 1e-5, false, f, f), Error);
}

namespace {

// Device buffer of n elements of T, one element of slack in front when `misalign` (the pointer is then 2 or 4
// bytes off 16-byte alignment: the scalar paths), filled from the host or poisoned (all bits set).
template <class T>
struct DevBuf {
  char* base = nullptr;
  T* p = nullptr;
  size_t n = 0;
  DevBuf(size_t count, bool misalign) : n(count) {
    VB_CUDA_CHECK(cudaMalloc(&base, (count + 1) * sizeof(T)));
    p = reinterpret_cast<T*>(base) + (misalign ? 1 : 0);
    VB_CUDA_CHECK(cudaMemset(base, 0xff, (count + 1) * sizeof(T)));
  }
  DevBuf(const std::vector<T>& v, bool misalign) : DevBuf(v.size(), misalign) { up(v); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  ~DevBuf() { cudaFree(base); }
  void up(const std::vector<T>& v) { VB_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice)); }
  void poison() { VB_CUDA_CHECK(cudaMemset(p, 0xff, n * sizeof(T))); }
  std::vector<T> down() const {
    VB_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> v(n);
    VB_CUDA_CHECK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
};

template <class A>
std::vector<A> store_as(const std::vector<float>& v) {
  std::vector<A> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = from_float<A>(v[i]);
  return o;
}

struct NhwcShape {
  int N, H, W, C;
};

template <class A>
void check_bn(const NhwcShape& s, bool residual, bool relu, bool misalign, uint32_t seed) {
  CAPTURE(s.N);
  CAPTURE(s.H);
  CAPTURE(s.W);
  CAPTURE(s.C);
  CAPTURE(residual);
  CAPTURE(relu);
  CAPTURE(misalign);
  const bool is_bf16 = std::is_same_v<A, bf16>;
  CAPTURE(is_bf16);
  const int64_t M = int64_t(s.N) * s.H * s.W;
  const int C = s.C;
  const size_t n = size_t(M) * C;
  const auto x = store_as<A>(vbtest::uniform(n, seed, 1.f, 3.f)), res = store_as<A>(vbtest::uniform(n, seed + 1)),
             dy = store_as<A>(vbtest::uniform(n, seed + 2));
  const auto gamma = vbtest::uniform(size_t(C), seed + 3, 0.5f, 1.5f), beta = vbtest::uniform(size_t(C), seed + 4),
             rm0 = vbtest::uniform(size_t(C), seed + 5), rv0 = vbtest::uniform(size_t(C), seed + 6, 0.5f, 2.f);
  DevBuf<A> dx_(x, misalign), dres_(res, misalign), ddy(dy, misalign), dyo(n, misalign), ddx(n, misalign),
      ddres(n, misalign), ddx2(n, misalign);
  DevBuf<float> dg(gamma, false), db(beta, false), drm(rm0, false), drv(rv0, false), dmean(size_t(C), false),
      dinv(size_t(C), false), ddg(size_t(C), false), ddb(size_t(C), false);
  DevBuf<char> work(cuda::bn_nhwc_work_bytes(C), false);

  // Training forward: statistics tightly, the apply bit for bit from the GPU's own statistics.
  cuda::bn_nhwc_train_fwd<A>(nullptr, M, C, dx_.p, dg.p, db.p, residual ? dres_.p : nullptr, relu, dyo.p, dmean.p,
                             dinv.p, drm.p, drv.p, 0.1, 1e-5, work.p);
  const auto y = dyo.down(), mean = dmean.down(), invstd = dinv.down(), rm = drm.down(), rv = drv.down();
  std::vector<float> cm(static_cast<size_t>(C)), ci(static_cast<size_t>(C)), crm = rm0, crv = rv0;
  cpu::bn_nhwc_stats<A>(M, C, x.data(), 0.1, 1e-5, cm.data(), ci.data(), crm.data(), crv.data());
  vbtest::check_close("mean", mean, cm, 1e-6, 1e-5);
  vbtest::check_close("invstd", invstd, ci, 0, 1e-5);
  vbtest::check_close("running_mean", rm, crm, 1e-6, 1e-5);
  vbtest::check_close("running_var", rv, crv, 1e-6, 1e-5);
  std::vector<A> cy(n);
  cpu::bn_nhwc_apply<A>(M, C, x.data(), gamma.data(), beta.data(), mean.data(), invstd.data(),
                        residual ? res.data() : nullptr, relu, cy.data());
  vbtest::check_bits("y (twin apply with the GPU's statistics)", y, cy);

  // The same bits again: deterministic statistics; and the standalone apply reproduces the forward.
  dyo.poison();
  cuda::bn_nhwc_train_fwd<A>(nullptr, M, C, dx_.p, dg.p, db.p, residual ? dres_.p : nullptr, relu, dyo.p, dmean.p,
                             dinv.p, nullptr, nullptr, 0.1, 1e-5, work.p);
  vbtest::check_bits("mean, second run", dmean.down(), mean);
  vbtest::check_bits("invstd, second run", dinv.down(), invstd);
  vbtest::check_bits("y, second run", dyo.down(), y);
  ddx2.poison();
  cuda::bn_nhwc_apply<A>(nullptr, M, C, dx_.p, dg.p, db.p, dmean.p, dinv.p, residual ? dres_.p : nullptr, relu, ddx2.p);
  vbtest::check_bits("apply == training forward", ddx2.down(), y);

  // Evaluation forward: bit for bit.
  ddx2.poison();
  cuda::bn_nhwc_eval_fwd<A>(nullptr, M, C, dx_.p, dg.p, db.p, drm.p, drv.p, 1e-5, residual ? dres_.p : nullptr, relu,
                            ddx2.p);
  std::vector<A> cye(n);
  cpu::bn_nhwc_eval_fwd<A>(M, C, x.data(), gamma.data(), beta.data(), rm.data(), rv.data(), 1e-5,
                           residual ? res.data() : nullptr, relu, cye.data());
  vbtest::check_bits("eval y", ddx2.down(), cye);

  // Backward: dgamma, dbeta and the coefficients tightly; dresidual and dx (with the GPU's coefficients) bit for bit.
  cuda::bn_nhwc_bwd<A>(nullptr, M, C, dx_.p, dyo.p, ddy.p, dg.p, dmean.p, dinv.p, relu, ddx.p, ddres.p, ddg.p, ddb.p,
                       work.p);
  std::vector<float> coef(size_t(3) * C);
  VB_CUDA_CHECK(cudaDeviceSynchronize());
  VB_CUDA_CHECK(cudaMemcpy(coef.data(), cuda::bn_nhwc_bwd_coef(work.p, C), coef.size() * sizeof(float),
                           cudaMemcpyDeviceToHost));
  const auto dx = ddx.down(), dres = ddres.down();
  std::vector<A> cdres(n), cdx(n);
  std::vector<float> cdg(static_cast<size_t>(C)), cdb(static_cast<size_t>(C)), ccoef(size_t(3) * C);
  cpu::bn_nhwc_bwd_reduce<A>(M, C, x.data(), y.data(), dy.data(), gamma.data(), mean.data(), invstd.data(), relu,
                             cdres.data(), cdg.data(), cdb.data(), ccoef.data());
  double gscale = 0;  // dgamma and dbeta are sums that cancel: bounded against the sum of magnitudes
  for (const A& v : dy) gscale += std::fabs(to_float(v));
  vbtest::check_close("dgamma", ddg.down(), cdg, 1e-6 * gscale, 1e-5);
  vbtest::check_close("dbeta", ddb.down(), cdb, 1e-6 * gscale, 1e-5);
  vbtest::check_close("k1 (gamma invstd)", std::vector<float>(coef.begin(), coef.begin() + C),
                      std::vector<float>(ccoef.begin(), ccoef.begin() + C), 0, 1e-5);
  vbtest::check_bits("dresidual", dres, cdres);
  cpu::bn_nhwc_bwd_dx<A>(M, C, x.data(), y.data(), dy.data(), cdres.data(), mean.data(), coef.data(), relu, cdx.data());
  vbtest::check_bits("dx (twin pass 2 with the GPU's coefficients)", dx, cdx);

  // Pass 2 recomputing g from y and dy (no dresidual), and in place over dy: the same bits.
  ddx2.poison();
  cuda::bn_nhwc_bwd<A>(nullptr, M, C, dx_.p, dyo.p, ddy.p, dg.p, dmean.p, dinv.p, relu, ddx2.p, nullptr, nullptr,
                       nullptr, work.p);
  vbtest::check_bits("dx without dresidual", ddx2.down(), dx);
  cuda::bn_nhwc_bwd<A>(nullptr, M, C, dx_.p, dyo.p, ddy.p, dg.p, dmean.p, dinv.p, relu, ddy.p, nullptr, nullptr,
                       nullptr, work.p);
  vbtest::check_bits("dx in place over dy", ddy.down(), dx);
}

// Odd shapes: C a multiple of 8 (128-bit for both types), of 4 only (float vectorised, bf16 scalar), neither;
// C wider than one column tile (520 bf16 = 65 vectors: 3 tiles, the last partial); M spanning many row slices.
const NhwcShape kBnShapes[] = {{3, 5, 7, 64}, {2, 9, 9, 12}, {4, 7, 5, 5}, {3, 4, 5, 520}, {4, 40, 40, 8},
                           {2, 30, 30, 24}, {2, 1, 1, 16}, {16, 20, 20, 64}};

}  // namespace

TEST_CASE("NHWC batch norm, float: training forward, apply, evaluation, backward against the CPU twins") {
  if (!has_gpu()) return;
  uint32_t seed = 1000;
  for (const NhwcShape& s : kBnShapes)
    for (int v = 0; v < 4; ++v) check_bn<float>(s, v & 1, v & 2, false, seed += 10);
  check_bn<float>({3, 5, 7, 64}, true, true, true, seed += 10);  // misaligned: the scalar path at C % 4 == 0
}

TEST_CASE("NHWC batch norm, bf16: training forward, apply, evaluation, backward against the CPU twins") {
  if (!has_gpu()) return;
  uint32_t seed = 2000;
  for (const NhwcShape& s : kBnShapes)
    for (int v = 0; v < 4; ++v) check_bn<bf16>(s, v & 1, v & 2, false, seed += 10);
  check_bn<bf16>({3, 5, 7, 64}, true, true, true, seed += 10);
  check_bn<bf16>({4, 40, 40, 8}, false, true, true, seed += 10);
}

namespace {

template <class A>
void check_pool(const NhwcShape& s, bool misalign, uint32_t seed) {
  CAPTURE(s.N);
  CAPTURE(s.H);
  CAPTURE(s.W);
  CAPTURE(s.C);
  CAPTURE(misalign);
  const int k = 3, st = 2, p = 1, P = (s.H + 2 * p - k) / st + 1, Q = (s.W + 2 * p - k) / st + 1;
  const size_t nx = size_t(s.N) * s.H * s.W * s.C, ny = size_t(s.N) * P * Q * s.C;
  auto xf = vbtest::uniform(nx, seed);
  for (size_t i = 0; i < nx; i += 5) xf[i] = 0.5f;                     // ties: the first maximum wins
  xf[nx / 3] = std::numeric_limits<float>::quiet_NaN();                // propagates and takes the gradient
  xf[nx / 2] = -std::numeric_limits<float>::infinity();
  const auto x = store_as<A>(xf), dy = store_as<A>(vbtest::uniform(ny, seed + 1));
  DevBuf<A> dx_(x, misalign), ddy(dy, misalign), dyo(ny, misalign), ddx(nx, misalign);
  cuda::maxpool_nhwc_fwd<A>(nullptr, s.N, s.H, s.W, s.C, k, st, p, dx_.p, dyo.p);
  cuda::maxpool_nhwc_bwd<A>(nullptr, s.N, s.H, s.W, s.C, k, st, p, dx_.p, ddy.p, ddx.p);
  std::vector<A> cy(ny), cdx(nx);
  cpu::maxpool_nhwc_fwd<A>(s.N, s.H, s.W, s.C, k, st, p, x.data(), cy.data());
  cpu::maxpool_nhwc_bwd<A>(s.N, s.H, s.W, s.C, k, st, p, x.data(), dy.data(), cdx.data());
  // NaN bits: both sides copy the input's NaN (the same bits).
  vbtest::check_bits("maxpool y", dyo.down(), cy);
  vbtest::check_bits("maxpool dx", ddx.down(), cdx);

  // Global average pool over H*W, without the NaN.
  auto xa = xf;
  xa[nx / 3] = 0.25f;
  xa[nx / 2] = -0.25f;
  const auto xv = store_as<A>(xa);
  const int HW = s.H * s.W;
  DevBuf<A> ax(xv, misalign), ay(size_t(s.N) * s.C, misalign), ag(store_as<A>(vbtest::uniform(size_t(s.N) * s.C, seed + 2)), misalign),
      adx(nx, misalign);
  cuda::avgpool_nhwc_fwd<A>(nullptr, s.N, HW, s.C, ax.p, ay.p);
  cuda::avgpool_nhwc_bwd<A>(nullptr, s.N, HW, s.C, ag.p, adx.p);
  std::vector<A> cay(size_t(s.N) * s.C), cadx(nx);
  cpu::avgpool_nhwc_fwd<A>(s.N, HW, s.C, xv.data(), cay.data());
  cpu::avgpool_nhwc_bwd<A>(s.N, HW, s.C, ag.down().data(), cadx.data());
  vbtest::check_bits("avgpool y", ay.down(), cay);
  vbtest::check_bits("avgpool dx", adx.down(), cadx);
}

const NhwcShape kPoolShapes[] = {{2, 9, 7, 5}, {3, 16, 16, 64}, {2, 15, 13, 24}, {1, 2, 3, 8}, {4, 7, 7, 2056}, {2, 1, 1, 12}};

}  // namespace

TEST_CASE("NHWC max pool 3x3/2/1 and global average pool, float and bf16, bit for bit against the CPU twins") {
  if (!has_gpu()) return;
  uint32_t seed = 3000;
  for (const NhwcShape& s : kPoolShapes) {
    check_pool<float>(s, false, seed += 3);
    check_pool<bf16>(s, false, seed += 3);
  }
  check_pool<float>({3, 16, 16, 64}, true, seed += 3);
  check_pool<bf16>({3, 16, 16, 64}, true, seed += 3);
}

TEST_CASE("bf16 on the device: float_to_bf16 / bf16_to_float are bit-identical to the host conversions") {
  if (!has_gpu()) return;
  // Ties, denormals, overflow to inf, NaN (as in the host test), then a spread over every exponent.
  std::vector<uint32_t> bits = {0x3f808000u, 0x3f818000u, 0x3f808001u, 0x00008000u, 0x00018000u, 0x007fffffu,
                                0x80000001u, 0x7f7f8000u, 0x7f7fffffu, 0xff7fffffu, 0x7f800000u, 0x7fc00000u,
                                0xff800001u, 0x00000000u, 0x80000000u, 0x3f800000u};
  for (uint32_t u = 0; u < 65536; ++u) bits.push_back(u * 65537u + (u & 1 ? 0x8000u : 0x7fffu));
  std::vector<float> f(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) f[i] = bits_float(bits[i]);
  for (bool misalign : {false, true}) {
    CAPTURE(misalign);
    DevBuf<float> df(f, misalign);
    DevBuf<bf16> db(f.size(), misalign);
    DevBuf<float> back(f.size(), misalign);
    cuda::float_to_bf16(nullptr, int64_t(f.size()), df.p, db.p);
    cuda::bf16_to_float(nullptr, int64_t(f.size()), db.p, back.p);
    const auto got = db.down();
    vbtest::check_bits("float -> bf16", got, vbtest::to_bf16(f));
    vbtest::check_bits("bf16 -> float", back.down(), vbtest::to_f32(got));
  }
}

#endif  // VB_WITH_CUDA

#ifdef VB_WITH_CUDA
TEST_CASE("layout changes on the device (the CUDA backend in NHWC): bit for bit against cpu::nchw_to_nhwc / nhwc_to_nchw") {
  if (!has_gpu()) return;
  // Activations (N, C, H*W) and filters (K, C, R*S): sides below, at and above the 32 x 32 tile, one value.
  const std::vector<std::array<int, 3>> shapes = {
      {3, 5, 37}, {2, 64, 49}, {1, 3, 33 * 31}, {4, 33, 1}, {1, 1, 1}, {7, 6, 9}, {2, 2048, 1}, {5, 32, 32}};
  uint32_t seed = 5000;
  for (const auto& [N, C, HW] : shapes) {
    CAPTURE(N);
    CAPTURE(C);
    CAPTURE(HW);
    const size_t n = size_t(N) * C * HW;
    const std::vector<float> x = vbtest::uniform(n, seed++);
    std::vector<float> nhwc(n), nchw(n);
    cpu::nchw_to_nhwc<float>(N, C, HW, x.data(), nhwc.data());
    cpu::nhwc_to_nchw<float>(N, C, HW, x.data(), nchw.data());
    DevBuf<float> src(x, false), a(n, false), b(n, false), back(n, false);
    cuda::nchw_to_nhwc(nullptr, N, C, HW, src.p, a.p);
    cuda::nhwc_to_nchw(nullptr, N, C, HW, src.p, b.p);
    cuda::nhwc_to_nchw(nullptr, N, C, HW, a.p, back.p);
    vbtest::check_bits("nchw_to_nhwc", a.down(), nhwc);
    vbtest::check_bits("nhwc_to_nchw", b.down(), nchw);
    vbtest::check_bits("the round trip", back.down(), x);
  }
}
#endif

#ifdef VB_WITH_CUDA
TEST_CASE("batch norm folded into convolution weights on the device: the CPU's folded values, bit for bit") {
  if (!has_gpu()) return;
  // cpu::bn_eval_affine's a and b (double, rounded to float), then w * a in float: what the CPU backend's
  // evaluation multiplies into its packed weights. OIHW and KRSC, with and without gamma / beta.
  uint32_t seed = 6000;
  for (const auto& [K, C, RS] : std::vector<std::array<int, 3>>{{4, 5, 9}, {24, 16, 1}, {64, 3, 49}, {33, 7, 9}})
    for (bool affine : {true, false})
      for (bool krsc : {false, true}) {
        CAPTURE(K);
        CAPTURE(C);
        CAPTURE(RS);
        CAPTURE(affine);
        CAPTURE(krsc);
        const size_t n = size_t(K) * C * RS;
        const auto w = vbtest::uniform(n, seed++), gamma = vbtest::uniform(K, seed++, 0.5f, 1.5f),
                   beta = vbtest::uniform(K, seed++), rm = vbtest::uniform(K, seed++),
                   rv = vbtest::uniform(K, seed++, 0.01f, 3.f);
        std::vector<float> want(n), want_bias(K), folded(n);
        for (int k = 0; k < K; ++k) {
          float a = 0, b = 0;
          cpu::bn_eval_affine<float>(affine ? gamma.data() : nullptr, affine ? beta.data() : nullptr, rm.data(),
                                     rv.data(), 1e-5, k, a, b);
          want_bias[size_t(k)] = b;
          for (size_t i = 0; i < size_t(C) * RS; ++i) folded[size_t(k) * C * RS + i] = w[size_t(k) * C * RS + i] * a;
        }
        if (krsc)
          cpu::nchw_to_nhwc<float>(K, C, RS, folded.data(), want.data());
        else
          want = folded;
        DevBuf<float> dw(w, false), dg(gamma, false), db(beta, false), drm(rm, false), drv(rv, false), wf(n, false),
            bias(size_t(K), false);
        cuda::bn_fold_weights(nullptr, K, C, RS, dw.p, affine ? dg.p : nullptr, affine ? db.p : nullptr, drm.p, drv.p,
                              1e-5, krsc, wf.p, bias.p);
        vbtest::check_bits("folded weights", wf.down(), want);
        vbtest::check_bits("folded bias", bias.down(), want_bias);
      }
}
#endif
