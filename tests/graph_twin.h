// A CPU twin of a CUDA graph, for testing a captured step where there is no GPU: a Backend that forwards every
// call to another backend, except that between capture's start and end the ops are recorded (closures over
// their arguments, as a graph's nodes hold their launch parameters) instead of run, and replay runs the
// recording again. Like a graph, a replay sees only what was recorded: a value the host changes from step to
// step but passes by value into an op (other than AdamW's scalars, which replay's update re-sets) would be
// replayed stale, and the step's results would differ from uncaptured steps. Anything a captured step may not
// do (allocate, copy to or from the host, wait) fails while recording.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/backend_forwarding.h"

namespace vbtest {

class GraphTwin final : public vb::ForwardingBackend {
 public:
  explicit GraphTwin(vb::Backend& inner) : ForwardingBackend(inner) {}

  size_t recorded_ops() const { return ops_.size(); }

  // ---- the captured step ----
  bool can_capture() const override { return true; }
  void capture(const std::function<void()>& fn) override {
    drop_capture();
    recording_ = true;
    try {
      fn();
    } catch (...) {
      recording_ = false;
      drop_capture();
      throw;
    }
    recording_ = false;
    for (auto& op : ops_) op();
  }
  void replay(const std::function<void()>& update) override {
    VB_CHECK(!ops_.empty(), "replay without a captured step");
    replaying_ = true;
    for (auto& kv : adam_) kv.second->updated = false;
    try {
      update();
    } catch (...) {
      replaying_ = false;
      throw;
    }
    replaying_ = false;
    for (const auto& kv : adam_) VB_CHECK(kv.second->updated, "replay: an AdamW launch was not given its scalars");
    for (auto& op : ops_) op();
  }
  void drop_capture() override {
    ops_.clear();
    adam_.clear();
  }
  bool has_capture() const override { return !ops_.empty(); }

  void adamw(int64_t n, float* p, const float* g, float* m, float* v, double lr, double beta1, double beta2,
             double eps, double weight_decay, int64_t step) override {
    if (replaying_) {
      auto it = adam_.find(p);
      VB_CHECK(it != adam_.end() && it->second->n == n && it->second->g == g && it->second->m == m &&
                   it->second->v == v && !it->second->updated,
               "replay: an AdamW update over a range the captured step did not launch (or twice)");
      *it->second = AdamArgs{n, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, true};
      return;
    }
    auto a = std::make_shared<AdamArgs>(AdamArgs{n, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, false});
    if (recording_) {
      VB_CHECK(!adam_.count(p), "capture: two AdamW launches over the same parameters");
      adam_[p] = a;
    }
    op([this, a] { in_.adamw(a->n, a->p, a->g, a->m, a->v, a->lr, a->beta1, a->beta2, a->eps, a->wd, a->step); });
  }

  // ---- what a recording may not do ----
  void* alloc(size_t bytes) override { return host_op("alloc"), in_.alloc(bytes); }
  // As the CUDA backend: memory going drops the capture, which may use it.
  void release(void* p) override { host_op("release"), drop_capture(), in_.release(p); }
  void upload(void* dst, const void* src, size_t bytes) override { host_op("upload"), in_.upload(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override {
    host_op("download"), in_.download(dst, src, bytes);
  }
  void sync() override { host_op("sync"), in_.sync(); }
  void wait_uploads() override { host_op("wait_uploads"), in_.wait_uploads(); }
  void wait_download(uint64_t ticket) override { host_op("wait_download"), in_.wait_download(ticket); }
  void* host_alloc(size_t bytes) override { return host_op("host_alloc"), in_.host_alloc(bytes); }
  void host_free(void* p) override { host_op("host_free"), in_.host_free(p); }
  uint64_t download_async(void* dst, const void* src, size_t bytes) override {
    return host_op("download_async"), in_.download_async(dst, src, bytes);
  }
  void scalar_push(const float* src) override { host_op("scalar_push"), in_.scalar_push(src); }
  bool scalar_pop(float* value, bool wait) override { return host_op("scalar_pop"), in_.scalar_pop(value, wait); }
  void upload_activation(float* dst, const float* src, int N, int C, int H, int W) override {
    host_op("upload_activation"), in_.upload_activation(dst, src, N, C, H, W);
  }
  void download_activation(float* dst, const float* src, int N, int C, int H, int W) override {
    host_op("download_activation"), in_.download_activation(dst, src, N, C, H, W);
  }
  void upload_images(float* dst, const uint8_t* src, int N, int H, int W) override {
    host_op("upload_images"), in_.upload_images(dst, src, N, H, W);
  }

  // ---- the rest as the inner backend, but named ----
  std::string description() const override { return "graph twin of " + in_.description(); }
  void set_precision(vb::Precision p) override { drop_capture(), ForwardingBackend::set_precision(p); }
  void set_deterministic(bool on) override { drop_capture(), in_.set_deterministic(on); }

  // ---- the ops: recorded while capturing ----
  void copy(void* dst, const void* src, size_t bytes) override { op([=, this] { in_.copy(dst, src, bytes); }); }
  void fill_zero(void* p, size_t bytes) override { op([=, this] { in_.fill_zero(p, bytes); }); }
  void conv_fwd(const vb::ConvShape& s, const float* x, const float* w, float* y) override {
    op([=, this] { in_.conv_fwd(s, x, w, y); });
  }
  void conv_bwd_data(const vb::ConvShape& s, const float* dy, const float* w, float* dx) override {
    op([=, this] { in_.conv_bwd_data(s, dy, w, dx); });
  }
  void conv_bwd_filter(const vb::ConvShape& s, const float* x, const float* dy, float* dw) override {
    op([=, this] { in_.conv_bwd_filter(s, x, dy, dw); });
  }
  void bn_train_fwd(int N, int C, int H, int W, const float* x, const float* gamma, const float* beta,
                    const float* residual, bool relu, float* y, float* save_mean, float* save_invstd,
                    float* running_mean, float* running_var, double momentum, double eps) override {
    op([=, this] {
      in_.bn_train_fwd(N, C, H, W, x, gamma, beta, residual, relu, y, save_mean, save_invstd, running_mean,
                       running_var, momentum, eps);
    });
  }
  void bn_eval_fwd(int N, int C, int H, int W, const float* x, const float* gamma, const float* beta,
                   const float* running_mean, const float* running_var, double eps, const float* residual,
                   bool relu, float* y) override {
    op([=, this] { in_.bn_eval_fwd(N, C, H, W, x, gamma, beta, running_mean, running_var, eps, residual, relu, y); });
  }
  void conv_bn_eval(const vb::ConvShape& s, const float* x, const float* w, const float* gamma, const float* beta,
                    const float* running_mean, const float* running_var, double eps, const float* residual,
                    bool relu, float* y) override {
    op([=, this] { in_.conv_bn_eval(s, x, w, gamma, beta, running_mean, running_var, eps, residual, relu, y); });
  }
  void bn_apply(int N, int C, int H, int W, const float* x, const float* gamma, const float* beta,
                const float* save_mean, const float* save_invstd, bool relu, float* y) override {
    op([=, this] { in_.bn_apply(N, C, H, W, x, gamma, beta, save_mean, save_invstd, relu, y); });
  }
  void bn_bwd(int N, int C, int H, int W, const float* x, const float* y, const float* dy, const float* gamma,
              const float* save_mean, const float* save_invstd, bool relu, float* dx, float* dresidual,
              float* dgamma, float* dbeta, float* scratch) override {
    op([=, this] {
      in_.bn_bwd(N, C, H, W, x, y, dy, gamma, save_mean, save_invstd, relu, dx, dresidual, dgamma, dbeta, scratch);
    });
  }
  void maxpool_fwd(int N, int C, int H, int W, int k, int s, int p, const float* x, float* y) override {
    op([=, this] { in_.maxpool_fwd(N, C, H, W, k, s, p, x, y); });
  }
  void maxpool_bwd(int N, int C, int H, int W, int k, int s, int p, const float* x, const float* y, const float* dy,
                   float* dx) override {
    op([=, this] { in_.maxpool_bwd(N, C, H, W, k, s, p, x, y, dy, dx); });
  }
  void avgpool_fwd(int N, int C, int H, int W, const float* x, float* y) override {
    op([=, this] { in_.avgpool_fwd(N, C, H, W, x, y); });
  }
  void avgpool_bwd(int N, int C, int H, int W, const float* dy, float* dx) override {
    op([=, this] { in_.avgpool_bwd(N, C, H, W, dy, dx); });
  }
  void linear_fwd(int N, int IN, int OUT, const float* x, const float* w, const float* b, float* y) override {
    op([=, this] { in_.linear_fwd(N, IN, OUT, x, w, b, y); });
  }
  void linear_bwd(int N, int IN, int OUT, const float* x, const float* w, const float* dy, float* dx, float* dw,
                  float* db) override {
    op([=, this] { in_.linear_bwd(N, IN, OUT, x, w, dy, dx, dw, db); });
  }
  void relu_fwd(int64_t n, const float* x, float* y) override { op([=, this] { in_.relu_fwd(n, x, y); }); }
  void relu_bwd(int64_t n, const float* y, const float* dy, float* dx) override {
    op([=, this] { in_.relu_bwd(n, y, dy, dx); });
  }
  void add(int64_t n, const float* a, const float* b, float* y) override { op([=, this] { in_.add(n, a, b, y); }); }
  void softmax_wce(int N, int C, const float* logits, const int64_t* labels, const float* class_weights,
                   float* probs, float* dlogits, float* loss) override {
    op([=, this] { in_.softmax_wce(N, C, logits, labels, class_weights, probs, dlogits, loss); });
  }

 private:
  struct AdamArgs {
    int64_t n;
    float* p;
    const float* g;
    float *m, *v;
    double lr, beta1, beta2, eps, wd;
    int64_t step;
    bool updated;  // given its scalars in the current replay's update
  };
  void op(std::function<void()> f) {
    VB_CHECK(!replaying_, "replay's update may call only adamw");
    if (recording_) ops_.push_back(std::move(f));
    else f();
  }
  void host_op(const char* what) {
    VB_CHECK(!recording_ && !replaying_, what, " inside a captured step");
  }

  bool recording_ = false, replaying_ = false;
  std::vector<std::function<void()>> ops_;
  std::map<const float*, std::shared_ptr<AdamArgs>> adam_;
};

}  // namespace vbtest
