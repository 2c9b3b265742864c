// vbtrain bench-ops: throughput of the CPU reference kernels. Prints GEMM GFLOP/s at a few sizes, then the
// time of every distinct convolution of ResNet-50 (forward, data gradient, filter gradient) at the given batch
// and image size, and the whole network's convolution time for one forward and backward pass, in the NCHW
// kernels (conv.cpp) and the NHWC ones the CPU backend runs (conv_nhwc.cpp) side by side (--layout); before
// those, the batch norm and pooling kernels at the network's shapes, NCHW against NHWC. Times are
// medians over repetitions; nothing is asserted.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <tuple>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "engine/model_config.h"
#include "kernels/cpu/bn_fused.h"
#include "kernels/cpu/bn_fused_nhwc.h"
#include "kernels/cpu/conv_nhwc.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/pool_fast.h"
#include "kernels/cpu/pool_fast_nhwc.h"
#include "tools/commands.h"

namespace vb::tools {
namespace {

struct BenchOpsOptions {
  int threads = 0;
  int batch = 1;
  int image = 224;
  double min_seconds = 0.3;
  bool skip_gemm = false;
  bool skip_activations = false;
  std::string blocks = "3,4,6,3";
  int width = 64;
  std::string layout = "both";  // nchw, nhwc or both
};

// Median seconds per call of fn: one warm-up call, then repetitions until min_seconds have passed (at least 3).
double time_median(const std::function<void()>& fn, double min_seconds) {
  fn();
  std::vector<double> t;
  double total = 0;
  while (t.size() < 3 || total < min_seconds) {
    const auto a = std::chrono::steady_clock::now();
    fn();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
    t.push_back(s);
    total += s;
    if (t.size() >= 1000) break;
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// The core's float32 multiply-add peak: 12 independent chains of 8-wide fused multiply-adds (enough to cover
// the latency of two FMA pipes), on the calling thread. What every GFLOP/s figure here is a fraction of.
double fma_peak_gflops(double seconds) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(float(i));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  int64_t iters = 0;
  const auto t0 = std::chrono::steady_clock::now();
  double elapsed = 0;
  while (elapsed < seconds) {
    for (int k = 0; k < 100000; ++k)
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
    iters += 100000;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  float sink = 0, tmp[8];
  for (int i = 0; i < 12; ++i) {
    _mm256_storeu_ps(tmp, acc[i]);
    sink += tmp[0];
  }
  volatile float keep = sink;
  (void)keep;
  return double(iters) * 12 * 8 * 2 / elapsed / 1e9;
#else
  (void)seconds;
  return 0;
#endif
}

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(-1, 1);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

// Every convolution of the ResNet with these blocks per stage and base width (torchvision's ResNet-50 for
// 3,4,6,3 and 64: stride on the 3x3, 1x1 downsample on each stage's first block).
std::vector<cpu::ConvShape> resnet_convs(int N, int image, const std::vector<int>& blocks, int width) {
  std::vector<cpu::ConvShape> convs;
  auto add = [&](int C, int H, int K, int k, int stride, int pad) {
    convs.push_back(cpu::ConvShape{N, C, H, H, K, k, k, stride, pad});
    return convs.back().P();
  };
  int H = add(3, image, width, 7, 2, 3);
  H = (H + 2 - 3) / 2 + 1;  // max pool 3x3 s2 p1
  int in = width;
  for (int stage = 0; stage < int(blocks.size()); ++stage) {
    const int planes = width << stage;
    for (int b = 0; b < blocks[stage]; ++b) {
      const int stride = (stage > 0 && b == 0) ? 2 : 1;
      add(in, H, planes, 1, 1, 0);
      const int H2 = add(planes, H, planes, 3, stride, 1);
      add(planes, H2, planes * 4, 1, 1, 0);
      if (b == 0) add(in, H, planes * 4, 1, stride, 0);
      in = planes * 4;
      H = H2;
    }
  }
  return convs;
}

// Batch norm (training forward with residual and ReLU, backward with ReLU writing dx and dresidual) at every
// distinct convolution output shape, and the max / average pools: the NCHW kernels (bn_fused.h, pool_fast.h,
// ops.h) against their NHWC twins (bn_fused_nhwc.h, pool_fast_nhwc.h), float.
void bench_activations(const BenchOpsOptions& o, const std::vector<cpu::ConvShape>& convs) {
  std::printf("\nBatch norm and pooling, float, batch %d: NCHW vs NHWC (ms)\n", o.batch);
  std::printf("%-8s %5s %5s %9s %9s %9s %9s\n", "op", "C", "HxW", "fwd NCHW", "fwd NHWC", "bwd NCHW", "bwd NHWC");
  std::vector<std::pair<int, int>> bn;  // (C, H) of each distinct convolution output
  for (const auto& s : convs)
    if (std::find(bn.begin(), bn.end(), std::make_pair(s.K, s.P())) == bn.end()) bn.emplace_back(s.K, s.P());
  for (const auto& [C, H] : bn) {
    const int N = o.batch, HW = H * H;
    const size_t n = size_t(N) * C * HW;
    const auto x = random_floats(n, 1), r = random_floats(n, 2), dy = random_floats(n, 3);
    const auto gamma = random_floats(size_t(C), 4), beta = random_floats(size_t(C), 5);
    std::vector<float> y(n), mean(C), invstd(C), rm(C, 0.f), rv(C, 1.f), dx(n), dr(n), dg(C), db(C);
    const double f1 = time_median(
        [&] {
          cpu::bn_train_fwd_fused<float>(N, C, HW, x.data(), gamma.data(), beta.data(), r.data(), true, y.data(),
                                         mean.data(), invstd.data(), rm.data(), rv.data(), 0.1, 1e-5);
        },
        o.min_seconds);
    const double f2 = time_median(
        [&] {
          cpu::bn_train_fwd_nhwc<float>(N, C, HW, x.data(), gamma.data(), beta.data(), r.data(), true, y.data(),
                                        mean.data(), invstd.data(), rm.data(), rv.data(), 0.1, 1e-5);
        },
        o.min_seconds);
    const double b1 = time_median(
        [&] {
          cpu::bn_bwd_fused<float>(N, C, HW, x.data(), y.data(), dy.data(), gamma.data(), mean.data(), invstd.data(),
                                   true, dx.data(), dr.data(), dg.data(), db.data());
        },
        o.min_seconds);
    const double b2 = time_median(
        [&] {
          cpu::bn_bwd_nhwc<float>(N, C, HW, x.data(), y.data(), dy.data(), gamma.data(), mean.data(), invstd.data(),
                                  true, dx.data(), dr.data(), dg.data(), db.data());
        },
        o.min_seconds);
    std::printf("%-8s %5d %5d %9.3f %9.3f %9.3f %9.3f\n", "bn", C, H, f1 * 1e3, f2 * 1e3, b1 * 1e3, b2 * 1e3);
  }
  if (convs.empty()) return;
  {  // The stem's max pool, 3x3 stride 2 padding 1.
    const int N = o.batch, C = convs[0].K, H = convs[0].P(), P = (H + 2 - 3) / 2 + 1;
    const auto x = random_floats(size_t(N) * C * H * H, 1), dy = random_floats(size_t(N) * C * P * P, 2);
    std::vector<float> y(dy.size()), dx(x.size());
    const double f1 = time_median([&] { cpu::maxpool_fwd_fast<float>(N, C, H, H, 3, 2, 1, x.data(), y.data()); },
                                  o.min_seconds);
    const double f2 = time_median(
        [&] { cpu::maxpool_nhwc_fwd_fast<float>(N, C, H, H, 3, 2, 1, x.data(), y.data()); }, o.min_seconds);
    const double b1 = time_median(
        [&] { cpu::maxpool_bwd_fast<float>(N, C, H, H, 3, 2, 1, x.data(), dy.data(), dx.data()); }, o.min_seconds);
    const double b2 = time_median(
        [&] { cpu::maxpool_nhwc_bwd_fast<float>(N, C, H, H, 3, 2, 1, x.data(), dy.data(), dx.data()); },
        o.min_seconds);
    std::printf("%-8s %5d %5d %9.3f %9.3f %9.3f %9.3f\n", "maxpool", C, H, f1 * 1e3, f2 * 1e3, b1 * 1e3, b2 * 1e3);
  }
  {  // The head's global average pool.
    const int N = o.batch, C = convs.back().K, HW = convs.back().P() * convs.back().Q();
    const auto x = random_floats(size_t(N) * C * HW, 1), dy = random_floats(size_t(N) * C, 2);
    std::vector<float> y(dy.size()), dx(x.size());
    const double f1 = time_median([&] { cpu::avgpool_fwd<float>(N, C, HW, x.data(), y.data()); }, o.min_seconds);
    const double f2 =
        time_median([&] { cpu::avgpool_nhwc_fwd_fast<float>(N, C, HW, x.data(), y.data()); }, o.min_seconds);
    const double b1 = time_median([&] { cpu::avgpool_bwd<float>(N, C, HW, dy.data(), dx.data()); }, o.min_seconds);
    const double b2 =
        time_median([&] { cpu::avgpool_nhwc_bwd_fast<float>(N, C, HW, dy.data(), dx.data()); }, o.min_seconds);
    std::printf("%-8s %5d %5d %9.3f %9.3f %9.3f %9.3f\n", "avgpool", C, convs.back().P(), f1 * 1e3, f2 * 1e3,
                b1 * 1e3, b2 * 1e3);
  }
}

int run_bench_ops(const BenchOpsOptions& o) {
  cpu::set_num_threads(o.threads);
  std::printf("CPU kernels: %d threads\n", cpu::num_threads());
  if (const double peak = fma_peak_gflops(std::max(0.2, o.min_seconds)); peak > 0)
    std::printf("float32 FMA peak of one core (12 chains of 8-wide fused multiply-adds): %.1f GFLOP/s\n", peak);

  if (!o.skip_gemm) {
    std::printf("\nGEMM (float, C = A * B, row-major, no transposes)\n");
    std::printf("%6s %6s %6s %10s %10s\n", "M", "N", "K", "ms", "GFLOP/s");
    const int sizes[][3] = {{256, 256, 256},    {512, 512, 512}, {1024, 1024, 1024},
                            {2048, 2048, 2048}, {64, 3136, 576}, {512, 49, 4608}};
    for (const auto& s : sizes) {
      const int M = s[0], N = s[1], K = s[2];
      const auto A = random_floats(size_t(M) * K, 1), B = random_floats(size_t(K) * N, 2);
      std::vector<float> C(size_t(M) * N);
      const double t = time_median(
          [&] { cpu::gemm<float>(false, false, M, N, K, 1.0f, A.data(), K, B.data(), N, 0.0f, C.data(), N); },
          o.min_seconds);
      std::printf("%6d %6d %6d %10.3f %10.1f\n", M, N, K, t * 1e3, 2.0 * M * N * K / t / 1e9);
    }
  }

  const auto all = resnet_convs(o.batch, o.image, parse_int_list(o.blocks, "--blocks"), o.width);
  if (!o.skip_activations) bench_activations(o, all);

  // Distinct shapes with their number of occurrences, in network order.
  std::vector<std::pair<cpu::ConvShape, int>> shapes;
  for (const auto& s : all) {
    auto key = [](const cpu::ConvShape& c) { return std::tie(c.C, c.H, c.W, c.K, c.R, c.S, c.stride, c.pad); };
    auto it = std::find_if(shapes.begin(), shapes.end(), [&](const auto& p) { return key(p.first) == key(s); });
    if (it == shapes.end())
      shapes.emplace_back(s, 1);
    else
      ++it->second;
  }
  std::printf("\nResNet [%s] width %d convolutions, batch %d, %dx%d input (%zu convolutions, %zu distinct)\n",
              o.blocks.c_str(), o.width, o.batch, o.image, o.image, all.size(), shapes.size());
  std::printf("(GFLOP/s: the direct convolution's arithmetic over the time, for the passes run by Winograd too)\n");
  const bool run_nchw = o.layout != "nhwc", run_nhwc = o.layout != "nchw";
  std::printf("%5s %5s %5s %5s %6s %2s %9s", "C", "HxW", "K", "RxS", "stride", "n", "GFLOP");
  if (run_nchw) std::printf(" | %8s %8s %8s %7s", "NCHW fwd", "dx ms", "dw ms", "GFLOP/s");
  if (run_nhwc) std::printf(" | %8s %8s %8s %7s", "NHWC fwd", "dx ms", "dw ms", "GFLOP/s");
  std::printf("\n");
  struct Totals {
    double fwd = 0, dx = 0, dw = 0;
  } totals[2];
  double total_flop = 0, backward_flop = 0;
  for (const auto& [s, count] : shapes) {
    const size_t nx = size_t(s.N) * s.C * s.H * s.W, nw = size_t(s.K) * s.C * s.R * s.S,
                 ny = size_t(s.N) * s.K * s.P() * s.Q();
    const auto x = random_floats(nx, 3), w = random_floats(nw, 4), dy = random_floats(ny, 5);
    std::vector<float> y(ny), dx(nx), dw(nw);
    const double flop = 2.0 * double(ny) * s.C * s.R * s.S;  // one pass
    // The stem's input is the image: the network never computes its gradient.
    const bool stem = &s == &shapes.front().first;
    std::printf("%5d %5d %5d %3dx%d %6d %2d %9.3f", s.C, s.H, s.K, s.R, s.S, s.stride, count, flop / 1e9);
    for (int layout = 0; layout < 2; ++layout) {
      if (!(layout == 0 ? run_nchw : run_nhwc)) continue;
      const bool nhwc = layout == 1;
      const double tf = time_median(
          [&] {
            nhwc ? cpu::conv2d_nhwc_fwd<float>(s, x.data(), w.data(), y.data())
                 : cpu::conv2d_fwd<float>(s, x.data(), w.data(), y.data());
          },
          o.min_seconds);
      const double td = stem ? 0.0
                             : time_median(
                                   [&] {
                                     nhwc ? cpu::conv2d_nhwc_bwd_data<float>(s, dy.data(), w.data(), dx.data())
                                          : cpu::conv2d_bwd_data<float>(s, dy.data(), w.data(), dx.data());
                                   },
                                   o.min_seconds);
      const double tw = time_median(
          [&] {
            nhwc ? cpu::conv2d_nhwc_bwd_filter<float>(s, x.data(), dy.data(), dw.data())
                 : cpu::conv2d_bwd_filter<float>(s, x.data(), dy.data(), dw.data());
          },
          o.min_seconds);
      std::printf(" | %8.3f %8.3f %8.3f %7.1f", tf * 1e3, td * 1e3, tw * 1e3, (stem ? 2 : 3) * flop / (tf + td + tw) / 1e9);
      if (nhwc) {  // the passes that run by Winograd (their GFLOP/s count the direct convolution's arithmetic)
        const bool wf = cpu::conv2d_nhwc_winograd<float>(s, cpu::ConvPass::Forward),
                   wd = !stem && cpu::conv2d_nhwc_winograd<float>(s, cpu::ConvPass::DataGradient),
                   ww = cpu::conv2d_nhwc_winograd<float>(s, cpu::ConvPass::FilterGradient);
        if (wf || wd || ww) std::printf("  Winograd:%s%s%s", wf ? " fwd" : "", wd ? " dx" : "", ww ? " dw" : "");
      }
      totals[layout].fwd += count * tf;
      totals[layout].dx += count * td;
      totals[layout].dw += count * tw;
    }
    std::printf("\n");
    total_flop += count * flop;
    backward_flop += count * flop * (stem ? 1 : 2);
  }
  for (int layout = 0; layout < 2; ++layout) {
    if (!(layout == 0 ? run_nchw : run_nhwc)) continue;
    const Totals& t = totals[layout];
    std::printf(
        "\nwhole network, %s convolutions only: forward %.1f ms (%.1f GFLOP/s), backward %.1f ms (data %.1f + "
        "filter %.1f; no data gradient for the stem), %.1f GFLOP per forward, %.1f GFLOP/s overall\n",
        layout == 0 ? "NCHW" : "NHWC", t.fwd * 1e3, total_flop / t.fwd / 1e9, (t.dx + t.dw) * 1e3, t.dx * 1e3,
        t.dw * 1e3, total_flop / 1e9, (total_flop + backward_flop) / (t.fwd + t.dx + t.dw) / 1e9);
  }
  return 0;
}

}  // namespace

VB_COMMAND(
    "bench-ops", "Benchmark the CPU kernels: GEMM GFLOP/s and every ResNet-50 convolution (forward, backward)",
    [](CLI::App& app) -> std::function<int()> {
      auto o = std::make_shared<BenchOpsOptions>();
      app.add_option("--threads", o->threads, "CPU threads (0 = all cores)")
          ->check(thread_count())
          ->capture_default_str();
      app.add_option("--batch", o->batch, "batch size of the convolutions")
          ->check(integer_in(1, 4096))
          ->capture_default_str();
      app.add_option("--image", o->image, "input image side")->check(integer_in(32, 1024))->capture_default_str();
      app.add_option("--min-seconds", o->min_seconds, "time spent per measurement (median of the repetitions)")
          ->check(finite_number(0, 3600, true))
          ->capture_default_str();
      app.add_flag("--skip-gemm", o->skip_gemm, "no GEMM figures");
      app.add_flag("--skip-activations", o->skip_activations, "no batch norm and pooling figures (NCHW vs NHWC)");
      app.add_option("--blocks", o->blocks, "blocks per stage")->capture_default_str();
      app.add_option("--width", o->width, "base width")->check(CLI::PositiveNumber)->capture_default_str();
      app.add_option("--layout", o->layout, "which convolution kernels: nchw, nhwc or both")
          ->check(CLI::IsMember({"nchw", "nhwc", "both"}))
          ->capture_default_str();
      return [o] { return run_bench_ops(*o); };
    });

}  // namespace vb::tools
