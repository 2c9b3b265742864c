// vbbench: every custom CUDA kernel and every distinct ResNet-50 convolution / batch-norm layer at the
// training batch (150 at 224x224 by default), forward and backward, timed with CUDA events after warm-up,
// with L2 flushed before each timed run. Each line gives the median time and the achieved GB/s (memory-bound
// kernels, bytes that must move at least once) or TFLOP/s (convolutions, linear), and that as a fraction of
// the H200's peak for the unit doing the work: 4.8 TB/s HBM; dense tensor cores 494 TFLOP/s TF32 (989 bf16,
// for when bf16 kernels exist); 67 TFLOP/s FP32 without tensor cores (strict fp32 convolutions and the head,
// which cuBLAS computes in fp32 in both modes). A last section weights each layer by how often ResNet-50 uses
// it: the time one training step spends in convolutions and batch norm. Last come issue 11's NHWC kernels
// (batch norm fused with add + ReLU, max pool, global average pool) with bf16 and float activations, and the
// CUDA backend's NHWC input transpose and evaluation fold. `--precision bf16` (or a list with it) also times every
// convolution in bf16 NHWC on cuDNN alone: what a bf16 step's convolutions would take.
//
// --versions prints what the process actually loaded (cuDNN, cuBLAS, the CUDA runtime and driver, the
// library files) and the GPU's name, clocks and memory, and exits: the first thing tools/gpu-check.sh asks.
// --max-seconds stops starting new ops after that long and still writes --json (marked incomplete), so a
// caller with a deadline gets the rows measured so far.
//
// Timing: the backend's stream is a blocking stream, so events recorded on the legacy default stream order
// with its work (an event there waits for everything queued before it on blocking streams).
#include <CLI/CLI.hpp>
#include <cublas_v2.h>
#include <cudnn.h>
#include <link.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "engine/backend.h"
#include "kernels/cuda/bf16_convert.cuh"
#include "kernels/cuda/bn_fold.cuh"
#include "kernels/cuda/bn_nhwc.cuh"
#include "kernels/cuda/layout.cuh"
#include "kernels/cuda/pool_nhwc.cuh"
#include "kernels/cuda/transforms.cuh"
#include "tools/commands.h"

namespace {

// The H200's peaks (NVIDIA's H200 SXM figures, dense): what each row's fraction is taken against.
constexpr double kHbmGBs = 4800.0;
constexpr double kBf16Tflops = 989.0;
constexpr double kTf32Tflops = 494.0;
constexpr double kFp32Tflops = 67.0;

struct Options {
  int batch = 150, size = 224, warmup = 2, iters = 10;
  double max_seconds = 0;
  bool versions = false;
  std::string precision = "both", filter, json;
};

struct Row {
  std::string group, name;
  double ms = 0;
  double gbs = 0, tflops = 0;  // one of them, the other 0
  double peak = 0;             // the peak it is measured against, in the same unit (GB/s or TFLOP/s)
  std::string peak_name;       // "HBM", "TF32 tensor cores", "FP32"
  double fraction() const { return peak > 0 ? (gbs > 0 ? gbs : tflops) / peak : 0; }
};

class Bench {
 public:
  Bench(vb::Backend& be, const Options& o) : be_(be), o_(o) {
    int dev = 0;
    VB_CUDA_CHECK(cudaGetDevice(&dev));
    cudaDeviceProp prop{};
    VB_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    flush_bytes_ = size_t(std::max(prop.l2CacheSize, 1 << 20)) * 2;
    VB_CUDA_CHECK(cudaMalloc(&flush_, flush_bytes_));
    VB_CUDA_CHECK(cudaEventCreate(&ev0_));
    VB_CUDA_CHECK(cudaEventCreate(&ev1_));
  }
  ~Bench() {
    cudaFree(flush_);
    cudaEventDestroy(ev0_);
    cudaEventDestroy(ev1_);
  }
  Bench(const Bench&) = delete;
  Bench& operator=(const Bench&) = delete;

  // False once --max-seconds has passed: the ops not started are left out, and the JSON says so.
  bool wanted(const std::string& name) {
    if (o_.max_seconds > 0 &&
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count() > o_.max_seconds) {
      if (!out_of_time_) std::printf("  (--max-seconds %.0f reached: the remaining ops are not run)\n", o_.max_seconds);
      std::fflush(stdout);
      out_of_time_ = true;
      return false;
    }
    return o_.filter.empty() || name.find(o_.filter) != std::string::npos;
  }
  bool out_of_time() const { return out_of_time_; }

  // Median of o_.iters timed runs of fn after o_.warmup untimed ones (the first run also chooses algorithms).
  template <class F>
  double time_ms(F&& fn) {
    for (int i = 0; i < o_.warmup; ++i) fn();
    be_.sync();
    std::vector<float> t;
    for (int i = 0; i < o_.iters; ++i) {
      VB_CUDA_CHECK(cudaMemsetAsync(flush_, i & 0xff, flush_bytes_, nullptr));
      VB_CUDA_CHECK(cudaEventRecord(ev0_, nullptr));
      fn();
      VB_CUDA_CHECK(cudaEventRecord(ev1_, nullptr));
      VB_CUDA_CHECK(cudaEventSynchronize(ev1_));
      float ms = 0;
      VB_CUDA_CHECK(cudaEventElapsedTime(&ms, ev0_, ev1_));
      t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }

  void mem(const std::string& group, const std::string& name, double bytes, double ms) {
    add({group, name, ms, bytes / (ms * 1e-3) / 1e9, 0, kHbmGBs, "HBM"});
  }
  // tensor_cores: the work may run on TF32 tensor cores (TF32 convolutions); otherwise plain FP32 units.
  void flops(const std::string& group, const std::string& name, double f, double ms, bool tensor_cores) {
    add({group, name, ms, 0, f / (ms * 1e-3) / 1e12, tensor_cores ? kTf32Tflops : kFp32Tflops,
         tensor_cores ? "TF32 tensor cores" : "FP32"});
  }
  // Work on bf16 tensor cores.
  void flops_bf16(const std::string& group, const std::string& name, double f, double ms) {
    add({group, name, ms, 0, f / (ms * 1e-3) / 1e12, kBf16Tflops, "bf16 tensor cores"});
  }
  const std::vector<Row>& rows() const { return rows_; }

 private:
  void add(Row r) {
    if (r.gbs > 0)
      std::printf("  %-58s %9.3f ms %9.1f GB/s     %5.1f%% of %.0f GB/s (%s)\n", r.name.c_str(), r.ms, r.gbs,
                  100 * r.fraction(), r.peak, r.peak_name.c_str());
    else
      std::printf("  %-58s %9.3f ms %9.1f TFLOP/s  %5.1f%% of %.0f TFLOP/s (%s)\n", r.name.c_str(), r.ms, r.tflops,
                  100 * r.fraction(), r.peak, r.peak_name.c_str());
    std::fflush(stdout);
    rows_.push_back(std::move(r));
  }
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  bool out_of_time_ = false;

  vb::Backend& be_;
  Options o_;
  void* flush_ = nullptr;
  size_t flush_bytes_ = 0;
  cudaEvent_t ev0_ = nullptr, ev1_ = nullptr;
  std::vector<Row> rows_;
};

// Device buffer on the backend, released at scope end: random in [lo, hi) (inputs) or zero (outputs, lo == hi).
// The random values come from a fast xorshift so that filling hundreds of megabytes takes no time to speak of.
struct Buf {
  vb::Backend& be;
  float* p;
  size_t n;
  Buf(vb::Backend& b, size_t count, uint32_t seed = 1, float lo = -1.f, float hi = 1.f)
      : be(b), p(static_cast<float*>(b.alloc(count * sizeof(float)))), n(count) {
    if (lo == hi) return;  // alloc zero-fills
    std::vector<float> h(count);
    uint64_t s = 0x9E3779B97F4A7C15ull * (seed + 1);
    for (auto& v : h) {
      s ^= s << 13;
      s ^= s >> 7;
      s ^= s << 17;
      v = lo + (hi - lo) * float(s >> 40) * (1.0f / 16777216.0f);
    }
    b.upload(p, h.data(), count * sizeof(float));
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { be.release(p); }
};
constexpr float kZero = 0.f;  // Buf(be, n, seed, kZero, kZero): an output buffer

std::string conv_name(const vb::ConvShape& s) {
  char b[128];
  std::snprintf(b, sizeof b, "%dx%d/%d %4d->%-4d @%3dx%-3d", s.R, s.S, s.stride, s.C, s.K, s.H, s.W);
  return b;
}

struct BnLayer {
  int C, H, W;
  bool residual, relu;
  bool operator<(const BnLayer& o) const {
    return std::tie(C, H, W, residual, relu) < std::tie(o.C, o.H, o.W, o.residual, o.relu);
  }
};

struct ConvKeyLess {
  bool operator()(const vb::ConvShape& a, const vb::ConvShape& b) const {
    return std::tie(a.N, a.C, a.H, a.W, a.K, a.R, a.S, a.stride, a.pad) <
           std::tie(b.N, b.C, b.H, b.W, b.K, b.R, b.S, b.stride, b.pad);
  }
};

// ResNet-50 (torchvision v1.5: stride on the 3x3) at batch N and image size S: distinct convolutions and
// batch norms with how many times a step uses each.
void resnet50_layers(int N, int S, std::map<vb::ConvShape, int, ConvKeyLess>& convs, std::map<BnLayer, int>& bns) {
  int H = (S + 2 * 3 - 7) / 2 + 1;
  convs[{N, 3, S, S, 64, 7, 7, 2, 3}]++;
  bns[{64, H, H, false, true}]++;
  H = (H + 2 - 3) / 2 + 1;  // max pool 3x3/2
  int in_c = 64;
  const int planes[] = {64, 128, 256, 512}, blocks[] = {3, 4, 6, 3};
  for (int st = 0; st < 4; ++st)
    for (int j = 0; j < blocks[st]; ++j) {
      const int p = planes[st], s = (j == 0 && st > 0) ? 2 : 1, Ho = (H + 2 - 3) / s + 1;
      convs[{N, in_c, H, H, p, 1, 1, 1, 0}]++;
      bns[{p, H, H, false, true}]++;
      convs[{N, p, H, H, p, 3, 3, s, 1}]++;
      bns[{p, Ho, Ho, false, true}]++;
      convs[{N, p, Ho, Ho, 4 * p, 1, 1, 1, 0}]++;
      bns[{4 * p, Ho, Ho, true, true}]++;
      if (j == 0) {
        convs[{N, in_c, H, H, 4 * p, 1, 1, s, 0}]++;
        bns[{4 * p, Ho, Ho, false, false}]++;
      }
      in_c = 4 * p;
      H = Ho;
    }
}

// A device tensor of n activations of type A (issue 11's NHWC kernels): random in [lo, hi) through a float
// buffer (converted on the device for bf16), or zero (lo == hi).
template <class A>
struct ABuf {
  vb::Backend& be;
  A* p;
  size_t n;
  ABuf(vb::Backend& b, size_t count, uint32_t seed = 1, float lo = -1.f, float hi = 1.f)
      : be(b), p(static_cast<A*>(b.alloc(count * sizeof(A)))), n(count) {
    if (lo == hi) return;
    if constexpr (std::is_same_v<A, float>) {
      Buf f(b, count, seed, lo, hi);
      VB_CUDA_CHECK(cudaMemcpy(p, f.p, count * sizeof(float), cudaMemcpyDeviceToDevice));
    } else {
      Buf f(b, count, seed, lo, hi);
      vb::cuda::float_to_bf16(nullptr, int64_t(count), f.p, p);
      VB_CUDA_CHECK(cudaDeviceSynchronize());
    }
  }
  ABuf(const ABuf&) = delete;
  ABuf& operator=(const ABuf&) = delete;
  ~ABuf() { be.release(p); }
};

// Issue 11's NHWC kernels at every distinct ResNet-50 batch norm and the two pools, activations of type A.
// Bytes counted are those that must move at least once (statistics and parameters, a few KB, left out):
// train fwd reads x twice (statistics, apply) and the residual, writes y; backward pass 1 reads x, dy (and y
// with ReLU) and writes dresidual on residual layers, pass 2 reads x and g (dresidual, else dy and y) and
// writes dx. Adds each layer's fwd + bwd, times its use count, to step_ms.
template <class A>
void bench_nhwc(Bench& bench, vb::Backend& be, int N, int S, const std::map<BnLayer, int>& bns,
                std::map<std::string, double>& step_ms) {
  const std::string tn = std::is_same_v<A, float> ? "float" : "bf16";
  std::printf("NHWC kernels, %s activations (issue 11; memory-bound, limit about %.0f GB/s):\n", tn.c_str(), kHbmGBs);
  const double es = sizeof(A);
  for (const auto& [b, count] : bns) {
    char nm[128];
    std::snprintf(nm, sizeof nm, "bn nhwc %s %4d @%3dx%-3d%s%s", tn.c_str(), b.C, b.H, b.W,
                  b.residual ? " +res" : "", b.relu ? " relu" : "");
    if (!bench.wanted(nm)) continue;
    const int64_t M = int64_t(N) * b.H * b.W;
    const size_t n = size_t(M) * b.C;
    ABuf<A> x(be, n, 1), r(be, n, 2), y(be, n, 3), dy(be, n, 4), dx(be, n, 5, kZero, kZero),
        dres(be, n, 6, kZero, kZero);
    Buf g(be, size_t(b.C), 7, 0.5f, 1.5f), bt(be, size_t(b.C), 8), sm(be, size_t(b.C), 9),
        si(be, size_t(b.C), 10, 0.5f, 1.5f), rm(be, size_t(b.C), 11), rv(be, size_t(b.C), 12, 0.5f, 1.5f),
        dg(be, size_t(b.C), 13), db(be, size_t(b.C), 14);
    void* work = be.alloc(vb::cuda::bn_nhwc_work_bytes(b.C));
    const double e = double(n) * es;
    const A* res = b.residual ? r.p : nullptr;
    const double tf = bench.time_ms([&] {
      vb::cuda::bn_nhwc_train_fwd<A>(nullptr, M, b.C, x.p, g.p, bt.p, res, b.relu, y.p, sm.p, si.p, rm.p, rv.p, 0.1,
                                     1e-5, work);
    });
    bench.mem("bn_nhwc_" + tn, std::string(nm) + " train fwd", e * (3 + (b.residual ? 1 : 0)), tf);
    const double te = bench.time_ms([&] {
      vb::cuda::bn_nhwc_eval_fwd<A>(nullptr, M, b.C, x.p, g.p, bt.p, rm.p, rv.p, 1e-5, res, b.relu, y.p);
    });
    bench.mem("bn_nhwc_" + tn, std::string(nm) + " eval fwd", e * (2 + (b.residual ? 1 : 0)), te);
    const double tb = bench.time_ms([&] {
      vb::cuda::bn_nhwc_bwd<A>(nullptr, M, b.C, x.p, y.p, dy.p, g.p, sm.p, si.p, b.relu, dx.p,
                               b.residual ? dres.p : nullptr, dg.p, db.p, work);
    });
    const int pass1 = 2 + (b.relu ? 1 : 0) + (b.residual ? 1 : 0);
    const int pass2 = 2 + (b.residual ? 1 : (b.relu ? 2 : 1));
    bench.mem("bn_nhwc_" + tn, std::string(nm) + " bwd", e * (pass1 + pass2), tb);
    step_ms["NHWC batch norm " + tn + " (train fwd + bwd)"] += count * (tf + tb);
    be.release(work);
  }
  {
    const int H = (S + 2 * 3 - 7) / 2 + 1, P = (H + 2 - 3) / 2 + 1, C = 64;
    const std::string nm = "maxpool nhwc " + tn + " 3x3/2 64 @" + std::to_string(H);
    if (bench.wanted(nm)) {
      const size_t nx = size_t(N) * H * H * C, ny = size_t(N) * P * P * C;
      ABuf<A> x(be, nx, 1), y(be, ny, 2), dy(be, ny, 3), dx(be, nx, 4, kZero, kZero);
      bench.mem("pool_nhwc_" + tn, nm + " fwd", es * double(nx + ny),
                bench.time_ms([&] { vb::cuda::maxpool_nhwc_fwd<A>(nullptr, N, H, H, C, 3, 2, 1, x.p, y.p); }));
      bench.mem("pool_nhwc_" + tn, nm + " bwd", es * double(2 * nx + ny),
                bench.time_ms([&] { vb::cuda::maxpool_nhwc_bwd<A>(nullptr, N, H, H, C, 3, 2, 1, x.p, dy.p, dx.p); }));
    }
  }
  {
    const int F = 2048, H = (S + 31) / 32;
    const std::string nm = "avgpool nhwc " + tn + " 2048 @" + std::to_string(H);
    if (bench.wanted(nm)) {
      const size_t nx = size_t(N) * H * H * F;
      ABuf<A> x(be, nx, 1), y(be, size_t(N) * F, 2), dx(be, nx, 3, kZero, kZero);
      bench.mem("pool_nhwc_" + tn, nm + " fwd", es * double(nx + size_t(N) * F),
                bench.time_ms([&] { vb::cuda::avgpool_nhwc_fwd<A>(nullptr, N, H * H, F, x.p, y.p); }));
      bench.mem("pool_nhwc_" + tn, nm + " bwd", es * double(nx + size_t(N) * F),
                bench.time_ms([&] { vb::cuda::avgpool_nhwc_bwd<A>(nullptr, N, H * H, F, y.p, dx.p); }));
    }
  }
  if constexpr (std::is_same_v<A, float>) {
    // What the CUDA backend adds in NHWC and in evaluation: the input batch's transpose (each upload), and the
    // fold of a batch norm into ResNet-50's largest filter, written in KRSC (each evaluation layer).
    const std::string nt = "transpose nchw->nhwc " + std::to_string(N) + "x3x" + std::to_string(S) + "x" +
                           std::to_string(S);
    if (bench.wanted(nt)) {
      const size_t n = size_t(N) * 3 * S * S;
      Buf x(be, n, 1), y(be, n, 2);
      bench.mem("layout", nt, 2.0 * sizeof(float) * double(n),
                bench.time_ms([&] { vb::cuda::nchw_to_nhwc(nullptr, N, 3, S * S, x.p, y.p); }));
    }
    const std::string nf = "bn fold 512x512x3x3 into KRSC";
    if (bench.wanted(nf)) {
      const int K = 512, C = 512;
      const size_t n = size_t(K) * C * 9;
      Buf w(be, n, 1), wf(be, n, 2), g(be, size_t(K), 3, 0.5f, 1.5f), bt(be, size_t(K), 4), rm(be, size_t(K), 5),
          rv(be, size_t(K), 6, 0.5f, 1.5f), bias(be, size_t(K), 7);
      bench.mem("bn_fold", nf, 2.0 * sizeof(float) * double(n), bench.time_ms([&] {
        vb::cuda::bn_fold_weights(nullptr, K, C, 9, w.p, g.p, bt.p, rm.p, rv.p, 1e-5, true, wf.p, bias.p);
      }));
    }
  }
}

// What this process really runs on: library versions as loaded (cuDNN picks its sub-libraries at run time,
// and the GPU machine has two cuDNN 9 builds), the files they came from, and the GPU.
int print_versions(const Options& o) {
  nlohmann::ordered_json j;
  int drv = 0, rt = 0;
  cudaDriverGetVersion(&drv);
  cudaRuntimeGetVersion(&rt);
  auto ver = [](int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); };
  const size_t dnn = cudnnGetVersion();
  int bmaj = 0, bmin = 0, bpatch = 0;
  cublasGetProperty(MAJOR_VERSION, &bmaj);
  cublasGetProperty(MINOR_VERSION, &bmin);
  cublasGetProperty(PATCH_LEVEL, &bpatch);
  j["cuda_driver"] = ver(drv);
  j["cuda_runtime"] = ver(rt) + " (built with " + ver(CUDART_VERSION) + ")";
  j["cudnn"] = std::to_string(dnn / 10000) + "." + std::to_string(dnn % 10000 / 100) + "." + std::to_string(dnn % 100) +
               " (built with " + std::to_string(CUDNN_MAJOR) + "." + std::to_string(CUDNN_MINOR) + "." +
               std::to_string(CUDNN_PATCHLEVEL) + ", cuDNN's cudart " + ver(int(cudnnGetCudartVersion())) + ")";
  j["cublas"] = std::to_string(bmaj) + "." + std::to_string(bmin) + "." + std::to_string(bpatch);
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  int status = 0;
  if (e != cudaSuccess || n == 0) {
    cudaGetLastError();
    j["gpu"] = std::string("none: ") + (e != cudaSuccess ? cudaGetErrorString(e) : "the driver sees no device");
    status = 1;
  } else {
    cudaDeviceProp p{};
    VB_CUDA_CHECK(cudaGetDeviceProperties(&p, 0));
    int sm_khz = 0, mem_khz = 0, bus = 0;
    cudaDeviceGetAttribute(&sm_khz, cudaDevAttrClockRate, 0);
    cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, 0);
    cudaDeviceGetAttribute(&bus, cudaDevAttrGlobalMemoryBusWidth, 0);
    j["gpu"] = p.name;
    j["devices"] = n;
    j["compute_capability"] = std::to_string(p.major) + "." + std::to_string(p.minor);
    j["sms"] = p.multiProcessorCount;
    j["memory_gib"] = double(p.totalGlobalMem) / double(1ull << 30);
    j["l2_mib"] = double(p.l2CacheSize) / double(1 << 20);
    j["sm_clock_max_mhz"] = sm_khz / 1000;
    j["memory_clock_mhz"] = mem_khz / 1000;
    j["memory_bus_bits"] = bus;
    // Handles make cuDNN and cuBLAS load their engines, so the file list below names what will run.
    cudnnHandle_t dnn_h = nullptr;
    cublasHandle_t blas_h = nullptr;
    if (cudnnCreate(&dnn_h) == CUDNN_STATUS_SUCCESS) cudnnDestroy(dnn_h);
    else j["cudnn_handle"] = "cudnnCreate failed";
    if (cublasCreate(&blas_h) == CUBLAS_STATUS_SUCCESS) {
      int v = 0;
      cublasGetVersion(blas_h, &v);
      j["cublas_handle_version"] = v;
      cublasDestroy(blas_h);
    } else {
      j["cublas_handle"] = "cublasCreate failed";
    }
  }
  std::vector<std::string> libs;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        const std::string name = info->dlpi_name ? info->dlpi_name : "";
        for (const char* k : {"cudnn", "cublas", "cudart", "libcuda.", "nvrtc", "nvJitLink"})
          if (name.find(k) != std::string::npos) {
            static_cast<std::vector<std::string>*>(data)->push_back(name);
            break;
          }
        return 0;
      },
      &libs);
  j["loaded_libraries"] = libs;
  for (const auto& [k, v] : j.items())
    if (k != "loaded_libraries") std::printf("%-22s %s\n", k.c_str(), v.is_string() ? v.get<std::string>().c_str() : v.dump().c_str());
  for (const auto& l : libs) std::printf("loaded                 %s\n", l.c_str());
  if (!o.json.empty()) {
    std::ofstream f(o.json);
    if (!f) vb::fail(o.json, ": cannot write");
    f << j.dump(1) << "\n";
  }
  return status;
}

// ---- bf16 convolutions in NHWC, on cuDNN directly (the backend has no bf16 path yet) ----
// What a bf16 training step's convolutions would take (issue 11: 8,000 img/s is 18.75 ms a step of 150): NHWC
// bf16 activations, KRSC bf16 filters, float32 accumulation, tensor-core math, each direction with the fastest
// algorithm cudnnFind returns within the workspace limit. A handle on the legacy default stream, so that the
// timing events order with its work. Adds each layer's fwd + bwd, times its use count, to step_ms.
constexpr size_t kBf16ConvWorkspace = size_t(512) << 20;
void bench_conv_bf16(Bench& bench, vb::Backend& be, const std::map<vb::ConvShape, int, ConvKeyLess>& convs,
                     std::map<std::string, double>& step_ms) {
  std::printf("convolutions, bf16 NHWC on cuDNN alone (limit about %.0f TFLOP/s):\n", kBf16Tflops);
  cudnnHandle_t h = nullptr;
  VB_CUDNN_CHECK(cudnnCreate(&h));
  void* ws = nullptr;
  VB_CUDA_CHECK(cudaMalloc(&ws, kBf16ConvWorkspace));
  cudnnTensorDescriptor_t xd = nullptr, yd = nullptr;
  cudnnFilterDescriptor_t wd = nullptr;
  cudnnConvolutionDescriptor_t cd = nullptr;
  VB_CUDNN_CHECK(cudnnCreateTensorDescriptor(&xd));
  VB_CUDNN_CHECK(cudnnCreateTensorDescriptor(&yd));
  VB_CUDNN_CHECK(cudnnCreateFilterDescriptor(&wd));
  VB_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&cd));
  const float one = 1.f, zero = 0.f;
  // A bf16 copy of random floats (the values matter not to the time, but zeros might take shortcuts).
  auto bf16_buf = [&](size_t n, uint32_t seed) {
    Buf f(be, n, seed);
    void* p = nullptr;
    VB_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(vb::bf16)));
    be.sync();
    vb::cuda::float_to_bf16(nullptr, int64_t(n), f.p, static_cast<vb::bf16*>(p));
    VB_CUDA_CHECK(cudaDeviceSynchronize());
    return p;
  };
  for (const auto& [s, count] : convs) {
    const std::string base = "conv bf16-nhwc " + conv_name(s);
    if (!bench.wanted(base)) continue;
    VB_CUDNN_CHECK(cudnnSetTensor4dDescriptor(xd, CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, s.N, s.C, s.H, s.W));
    VB_CUDNN_CHECK(cudnnSetTensor4dDescriptor(yd, CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, s.N, s.K, s.P(), s.Q()));
    VB_CUDNN_CHECK(cudnnSetFilter4dDescriptor(wd, CUDNN_DATA_BFLOAT16, CUDNN_TENSOR_NHWC, s.K, s.C, s.R, s.S));
    VB_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(cd, s.pad, s.pad, s.stride, s.stride, 1, 1, CUDNN_CROSS_CORRELATION,
                                                   CUDNN_DATA_FLOAT));
    VB_CUDNN_CHECK(cudnnSetConvolutionMathType(cd, CUDNN_TENSOR_OP_MATH));
    void* x = bf16_buf(size_t(s.N) * s.C * s.H * s.W, 1);
    void* w = bf16_buf(size_t(s.K) * s.C * s.R * s.S, 2);
    void* y = bf16_buf(size_t(s.N) * s.K * s.P() * s.Q(), 3);
    void* dx = bf16_buf(size_t(s.N) * s.C * s.H * s.W, 4);
    void* dw = bf16_buf(size_t(s.K) * s.C * s.R * s.S, 5);
    const double f = 2.0 * s.N * s.K * s.P() * s.Q() * double(s.C) * s.R * s.S;
    // One direction: cudnnFind's fastest algorithm (when it has one), timed; 0 ms when there is none.
    auto measure = [&](const char* dir, auto* perf, auto&& find, auto&& call) {
      int got = 0;
      VB_CUDNN_CHECK(find(perf, &got));
      if (got == 0 || perf[0].status != CUDNN_STATUS_SUCCESS) return 0.0;
      const auto algo = perf[0].algo;
      const double t = bench.time_ms([&] { VB_CUDNN_CHECK(call(algo)); });
      bench.flops_bf16("conv_bf16", base + " " + dir, f, t);
      return t;
    };
    cudnnConvolutionFwdAlgoPerf_t pf[8];
    cudnnConvolutionBwdDataAlgoPerf_t pd[8];
    cudnnConvolutionBwdFilterAlgoPerf_t pw[8];
    const size_t wsb = kBf16ConvWorkspace;
    const double tf = measure(
        "fwd", pf,
        [&](auto* r, int* got) {
          return cudnnFindConvolutionForwardAlgorithmEx(h, xd, x, wd, w, cd, yd, y, 8, got, r, ws, wsb);
        },
        [&](auto algo) { return cudnnConvolutionForward(h, &one, xd, x, wd, w, cd, algo, ws, wsb, &zero, yd, y); });
    const double tb = measure(
        "bwd-data", pd,
        [&](auto* r, int* got) {
          return cudnnFindConvolutionBackwardDataAlgorithmEx(h, wd, w, yd, y, cd, xd, dx, 8, got, r, ws, wsb);
        },
        [&](auto algo) {
          return cudnnConvolutionBackwardData(h, &one, wd, w, yd, y, cd, algo, ws, wsb, &zero, xd, dx);
        });
    const double tw = measure(
        "bwd-filter", pw,
        [&](auto* r, int* got) {
          return cudnnFindConvolutionBackwardFilterAlgorithmEx(h, xd, x, yd, y, cd, wd, dw, 8, got, r, ws, wsb);
        },
        [&](auto algo) {
          return cudnnConvolutionBackwardFilter(h, &one, xd, x, yd, y, cd, algo, ws, wsb, &zero, wd, dw);
        });
    for (void* p : {x, w, y, dx, dw}) VB_CUDA_CHECK(cudaFree(p));
    step_ms["convolutions bf16 NHWC (cuDNN alone)"] += count * (tf + tw + (s.C == 3 ? 0.0 : tb));
  }
  cudnnDestroyConvolutionDescriptor(cd);
  cudnnDestroyFilterDescriptor(wd);
  cudnnDestroyTensorDescriptor(yd);
  cudnnDestroyTensorDescriptor(xd);
  cudaFree(ws);
  cudnnDestroy(h);
}

int run(const Options& o) {
  std::unique_ptr<vb::Backend> be = vb::make_cuda_backend(0);
  Bench bench(*be, o);
  const int N = o.batch, S = o.size;
  std::printf("vbbench: %s, batch %d, %dx%d; median of %d runs after %d warm-up, L2 flushed\n",
              be->description().c_str(), N, S, S, o.iters, o.warmup);
  std::map<vb::ConvShape, int, ConvKeyLess> convs;
  std::map<BnLayer, int> bns;
  resnet50_layers(N, S, convs, bns);

  // ---- convolutions (cuDNN), per precision ----
  std::vector<vb::Precision> precs;
  // --precision: a comma-separated list of tf32, fp32, bf16; "both" is tf32,fp32 and "all" the three.
  const std::string plist = o.precision == "both" ? "tf32,fp32" : o.precision == "all" ? "tf32,fp32,bf16" : o.precision;
  auto wants = [&](const std::string& p) { return ("," + plist + ",").find("," + p + ",") != std::string::npos; };
  if (wants("tf32")) precs.push_back(vb::Precision::TF32);
  if (wants("fp32")) precs.push_back(vb::Precision::FP32);
  std::map<std::string, double> step_ms;  // per-step totals, weighted by use count
  for (vb::Precision prec : precs) {
    be->set_precision(prec);
    const std::string pn = vb::precision_name(prec);
    const bool tc = prec == vb::Precision::TF32;
    const double limit = tc ? kTf32Tflops : kFp32Tflops;
    std::printf("convolutions, %s (limit about %.0f TFLOP/s):\n", pn.c_str(), limit);
    for (const auto& [s, count] : convs) {
      const std::string base = "conv " + pn + " " + conv_name(s);
      if (!bench.wanted(base)) continue;
      Buf x(*be, size_t(s.N) * s.C * s.H * s.W, 1), w(*be, size_t(s.K) * s.C * s.R * s.S, 2, -0.05f, 0.05f),
          y(*be, size_t(s.N) * s.K * s.P() * s.Q(), 3), dx(*be, x.n, 4, kZero, kZero), dw(*be, w.n, 5, kZero, kZero);
      const double f = 2.0 * s.N * s.K * s.P() * s.Q() * double(s.C) * s.R * s.S;
      const double tf = bench.time_ms([&] { be->conv_fwd(s, x.p, w.p, y.p); });
      bench.flops("conv_" + pn, base + " fwd", f, tf, tc);
      const double tb = bench.time_ms([&] { be->conv_bwd_data(s, y.p, w.p, dx.p); });
      bench.flops("conv_" + pn, base + " bwd-data", f, tb, tc);
      const double tw = bench.time_ms([&] { be->conv_bwd_filter(s, x.p, y.p, dw.p); });
      bench.flops("conv_" + pn, base + " bwd-filter", f, tw, tc);
      // The stem's input needs no gradient: the model never runs its backward-data.
      step_ms["convolutions " + pn] += count * (tf + tw + (s.C == 3 ? 0.0 : tb));
    }
  }
  be->set_precision(vb::Precision::TF32);
  if (wants("bf16")) bench_conv_bf16(bench, *be, convs, step_ms);

  // ---- batch norm (fused residual + ReLU), custom kernels ----
  std::printf("batch norm (memory-bound; limit about %.0f GB/s):\n", kHbmGBs);
  for (const auto& [b, count] : bns) {
    char nm[128];
    std::snprintf(nm, sizeof nm, "bn %4d @%3dx%-3d%s%s", b.C, b.H, b.W, b.residual ? " +res" : "",
                  b.relu ? " relu" : "");
    if (!bench.wanted(nm)) continue;
    const size_t n = size_t(N) * b.C * b.H * b.W;
    Buf x(*be, n, 1), r(*be, n, 2), y(*be, n, 3), dy(*be, n, 4), dx(*be, n, 5, kZero, kZero), scr(*be, n, 6, kZero, kZero);
    Buf g(*be, size_t(b.C), 7, 0.5f, 1.5f), bt(*be, size_t(b.C), 8), sm(*be, size_t(b.C), 9),
        si(*be, size_t(b.C), 10, 0.5f, 1.5f), rm(*be, size_t(b.C), 11), rv(*be, size_t(b.C), 12, 0.5f, 1.5f),
        dg(*be, size_t(b.C), 13), db(*be, size_t(b.C), 14);
    const double e = double(n) * sizeof(float);
    const double tf = bench.time_ms([&] {
      be->bn_train_fwd(N, b.C, b.H, b.W, x.p, g.p, bt.p, b.residual ? r.p : nullptr, b.relu, y.p, sm.p, si.p, rm.p,
                       rv.p, 0.1, 1e-5);
    });
    bench.mem("bn", std::string(nm) + " train fwd", e * (3 + (b.residual ? 1 : 0)), tf);
    const double te = bench.time_ms([&] {
      be->bn_eval_fwd(N, b.C, b.H, b.W, x.p, g.p, bt.p, rm.p, rv.p, 1e-5, b.residual ? r.p : nullptr, b.relu, y.p);
    });
    bench.mem("bn", std::string(nm) + " eval fwd", e * (2 + (b.residual ? 1 : 0)), te);
    const double tb = bench.time_ms([&] {
      be->bn_bwd(N, b.C, b.H, b.W, x.p, y.p, dy.p, g.p, sm.p, si.p, b.relu, dx.p, b.residual ? scr.p : nullptr, dg.p,
                 db.p, scr.p);
    });
    // Pass 1 reads x, dy (and y with relu), writes the masked gradient with relu; pass 2 reads x and it, writes dx.
    bench.mem("bn", std::string(nm) + " bwd", e * (b.relu ? 6 : 4), tb);
    step_ms["batch norm (train fwd + bwd)"] += count * (tf + tb);
  }

  // ---- the other custom kernels, at their ResNet-50 sizes ----
  std::printf("other kernels:\n");
  {
    const int H = (S + 2 * 3 - 7) / 2 + 1, P = (H + 2 - 3) / 2 + 1;
    const size_t nx = size_t(N) * 64 * H * H, ny = size_t(N) * 64 * P * P;
    Buf x(*be, nx, 1), y(*be, ny, 2), dy(*be, ny, 3), dx(*be, nx, 4);
    if (bench.wanted("maxpool")) {
      be->maxpool_fwd(N, 64, H, H, 3, 2, 1, x.p, y.p);
      const double tf = bench.time_ms([&] { be->maxpool_fwd(N, 64, H, H, 3, 2, 1, x.p, y.p); });
      bench.mem("pool", "maxpool 3x3/2 64 @" + std::to_string(H) + " fwd", 4.0 * (nx + ny), tf);
      const double tb = bench.time_ms([&] { be->maxpool_bwd(N, 64, H, H, 3, 2, 1, x.p, y.p, dy.p, dx.p); });
      bench.mem("pool", "maxpool 3x3/2 64 @" + std::to_string(H) + " bwd", 4.0 * (2 * nx + 2 * ny), tb);
    }
  }
  {
    const int F = 2048, H = (S + 31) / 32;
    const size_t nx = size_t(N) * F * H * H;
    Buf x(*be, nx, 1), y(*be, size_t(N) * F, 2), dx(*be, nx, 3);
    if (bench.wanted("avgpool")) {
      const double tf = bench.time_ms([&] { be->avgpool_fwd(N, F, H, H, x.p, y.p); });
      bench.mem("pool", "avgpool 2048 @" + std::to_string(H) + " fwd", 4.0 * (nx + size_t(N) * F), tf);
      const double tb = bench.time_ms([&] { be->avgpool_bwd(N, F, H, H, y.p, dx.p); });
      bench.mem("pool", "avgpool 2048 @" + std::to_string(H) + " bwd", 4.0 * (nx + size_t(N) * F), tb);
    }
  }
  {
    const size_t n = size_t(N) * 256 * 56 * 56 * S / 224 * S / 224;
    Buf a(*be, n, 1), b(*be, n, 2), c(*be, n, 3);
    if (bench.wanted("relu")) {
      bench.mem("elementwise", "relu fwd n=" + std::to_string(n), 8.0 * n,
                bench.time_ms([&] { be->relu_fwd(int64_t(n), a.p, c.p); }));
      bench.mem("elementwise", "relu bwd n=" + std::to_string(n), 12.0 * n,
                bench.time_ms([&] { be->relu_bwd(int64_t(n), a.p, b.p, c.p); }));
    }
    if (bench.wanted("add"))
      bench.mem("elementwise", "add n=" + std::to_string(n), 12.0 * n,
                bench.time_ms([&] { be->add(int64_t(n), a.p, b.p, c.p); }));
  }
  for (vb::Precision prec : precs) {
    be->set_precision(prec);
    const int IN = 2048, OUT = 8;
    Buf x(*be, size_t(N) * IN, 1), w(*be, size_t(OUT) * IN, 2), b(*be, OUT, 3), y(*be, size_t(N) * OUT, 4),
        dx(*be, size_t(N) * IN, 5), dw(*be, size_t(OUT) * IN, 6), db(*be, OUT, 7);
    const std::string nm = std::string("linear ") + vb::precision_name(prec) + " 2048->8";
    if (!bench.wanted(nm)) continue;
    const double f = 2.0 * N * IN * OUT;
    // The head stays fp32 in both modes (cuBLAS default math, as PyTorch's matmul.allow_tf32 = False).
    bench.flops("linear", nm + " fwd", f, bench.time_ms([&] { be->linear_fwd(N, IN, OUT, x.p, w.p, b.p, y.p); }),
                false);
    bench.flops("linear", nm + " bwd", 2 * f,
                bench.time_ms([&] { be->linear_bwd(N, IN, OUT, x.p, w.p, y.p, dx.p, dw.p, db.p); }), false);
  }
  be->set_precision(vb::Precision::TF32);
  if (bench.wanted("softmax_wce")) {
    const int C = 8;
    Buf l(*be, size_t(N) * C, 1), cw(*be, C, 2, 0.5f, 2.f), pr(*be, size_t(N) * C, 3), dl(*be, size_t(N) * C, 4),
        loss(*be, 1, 5);
    std::vector<int64_t> lab(static_cast<size_t>(N));
    for (int i = 0; i < N; ++i) lab[size_t(i)] = i % C;
    auto* d_lab = static_cast<int64_t*>(be->alloc(lab.size() * sizeof(int64_t)));
    be->upload(d_lab, lab.data(), lab.size() * sizeof(int64_t));
    bench.mem("loss", "softmax_wce " + std::to_string(N) + "x8", 4.0 * 3 * N * C,
              bench.time_ms([&] { be->softmax_wce(N, C, l.p, d_lab, cw.p, pr.p, dl.p, loss.p); }));
    be->release(d_lab);
  }
  if (bench.wanted("adamw")) {
    const size_t n = 23'524'424;  // ResNet-50 backbone + the notebook's 2048->8 head
    Buf p(*be, n, 1), g(*be, n, 2), m(*be, n, 3), v(*be, n, 4, 0.f, 1.f);
    bench.mem("optimizer", "adamw n=" + std::to_string(n), 28.0 * n,
              bench.time_ms([&] { be->adamw(int64_t(n), p.p, g.p, m.p, v.p, 1e-3, 0.9, 0.999, 1e-8, 0.01, 5); }));
  }
  if (bench.wanted("transforms")) {
    // Training frames as the cache keeps them (455x256 uint8), the batch cropped, resized, rotated, normalised.
    const int FW = 455, FH = 256;
    const size_t fb = size_t(FW) * FH * 3;
    auto* frames = static_cast<uint8_t*>(be->alloc(fb * size_t(N)));
    std::vector<vb::cuda::AugSample> smp;
    std::mt19937 g(3);
    for (int i = 0; i < N; ++i) {
      const int h = 120 + int(g() % 130), w = 120 + int(g() % 200);
      smp.push_back(vb::cuda::make_aug_sample(int64_t(fb) * i, FW, FH, int(g() % uint32_t(FH - h + 1)),
                                              int(g() % uint32_t(FW - w + 1)), h, w, double(int(g() % 11) - 5), S));
    }
    auto* d_smp = static_cast<vb::cuda::AugSample*>(be->alloc(smp.size() * sizeof(vb::cuda::AugSample)));
    be->upload(d_smp, smp.data(), smp.size() * sizeof(vb::cuda::AugSample));
    Buf out(*be, size_t(N) * 3 * S * S, 1);
    be->sync();
    const double ta = bench.time_ms([&] { vb::cuda::augment_frames(nullptr, N, S, frames, d_smp, out.p); });
    bench.mem("transforms", "augment (crop+resize+rotate+normalise) " + std::to_string(N) + "x3x" + std::to_string(S),
              double(out.n) * 4 + double(N) * S * S * 3, ta);
    const double tn = bench.time_ms([&] { vb::cuda::normalize_frames(nullptr, N, S, S, frames, out.p); });
    bench.mem("transforms", "normalise " + std::to_string(N) + "x3x" + std::to_string(S), double(out.n) * 5, tn);
    be->release(d_smp);
    be->release(frames);
  }

  // ---- issue 11: NHWC batch norm and pooling, bf16 and float activations (last: new rows never push the
  // existing ones past --max-seconds) ----
  bench_nhwc<vb::bf16>(bench, *be, N, S, bns, step_ms);
  bench_nhwc<float>(bench, *be, N, S, bns, step_ms);

  if (!step_ms.empty()) {
    std::printf("per training step at batch %d (each distinct layer times its use count):\n", N);
    for (const auto& [k, v] : step_ms) std::printf("  %-40s %9.2f ms\n", k.c_str(), v);
  }
  if (!o.json.empty()) {
    nlohmann::ordered_json j = nlohmann::ordered_json::array();
    for (const Row& r : bench.rows())
      j.push_back({{"group", r.group}, {"name", r.name}, {"ms", r.ms}, {"GB/s", r.gbs}, {"TFLOP/s", r.tflops},
                   {"peak", r.peak}, {"peak_unit", r.gbs > 0 ? "GB/s" : "TFLOP/s"}, {"peak_of", r.peak_name},
                   {"fraction_of_peak", r.fraction()}});
    nlohmann::ordered_json top = {{"device", be->description()}, {"batch", N}, {"image_size", S},
                                  {"complete", !bench.out_of_time()},
                                  {"peaks", {{"hbm_GB/s", kHbmGBs}, {"bf16_tensor_TFLOP/s", kBf16Tflops},
                                             {"tf32_tensor_TFLOP/s", kTf32Tflops}, {"fp32_TFLOP/s", kFp32Tflops}}},
                                  {"rows", j}};
    for (const auto& [k, v] : step_ms) top["step_ms"][k] = v;
    std::ofstream f(o.json);
    if (!f) vb::fail(o.json, ": cannot write");
    f << top.dump(1) << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vbbench: CUDA kernel and ResNet-50 layer benchmarks"};
  Options o;
  app.add_option("--batch-size", o.batch, "batch (default 150)");
  app.add_option("--image-size", o.size, "input size (default 224)");
  app.add_option("--precision", o.precision,
                 "convolutions (and linear) in: tf32, fp32, bf16 (cuDNN alone, NHWC), a comma-separated list of them, "
                 "both (tf32,fp32; the default) or all")
      ->check([](const std::string& v) {
        if (v == "both" || v == "all") return std::string();
        size_t b = 0;
        while (b <= v.size()) {
          const size_t e = std::min(v.find(',', b), v.size());
          const std::string p = v.substr(b, e - b);
          if (p != "tf32" && p != "fp32" && p != "bf16") return "'" + p + "' is not tf32, fp32 or bf16";
          b = e + 1;
        }
        return std::string();
      });
  app.add_option("--warmup", o.warmup, "untimed runs per op (default 2)");
  app.add_option("--iters", o.iters, "timed runs per op (default 10)");
  app.add_option("--filter", o.filter, "only ops whose name contains this");
  app.add_option("--json", o.json, "also write the rows as JSON");
  app.add_option("--max-seconds", o.max_seconds, "start no new op after this many seconds (0: no limit)");
  app.add_flag("--versions", o.versions, "print the loaded cuDNN, cuBLAS, CUDA runtime and driver, and the GPU, then exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return vb::tools::parse_error(app, e, "vbbench");
  }
  return vb::tools::run_guarded("vbbench", "benchmarking", [&] {
    if (o.iters < 1 || o.warmup < 1 || o.batch < 1 || o.size < 32) vb::fail("bad --iters, --warmup, --batch-size or --image-size");
    return o.versions ? print_versions(o) : run(o);
  });
}
