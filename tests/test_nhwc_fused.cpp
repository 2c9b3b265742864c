// The fast NHWC batch norm and pooling of the CPU backend (kernels/cpu/bn_fused_nhwc.h, pool_fast_nhwc.h), float
// and double, against the NCHW ops they mirror (bn_fused.h, ops.h) on transposed data:
// - per-element results given the same statistics (bn apply / eval / the training forward's output, dresidual)
//   and all pooling results: the same bits;
// - statistics and backward sums (reduced in another order): within 1e-12 (double) / 1e-5 (float);
// - every result the same bits with 1, 2 and 3 threads.
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/bn_fused.h"
#include "kernels/cpu/bn_fused_nhwc.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/pool_fast_nhwc.h"
#include "tests/nhwc_util.h"
#include "tests/test_util.h"

using namespace vb;
using vbtest::check_close;
using vbtest::to_nchw;
using vbtest::to_nhwc;

namespace {

template <class T>
std::vector<T> randv(size_t n, uint32_t seed, double lo = -1, double hi = 1) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = T(d(g));
  return v;
}

template <class T>
void same_bits(const std::string& what, const std::vector<T>& got, const std::vector<T>& want) {
  REQUIRE_MESSAGE(got.size() == want.size(), what << ": size " << got.size() << " vs " << want.size());
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0 && bad++ == 0) first = i;
  INFO(what << ": " << bad << " of " << got.size() << " elements differ; first at " << first << ": got "
            << (bad ? double(got[first]) : 0.0) << ", want " << (bad ? double(want[first]) : 0.0));
  CHECK(bad == 0);
}

template <class T>
double tol() {
  return sizeof(T) == 8 ? 1e-12 : 1e-5;
}

// Runs fn (which returns its outputs concatenated) with 1, 2 and 3 threads; checks the same bits; returns them.
template <class T>
std::vector<T> same_bits_any_threads(const std::string& what, const std::function<std::vector<T>()>& fn) {
  const int saved = cpu::num_threads();
  std::vector<std::vector<T>> outs;
  for (int threads : {1, 2, 3}) {
    cpu::set_num_threads(threads);
    outs.push_back(fn());
  }
  cpu::set_num_threads(saved);
  same_bits(what + " (2 threads vs 1)", outs[1], outs[0]);
  same_bits(what + " (3 threads vs 1)", outs[2], outs[0]);
  return outs[0];
}

struct BnShape {
  int N, C, H, W;
  int HW() const { return H * W; }
  size_t size() const { return size_t(N) * C * H * W; }
};
// The task's shapes, plus some that take several reduction chunks (16k values each) and odd channel counts. Under
// 64 channels the element passes take 64 / C rows at a time: rows left over after the last whole group (16
// channels, 105 rows: one; 20 channels, 20 rows: two), and none at all (5 channels, 2 rows).
const BnShape kBnShapes[] = {{3, 20, 5, 7}, {2, 64, 7, 7}, {2, 5, 1, 1}, {4, 8, 40, 40}, {2, 256, 14, 14},
                             {3, 2048, 2, 2}, {2, 33, 9, 11}, {3, 16, 5, 7}, {1, 20, 4, 5}};

template <class T>
std::vector<T> concat(std::initializer_list<const std::vector<T>*> vs) {
  std::vector<T> o;
  for (auto* v : vs) o.insert(o.end(), v->begin(), v->end());
  return o;
}

}  // namespace

TEST_CASE_TEMPLATE("bn NHWC training forward, apply, eval vs the NCHW fused ops", T, float, double) {
  uint32_t seed = 1;
  for (const auto& s : kBnShapes)
    for (bool with_res : {false, true})
      for (bool relu : {false, true}) {
        const int N = s.N, C = s.C, HW = s.HW();
        CAPTURE(N);
        CAPTURE(C);
        CAPTURE(HW);
        CAPTURE(with_res);
        CAPTURE(relu);
        // An offset mean and a spread, per channel, so that the mean matters to the variance.
        auto x = randv<T>(s.size(), seed++, -2, 2);
        for (size_t i = 0; i < x.size(); ++i) x[i] = x[i] * T(1 + (i / HW) % 3) + T(3.0 * ((i / HW) % C % 5) - 5);
        const auto gamma = randv<T>(size_t(C), seed++, 0.5, 1.5), beta = randv<T>(size_t(C), seed++);
        const auto res = randv<T>(s.size(), seed++);
        const auto rm0 = randv<T>(size_t(C), seed++), rv0 = randv<T>(size_t(C), seed++, 0.5, 2);
        const T* res_nchw = with_res ? res.data() : nullptr;

        // NCHW reference.
        std::vector<T> y_ref(s.size()), mean_ref(C), invstd_ref(C), rm_ref = rm0, rv_ref = rv0;
        cpu::bn_train_fwd_fused<T>(N, C, HW, x.data(), gamma.data(), beta.data(), res_nchw, relu, y_ref.data(),
                                   mean_ref.data(), invstd_ref.data(), rm_ref.data(), rv_ref.data(), 0.1, 1e-5);

        const auto xt = to_nhwc(x, N, C, HW), rt = to_nhwc(res, N, C, HW);
        std::vector<T> y(s.size()), mean(C), invstd(C), rm, rv;
        same_bits_any_threads<T>("bn_train_fwd_nhwc", [&] {
          vbtest::poison(y);
          rm = rm0;
          rv = rv0;
          cpu::bn_train_fwd_nhwc<T>(N, C, HW, xt.data(), gamma.data(), beta.data(), with_res ? rt.data() : nullptr,
                                    relu, y.data(), mean.data(), invstd.data(), rm.data(), rv.data(), 0.1, 1e-5);
          return concat<T>({&y, &mean, &invstd, &rm, &rv});
        });
        check_close("save_mean", mean, mean_ref, tol<T>(), tol<T>());
        check_close("save_invstd", invstd, invstd_ref, 0, tol<T>());
        check_close("running_mean", rm, rm_ref, tol<T>(), tol<T>());
        check_close("running_var", rv, rv_ref, 0, tol<T>());

        // The output, given those statistics, is the unfused ops' composition bit for bit.
        std::vector<T> y_want(s.size());
        cpu::batchnorm_apply<T>(N, C, HW, x.data(), gamma.data(), beta.data(), mean.data(), invstd.data(),
                                y_want.data());
        if (with_res) cpu::add<T>(int64_t(s.size()), y_want.data(), res.data(), y_want.data());
        if (relu) cpu::relu_fwd<T>(int64_t(s.size()), y_want.data(), y_want.data());
        same_bits("bn_train_fwd_nhwc y", to_nchw(y, N, C, HW), y_want);
        check_close("bn_train_fwd_nhwc y vs NCHW", to_nchw(y, N, C, HW), y_ref, 1e3 * tol<T>(), 1e3 * tol<T>());

        // bn_apply_nhwc: the training output again (no residual), and bn_apply_fused's bits.
        std::vector<T> ya(s.size());
        same_bits_any_threads<T>("bn_apply_nhwc", [&] {
          vbtest::poison(ya);
          cpu::bn_apply_nhwc<T>(N, C, HW, xt.data(), gamma.data(), beta.data(), mean.data(), invstd.data(), relu,
                                ya.data());
          return ya;
        });
        std::vector<T> ya_ref(s.size());
        cpu::bn_apply_fused<T>(N, C, HW, x.data(), gamma.data(), beta.data(), mean.data(), invstd.data(), relu,
                               ya_ref.data());
        same_bits("bn_apply_nhwc vs bn_apply_fused", to_nchw(ya, N, C, HW), ya_ref);
        if (!with_res) same_bits("bn_apply_nhwc vs the training forward", ya, y);
        // Null gamma / beta: as the NCHW op.
        cpu::bn_apply_nhwc<T>(N, C, HW, xt.data(), nullptr, nullptr, mean.data(), invstd.data(), relu, ya.data());
        cpu::bn_apply_fused<T>(N, C, HW, x.data(), nullptr, nullptr, mean.data(), invstd.data(), relu,
                               ya_ref.data());
        same_bits("bn_apply_nhwc, no affine", to_nchw(ya, N, C, HW), ya_ref);

        // Eval.
        std::vector<T> ye(s.size()), ye_ref(s.size());
        cpu::bn_eval_fwd_fused<T>(N, C, HW, x.data(), gamma.data(), beta.data(), rm0.data(), rv0.data(), 1e-5,
                                  res_nchw, relu, ye_ref.data());
        same_bits_any_threads<T>("bn_eval_fwd_nhwc", [&] {
          vbtest::poison(ye);
          cpu::bn_eval_fwd_nhwc<T>(N, C, HW, xt.data(), gamma.data(), beta.data(), rm0.data(), rv0.data(), 1e-5,
                                   with_res ? rt.data() : nullptr, relu, ye.data());
          return ye;
        });
        same_bits("bn_eval_fwd_nhwc", to_nchw(ye, N, C, HW), ye_ref);

        // Statistics only (y null), running statistics null.
        std::vector<T> mean2(C), invstd2(C);
        cpu::bn_train_fwd_nhwc<T>(N, C, HW, xt.data(), gamma.data(), beta.data(), nullptr, relu, nullptr,
                                  mean2.data(), invstd2.data(), nullptr, nullptr, 0.1, 1e-5);
        same_bits("mean without y", mean2, mean);
        same_bits("invstd without y", invstd2, invstd);
      }
}

TEST_CASE_TEMPLATE("bn NHWC backward vs the NCHW fused backward", T, float, double) {
  uint32_t seed = 100;
  for (const auto& s : kBnShapes)
    for (bool relu : {false, true}) {
      const int N = s.N, C = s.C, HW = s.HW();
      CAPTURE(N);
      CAPTURE(C);
      CAPTURE(HW);
      CAPTURE(relu);
      auto x = randv<T>(s.size(), seed++, -2, 2);
      const auto gamma = randv<T>(size_t(C), seed++, 0.5, 1.5), beta = randv<T>(size_t(C), seed++);
      const auto dy = randv<T>(s.size(), seed++);
      std::vector<T> y(s.size()), mean(C), invstd(C);
      cpu::bn_train_fwd_fused<T>(N, C, HW, x.data(), gamma.data(), beta.data(), nullptr, relu, y.data(),
                                 mean.data(), invstd.data(), nullptr, nullptr, 0.1, 1e-5);
      // A few NaN outputs: the ReLU's backward passes their gradient.
      if (relu)
        for (size_t i = 3; i < y.size(); i += 97) y[i] = std::numeric_limits<T>::quiet_NaN();

      std::vector<T> dx_ref(s.size()), dres_ref(s.size()), dg_ref(C), db_ref(C);
      cpu::bn_bwd_fused<T>(N, C, HW, x.data(), y.data(), dy.data(), gamma.data(), mean.data(), invstd.data(), relu,
                           dx_ref.data(), dres_ref.data(), dg_ref.data(), db_ref.data());

      const auto xt = to_nhwc(x, N, C, HW), yt = to_nhwc(y, N, C, HW), dyt = to_nhwc(dy, N, C, HW);
      std::vector<T> dx(s.size()), dres(s.size()), dg(C), db(C);
      const auto all = same_bits_any_threads<T>("bn_bwd_nhwc", [&] {
        vbtest::poison(dx);
        vbtest::poison(dres);
        vbtest::poison(dg);
        vbtest::poison(db);
        cpu::bn_bwd_nhwc<T>(N, C, HW, xt.data(), yt.data(), dyt.data(), gamma.data(), mean.data(), invstd.data(),
                            relu, dx.data(), dres.data(), dg.data(), db.data());
        return concat<T>({&dx, &dres, &dg, &db});
      });
      same_bits("dresidual", to_nchw(dres, N, C, HW), dres_ref);
      check_close("dgamma", dg, dg_ref, tol<T>(), tol<T>());
      check_close("dbeta", db, db_ref, tol<T>(), tol<T>());
      // dx from coefficients that may differ from the NCHW ones in their last bit: relative to dx's scale.
      double scale = 0;
      for (T v : dx_ref) scale = std::max(scale, double(std::fabs(v)));
      check_close("dx", to_nchw(dx, N, C, HW), dx_ref, 10 * tol<T>() * scale, 10 * tol<T>());

      // Null outputs, and dx / dresidual in place of dy: the same bits.
      std::vector<T> dx2(s.size()), dg2(C);
      cpu::bn_bwd_nhwc<T>(N, C, HW, xt.data(), yt.data(), dyt.data(), gamma.data(), mean.data(), invstd.data(), relu,
                          dx2.data(), nullptr, nullptr, nullptr);
      same_bits("dx alone", dx2, dx);
      cpu::bn_bwd_nhwc<T>(N, C, HW, xt.data(), yt.data(), dyt.data(), gamma.data(), mean.data(), invstd.data(), relu,
                          nullptr, nullptr, dg2.data(), nullptr);
      same_bits("dgamma alone", dg2, dg);
      std::vector<T> inplace = dyt, dres3(s.size());
      cpu::bn_bwd_nhwc<T>(N, C, HW, xt.data(), yt.data(), inplace.data(), gamma.data(), mean.data(), invstd.data(),
                          relu, inplace.data(), dres3.data(), nullptr, nullptr);
      same_bits("dx in place of dy", inplace, dx);
      same_bits("dresidual with dx in place of dy", dres3, dres);
      inplace = dyt;
      std::vector<T> dx3(s.size());
      cpu::bn_bwd_nhwc<T>(N, C, HW, xt.data(), yt.data(), inplace.data(), gamma.data(), mean.data(), invstd.data(),
                          relu, dx3.data(), inplace.data(), nullptr, nullptr);
      same_bits("dresidual in place of dy", inplace, dres);
      same_bits("dx with dresidual in place of dy", dx3, dx);
      (void)all;
    }
}

namespace {

struct PoolShape {
  int N, C, H, W, k, s, p;
};
const PoolShape kPoolShapes[] = {{3, 20, 5, 7, 3, 2, 1},  {2, 64, 7, 7, 3, 2, 1}, {2, 5, 1, 1, 1, 1, 0},
                                 {2, 3, 8, 9, 2, 2, 0},   {2, 70, 9, 6, 3, 1, 1}, {1, 7, 6, 6, 3, 3, 1},
                                 {2, 130, 12, 12, 3, 2, 1}, {1, 4, 5, 5, 5, 1, 2},
                                 // Channels a multiple of 8 (the float windows' intrinsics): the small preset's
                                 // stem pool, and a 5x5 window
                                 {2, 16, 9, 10, 3, 2, 1},  {1, 24, 6, 7, 5, 1, 2}};

enum class Fill { kRandom, kTies, kNaN };

template <class T>
std::vector<T> pool_input(size_t n, uint32_t seed, Fill fill) {
  auto x = randv<T>(n, seed, -1, 1);
  if (fill == Fill::kTies) {
    // Few distinct values, both zeros among them, and -inf: many ties (the first maximum wins, including
    // between +0 and -0), and some all -inf windows.
    const T levels[] = {T(-1), T(-0.0), T(0), T(0.5), -std::numeric_limits<T>::infinity(), T(0.5), T(-0.0)};
    std::mt19937 g(seed);
    for (auto& v : x) v = levels[g() % 7];
    for (size_t i = 0; i < n / 5; ++i) x[i] = -std::numeric_limits<T>::infinity();
  } else if (fill == Fill::kNaN) {
    // NaNs of different payloads and signs: which one a window outputs is visible in the bits.
    std::mt19937 g(seed);
    for (size_t i = 0; i < n; i += 1 + g() % 9) {
      T nan = std::numeric_limits<T>::quiet_NaN();
      unsigned char* b = reinterpret_cast<unsigned char*>(&nan);
      b[0] = static_cast<unsigned char>(g());
      if (g() % 2) nan = -nan;
      x[i] = nan;
    }
  }
  return x;
}

}  // namespace

TEST_CASE_TEMPLATE("max pool NHWC vs ops.h max pool: same bits (random, ties, NaN)", T, float, double) {
  uint32_t seed = 500;
  for (const auto& ps : kPoolShapes)
    for (Fill fill : {Fill::kRandom, Fill::kTies, Fill::kNaN}) {
      const int N = ps.N, C = ps.C, H = ps.H, W = ps.W, k = ps.k, st = ps.s, p = ps.p;
      CAPTURE(N);
      CAPTURE(C);
      CAPTURE(H);
      CAPTURE(W);
      CAPTURE(k);
      CAPTURE(st);
      CAPTURE(p);
      CAPTURE(int(fill));
      const int P = (H + 2 * p - k) / st + 1, Q = (W + 2 * p - k) / st + 1;
      const size_t nin = size_t(N) * C * H * W, nout = size_t(N) * C * P * Q;
      const auto x = pool_input<T>(nin, seed++, fill);
      // Gradients with ties of their own and -0, so that sums of several windows are exercised bitwise.
      auto dy = randv<T>(nout, seed++);
      for (size_t i = 0; i < nout; i += 7) dy[i] = T(-0.0);
      std::vector<T> y_ref(nout), dx_ref(nin);
      cpu::maxpool_fwd<T>(N, C, H, W, k, st, p, x.data(), y_ref.data());
      cpu::maxpool_bwd<T>(N, C, H, W, k, st, p, x.data(), dy.data(), dx_ref.data());

      const auto xt = to_nhwc(x, N, C, H * W), dyt = to_nhwc(dy, N, C, P * Q);
      std::vector<T> y(nout), dx(nin);
      same_bits_any_threads<T>("maxpool_nhwc_fwd_fast", [&] {
        vbtest::poison(y);
        cpu::maxpool_nhwc_fwd_fast<T>(N, C, H, W, k, st, p, xt.data(), y.data());
        return y;
      });
      same_bits("maxpool_nhwc_fwd_fast", to_nchw(y, N, C, P * Q), y_ref);
      same_bits_any_threads<T>("maxpool_nhwc_bwd_fast", [&] {
        vbtest::poison(dx);
        cpu::maxpool_nhwc_bwd_fast<T>(N, C, H, W, k, st, p, xt.data(), dyt.data(), dx.data());
        return dx;
      });
      same_bits("maxpool_nhwc_bwd_fast", to_nchw(dx, N, C, H * W), dx_ref);
    }
}

TEST_CASE_TEMPLATE("avg pool NHWC vs ops.h avg pool: same bits", T, float, double) {
  uint32_t seed = 900;
  const int shapes[][3] = {{3, 20, 35}, {2, 64, 49}, {2, 5, 1}, {2, 2048, 49}, {1, 70, 3}, {4, 130, 196}};
  for (const auto& sh : shapes) {
    const int N = sh[0], C = sh[1], HW = sh[2];
    CAPTURE(N);
    CAPTURE(C);
    CAPTURE(HW);
    auto x = randv<T>(size_t(N) * C * HW, seed++, -3, 3);
    x[size_t(seed) % x.size()] = std::numeric_limits<T>::quiet_NaN();
    const auto dy = randv<T>(size_t(N) * C, seed++);
    std::vector<T> y_ref(size_t(N) * C), dx_ref(x.size());
    cpu::avgpool_fwd<T>(N, C, HW, x.data(), y_ref.data());
    cpu::avgpool_bwd<T>(N, C, HW, dy.data(), dx_ref.data());
    const auto xt = to_nhwc(x, N, C, HW);
    std::vector<T> y(size_t(N) * C), dx(x.size());
    same_bits_any_threads<T>("avgpool_nhwc_fwd_fast", [&] {
      vbtest::poison(y);
      cpu::avgpool_nhwc_fwd_fast<T>(N, C, HW, xt.data(), y.data());
      return y;
    });
    same_bits("avgpool_nhwc_fwd_fast", y, y_ref);  // [N, C] in both layouts
    same_bits_any_threads<T>("avgpool_nhwc_bwd_fast", [&] {
      vbtest::poison(dx);
      cpu::avgpool_nhwc_bwd_fast<T>(N, C, HW, dy.data(), dx.data());
      return dx;
    });
    same_bits("avgpool_nhwc_bwd_fast", to_nchw(dx, N, C, HW), dx_ref);
  }
}
