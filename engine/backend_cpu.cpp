// The CPU backend: the reference ops of kernels/cpu in float, composed where the CUDA path fuses.
#include <cstdlib>
#include <thread>

#include "engine/backend.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

namespace vb {
namespace {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) {
    cpu::set_num_threads(threads);
    precision_ = Precision::FP32;
  }
  Device device() const override { return Device::CPU; }
  std::string description() const override {
    return "cpu (" + std::to_string(cpu::num_threads()) + " threads)";
  }

  void* alloc(size_t bytes) override {
    size_t rounded = (bytes + 255) / 256 * 256;
    if (rounded == 0) rounded = 256;
    void* p = std::aligned_alloc(256, rounded);
    if (!p) fail("out of host memory allocating ", bytes, " bytes");
    std::memset(p, 0, rounded);
    return p;
  }
  void release(void* p) override { std::free(p); }
  void upload(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { std::memmove(dst, src, bytes); }
  void fill_zero(void* p, size_t bytes) override { std::memset(p, 0, bytes); }
  void sync() override {}
  void upload_activation(float* dst, const float* src, int N, int C, int H, int W) override {
    std::memcpy(dst, src, sizeof(float) * size_t(N) * C * H * W);
  }
  void download_activation(float* dst, const float* src, int N, int C, int H, int W) override {
    std::memcpy(dst, src, sizeof(float) * size_t(N) * C * H * W);
  }

  void conv_fwd(const ConvShape& s, const float* x, const float* w, float* y) override {
    cpu::conv2d_fwd<float>(s, x, w, y);
  }
  void conv_bwd_data(const ConvShape& s, const float* dy, const float* w, float* dx) override {
    cpu::conv2d_bwd_data<float>(s, dy, w, dx);
  }
  void conv_bwd_filter(const ConvShape& s, const float* x, const float* dy, float* dw) override {
    cpu::conv2d_bwd_filter<float>(s, x, dy, dw);
  }

  void bn_train_fwd(int N, int C, int H, int W, const float* x, const float* gamma, const float* beta,
                    const float* residual, bool relu, float* y, float* save_mean, float* save_invstd,
                    float* running_mean, float* running_var, double momentum, double eps) override {
    cpu::batchnorm_train_fwd<float>(N, C, H * W, x, gamma, beta, y, save_mean, save_invstd, running_mean,
                                    running_var, momentum, eps);
    epilogue(int64_t(N) * C * H * W, residual, relu, y);
  }
  void bn_eval_fwd(int N, int C, int H, int W, const float* x, const float* gamma, const float* beta,
                   const float* running_mean, const float* running_var, double eps, const float* residual,
                   bool relu, float* y) override {
    cpu::batchnorm_eval_fwd<float>(N, C, H * W, x, gamma, beta, running_mean, running_var, eps, y);
    epilogue(int64_t(N) * C * H * W, residual, relu, y);
  }
  void bn_bwd(int N, int C, int H, int W, const float* x, const float* y, const float* dy, const float* gamma,
              const float* save_mean, const float* save_invstd, bool relu, float* dx, float* dresidual,
              float* dgamma, float* dbeta, float* scratch) override {
    const int64_t n = int64_t(N) * C * H * W;
    const float* g = dy;  // gradient of bn's output, before the residual add
    if (relu) {
      cpu::relu_bwd<float>(n, y, dy, scratch);
      g = scratch;
    }
    if (dresidual && dresidual != g) std::memcpy(dresidual, g, sizeof(float) * size_t(n));
    cpu::batchnorm_bwd<float>(N, C, H * W, x, g, gamma, save_mean, save_invstd, dx, dgamma, dbeta);
  }

  void maxpool_fwd(int N, int C, int H, int W, int k, int s, int p, const float* x, float* y) override {
    cpu::maxpool_fwd<float>(N, C, H, W, k, s, p, x, y);
  }
  void maxpool_bwd(int N, int C, int H, int W, int k, int s, int p, const float* x, const float*,
                   const float* dy, float* dx) override {
    cpu::maxpool_bwd<float>(N, C, H, W, k, s, p, x, dy, dx);
  }
  void avgpool_fwd(int N, int C, int H, int W, const float* x, float* y) override {
    cpu::avgpool_fwd<float>(N, C, H * W, x, y);
  }
  void avgpool_bwd(int N, int C, int H, int W, const float* dy, float* dx) override {
    cpu::avgpool_bwd<float>(N, C, H * W, dy, dx);
  }
  void linear_fwd(int N, int IN, int OUT, const float* x, const float* w, const float* b, float* y) override {
    cpu::linear_fwd<float>(N, IN, OUT, x, w, b, y);
  }
  void linear_bwd(int N, int IN, int OUT, const float* x, const float* w, const float* dy, float* dx, float* dw,
                  float* db) override {
    cpu::linear_bwd<float>(N, IN, OUT, x, w, dy, dx, dw, db);
  }
  void relu_fwd(int64_t n, const float* x, float* y) override { cpu::relu_fwd<float>(n, x, y); }
  void relu_bwd(int64_t n, const float* y, const float* dy, float* dx) override {
    cpu::relu_bwd<float>(n, y, dy, dx);
  }
  void add(int64_t n, const float* a, const float* b, float* y) override { cpu::add<float>(n, a, b, y); }
  void softmax_wce(int N, int C, const float* logits, const int64_t* labels, const float* class_weights,
                   float* probs, float* dlogits, float* loss) override {
    *loss = cpu::softmax_wce<float>(N, C, logits, labels, class_weights, probs, dlogits);
  }
  void adamw(int64_t n, float* p, const float* g, float* m, float* v, double lr, double beta1, double beta2,
             double eps, double weight_decay, int64_t step) override {
    cpu::adamw_step<float>(n, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step);
  }

 private:
  static void epilogue(int64_t n, const float* residual, bool relu, float* y) {
    if (residual) cpu::add<float>(n, y, residual, y);
    if (relu) cpu::relu_fwd<float>(n, y, y);
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads) { return std::make_unique<CpuBackend>(threads); }

#ifndef VB_WITH_CUDA
std::unique_ptr<Backend> make_cuda_backend(int) {
  fail("no CUDA device: this build of vbtrain has no CUDA support (configure with the CUDA toolkit present)");
}
bool cuda_available() { return false; }
#endif

std::unique_ptr<Backend> make_backend(const std::string& device, int threads) {
  if (device == "cpu") return make_cpu_backend(threads);
  if (device == "cuda") return make_cuda_backend(0);
  if (device == "auto") return cuda_available() ? make_cuda_backend(0) : make_cpu_backend(threads);
  fail("unknown device '", device, "' (expected auto, cpu or cuda)");
}

}  // namespace vb
