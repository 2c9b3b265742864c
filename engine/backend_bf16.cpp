#include "engine/backend_bf16.h"

#include <vector>

#include "engine/backend_forwarding.h"
#include "kernels/bf16.h"

namespace vb {
namespace {

void round_n(float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = round_bf16(p[i]);
}

class Bf16Emulation final : public ForwardingBackend {
 public:
  explicit Bf16Emulation(std::unique_ptr<Backend> inner) : ForwardingBackend(*inner), owned_(std::move(inner)) {
    in_.set_precision(Precision::FP32);
    precision_ = Precision::BF16;
  }
  std::string description() const override { return in_.description() + ", bf16 emulated"; }
  void set_precision(Precision p) override {
    VB_CHECK(p == Precision::BF16, "the bf16 emulation computes in bf16, not ", precision_name(p));
  }

  void conv_fwd(const ConvShape& s, const float* x, const float* w, float* y) override {
    in_.conv_fwd(s, rounded(0, x, in_size(s)), rounded(1, w, w_size(s)), y);
    round_n(y, out_size(s));
  }
  void conv_bwd_data(const ConvShape& s, const float* dy, const float* w, float* dx) override {
    in_.conv_bwd_data(s, rounded(0, dy, out_size(s)), rounded(1, w, w_size(s)), dx);
    round_n(dx, in_size(s));
  }
  void conv_bwd_filter(const ConvShape& s, const float* x, const float* dy, float* dw) override {
    in_.conv_bwd_filter(s, rounded(0, x, in_size(s)), rounded(1, dy, out_size(s)), dw);
    round_n(dw, w_size(s));
  }
  // conv_bn_eval: ForwardingBackend's, the convolution then the batch norm, each rounding as above (autocast does
  // not fold).
  void bn_train_fwd(int N, int C, int H, int W, const float* x, const float* gamma, const float* beta,
                    const float* residual, bool relu, float* y, float* save_mean, float* save_invstd,
                    float* running_mean, float* running_var, double momentum, double eps) override {
    in_.bn_train_fwd(N, C, H, W, x, gamma, beta, nullptr, false, y, save_mean, save_invstd, running_mean, running_var,
                     momentum, eps);
    finish_bn(int64_t(N) * C * H * W, residual, relu, y);
  }
  void bn_eval_fwd(int N, int C, int H, int W, const float* x, const float* gamma, const float* beta,
                   const float* running_mean, const float* running_var, double eps, const float* residual,
                   bool relu, float* y) override {
    in_.bn_eval_fwd(N, C, H, W, x, gamma, beta, running_mean, running_var, eps, nullptr, false, y);
    finish_bn(int64_t(N) * C * H * W, residual, relu, y);
  }
  void bn_apply(int N, int C, int H, int W, const float* x, const float* gamma, const float* beta,
                const float* save_mean, const float* save_invstd, bool relu, float* y) override {
    in_.bn_apply(N, C, H, W, x, gamma, beta, save_mean, save_invstd, false, y);
    finish_bn(int64_t(N) * C * H * W, nullptr, relu, y);
  }
  void bn_bwd(int N, int C, int H, int W, const float* x, const float* y, const float* dy, const float* gamma,
              const float* save_mean, const float* save_invstd, bool relu, float* dx, float* dresidual,
              float* dgamma, float* dbeta, float* scratch) override {
    in_.bn_bwd(N, C, H, W, x, y, dy, gamma, save_mean, save_invstd, relu, dx, dresidual, dgamma, dbeta, scratch);
    if (dx) round_n(dx, int64_t(N) * C * H * W);
  }
  void maxpool_bwd(int N, int C, int H, int W, int k, int s, int p, const float* x, const float* y, const float* dy,
                   float* dx) override {
    in_.maxpool_bwd(N, C, H, W, k, s, p, x, y, dy, dx);
    round_n(dx, int64_t(N) * C * H * W);  // overlapping windows add
  }
  void avgpool_fwd(int N, int C, int H, int W, const float* x, float* y) override {
    in_.avgpool_fwd(N, C, H, W, x, y);
    round_n(y, int64_t(N) * C);
  }
  void avgpool_bwd(int N, int C, int H, int W, const float* dy, float* dx) override {
    in_.avgpool_bwd(N, C, H, W, dy, dx);
    round_n(dx, int64_t(N) * C * H * W);
  }
  void linear_fwd(int N, int IN, int OUT, const float* x, const float* w, const float* b, float* y) override {
    in_.linear_fwd(N, IN, OUT, rounded(0, x, int64_t(N) * IN), rounded(1, w, int64_t(OUT) * IN),
                   b ? rounded(2, b, OUT) : nullptr, y);
    round_n(y, int64_t(N) * OUT);
  }
  void linear_bwd(int N, int IN, int OUT, const float* x, const float* w, const float* dy, float* dx, float* dw,
                  float* db) override {
    in_.linear_bwd(N, IN, OUT, rounded(0, x, int64_t(N) * IN), rounded(1, w, int64_t(OUT) * IN),
                   rounded(2, dy, int64_t(N) * OUT), dx, dw, db);
    if (dx) round_n(dx, int64_t(N) * IN);
    if (dw) round_n(dw, int64_t(OUT) * IN);
    if (db) round_n(db, OUT);
  }
  void add(int64_t n, const float* a, const float* b, float* y) override {
    in_.add(n, a, b, y);
    round_n(y, n);
  }
  void softmax_wce(int N, int C, const float* logits, const int64_t* labels, const float* class_weights,
                   float* probs, float* dlogits, float* loss) override {
    in_.softmax_wce(N, C, logits, labels, class_weights, probs, dlogits, loss);
    if (dlogits) round_n(dlogits, int64_t(N) * C);
  }

 private:
  static int64_t in_size(const ConvShape& s) { return int64_t(s.N) * s.C * s.H * s.W; }
  static int64_t out_size(const ConvShape& s) { return int64_t(s.N) * s.K * s.P() * s.Q(); }
  static int64_t w_size(const ConvShape& s) { return int64_t(s.K) * s.C * s.R * s.S; }
  // A rounded copy of n values in scratch `slot` (grow-only); the inner backend's memory is host memory.
  const float* rounded(int slot, const float* p, int64_t n) {
    std::vector<float>& v = scratch_[slot];
    if (v.size() < size_t(n)) v.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) v[size_t(i)] = round_bf16(p[i]);
    return v.data();
  }
  // Batch norm's output y (float32 arithmetic) to bf16, then the residual add in bf16, then ReLU.
  void finish_bn(int64_t n, const float* residual, bool relu, float* y) {
    round_n(y, n);
    if (residual) add(n, y, residual, y);
    if (relu) in_.relu_fwd(n, y, y);
  }

  std::unique_ptr<Backend> owned_;
  std::vector<float> scratch_[3];
};

}  // namespace

std::unique_ptr<Backend> make_bf16_emulation(std::unique_ptr<Backend> inner) {
  VB_CHECK(inner && inner->device() == Device::CPU, "the bf16 emulation runs over the CPU backend");
  return std::make_unique<Bf16Emulation>(std::move(inner));
}

}  // namespace vb
