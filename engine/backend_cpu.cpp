// The CPU backend: the ops of kernels/cpu (in float, or in double for the reference path), composed where the
// CUDA path fuses. Activations are channels-last (NHWC) by default: convolutions then read their inputs in
// place (kernels/cpu/conv_nhwc.h) instead of through an im2col matrix, and batch norm and pooling run along
// contiguous channels (bn_fused_nhwc.h, pool_fast_nhwc.h). Layout::NCHW keeps the NCHW kernels (conv.cpp,
// bn_fused.h, pool_fast.h), the layout of PyTorch's reference files and of the CUDA backend; the two differ
// only in the order of some sums. VB_CPU_LAYOUT=nchw picks it for the commands (for comparisons).
#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "engine/backend.h"
#include "kernels/cpu/bn_coeffs.h"
#include "kernels/cpu/bn_fused.h"
#include "kernels/cpu/bn_fused_nhwc.h"
#include "kernels/cpu/conv_nhwc.h"
#include "kernels/cpu/normalize.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/pool_fast.h"
#include "kernels/cpu/pool_fast_nhwc.h"
#include "kernels/cpu/parallel.h"

namespace vb {
namespace {

// VB_CPU_PROFILE=1: every op's wall time summed per (op, shape), printed to stderr by the backend's
// destructor, largest first. For finding where a CPU step goes; off (one branch per op) otherwise.
class OpProfile {
 public:
  OpProfile() {
    const char* e = std::getenv("VB_CPU_PROFILE");
    on_ = e && *e && std::string(e) != "0";
  }
  ~OpProfile() {
    if (!on_ || ops_.empty()) return;
    std::vector<std::pair<std::string, Entry>> v(ops_.begin(), ops_.end());
    std::sort(v.begin(), v.end(), [](auto& a, auto& b) { return a.second.s > b.second.s; });
    double total = 0;
    for (auto& [k, e] : v) total += e.s;
    std::fprintf(stderr, "VB_CPU_PROFILE: %.3f s in backend ops\n%9s %6s %8s  %s\n", total, "ms", "%", "calls", "op");
    for (auto& [k, e] : v)
      std::fprintf(stderr, "%9.2f %6.2f %8ld  %s\n", e.s * 1e3, 100 * e.s / total, long(e.n), k.c_str());
  }
  bool on() const { return on_; }
  template <class F>
  void time(const std::string& key, F&& fn) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    Entry& e = ops_[key];
    e.s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++e.n;
  }

 private:
  struct Entry {
    double s = 0;
    int64_t n = 0;
  };
  bool on_ = false;
  std::map<std::string, Entry> ops_;
};

std::string shape_key(const char* op, const ConvShape& s) {
  char b[128];
  std::snprintf(b, sizeof b, "%s C%d %dx%d K%d %dx%d/%d", op, s.C, s.H, s.W, s.K, s.R, s.S, s.stride);
  return b;
}
std::string shape_key(const char* op, int C, int H, int W) {
  char b[128];
  std::snprintf(b, sizeof b, "%s C%d %dx%d", op, C, H, W);
  return b;
}
#define VB_PROF(key, body)         \
  do {                             \
    if (prof_.on())                \
      prof_.time((key), [&] { body; }); \
    else {                         \
      body;                        \
    }                              \
  } while (0)

template <class T>
class CpuBackend final : public BackendT<T> {
 public:
  CpuBackend(int threads, Layout layout) : nhwc_(layout == Layout::NHWC) {
    cpu::set_num_threads(threads);
    this->precision_ = sizeof(T) == 8 ? Precision::FP64 : Precision::FP32;
  }
  Device device() const override { return Device::CPU; }
  std::string description() const override {
    return "cpu (" + std::to_string(cpu::num_threads()) + " threads" + (nhwc_ ? "" : ", NCHW") + ")";
  }
  Layout activation_layout() const override { return nhwc_ ? Layout::NHWC : Layout::NCHW; }

  void* alloc(size_t bytes) override {
    size_t rounded = (bytes + 255) / 256 * 256;
    if (rounded == 0) rounded = 256;
    if (limit_ && in_use_ + rounded > limit_)
      fail("out of memory allocating ", rounded, " bytes (", in_use_ >> 20, " MiB held, over the limit of ",
           limit_ >> 20, " MiB set for this backend)");
    void* p = std::aligned_alloc(256, rounded);
    if (!p) fail("out of host memory allocating ", bytes, " bytes");
    std::memset(p, 0, rounded);
    sizes_[p] = rounded;
    ++allocations_;
    in_use_ += rounded;
    peak_ = std::max(peak_, in_use_);
    return p;
  }
  void release(void* p) override {
    if (!p) return;
    auto it = sizes_.find(p);
    if (it != sizes_.end()) {
      in_use_ -= it->second;
      sizes_.erase(it);
    }
    std::free(p);
  }
  size_t memory_in_use() const override { return in_use_; }
  size_t memory_peak() const override { return peak_; }
  size_t allocations() const override { return allocations_; }
  void set_memory_limit(size_t bytes) override { limit_ = bytes; }
  void upload(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { std::memmove(dst, src, bytes); }
  void fill_zero(void* p, size_t bytes) override { std::memset(p, 0, bytes); }
  void sync() override {}
  void upload_activation(T* dst, const T* src, int N, int C, int H, int W) override {
    if (nhwc_)
      cpu::nchw_to_nhwc<T>(N, C, H * W, src, dst);
    else
      std::memcpy(dst, src, sizeof(T) * size_t(N) * C * H * W);
  }
  void upload_images(T* dst, const uint8_t* src, int N, int H, int W) override {
    if (nhwc_)
      cpu::normalize_u8_nhwc<T>(N, int64_t(H) * W, src, dst);
    else
      cpu::normalize_u8_nchw<T>(N, int64_t(H) * W, src, dst);
  }
  void download_activation(T* dst, const T* src, int N, int C, int H, int W) override {
    if (nhwc_)
      cpu::nhwc_to_nchw<T>(N, C, H * W, src, dst);
    else
      std::memcpy(dst, src, sizeof(T) * size_t(N) * C * H * W);
  }

  void conv_fwd(const ConvShape& s, const T* x, const T* w, T* y) override {
    VB_PROF(shape_key("conv_fwd", s),
            nhwc_ ? cpu::conv2d_nhwc_fwd<T>(s, x, w, y) : cpu::conv2d_fwd<T>(s, x, w, y));
  }
  void conv_bwd_data(const ConvShape& s, const T* dy, const T* w, T* dx) override {
    VB_PROF(shape_key("conv_bwd_data", s),
            nhwc_ ? cpu::conv2d_nhwc_bwd_data<T>(s, dy, w, dx) : cpu::conv2d_bwd_data<T>(s, dy, w, dx));
  }
  void conv_bwd_filter(const ConvShape& s, const T* x, const T* dy, T* dw) override {
    VB_PROF(shape_key("conv_bwd_filter", s),
            nhwc_ ? cpu::conv2d_nhwc_bwd_filter<T>(s, x, dy, dw) : cpu::conv2d_bwd_filter<T>(s, x, dy, dw));
  }

  void conv_bn_eval(const ConvShape& s, const T* x, const T* w, const T* gamma, const T* beta,
                    const T* running_mean, const T* running_var, double eps, const T* residual, bool relu,
                    T* y) override {
    if (!nhwc_) {
      BackendT<T>::conv_bn_eval(s, x, w, gamma, beta, running_mean, running_var, eps, residual, relu, y);
      return;
    }
    // The batch norm folded into the convolution: bn_eval_fwd's per-channel coefficients, the scale into the
    // weights and the shift as a bias.
    if (coef_.size() < 2 * size_t(s.K)) coef_.resize(2 * size_t(s.K));
    T* a = coef_.data();
    T* b = a + s.K;
    auto fold = [&] {
      for (int k = 0; k < s.K; ++k) cpu::bn_eval_affine(gamma, beta, running_mean, running_var, eps, k, a[k], b[k]);
    };
    if (in_eval_pass_ && s.N > 0) {
      // In an evaluation pass: the layer's folded weights and bias as the pass's first batch made them. They count
      // as the backend's memory; past a limit set with set_memory_limit the layer folds on every call instead.
      EvalLayer& e = eval_layers_[w];
      const EvalKey key{gamma, beta, running_mean, running_var, eps};
      if (e.pass != eval_pass_ || !(e.key == key) || !(e.uncached || e.weights.serves(s))) {
        fold();
        VB_PROF(shape_key("conv_bn_eval prepare", s), cpu::conv2d_nhwc_prepare<T>(s, w, a, e.weights));
        e.bias.assign(b, b + s.K);
        e.key = key;
        e.pass = eval_pass_;
        e.uncached = false;
        size_t bytes = sizeof(T) * (e.weights.values.capacity() + e.bias.capacity());
        if (limit_ && in_use_ - e.bytes + bytes > limit_) {
          e.weights.values = {};
          e.bias = {};
          e.uncached = true;
          bytes = 0;
        }
        in_use_ = in_use_ - e.bytes + bytes;
        peak_ = std::max(peak_, in_use_);
        e.bytes = bytes;
      }
      if (!e.uncached) {
        VB_PROF(shape_key("conv_bn_eval", s),
                cpu::conv2d_nhwc_fwd_prepared<T>(s, x, e.weights, e.bias.data(), residual, relu, y));
        return;
      }
    }
    fold();
    VB_PROF(shape_key("conv_bn_eval", s), cpu::conv2d_nhwc_fwd_affine<T>(s, x, w, a, b, residual, relu, y));
  }
  void begin_eval_pass() override {
    VB_CHECK(!in_eval_pass_, "begin_eval_pass: an evaluation pass is already open (passes do not nest)");
    in_eval_pass_ = true;
    ++eval_pass_;
  }
  void end_eval_pass() override { in_eval_pass_ = false; }

  void bn_train_fwd(int N, int C, int H, int W, const T* x, const T* gamma, const T* beta,
                    const T* residual, bool relu, T* y, T* save_mean, T* save_invstd,
                    T* running_mean, T* running_var, double momentum, double eps) override {
    VB_PROF(shape_key("bn_train_fwd", C, H, W), {
      (nhwc_ ? cpu::bn_train_fwd_nhwc<T> : cpu::bn_train_fwd_fused<T>)(N, C, H * W, x, gamma, beta, residual, relu, y,
                                                                      save_mean, save_invstd, running_mean,
                                                                      running_var, momentum, eps);
    });
  }
  void bn_eval_fwd(int N, int C, int H, int W, const T* x, const T* gamma, const T* beta,
                   const T* running_mean, const T* running_var, double eps, const T* residual,
                   bool relu, T* y) override {
    VB_PROF(shape_key("bn_eval_fwd", C, H, W), {
      (nhwc_ ? cpu::bn_eval_fwd_nhwc<T> : cpu::bn_eval_fwd_fused<T>)(N, C, H * W, x, gamma, beta, running_mean,
                                                                    running_var, eps, residual, relu, y);
    });
  }
  void bn_apply(int N, int C, int H, int W, const T* x, const T* gamma, const T* beta, const T* save_mean,
                const T* save_invstd, bool relu, T* y) override {
    VB_PROF(shape_key("bn_apply", C, H, W), {
      (nhwc_ ? cpu::bn_apply_nhwc<T> : cpu::bn_apply_fused<T>)(N, C, H * W, x, gamma, beta, save_mean, save_invstd,
                                                              relu, y);
    });
  }
  void bn_bwd(int N, int C, int H, int W, const T* x, const T* y, const T* dy, const T* gamma,
              const T* save_mean, const T* save_invstd, bool relu, T* dx, T* dresidual,
              T* dgamma, T* dbeta, T* scratch) override {
    VB_PROF(shape_key("bn_bwd", C, H, W), {
      (nhwc_ ? cpu::bn_bwd_nhwc<T> : cpu::bn_bwd_fused<T>)(N, C, H * W, x, y, dy, gamma, save_mean, save_invstd,
                                                          relu, dx, dresidual, dgamma, dbeta);
    });
  }

  void maxpool_fwd(int N, int C, int H, int W, int k, int s, int p, const T* x, T* y) override {
    VB_PROF(shape_key("maxpool_fwd", C, H, W),
            (nhwc_ ? cpu::maxpool_nhwc_fwd_fast<T> : cpu::maxpool_fwd_fast<T>)(N, C, H, W, k, s, p, x, y));
  }
  void maxpool_bwd(int N, int C, int H, int W, int k, int s, int p, const T* x, const T*,
                   const T* dy, T* dx) override {
    VB_PROF(shape_key("maxpool_bwd", C, H, W),
            (nhwc_ ? cpu::maxpool_nhwc_bwd_fast<T> : cpu::maxpool_bwd_fast<T>)(N, C, H, W, k, s, p, x, dy, dx));
  }
  void avgpool_fwd(int N, int C, int H, int W, const T* x, T* y) override {
    VB_PROF(shape_key("avgpool_fwd", C, H, W),
            (nhwc_ ? cpu::avgpool_nhwc_fwd_fast<T> : cpu::avgpool_fwd<T>)(N, C, H * W, x, y));
  }
  void avgpool_bwd(int N, int C, int H, int W, const T* dy, T* dx) override {
    VB_PROF(shape_key("avgpool_bwd", C, H, W),
            (nhwc_ ? cpu::avgpool_nhwc_bwd_fast<T> : cpu::avgpool_bwd<T>)(N, C, H * W, dy, dx));
  }
  void linear_fwd(int N, int IN, int OUT, const T* x, const T* w, const T* b, T* y) override {
    VB_PROF("linear_fwd", cpu::linear_fwd<T>(N, IN, OUT, x, w, b, y));
  }
  void linear_bwd(int N, int IN, int OUT, const T* x, const T* w, const T* dy, T* dx, T* dw,
                  T* db) override {
    VB_PROF("linear_bwd", cpu::linear_bwd<T>(N, IN, OUT, x, w, dy, dx, dw, db));
  }
  void relu_fwd(int64_t n, const T* x, T* y) override { cpu::relu_fwd<T>(n, x, y); }
  void relu_bwd(int64_t n, const T* y, const T* dy, T* dx) override {
    cpu::relu_bwd<T>(n, y, dy, dx);
  }
  void add(int64_t n, const T* a, const T* b, T* y) override { VB_PROF("add", cpu::add<T>(n, a, b, y)); }
  void softmax_wce(int N, int C, const T* logits, const int64_t* labels, const T* class_weights,
                   T* probs, T* dlogits, T* loss) override {
    *loss = cpu::softmax_wce<T>(N, C, logits, labels, class_weights, probs, dlogits);
  }
  void adamw(int64_t n, T* p, const T* g, T* m, T* v, double lr, double beta1, double beta2,
             double eps, double weight_decay, int64_t step) override {
    VB_PROF("adamw", cpu::adamw_step<T>(n, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step));
  }

 private:
  bool nhwc_;
  std::vector<T> coef_;  // conv_bn_eval's folded scale and bias
  // Evaluation passes (begin_eval_pass): each layer's folded weights and bias, by its weight pointer, valid for
  // the pass numbered `pass` and the batch-norm tensors of `key`. Kept from pass to pass (remade, not freed) and
  // counted in memory_in_use() (ResNet-50's: about 120 MB, Winograd's layers at 16/9 of their weights).
  struct EvalKey {
    const T *gamma = nullptr, *beta = nullptr, *mean = nullptr, *var = nullptr;
    double eps = 0;
    bool operator==(const EvalKey& o) const {
      return gamma == o.gamma && beta == o.beta && mean == o.mean && var == o.var && eps == o.eps;
    }
  };
  struct EvalLayer {
    uint64_t pass = 0;
    EvalKey key;
    cpu::PreparedConv<T> weights;
    std::vector<T> bias;
    size_t bytes = 0;       // what weights and bias hold, counted in in_use_
    bool uncached = false;  // over the memory limit: folded on every call in this pass
  };
  std::unordered_map<const T*, EvalLayer> eval_layers_;
  uint64_t eval_pass_ = 0;  // the open or last pass's number (0: none yet)
  bool in_eval_pass_ = false;
  OpProfile prof_;
  std::unordered_map<void*, size_t> sizes_;  // what alloc handed out, for the memory figures
  size_t in_use_ = 0, peak_ = 0, allocations_ = 0;
  size_t limit_ = 0;  // set_memory_limit; 0: none

};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads, Layout layout) {
  return std::make_unique<CpuBackend<float>>(threads, layout);
}
std::unique_ptr<BackendT<double>> make_cpu_backend_f64(int threads, Layout layout) {
  return std::make_unique<CpuBackend<double>>(threads, layout);
}
namespace {
// The layout an environment variable names, or `fallback` when it is unset or empty.
Layout layout_from_env(const char* var, Layout fallback) {
  const char* e = std::getenv(var);
  if (!e || !*e) return fallback;
  const std::string v = e;
  if (v == "nhwc") return Layout::NHWC;
  if (v == "nchw") return Layout::NCHW;
  fail(var, "='", escape(v), "' is not a layout (expected nhwc or nchw)");
}
}  // namespace

Layout default_cpu_layout() { return layout_from_env("VB_CPU_LAYOUT", Layout::NHWC); }
Layout default_cuda_layout() { return layout_from_env("VB_CUDA_LAYOUT", Layout::NCHW); }

#ifndef VB_WITH_CUDA
std::unique_ptr<Backend> make_cuda_backend(int, Layout) {
  fail("no CUDA device: this build of vbtrain has no CUDA support (configure with the CUDA toolkit present)");
}
std::unique_ptr<Backend> make_cuda_backend(int device_index) { return make_cuda_backend(device_index, Layout::NCHW); }
bool cuda_available() { return false; }
#endif

std::unique_ptr<Backend> make_backend(const std::string& device, int threads) {
  if (device == "cpu") return make_cpu_backend(threads, default_cpu_layout());
  if (device == "cuda") return make_cuda_backend(0);
  if (device == "auto") return cuda_available() ? make_cuda_backend(0) : make_cpu_backend(threads, default_cpu_layout());
  fail("unknown device '", device, "' (expected auto, cpu or cuda)");
}

}  // namespace vb
