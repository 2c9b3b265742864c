// A Backend that passes every call on to another one: the base of backends that change a few ops and keep the
// rest (the bf16 emulation of engine/backend_bf16.h; the tests' CPU twin of a CUDA graph). Override what
// differs; everything else reaches `inner` unchanged, except two things that would bypass the overrides:
// conv_bn_eval runs as this class's conv_fwd then bn_eval_fwd (the inner backend might fold them), a derived
// backend cannot capture (a replay on the inner backend would skip the derived class's own work per op), and
// evaluation passes stay here (Backend's no-op: the inner backend never sees a conv_bn_eval to keep).
// precision() is this object's: set it through set_precision.
#pragma once
#include <string>

#include "engine/backend.h"

namespace vb {

class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(Backend& inner) : in_(inner) { precision_ = inner.precision(); }

  Device device() const override { return in_.device(); }
  std::string description() const override { return in_.description(); }
  Layout activation_layout() const override { return in_.activation_layout(); }
  size_t activation_element_bytes() const override { return in_.activation_element_bytes(); }
  void* alloc(size_t bytes) override { return in_.alloc(bytes); }
  void release(void* p) override { in_.release(p); }
  void upload(void* dst, const void* src, size_t bytes) override { in_.upload(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { in_.download(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { in_.copy(dst, src, bytes); }
  void fill_zero(void* p, size_t bytes) override { in_.fill_zero(p, bytes); }
  void sync() override { in_.sync(); }
  void* host_alloc(size_t bytes) override { return in_.host_alloc(bytes); }
  void host_free(void* p) override { in_.host_free(p); }
  size_t memory_in_use() const override { return in_.memory_in_use(); }
  size_t memory_peak() const override { return in_.memory_peak(); }
  size_t allocations() const override { return in_.allocations(); }
  void set_memory_limit(size_t bytes) override { in_.set_memory_limit(bytes); }
  void wait_uploads() override { in_.wait_uploads(); }
  void scalar_push(const float* src) override { in_.scalar_push(src); }
  bool scalar_pop(float* value, bool wait) override { return in_.scalar_pop(value, wait); }
  uint64_t download_async(void* dst, const void* src, size_t bytes) override {
    return in_.download_async(dst, src, bytes);
  }
  void wait_download(uint64_t ticket) override { in_.wait_download(ticket); }
  void upload_activation(float* dst, const float* src, int N, int C, int H, int W) override {
    in_.upload_activation(dst, src, N, C, H, W);
  }
  void download_activation(float* dst, const float* src, int N, int C, int H, int W) override {
    in_.download_activation(dst, src, N, C, H, W);
  }
  void upload_images(float* dst, const uint8_t* src, int N, int H, int W) override {
    in_.upload_images(dst, src, N, H, W);
  }

  void conv_fwd(const ConvShape& s, const float* x, const float* w, float* y) override { in_.conv_fwd(s, x, w, y); }
  void conv_bwd_data(const ConvShape& s, const float* dy, const float* w, float* dx) override {
    in_.conv_bwd_data(s, dy, w, dx);
  }
  void conv_bwd_filter(const ConvShape& s, const float* x, const float* dy, float* dw) override {
    in_.conv_bwd_filter(s, x, dy, dw);
  }
  void bn_train_fwd(int N, int C, int H, int W, const float* x, const float* gamma, const float* beta,
                    const float* residual, bool relu, float* y, float* save_mean, float* save_invstd,
                    float* running_mean, float* running_var, double momentum, double eps) override {
    in_.bn_train_fwd(N, C, H, W, x, gamma, beta, residual, relu, y, save_mean, save_invstd, running_mean,
                     running_var, momentum, eps);
  }
  void bn_eval_fwd(int N, int C, int H, int W, const float* x, const float* gamma, const float* beta,
                   const float* running_mean, const float* running_var, double eps, const float* residual,
                   bool relu, float* y) override {
    in_.bn_eval_fwd(N, C, H, W, x, gamma, beta, running_mean, running_var, eps, residual, relu, y);
  }
  void bn_apply(int N, int C, int H, int W, const float* x, const float* gamma, const float* beta,
                const float* save_mean, const float* save_invstd, bool relu, float* y) override {
    in_.bn_apply(N, C, H, W, x, gamma, beta, save_mean, save_invstd, relu, y);
  }
  void bn_bwd(int N, int C, int H, int W, const float* x, const float* y, const float* dy, const float* gamma,
              const float* save_mean, const float* save_invstd, bool relu, float* dx, float* dresidual,
              float* dgamma, float* dbeta, float* scratch) override {
    in_.bn_bwd(N, C, H, W, x, y, dy, gamma, save_mean, save_invstd, relu, dx, dresidual, dgamma, dbeta, scratch);
  }
  void maxpool_fwd(int N, int C, int H, int W, int k, int s, int p, const float* x, float* y) override {
    in_.maxpool_fwd(N, C, H, W, k, s, p, x, y);
  }
  void maxpool_bwd(int N, int C, int H, int W, int k, int s, int p, const float* x, const float* y, const float* dy,
                   float* dx) override {
    in_.maxpool_bwd(N, C, H, W, k, s, p, x, y, dy, dx);
  }
  void avgpool_fwd(int N, int C, int H, int W, const float* x, float* y) override { in_.avgpool_fwd(N, C, H, W, x, y); }
  void avgpool_bwd(int N, int C, int H, int W, const float* dy, float* dx) override {
    in_.avgpool_bwd(N, C, H, W, dy, dx);
  }
  void linear_fwd(int N, int IN, int OUT, const float* x, const float* w, const float* b, float* y) override {
    in_.linear_fwd(N, IN, OUT, x, w, b, y);
  }
  void linear_bwd(int N, int IN, int OUT, const float* x, const float* w, const float* dy, float* dx, float* dw,
                  float* db) override {
    in_.linear_bwd(N, IN, OUT, x, w, dy, dx, dw, db);
  }
  void relu_fwd(int64_t n, const float* x, float* y) override { in_.relu_fwd(n, x, y); }
  void relu_bwd(int64_t n, const float* y, const float* dy, float* dx) override { in_.relu_bwd(n, y, dy, dx); }
  void add(int64_t n, const float* a, const float* b, float* y) override { in_.add(n, a, b, y); }
  void softmax_wce(int N, int C, const float* logits, const int64_t* labels, const float* class_weights,
                   float* probs, float* dlogits, float* loss) override {
    in_.softmax_wce(N, C, logits, labels, class_weights, probs, dlogits, loss);
  }
  void adamw(int64_t n, float* p, const float* g, float* m, float* v, double lr, double beta1, double beta2,
             double eps, double weight_decay, int64_t step) override {
    in_.adamw(n, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step);
  }

  void set_precision(Precision p) override {
    in_.set_precision(p);
    precision_ = p;
  }
  void set_deterministic(bool on) override { in_.set_deterministic(on); }
  size_t conv_algo_searches() const override { return in_.conv_algo_searches(); }
  size_t conv_bn_eval_fused() const override { return in_.conv_bn_eval_fused(); }

 protected:
  Backend& in_;
};

}  // namespace vb
