// A backend executes the model's ops on one device: the CPU reference path (engine/backend_cpu.cpp, on
// kernels/cpu) or the CUDA path (engine/backend_cuda.cu, on cuDNN, cuBLAS and kernels/cuda). The model is
// wired once, in engine/model.cpp, against this interface.
//
// Rules every backend keeps:
// - Pointers are the backend's own memory (from alloc). Element type T is float for training (the CUDA
//   backend may compute convolutions in TF32, Precision::TF32) and may be double on the CPU. Activations are 4-D tensors whose memory
//   layout is activation_layout(); the model only passes logical shapes (N, C, H, W).
// - Outputs are assigned, never accumulated. A null output means "not needed".
// - Ops are asynchronous on the CUDA backend (one stream); nothing inside a training step allocates or
//   waits for the device. sync() waits; download() waits for its copy; scalar_push/scalar_pop read a value
//   without waiting, wait_uploads() waits only for the uploads.
// - Ops whose only cost is memory traffic come fused where the data flow allows: batch norm takes an
//   optional residual input and an optional ReLU (y = relu(bn(x) + residual)), which is exactly the end of a
//   ResNet bottleneck; its backward takes the gradient of that fused output.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <functional>
#include <memory>
#include <string>

#include "engine/tensor.h"
#include "kernels/cpu/ops.h"

namespace vb {

using ConvShape = cpu::ConvShape;

// BF16: bf16 activations and convolution/linear operands with float32 accumulation, float32 master weights,
// optimizer state, batch-norm statistics and loss (torch.autocast(bfloat16)'s numerics); on the CPU an
// emulation (engine/backend_bf16.h), the reference a CUDA bf16 path is held to.
enum class Precision : uint8_t { FP32, TF32, FP64, BF16 };
inline const char* precision_name(Precision p) {
  return p == Precision::FP32 ? "fp32" : p == Precision::TF32 ? "tf32" : p == Precision::FP64 ? "fp64" : "bf16";
}

// T is the element type of parameters and activations: float for training (both devices); double on the CPU
// for the reference path that the golden checks run (`vbtrain verify --precision fp64`).
template <class T>
class BackendT {
 public:
  virtual ~BackendT() = default;
  virtual Device device() const = 0;
  virtual std::string description() const = 0;  // e.g. "cpu (2 threads)" or "cuda: NVIDIA H200, cuDNN 9.19"
  virtual Layout activation_layout() const { return Layout::NCHW; }
  // Bytes per element of a 4-D activation (and its gradient) in backend memory: sizeof(T), or 2 where the
  // backend keeps them in bf16 (the CUDA backend's Precision::BF16). Parameters, their gradients, batch-norm
  // statistics and the head's [N, features] buffers are always T. The model sizes its buffers by it at plan().
  virtual size_t activation_element_bytes() const { return sizeof(T); }

  // ---- memory ----
  virtual void* alloc(size_t bytes) = 0;  // zero-filled, at least 256-byte aligned
  virtual void release(void* p) = 0;
  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, size_t bytes) = 0;  // waits for the copy
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;           // device to device
  virtual void fill_zero(void* p, size_t bytes) = 0;
  virtual void sync() = 0;
  // Host memory for data headed to the device (page-locked on CUDA, so copies run at full speed).
  virtual void* host_alloc(size_t bytes) {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    if (!p) fail("out of host memory allocating ", bytes, " bytes");
    return p;
  }
  virtual void host_free(void* p) { std::free(p); }
  // Bytes of device memory this backend holds now and at most so far (0 where not tracked).
  virtual size_t memory_in_use() const { return 0; }
  virtual size_t memory_peak() const { return 0; }
  // How many blocks of backend memory have been allocated so far (alloc and the backend's own scratch and
  // workspaces): a steady-state training step or evaluation batch adds none (the rule above; what a captured
  // CUDA graph needs).
  virtual size_t allocations() const { return 0; }
  // At most this many bytes held at once (0: no limit); an allocation beyond it fails as out of memory would.
  // For tests of the out-of-memory paths, and to try a memory budget on a larger device.
  virtual void set_memory_limit(size_t) {}
  // Waits until every upload queued so far has read its host memory: only then may the host overwrite the
  // source (a loader's page-locked batch buffer, which the CUDA copy reads while the host runs on). Cheaper
  // than sync(): the work queued after the uploads keeps running.
  virtual void wait_uploads() {}
  // Reading a device value without stalling the stream (the training loss, every step): scalar_push queues a
  // copy of *src as it stands once the work queued before it has run; scalar_pop hands the queued values
  // back in order, false when none is queued or (wait = false) when the oldest has not landed yet. This
  // default downloads at once (a wait per push); the CUDA backend copies into page-locked slots with events.
  virtual void scalar_push(const T* src) {
    T v{};
    download(&v, src, sizeof(T));
    scalars_.push_back(v);
  }
  virtual bool scalar_pop(T* value, bool /*wait*/) {
    if (scalars_.empty()) return false;
    *value = scalars_.front();
    scalars_.pop_front();
    return true;
  }
  // Reading a block of values without stalling the stream (evaluation's logits and loss, every batch):
  // download_async queues a copy into host memory (from host_alloc, page-locked on CUDA) that runs once the
  // work queued before it has run, and returns a ticket; wait_download(ticket) waits for that copy and every copy
  // queued before it (they land in order). The kDownloadTickets most recent tickets can be waited for. This
  // default copies at once (download).
  static constexpr uint64_t kDownloadTickets = 8;
  virtual uint64_t download_async(void* host_dst, const void* src, size_t bytes) {
    download(host_dst, src, bytes);
    return downloads_++;
  }
  virtual void wait_download(uint64_t ticket) {
    VB_CHECK(ticket < downloads_ && ticket + kDownloadTickets >= downloads_, "wait_download: ticket ", ticket,
             " is not among the last ", kDownloadTickets, " of ", downloads_);
  }
  // Activations: converts a host NCHW float batch to / from the backend's activation layout.
  virtual void upload_activation(T* dst, const T* host_nchw, int N, int C, int H, int W) = 0;
  virtual void download_activation(T* host_nchw, const T* src, int N, int C, int H, int W) = 0;
  // A loader's uint8 frames (N, H, W, 3 in host memory, data::PixelFormat::Uint8NHWC) into the input activation
  // [N, 3, H, W], normalised on the way (ToTensor + Normalize, the float32 values of kernels/normalize.h, so
  // the same as uploading the loader's float batch). The CUDA backend copies the bytes up on a copy stream of
  // its own into one of two device buffers, so the copy of the next batch runs while this one's step computes,
  // and normalises on its stream; as with upload, the host memory may be reused after wait_uploads().
  virtual void upload_images(T* dst, const uint8_t* host_nhwc, int N, int H, int W) = 0;

  // ---- convolution (no bias) ----
  virtual void conv_fwd(const ConvShape& s, const T* x, const T* w, T* y) = 0;
  virtual void conv_bwd_data(const ConvShape& s, const T* dy, const T* w, T* dx) = 0;
  virtual void conv_bwd_filter(const ConvShape& s, const T* x, const T* dy, T* dw) = 0;

  // ---- batch norm, fused with an optional residual add and ReLU: y = act(bn(x) + residual) ----
  // Training: batch statistics; saves mean and 1/sqrt(var+eps) [C]; updates running statistics (unbiased
  // variance, momentum) when running_mean is not null.
  virtual void bn_train_fwd(int N, int C, int H, int W, const T* x, const T* gamma, const T* beta,
                            const T* residual, bool relu, T* y, T* save_mean, T* save_invstd,
                            T* running_mean, T* running_var, double momentum, double eps) = 0;
  virtual void bn_eval_fwd(int N, int C, int H, int W, const T* x, const T* gamma, const T* beta,
                           const T* running_mean, const T* running_var, double eps,
                           const T* residual, bool relu, T* y) = 0;
  // Evaluation: a convolution and the batch norm after it, y = act(bn(conv(x, w)) + residual) with the running
  // statistics. Backends may fold the batch norm into the convolution (weights scaled per output channel, a
  // bias, the residual and ReLU applied as each output tile is stored); this default runs conv_fwd, then
  // bn_eval_fwd in place on y. y must not alias x or residual.
  virtual void conv_bn_eval(const ConvShape& s, const T* x, const T* w, const T* gamma, const T* beta,
                            const T* running_mean, const T* running_var, double eps, const T* residual, bool relu,
                            T* y) {
    conv_fwd(s, x, w, y);
    bn_eval_fwd(s.N, s.K, s.P(), s.Q(), y, gamma, beta, running_mean, running_var, eps, residual, relu, y);
  }
  // An evaluation pass: between begin_eval_pass() and end_eval_pass() the model's parameters (weights, batch-norm
  // affine and running statistics) do not change, so a backend may keep what it derives from them from one
  // conv_bn_eval call of a layer to the next (the CPU backend: each layer's folded, packed weights, made on the
  // pass's first batch instead of every batch, found again by the tensors' addresses). Open one with EvalPass
  // around a loop of evaluation forwards; while it is open nothing may write the parameters, nor free a model
  // and make another in its memory. Passes do not nest.
  virtual void begin_eval_pass() {}
  virtual void end_eval_pass() {}
  // The training forward's output again, y = act(bn(x)), from the statistics it saved (no residual):
  // bit-identical to what bn_train_fwd wrote, so the model can recompute it in backward instead of keeping it.
  virtual void bn_apply(int N, int C, int H, int W, const T* x, const T* gamma, const T* beta,
                        const T* save_mean, const T* save_invstd, bool relu, T* y) = 0;
  // dy: gradient of y. y: the fused output (used for the ReLU mask when relu). Writes dx, dresidual (the
  // gradient reaching the residual input, = dy masked by the ReLU), dgamma, dbeta; any may be null.
  // `scratch` holds N*C*H*W floats for the masked gradient; it may be dresidual.
  virtual void bn_bwd(int N, int C, int H, int W, const T* x, const T* y, const T* dy,
                      const T* gamma, const T* save_mean, const T* save_invstd, bool relu, T* dx,
                      T* dresidual, T* dgamma, T* dbeta, T* scratch) = 0;

  // ---- pooling ----
  virtual void maxpool_fwd(int N, int C, int H, int W, int k, int s, int p, const T* x, T* y) = 0;
  virtual void maxpool_bwd(int N, int C, int H, int W, int k, int s, int p, const T* x, const T* y,
                           const T* dy, T* dx) = 0;
  // Global average: x [N,C,H,W] (activation layout) -> y [N,C] (row-major).
  virtual void avgpool_fwd(int N, int C, int H, int W, const T* x, T* y) = 0;
  virtual void avgpool_bwd(int N, int C, int H, int W, const T* dy, T* dx) = 0;

  // ---- the head (row-major matrices) ----
  virtual void linear_fwd(int N, int IN, int OUT, const T* x, const T* w, const T* b, T* y) = 0;
  virtual void linear_bwd(int N, int IN, int OUT, const T* x, const T* w, const T* dy, T* dx,
                          T* dw, T* db) = 0;
  virtual void relu_fwd(int64_t n, const T* x, T* y) = 0;
  virtual void relu_bwd(int64_t n, const T* y, const T* dy, T* dx) = 0;
  // y = a + b (flat, any layout; y may alias a or b): joins the two gradient paths of a residual block.
  virtual void add(int64_t n, const T* a, const T* b, T* y) = 0;

  // ---- loss: softmax + weighted cross-entropy in one pass. loss: one float in backend memory. ----
  virtual void softmax_wce(int N, int C, const T* logits, const int64_t* labels, const T* class_weights,
                           T* probs, T* dlogits, T* loss) = 0;

  // ---- optimizer: one AdamW step over a flat range (torch.optim.AdamW semantics) ----
  virtual void adamw(int64_t n, T* p, const T* g, T* m, T* v, double lr, double beta1,
                     double beta2, double eps, double weight_decay, int64_t step) = 0;

  // ---- a captured training step (a CUDA graph; engine/train/step.h decides when) ----
  // Whether this backend can record a step's ops and replay them (CUDA: yes; the CPU: no).
  virtual bool can_capture() const { return false; }
  // Records the ops fn issues as one graph, without running them, then launches the graph once: fn's work is
  // done either way. fn must neither allocate nor wait for the device (the rule above). Replaces an earlier
  // capture; an error inside fn ends the recording, leaves no capture and is rethrown.
  virtual void capture(const std::function<void()>& fn) { fn(); }
  // Launches the captured graph again, after calling update: during update, adamw() launches nothing but gives
  // the graph's AdamW launch over the same range its new scalars (the step count and learning rate change from
  // step to step); update may call nothing else, and must update every AdamW launch of the graph.
  virtual void replay(const std::function<void()>& update) {
    (void)update;
    fail("this backend has no captured step to replay");
  }
  virtual void drop_capture() {}
  // Whether a captured step is held. A backend drops its capture by itself when memory the graph may use goes
  // (a buffer released, a workspace replaced by a larger one, as evaluation's algorithm search may do), since a
  // replay would then use freed memory; the caller records the step again.
  virtual bool has_capture() const { return false; }

  virtual void set_precision(Precision p) { precision_ = p; }
  // Bit-reproducible results from run to run (cuDNN: deterministic algorithms only). The CPU path always is.
  virtual void set_deterministic(bool) {}
  Precision precision() const { return precision_; }
  // How many convolution algorithm searches ran so far (cuDNN: one per layer and direction for the largest
  // batch seen, plus a search where a reused choice does not fit a smaller shape); 0 where there is no search.
  virtual size_t conv_algo_searches() const { return 0; }
  // How many conv_bn_eval calls ran as one fused call (cuDNN's convolution + bias + activation); 0 where the
  // backend folds otherwise or not at all.
  virtual size_t conv_bn_eval_fused() const { return 0; }

 protected:
  Precision precision_ = Precision::TF32;
  std::deque<T> scalars_;  // the default scalar_push's values
  uint64_t downloads_ = 0;  // download_async tickets handed out
};

using Backend = BackendT<float>;

// Holds an evaluation pass open for its lifetime (see begin_eval_pass).
template <class T>
class EvalPassT {
 public:
  explicit EvalPassT(BackendT<T>& be) : be_(be) { be_.begin_eval_pass(); }
  ~EvalPassT() { be_.end_eval_pass(); }
  EvalPassT(const EvalPassT&) = delete;
  EvalPassT& operator=(const EvalPassT&) = delete;

 private:
  BackendT<T>& be_;
};
using EvalPass = EvalPassT<float>;

// The CPU backend. Activations channels-last by default (the fast path); NCHW runs the NCHW kernels (the CUDA
// op tests compare the CUDA backend op by op against the CPU backend in the CUDA backend's layout).
std::unique_ptr<Backend> make_cpu_backend(int threads, Layout layout = Layout::NHWC);
// The CPU path in double: the reference that gradient checks and golden runs can use.
std::unique_ptr<BackendT<double>> make_cpu_backend_f64(int threads, Layout layout = Layout::NHWC);
// The layout make_backend gives the CPU: NHWC, or what VB_CPU_LAYOUT says (nhwc or nchw).
Layout default_cpu_layout();
// The layout make_backend gives the GPU: NCHW, or what VB_CUDA_LAYOUT says (nhwc or nchw). NHWC becomes the
// default once it has been measured on a GPU.
Layout default_cuda_layout();
// Throws vb::Error with one line ("no CUDA device: ...") when CUDA is not built in or no GPU is present. Without
// a layout: default_cuda_layout(), read after the device is found.
std::unique_ptr<Backend> make_cuda_backend(int device_index = 0);
std::unique_ptr<Backend> make_cuda_backend(int device_index, Layout layout);
bool cuda_available();  // built with CUDA and at least one device is visible

// "auto" -> cuda when available, else cpu. Throws on an unknown name.
std::unique_ptr<Backend> make_backend(const std::string& device, int threads);

}  // namespace vb
