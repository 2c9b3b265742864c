// The CUDA backend: convolutions on cuDNN (legacy API), the head on cuBLAS, everything else on the custom
// kernels of kernels/cuda. One compute stream, which the cuDNN and cuBLAS handles are bound to, and a copy stream
// for the loader's images (upload_images).
//
// Activation layout: NCHW by default; NHWC with VB_CUDA_LAYOUT=nhwc (make_cuda_backend's layout). cuDNN's
// tensor-core convolutions prefer NHWC and transpose NCHW internally (about 8% of PyTorch's fp32 step, see
// docs/anchors.md). In NHWC the convolutions get NHWC activations and KRSC filters: the parameters stay one
// OIHW copy (torchvision's layout, which AdamW, checkpoints and exports see), each convolution permutes its
// weights into a KRSC scratch buffer before the call (the filter gradient is computed there and permuted back),
// a few microseconds per layer at the H200's bandwidth; batch norm and pooling run the NHWC kernels of
// kernels/cuda/bn_nhwc.cu and pool_nhwc.cu; upload_activation and download_activation transpose on the device
// through a staging buffer. NHWC is not the default until it has been measured on a GPU (docs/STATUS.md).
//
// Memory: alloc is cudaMalloc + a stream-ordered memset (no managed memory). The cuDNN workspace is one
// buffer shared by every convolution; it grows only while an algorithm is being chosen (the first time a
// layer and direction is seen at a batch no smaller than before, i.e. during the first training step), never
// afterwards: a smaller batch (the last partial batch of a split, a batch that lost skipped images, evaluation)
// reuses the layer's choice after checking its workspace for the actual shape (engine/conv_algo_cache.h).
// A growing buffer is allocated before the old one is freed, so an out-of-memory there leaves the old one in
// place and says so clearly. Batch norm's reduction scratch and cuBLAS's workspace are allocated once up
// front, so a steady-state step neither allocates nor waits for the device; the loss comes back through
// scalar_push/scalar_pop (page-locked slots and events) and the trainer waits only for the uploads
// (wait_uploads) before its loader reuses a batch buffer. The loader's uint8 frames go up on a copy stream of
// their own (upload_images), so that the next batch's copy overlaps the current step. VB_CUDNN_LOG=1 prints each choice (algorithm, math
// type, workspace) and each reuse.
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/conv_algo_cache.h"
#include "kernels/cuda/adamw.cuh"
#include "kernels/cuda/batchnorm.cuh"
#include "kernels/cuda/bf16_convert.cuh"
#include "kernels/cuda/bn_fold.cuh"
#include "kernels/cuda/bn_nhwc.cuh"
#include "kernels/cuda/elementwise.cuh"
#include "kernels/cuda/layout.cuh"
#include "kernels/cuda/pool.cuh"
#include "kernels/cuda/pool_nhwc.cuh"
#include "kernels/cuda/softmax_wce.cuh"
#include "kernels/cuda/transforms.cuh"

namespace vb {
namespace {

// The most workspace any one convolution algorithm may claim: larger ones are skipped during the choice.
// (A batch-150 step plans about 15 GiB before workspace: 12.6 GiB of activations, 2.2 GiB of gradient
// scratch, 0.4 GiB of parameters, gradients and AdamW state; fitting PyTorch's 12.5 GiB needs NHWC/bf16 or
// recomputation, not yet done.)
constexpr size_t kMaxConvWorkspace = size_t(512) << 20;
// cuBLAS's own workspace (NVIDIA recommends 32 MiB on Hopper); set explicitly so that cuBLAS never allocates
// inside a step (and a CUDA graph can capture it later).
constexpr size_t kCublasWorkspace = size_t(32) << 20;
// Batch-norm scratch is sized for this many channels up front (ResNet-50 has at most 2048).
constexpr int kBnChannels = 4096;
// NHWC: the KRSC filter scratch is sized up front for this many floats (ResNet-50's largest filter, 512 x 512 x
// 3 x 3), so that no step allocates it; a larger filter grows it once.
constexpr size_t kKrscFloats = size_t(512) * 512 * 9;
// Page-locked slots for scalar_push: values in flight at once before a push parks the oldest on the host.
constexpr int kScalarSlots = 64;

enum class ConvDir { Fwd = 0, BwdData = 1, BwdFilter = 2 };
const char* const kDirNames[] = {"forward", "backward-data", "backward-filter"};

// Descriptors and chosen algorithms of one (shape, precision); created once, reused by every call.
struct ConvPlan {
  cudnnTensorDescriptor_t x = nullptr, y = nullptr;
  cudnnFilterDescriptor_t w = nullptr;
  cudnnConvolutionDescriptor_t conv = nullptr;
  cudnnTensorDescriptor_t bias = nullptr;  // [1, K, 1, 1]: conv_bn_eval's folded bias (made on first use)
  // conv_bn_eval: cuDNN refused the fused call once, without ([0]) or with ([1]) ReLU; unfused from then on.
  bool unfused[2] = {false, false};
  bool chosen[3] = {false, false, false};
  bool reused[3] = {false, false, false};  // the choice was searched for a larger batch of the layer
  int algo[3] = {0, 0, 0};  // cudnnConvolution{Fwd,BwdData,BwdFilter}Algo_t
  cudnnMathType_t math[3] = {CUDNN_FMA_MATH, CUDNN_FMA_MATH, CUDNN_FMA_MATH};
  size_t ws[3] = {0, 0, 0};

  ~ConvPlan() {
    if (x) cudnnDestroyTensorDescriptor(x);
    if (y) cudnnDestroyTensorDescriptor(y);
    if (w) cudnnDestroyFilterDescriptor(w);
    if (conv) cudnnDestroyConvolutionDescriptor(conv);
    if (bias) cudnnDestroyTensorDescriptor(bias);
  }
};

using ConvKey = std::array<int, 11>;  // the shape with N, precision, deterministic

// A candidate from the heuristics or the timing, whatever the direction.
struct Candidate {
  int algo;
  cudnnStatus_t status;
  float time;
  size_t memory;
  cudnnMathType_t math;
  bool deterministic;
};
template <class Perf>
std::vector<Candidate> candidates(const Perf* p, int n) {
  std::vector<Candidate> r;
  for (int i = 0; i < n; ++i)
    r.push_back({int(p[i].algo), p[i].status, p[i].time, p[i].memory, p[i].mathType,
                 p[i].determinism == CUDNN_DETERMINISTIC});
  return r;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, Layout layout) : dev_(device), nhwc_(layout == Layout::NHWC) {
    VB_CUDA_CHECK(cudaSetDevice(dev_));
    cudaDeviceProp prop{};
    VB_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev_));
    // A blocking stream: it orders with the legacy default stream, so a tool can time it with events there.
    VB_CUDA_CHECK(cudaStreamCreate(&st_));
    VB_CUDNN_CHECK(cudnnCreate(&dnn_));
    VB_CUDNN_CHECK(cudnnSetStream(dnn_, st_));
    VB_CUBLAS_CHECK(cublasCreate(&blas_));
    VB_CUBLAS_CHECK(cublasSetStream(blas_, st_));
    blas_ws_ = device_malloc(kCublasWorkspace, "cuBLAS's workspace");
    VB_CUBLAS_CHECK(cublasSetWorkspace(blas_, blas_ws_, kCublasWorkspace));
    grow_bn_work(kBnChannels);
    // The filter scratch: KRSC weights in NHWC, folded weights in evaluation (either layout).
    grow_buffer(wt_, wt_size_, kKrscFloats * sizeof(float), "the filter scratch");
    fold_bias_ = static_cast<float*>(device_malloc(kBnChannels * sizeof(float), "the folded batch-norm bias"));
    VB_CUDNN_CHECK(cudnnCreateActivationDescriptor(&relu_));
    VB_CUDNN_CHECK(cudnnSetActivationDescriptor(relu_, CUDNN_ACTIVATION_RELU, CUDNN_PROPAGATE_NAN, 0.0));
    VB_CUDNN_CHECK(cudnnCreateActivationDescriptor(&identity_));
    VB_CUDNN_CHECK(cudnnSetActivationDescriptor(identity_, CUDNN_ACTIVATION_IDENTITY, CUDNN_PROPAGATE_NAN, 0.0));
    // The same without NaN propagation (as PyTorch sets them for this call: cuDNN's fused call may refuse
    // CUDNN_PROPAGATE_NAN); used only if it does.
    VB_CUDNN_CHECK(cudnnCreateActivationDescriptor(&relu_np_));
    VB_CUDNN_CHECK(cudnnSetActivationDescriptor(relu_np_, CUDNN_ACTIVATION_RELU, CUDNN_NOT_PROPAGATE_NAN,
                                                std::numeric_limits<double>::max()));
    VB_CUDNN_CHECK(cudnnCreateActivationDescriptor(&identity_np_));
    VB_CUDNN_CHECK(cudnnSetActivationDescriptor(identity_np_, CUDNN_ACTIVATION_IDENTITY, CUDNN_NOT_PROPAGATE_NAN,
                                                std::numeric_limits<double>::max()));
    VB_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&scalar_host_), kScalarSlots * sizeof(float)));
    for (cudaEvent_t& e : scalar_ev_) VB_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    VB_CUDA_CHECK(cudaEventCreateWithFlags(&upload_ev_, cudaEventDisableTiming));
    for (cudaEvent_t& e : download_ev_) VB_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    // The images' copy stream: non-blocking, so that it never waits for work on the legacy default stream.
    VB_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_st_, cudaStreamNonBlocking));
    for (int i = 0; i < 2; ++i) {
      VB_CUDA_CHECK(cudaEventCreateWithFlags(&img_copied_ev_[i], cudaEventDisableTiming));
      VB_CUDA_CHECK(cudaEventCreateWithFlags(&img_read_ev_[i], cudaEventDisableTiming));
    }
    set_precision(Precision::TF32);
    const size_t v = cudnnGetVersion();
    desc_ = std::string("cuda: ") + prop.name + ", cuDNN " + std::to_string(v / 10000) + "." +
            std::to_string((v % 10000) / 100) + (nhwc_ ? ", NHWC" : "");
  }

  ~CudaBackend() override {
    // No throwing from a destructor: errors here are reported, not raised.
    cudaStreamSynchronize(st_);
    if (copy_st_) cudaStreamSynchronize(copy_st_);
    if (graph_exec_) cudaGraphExecDestroy(graph_exec_);
    if (graph_) cudaGraphDestroy(graph_);
    plans_.clear();
    for (auto& kv : sizes_) cudaFree(kv.first);
    if (ws_) cudaFree(ws_);
    if (bn_work_) cudaFree(bn_work_);
    if (stage_) cudaFree(stage_);
    for (void* p : {stage2_, wt16_, head16_, round_[0], round_[1], round_[2]})
      if (p) cudaFree(p);
    for (int i = 0; i < 2; ++i) {
      if (img_stage_[i]) cudaFree(img_stage_[i]);
      if (img_copied_ev_[i]) cudaEventDestroy(img_copied_ev_[i]);
      if (img_read_ev_[i]) cudaEventDestroy(img_read_ev_[i]);
    }
    if (copy_st_) cudaStreamDestroy(copy_st_);
    if (wt_) cudaFree(wt_);
    if (fold_bias_) cudaFree(fold_bias_);
    if (relu_) cudnnDestroyActivationDescriptor(relu_);
    if (identity_) cudnnDestroyActivationDescriptor(identity_);
    if (relu_np_) cudnnDestroyActivationDescriptor(relu_np_);
    if (identity_np_) cudnnDestroyActivationDescriptor(identity_np_);
    if (blas_ws_) cudaFree(blas_ws_);
    for (cudaEvent_t e : scalar_ev_)
      if (e) cudaEventDestroy(e);
    if (upload_ev_) cudaEventDestroy(upload_ev_);
    for (cudaEvent_t e : download_ev_)
      if (e) cudaEventDestroy(e);
    if (scalar_host_) cudaFreeHost(scalar_host_);
    if (blas_) cublasDestroy(blas_);
    if (dnn_) cudnnDestroy(dnn_);
    if (st_) cudaStreamDestroy(st_);
  }

  Device device() const override { return Device::CUDA; }
  std::string description() const override { return desc_; }
  Layout activation_layout() const override { return nhwc_ ? Layout::NHWC : Layout::NCHW; }
  size_t activation_element_bytes() const override { return bf16() ? sizeof(vb::bf16) : sizeof(float); }

  void set_precision(Precision p) override {
    VB_CHECK(p == Precision::FP32 || p == Precision::TF32 || p == Precision::BF16,
             "the CUDA backend computes in fp32, tf32 or bf16, not ", precision_name(p));
    VB_CHECK(p != Precision::BF16 || nhwc_, "bf16 on the CUDA backend needs the NHWC layout (VB_CUDA_LAYOUT=nhwc, "
             "or make_cuda_backend(device, Layout::NHWC))");
    if (p != precision_) drop_capture();  // a captured step keeps the math it was recorded with
    precision_ = p;
    // bf16: its filter scratch sized up front, as the float one (no step grows it).
    if (p == Precision::BF16) grow_buffer(wt16_, wt16_size_, kKrscFloats * sizeof(vb::bf16), "the bf16 filter scratch");
    // TF32 applies to the convolutions only, as PyTorch's defaults (cudnn.allow_tf32 on, matmul.allow_tf32
    // off): the head's matrix products stay fp32 in both modes.
    VB_CUBLAS_CHECK(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH));
  }

  // ---- memory ----
  void* alloc(size_t bytes) override {
    const size_t rounded = bytes == 0 ? 256 : (bytes + 255) / 256 * 256;
    void* p = device_malloc(rounded, "a buffer");
    VB_CUDA_CHECK(cudaMemsetAsync(p, 0, rounded, st_));
    sizes_[p] = rounded;
    return p;
  }
  void release(void* p) override {
    if (!p) return;
    outside_capture("release");
    drop_capture();  // the graph may use this memory (Backend::has_capture)
    auto it = sizes_.find(p);
    VB_CHECK(it != sizes_.end(), "release of a pointer this CUDA backend did not allocate");
    account(-int64_t(it->second));
    sizes_.erase(it);
    VB_CUDA_CHECK(cudaFree(p));
  }
  void* host_alloc(size_t bytes) override {
    outside_capture("host_alloc");
    void* p = nullptr;
    VB_CUDA_CHECK(cudaMallocHost(&p, bytes == 0 ? 64 : bytes));
    return p;
  }
  void host_free(void* p) override {
    outside_capture("host_free");
    if (p) VB_CUDA_CHECK(cudaFreeHost(p));
  }
  void set_deterministic(bool on) override {
    if (on != deterministic_) drop_capture();  // a captured step keeps the algorithms it was recorded with
    deterministic_ = on;
  }
  size_t memory_in_use() const override { return in_use_; }
  size_t memory_peak() const override { return peak_; }
  size_t allocations() const override { return allocations_; }
  void set_memory_limit(size_t bytes) override { limit_ = bytes; }
  size_t conv_algo_searches() const override { return algo_cache_.searches(); }
  void upload(void* dst, const void* src, size_t bytes) override {
    outside_capture("upload");
    VB_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, st_));
    VB_CUDA_CHECK(cudaEventRecord(upload_ev_, st_));  // wait_uploads() waits for the latest
  }
  void wait_uploads() override {
    outside_capture("wait_uploads");
    VB_CUDA_CHECK(cudaEventSynchronize(upload_ev_));
    if (images_uploaded_ > 0) VB_CUDA_CHECK(cudaEventSynchronize(img_copied_ev_[(images_uploaded_ - 1) % 2]));
  }
  // The values in flight live in page-locked slots, each with the event recorded after its copy; a push into a
  // full ring first parks the oldest value (waiting for it) in scalars_, which holds values older than any slot.
  void scalar_push(const float* src) override {
    outside_capture("scalar_push");
    if (scalar_pushed_ - scalar_taken_ == kScalarSlots) {
      const int i = int(scalar_taken_ % kScalarSlots);
      VB_CUDA_CHECK(cudaEventSynchronize(scalar_ev_[i]));
      scalars_.push_back(scalar_host_[i]);
      ++scalar_taken_;
    }
    const int i = int(scalar_pushed_ % kScalarSlots);
    VB_CUDA_CHECK(cudaMemcpyAsync(scalar_host_ + i, src, sizeof(float), cudaMemcpyDeviceToHost, st_));
    VB_CUDA_CHECK(cudaEventRecord(scalar_ev_[i], st_));
    ++scalar_pushed_;
  }
  bool scalar_pop(float* value, bool wait) override {
    outside_capture("scalar_pop");
    if (!scalars_.empty()) {
      *value = scalars_.front();
      scalars_.pop_front();
      return true;
    }
    if (scalar_taken_ == scalar_pushed_) return false;
    const int i = int(scalar_taken_ % kScalarSlots);
    if (wait) {
      VB_CUDA_CHECK(cudaEventSynchronize(scalar_ev_[i]));
    } else {
      const cudaError_t e = cudaEventQuery(scalar_ev_[i]);
      if (e == cudaErrorNotReady) {
        cudaGetLastError();  // "not ready" is an answer, not an error: the next launch check must not see it
        return false;
      }
      VB_CUDA_CHECK(e);
    }
    *value = scalar_host_[i];
    ++scalar_taken_;
    return true;
  }
  uint64_t download_async(void* dst, const void* src, size_t bytes) override {
    outside_capture("download_async");
    const uint64_t t = downloads_++;
    VB_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, st_));
    VB_CUDA_CHECK(cudaEventRecord(download_ev_[t % kDownloadTickets], st_));
    return t;
  }
  void wait_download(uint64_t ticket) override {
    outside_capture("wait_download");
    Backend::wait_download(ticket);  // the ticket's checks
    VB_CUDA_CHECK(cudaEventSynchronize(download_ev_[ticket % kDownloadTickets]));
  }
  void download(void* dst, const void* src, size_t bytes) override {
    outside_capture("download");
    VB_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, st_));
    VB_CUDA_CHECK(cudaStreamSynchronize(st_));
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    VB_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, st_));
  }
  void fill_zero(void* p, size_t bytes) override { VB_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, st_)); }
  void sync() override {
    outside_capture("sync");
    VB_CUDA_CHECK(cudaStreamSynchronize(st_));
  }
  // NHWC: the host's NCHW batch goes up into the staging buffer, then is transposed into dst on the stream
  // (the buffer grows only when a batch larger than any before arrives: the first step).
  void upload_activation(float* dst, const float* src, int N, int C, int H, int W) override {
    const size_t bytes = sizeof(float) * size_t(N) * C * H * W;
    if (!nhwc_) return upload(dst, src, bytes);
    grow_buffer(stage_, stage_size_, bytes, "the activation staging buffer", false);
    upload(stage_, src, bytes);
    if (!bf16()) return cuda::nchw_to_nhwc(st_, N, C, H * W, static_cast<const float*>(stage_), dst);
    // bf16: transposed in float into the second staging buffer, then rounded into the activation.
    grow_buffer(stage2_, stage2_size_, bytes, "the activation staging buffer", false);
    cuda::nchw_to_nhwc(st_, N, C, H * W, static_cast<const float*>(stage_), static_cast<float*>(stage2_));
    cuda::float_to_bf16(st_, int64_t(N) * C * H * W, static_cast<const float*>(stage2_), B(dst));
  }
  // The uint8 frames go up on copy_st_ into the two staging buffers in turn, and are normalised on st_: the
  // copy of the next batch overlaps the step that computes on this one. Events order the two streams both
  // ways: st_ normalises only after its copy landed (img_copied_ev_), and a buffer is overwritten only after
  // the normalisation that read it (img_read_ev_; an event never recorded is already complete).
  void upload_images(float* dst, const uint8_t* src, int N, int H, int W) override {
    outside_capture("upload_images");
    if (N <= 0) return;
    const size_t bytes = size_t(N) * H * W * 3;
    const int i = int(images_uploaded_ % 2);
    // Both buffers grow together, on the first batch: a steady-state step allocates nothing.
    for (int j : {i, 1 - i}) grow_buffer(img_stage_[j], img_stage_size_[j], bytes, "the image staging buffer", false);
    VB_CUDA_CHECK(cudaStreamWaitEvent(copy_st_, img_read_ev_[i], 0));
    VB_CUDA_CHECK(cudaMemcpyAsync(img_stage_[i], src, bytes, cudaMemcpyHostToDevice, copy_st_));
    VB_CUDA_CHECK(cudaEventRecord(img_copied_ev_[i], copy_st_));
    ++images_uploaded_;
    VB_CUDA_CHECK(cudaStreamWaitEvent(st_, img_copied_ev_[i], 0));
    const auto* px = static_cast<const uint8_t*>(img_stage_[i]);
    if (bf16())
      cuda::normalize_frames_nhwc_bf16(st_, N, H, W, px, B(dst));
    else if (nhwc_)
      cuda::normalize_frames_nhwc(st_, N, H, W, px, dst);
    else
      cuda::normalize_frames(st_, N, H, W, px, dst);
    VB_CUDA_CHECK(cudaEventRecord(img_read_ev_[i], st_));
  }
  void download_activation(float* dst, const float* src, int N, int C, int H, int W) override {
    const size_t bytes = sizeof(float) * size_t(N) * C * H * W;
    if (!nhwc_) return download(dst, src, bytes);
    grow_buffer(stage_, stage_size_, bytes, "the activation staging buffer", false);
    if (bf16()) {
      grow_buffer(stage2_, stage2_size_, bytes, "the activation staging buffer", false);
      cuda::bf16_to_float(st_, int64_t(N) * C * H * W, B(src), static_cast<float*>(stage2_));
      src = static_cast<const float*>(stage2_);
    }
    cuda::nhwc_to_nchw(st_, N, C, H * W, src, static_cast<float*>(stage_));
    download(dst, stage_, bytes);
  }

  // ---- convolution ----
  // a, b, c: the direction's buffers as choose() takes them (fwd: x, w, y; bwd-data: dx, w, dy; bwd-filter:
  // x, dw, dy).
  // NHWC: w (OIHW) is permuted into the KRSC scratch first; the filter gradient is made there and permuted back.
  // A 1x1 filter is the same bytes in both layouts: used in place.
  // bf16: activations are bf16 in the model's buffers; the weights go through a bf16 KRSC copy (the float
  // master permuted, then rounded), and the filter gradient comes back from one (widened, then permuted).
  void conv_fwd(const ConvShape& s, const float* x, const float* w, float* y) override {
    if (bf16()) return conv_run(s, ConvDir::Fwd, x, bf16_weights(s, w), y);
    conv_run(s, ConvDir::Fwd, x, permuted(s) ? krsc_weights(s, w) : w, y);
  }
  void conv_bwd_data(const ConvShape& s, const float* dy, const float* w, float* dx) override {
    if (bf16()) return conv_run(s, ConvDir::BwdData, dx, bf16_weights(s, w), dy);
    conv_run(s, ConvDir::BwdData, dx, permuted(s) ? krsc_weights(s, w) : w, dy);
  }
  void conv_bwd_filter(const ConvShape& s, const float* x, const float* dy, float* dw) override {
    if (bf16()) {
      const int64_t n = int64_t(s.K) * s.C * s.R * s.S;
      vb::bf16* g = bf16_filter_scratch(s);
      conv_run(s, ConvDir::BwdFilter, x, g, dy);
      if (!permuted(s)) return cuda::bf16_to_float(st_, n, g, dw);
      float* krsc = krsc_scratch(s);
      cuda::bf16_to_float(st_, n, g, krsc);
      return cuda::nhwc_to_nchw(st_, s.K, s.C, s.R * s.S, krsc, dw);
    }
    if (!permuted(s)) return conv_run(s, ConvDir::BwdFilter, x, dw, dy);
    float* krsc = krsc_scratch(s);
    conv_run(s, ConvDir::BwdFilter, x, krsc, dy);
    cuda::nhwc_to_nchw(st_, s.K, s.C, s.R * s.S, krsc, dw);
  }

  // Evaluation: the batch norm folded into the weights (cuda::bn_fold_weights: the CPU backend's folded values,
  // into the filter scratch, KRSC in NHWC) and one cuDNN call, y = act(conv(x, w a) + residual + b)
  // (cudnnConvolutionBiasActivationForward) with the layer's forward algorithm. cuDNN fuses the identity only
  // with IMPLICIT_PRECOMP_GEMM: a layer without ReLU whose algorithm is another runs unfused (the convolution,
  // then bn_eval_fwd: the default) from its first call on. A layer whose fused call cuDNN refuses runs unfused
  // from then on, for that activation (said once on stderr unless the refusal is "not supported"). VB_CUDA_FOLD_BN=0 never fuses;
  // conv_bn_eval_fused() counts the fused calls (the tests read it).
  void conv_bn_eval(const ConvShape& s, const float* x, const float* w, const float* gamma, const float* beta,
                    const float* running_mean, const float* running_var, double eps, const float* residual,
                    bool relu, float* y) override {
    ConvPlan& p = plan(s);
    if (fold_bn_ && !bf16() && s.K <= kBnChannels && !p.unfused[relu] && fused_eval(s, p, x, w, gamma, beta, running_mean,
                                                                          running_var, eps, residual, relu, y)) {
      ++fused_evals_;
      return;
    }
    Backend::conv_bn_eval(s, x, w, gamma, beta, running_mean, running_var, eps, residual, relu, y);
  }
  size_t conv_bn_eval_fused() const override { return fused_evals_; }

  // ---- batch norm ----
  void bn_train_fwd(int N, int C, int H, int W, const float* x, const float* gamma, const float* beta,
                    const float* residual, bool relu, float* y, float* save_mean, float* save_invstd,
                    float* running_mean, float* running_var, double momentum, double eps) override {
    grow_bn_work(C);
    if (bf16()) {  // the output rounded, then the residual added and rounded, then ReLU (as autocast)
      VB_CHECK(!residual || residual != y, "bf16 batch norm: the output may not alias the residual");
      cuda::bn_nhwc_train_fwd<vb::bf16>(st_, int64_t(N) * H * W, C, B(x), gamma, beta, nullptr, relu && !residual,
                                        B(y), save_mean, save_invstd, running_mean, running_var, momentum, eps,
                                        bn_work_);
      return bf16_residual_relu(int64_t(N) * C * H * W, residual, relu, y);
    }
    if (nhwc_)
      return cuda::bn_nhwc_train_fwd<float>(st_, int64_t(N) * H * W, C, x, gamma, beta, residual, relu, y, save_mean,
                                            save_invstd, running_mean, running_var, momentum, eps, bn_work_);
    cuda::bn_train_fwd(st_, N, C, H * W, x, gamma, beta, residual, relu, y, save_mean, save_invstd, running_mean,
                       running_var, momentum, eps, bn_work_);
  }
  void bn_eval_fwd(int N, int C, int H, int W, const float* x, const float* gamma, const float* beta,
                   const float* running_mean, const float* running_var, double eps, const float* residual,
                   bool relu, float* y) override {
    if (bf16()) {
      VB_CHECK(!residual || residual != y, "bf16 batch norm: the output may not alias the residual");
      cuda::bn_nhwc_eval_fwd<vb::bf16>(st_, int64_t(N) * H * W, C, B(x), gamma, beta, running_mean, running_var, eps,
                                       nullptr, relu && !residual, B(y));
      return bf16_residual_relu(int64_t(N) * C * H * W, residual, relu, y);
    }
    if (nhwc_)
      return cuda::bn_nhwc_eval_fwd<float>(st_, int64_t(N) * H * W, C, x, gamma, beta, running_mean, running_var, eps,
                                           residual, relu, y);
    cuda::bn_eval_fwd(st_, N, C, H * W, x, gamma, beta, running_mean, running_var, eps, residual, relu, y);
  }
  void bn_apply(int N, int C, int H, int W, const float* x, const float* gamma, const float* beta,
                const float* save_mean, const float* save_invstd, bool relu, float* y) override {
    if (bf16())
      return cuda::bn_nhwc_apply<vb::bf16>(st_, int64_t(N) * H * W, C, B(x), gamma, beta, save_mean, save_invstd,
                                           nullptr, relu, B(y));
    if (nhwc_)
      return cuda::bn_nhwc_apply<float>(st_, int64_t(N) * H * W, C, x, gamma, beta, save_mean, save_invstd, nullptr,
                                        relu, y);
    cuda::bn_apply(st_, N, C, H * W, x, gamma, beta, save_mean, save_invstd, relu, y);
  }
  void bn_bwd(int N, int C, int H, int W, const float* x, const float* y, const float* dy, const float* gamma,
              const float* save_mean, const float* save_invstd, bool relu, float* dx, float* dresidual,
              float* dgamma, float* dbeta, float* scratch) override {
    grow_bn_work(C);
    if (bf16())
      return cuda::bn_nhwc_bwd<vb::bf16>(st_, int64_t(N) * H * W, C, B(x), B(y), B(dy), gamma, save_mean, save_invstd,
                                         relu, B(dx), B(dresidual), dgamma, dbeta, bn_work_);
    if (nhwc_)  // pass 2 reads the masked gradient from dresidual when there is one (no scratch needed)
      return cuda::bn_nhwc_bwd<float>(st_, int64_t(N) * H * W, C, x, y, dy, gamma, save_mean, save_invstd, relu, dx,
                                      dresidual, dgamma, dbeta, bn_work_);
    cuda::bn_bwd(st_, N, C, H * W, x, y, dy, gamma, save_mean, save_invstd, relu, dx, dresidual, dgamma, dbeta,
                 scratch, bn_work_);
  }

  // ---- pooling ----
  void maxpool_fwd(int N, int C, int H, int W, int k, int s, int p, const float* x, float* y) override {
    if (bf16()) return cuda::maxpool_nhwc_fwd<vb::bf16>(st_, N, H, W, C, k, s, p, B(x), B(y));
    if (nhwc_) return cuda::maxpool_nhwc_fwd<float>(st_, N, H, W, C, k, s, p, x, y);
    cuda::maxpool_fwd(st_, N, C, H, W, k, s, p, x, y);
  }
  void maxpool_bwd(int N, int C, int H, int W, int k, int s, int p, const float* x, const float* y,
                   const float* dy, float* dx) override {
    if (bf16()) return cuda::maxpool_nhwc_bwd<vb::bf16>(st_, N, H, W, C, k, s, p, B(x), B(dy), B(dx));
    if (nhwc_) return cuda::maxpool_nhwc_bwd<float>(st_, N, H, W, C, k, s, p, x, dy, dx);
    cuda::maxpool_bwd(st_, N, C, H, W, k, s, p, x, y, dy, dx);
  }
  void avgpool_fwd(int N, int C, int H, int W, const float* x, float* y) override {
    if (bf16()) {  // into the head, which stays float: the bf16 mean, widened
      vb::bf16* h = head_scratch(int64_t(N) * C);
      cuda::avgpool_nhwc_fwd<vb::bf16>(st_, N, H * W, C, B(x), h);
      return cuda::bf16_to_float(st_, int64_t(N) * C, h, y);
    }
    if (nhwc_) return cuda::avgpool_nhwc_fwd<float>(st_, N, H * W, C, x, y);
    cuda::avgpool_fwd(st_, N, C, H * W, x, y);
  }
  void avgpool_bwd(int N, int C, int H, int W, const float* dy, float* dx) override {
    if (bf16()) {  // dy from the float head (bf16 values: exact), dy / HW rounded once
      vb::bf16* h = head_scratch(int64_t(N) * C);
      cuda::float_to_bf16(st_, int64_t(N) * C, dy, h);
      return cuda::avgpool_nhwc_bwd<vb::bf16>(st_, N, H * W, C, h, B(dx));
    }
    if (nhwc_) return cuda::avgpool_nhwc_bwd<float>(st_, N, H * W, C, dy, dx);
    cuda::avgpool_bwd(st_, N, C, H * W, dy, dx);
  }

  // ---- the head: row-major matrices through column-major cuBLAS ----
  // A row-major [M, K] buffer is the column-major [K, M] matrix, so y = x w^T (row-major) is
  // y^T = w x^T (column-major): gemm(T, N) with w seen as [IN, OUT] and x as [IN, N].
  // bf16: the head's buffers stay float32 holding bf16 values; its operands are rounded copies and its outputs
  // rounded in place (as autocast's bf16 linear layer with float32 accumulation).
  void linear_fwd(int N, int IN, int OUT, const float* x, const float* w, const float* b, float* y) override {
    if (bf16()) {
      const float* xr = rounded(0, x, int64_t(N) * IN);
      const float* wr = rounded(1, w, int64_t(OUT) * IN);
      const float* br = b ? rounded(2, b, OUT) : nullptr;
      linear_fwd_f32(N, IN, OUT, xr, wr, br, y);
      return cuda::round_to_bf16(st_, int64_t(N) * OUT, y, y);
    }
    linear_fwd_f32(N, IN, OUT, x, w, b, y);
  }
  void linear_fwd_f32(int N, int IN, int OUT, const float* x, const float* w, const float* b, float* y) {
    const float one = 1.f, zero = 0.f;
    VB_CUBLAS_CHECK(cublasSgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, OUT, N, IN, &one, w, IN, x, IN, &zero, y, OUT));
    if (b) cuda::bias_add(st_, N, OUT, b, y);
  }
  void linear_bwd(int N, int IN, int OUT, const float* x, const float* w, const float* dy, float* dx, float* dw,
                  float* db) override {
    if (bf16()) {
      linear_bwd_f32(N, IN, OUT, rounded(0, x, int64_t(N) * IN), rounded(1, w, int64_t(OUT) * IN),
                     rounded(2, dy, int64_t(N) * OUT), dx, dw, db);
      if (dx) cuda::round_to_bf16(st_, int64_t(N) * IN, dx, dx);
      if (dw) cuda::round_to_bf16(st_, int64_t(OUT) * IN, dw, dw);
      if (db) cuda::round_to_bf16(st_, OUT, db, db);
      return;
    }
    linear_bwd_f32(N, IN, OUT, x, w, dy, dx, dw, db);
  }
  void linear_bwd_f32(int N, int IN, int OUT, const float* x, const float* w, const float* dy, float* dx, float* dw,
                      float* db) {
    const float one = 1.f, zero = 0.f;
    // dx [N, IN] = dy w: column-major dx^T [IN, N] = w^T [IN, OUT] dy^T [OUT, N].
    if (dx) VB_CUBLAS_CHECK(cublasSgemm(blas_, CUBLAS_OP_N, CUBLAS_OP_N, IN, N, OUT, &one, w, IN, dy, OUT, &zero, dx, IN));
    // dw [OUT, IN] = dy^T x: column-major dw^T [IN, OUT] = x^T [IN, N] dy [N, OUT].
    if (dw) VB_CUBLAS_CHECK(cublasSgemm(blas_, CUBLAS_OP_N, CUBLAS_OP_T, IN, OUT, N, &one, x, IN, dy, OUT, &zero, dw, IN));
    if (db) cuda::bias_grad(st_, N, OUT, dy, db);
  }
  void relu_fwd(int64_t n, const float* x, float* y) override { cuda::relu_fwd(st_, n, x, y); }
  void relu_bwd(int64_t n, const float* y, const float* dy, float* dx) override { cuda::relu_bwd(st_, n, y, dy, dx); }
  // add joins activation gradients (bf16 in bf16 mode); relu is the head's (float in every mode).
  void add(int64_t n, const float* a, const float* b, float* y) override {
    if (bf16()) return cuda::add_bf16(st_, n, B(a), B(b), B(y));
    cuda::add(st_, n, a, b, y);
  }

  void softmax_wce(int N, int C, const float* logits, const int64_t* labels, const float* class_weights,
                   float* probs, float* dlogits, float* loss) override {
    cuda::softmax_wce(st_, N, C, logits, labels, class_weights, probs, dlogits, loss);
    if (bf16() && dlogits) cuda::round_to_bf16(st_, int64_t(N) * C, dlogits, dlogits);  // the cast back to bf16
  }
  void adamw(int64_t n, float* p, const float* g, float* m, float* v, double lr, double beta1, double beta2,
             double eps, double weight_decay, int64_t step) override {
    cuda::AdamScalars a = cuda::adam_scalars(lr, beta1, beta2, eps, weight_decay, step);
    if (n <= 0) return;  // no launch, in a capture or out of one
    if (replaying_) {
      // Inside replay's update: the graph's launch over this range takes the new scalars at its next launch
      // (launches already queued keep theirs).
      auto it = adam_nodes_.find(p);
      VB_CHECK(it != adam_nodes_.end() && it->second.n == n && it->second.g == g && it->second.m == m &&
                   it->second.v == v && !it->second.updated,
               "replay: an AdamW update over ", n, " parameters that the captured step did not launch (or twice)");
      void* args[] = {&n, &p, &g, &m, &v, &a};  // adamw_kernel's parameters, in order
      cudaKernelNodeParams kp{};
      kp.func = const_cast<void*>(cuda::adamw_kernel_function());
      cuda::adamw_launch_shape(n, &kp.gridDim, &kp.blockDim);
      kp.sharedMemBytes = 0;
      kp.kernelParams = args;
      kp.extra = nullptr;
      VB_CUDA_CHECK(cudaGraphExecKernelNodeSetParams(graph_exec_, it->second.node, &kp));
      it->second.updated = true;
      return;
    }
    cuda::adamw(st_, n, p, g, m, v, a);
    if (!capturing_) return;
    // Recording: the launch just made is the capture's one open end; keep its node for the replays' updates.
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    const cudaGraphNode_t* deps = nullptr;
    size_t ndeps = 0;
    VB_CUDA_CHECK(cudaStreamGetCaptureInfo(st_, &status, nullptr, nullptr, &deps, nullptr, &ndeps));
    VB_CHECK(status == cudaStreamCaptureStatusActive && ndeps == 1 && deps,
             "capture: cannot find the AdamW launch's node in the recording");
    VB_CHECK(!adam_nodes_.count(p), "capture: two AdamW launches over the same parameters");
    adam_nodes_[p] = AdamNode{deps[0], n, g, m, v, false};
  }

  // ---- the captured step ----
  bool can_capture() const override { return true; }
  bool has_capture() const override { return graph_exec_ != nullptr; }
  // Records into locals, kept only once the graph has been instantiated and launched: any failure leaves no
  // capture behind (and the error is rethrown).
  void capture(const std::function<void()>& fn) override {
    drop_capture();
    adam_nodes_.clear();
    VB_CUDA_CHECK(cudaStreamBeginCapture(st_, cudaStreamCaptureModeThreadLocal));
    capturing_ = true;
    cudaGraph_t graph = nullptr;
    try {
      fn();
    } catch (...) {
      capturing_ = false;
      cudaStreamEndCapture(st_, &graph);  // ends the recording whatever went wrong; the error is fn's
      if (graph) cudaGraphDestroy(graph);
      cudaGetLastError();  // a capture-invalidated status is not fn's error: clear it
      adam_nodes_.clear();
      throw;
    }
    capturing_ = false;
    cudaError_t e = cudaStreamEndCapture(st_, &graph);
    const char* stage = "recording";
    cudaGraphExec_t exec = nullptr;
    if (e == cudaSuccess) stage = "instantiating", e = cudaGraphInstantiate(&exec, graph, 0);
    if (e == cudaSuccess) stage = "launching", e = cudaGraphLaunch(exec, st_);
    if (e != cudaSuccess) {
      if (exec) cudaGraphExecDestroy(exec);
      if (graph) cudaGraphDestroy(graph);
      cudaGetLastError();
      adam_nodes_.clear();
      fail(stage, " the captured training step as a CUDA graph failed: ", cudaGetErrorString(e));
    }
    graph_ = graph;
    graph_exec_ = exec;
  }
  void replay(const std::function<void()>& update) override {
    VB_CHECK(graph_exec_, "replay without a captured step");
    for (auto& kv : adam_nodes_) kv.second.updated = false;
    replaying_ = true;
    try {
      update();
    } catch (...) {
      replaying_ = false;
      throw;
    }
    replaying_ = false;
    for (const auto& kv : adam_nodes_)
      VB_CHECK(kv.second.updated, "replay: the captured AdamW launch over ", kv.second.n,
               " parameters was not given its new scalars");
    VB_CUDA_CHECK(cudaGraphLaunch(graph_exec_, st_));
  }
  // Never throws (it runs where memory goes: release, a growing buffer): a failing wait surfaces at the next
  // checked call. A launch in flight finishes before its graph goes.
  void drop_capture() override {
    if (!graph_exec_ && !graph_) return;
    cudaStreamSynchronize(st_);
    if (graph_exec_) cudaGraphExecDestroy(graph_exec_);
    if (graph_) cudaGraphDestroy(graph_);
    graph_exec_ = nullptr;
    graph_ = nullptr;
    adam_nodes_.clear();
  }

 private:
  // Device bytes held by this backend: allocations, workspaces and scratch (not the libraries' own state).
  void account(int64_t delta) {
    in_use_ = size_t(int64_t(in_use_) + delta);
    if (in_use_ > peak_) peak_ = in_use_;
  }

  // cudaMalloc with the one clear out-of-memory message (and set_memory_limit's limit); accounts the bytes.
  void* device_malloc(size_t bytes, const char* what) {
    VB_CHECK(!capturing_, "allocating ", bytes, " bytes for ", what,
             " inside a captured step (an op that had not run at this size before the capture)");
    void* p = nullptr;
    const bool over_limit = limit_ != 0 && in_use_ + bytes > limit_;
    const cudaError_t e = over_limit ? cudaErrorMemoryAllocation : cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();  // an allocation failure is not sticky: clear it so later calls do not report it
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      fail("CUDA out of memory allocating ", bytes, " bytes for ", what, " (", free_b >> 20, " MiB free of ",
           total_b >> 20, " MiB, ", in_use_ >> 20, " MiB held by vbtrain",
           over_limit ? ", over the limit of " + std::to_string(limit_ >> 20) + " MiB set for it" : std::string(),
           "): ", cudaGetErrorString(e));
    }
    account(int64_t(bytes));
    ++allocations_;
    return p;
  }

  // Replaces a device buffer by a larger one: the new one first, so that an out-of-memory leaves the old one
  // in place (and the backend usable); then the stream is drained, since queued work may still use the old.
  // graph_uses: a captured step may use the buffer (all but the upload and download staging buffers), so a
  // capture is dropped before the old one goes (Backend::has_capture).
  void grow_buffer(void*& buf, size_t& size, size_t bytes, const char* what, bool graph_uses = true) {
    if (bytes <= size) return;
    void* fresh = device_malloc(bytes, what);
    if (buf) {
      if (graph_uses) drop_capture();
      VB_CUDA_CHECK(cudaStreamSynchronize(st_));
      VB_CUDA_CHECK(cudaFree(buf));
      account(-int64_t(size));
    }
    buf = fresh;
    size = bytes;
  }

  // One scratch for both layouts' batch-norm kernels (NCHW: cuda::bn_work_floats; NHWC: bn_nhwc_work_bytes).
  void grow_bn_work(int C) {
    void* buf = bn_work_;
    size_t bytes = bn_work_floats_ * sizeof(float);
    const size_t need = nhwc_ ? (cuda::bn_nhwc_work_bytes(C) + sizeof(float) - 1) / sizeof(float) * sizeof(float)
                              : cuda::bn_work_floats(C) * sizeof(float);
    grow_buffer(buf, bytes, need, "batch norm's scratch");
    bn_work_ = static_cast<float*>(buf);
    bn_work_floats_ = bytes / sizeof(float);
  }

  // conv_bn_eval's fused path; false when it did not run (the caller then runs the layer unfused).
  bool fused_eval(const ConvShape& s, ConvPlan& p, const float* x, const float* w, const float* gamma,
                  const float* beta, const float* running_mean, const float* running_var, double eps,
                  const float* residual, bool relu, float* y) {
    const int d = int(ConvDir::Fwd);
    float* wf = krsc_scratch(s);
    cuda::bn_fold_weights(st_, s.K, s.C, s.R * s.S, w, gamma, beta, running_mean, running_var, eps, nhwc_, wf,
                          fold_bias_);
    if (!p.chosen[d]) resolve(s, p, ConvDir::Fwd, x, wf, y);
    const bool log = std::getenv("VB_CUDNN_LOG") != nullptr;
    if (!relu && p.algo[d] != CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM) {
      // The layer's algorithm is fixed from here on: unfused for good, so later calls skip the fold too.
      p.unfused[relu] = true;
      if (log)
        std::fprintf(stderr, "cudnn conv_bn_eval C%d %dx%d K%d %dx%d/%d: no ReLU with algo %d, not fused\n", s.C, s.H,
                     s.W, s.K, s.R, s.S, s.stride, p.algo[d]);
      return false;
    }
    if (!p.bias) {
      VB_CUDNN_CHECK(cudnnCreateTensorDescriptor(&p.bias));
      VB_CUDNN_CHECK(cudnnSetTensor4dDescriptor(p.bias, nhwc_ ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW,
                                                CUDNN_DATA_FLOAT, 1, s.K, 1, 1));
    }
    const float one = 1.f, zero = 0.f;
    VB_CUDNN_CHECK(cudnnSetConvolutionMathType(p.conv, p.math[d]));
    auto call = [&](bool propagate) {
      cudnnActivationDescriptor_t act = relu ? (propagate ? relu_ : relu_np_) : (propagate ? identity_ : identity_np_);
      return cudnnConvolutionBiasActivationForward(dnn_, &one, p.x, x, p.w, wf, p.conv,
                                                   cudnnConvolutionFwdAlgo_t(p.algo[d]), ws_, p.ws[d],
                                                   residual ? &one : &zero, p.y, residual ? residual : y, p.bias,
                                                   fold_bias_, act, p.y, y);
    };
    cudnnStatus_t st = call(fused_propagates_nan_);
    if (st == CUDNN_STATUS_NOT_SUPPORTED && fused_propagates_nan_ && call(false) == CUDNN_STATUS_SUCCESS) {
      // Refused only for the NaN propagation: from here on without it, said once.
      fused_propagates_nan_ = false;
      std::fprintf(stderr, "vbtrain: note: cuDNN's fused convolution + bias + activation refuses NaN propagation; "
                   "evaluation's fused ReLU now turns a NaN into 0 (the CPU path keeps it)\n");
      return true;
    }
    if (st == CUDNN_STATUS_SUCCESS) return true;
    p.unfused[relu] = true;
    // Said for every layer when logging or for another error; a refused ReLU layer at least once, since the fused
    // call is evaluation's fast path.
    if (st != CUDNN_STATUS_NOT_SUPPORTED || log || (relu && !told_relu_refusal_)) {
      told_relu_refusal_ = told_relu_refusal_ || relu;
      std::fprintf(stderr, "vbtrain: cuDNN refused the fused convolution + bias + %s (%s) for C%d %dx%d K%d %dx%d/%d "
                   "(algo %d); this layer's evaluation runs unfused%s\n", relu ? "ReLU" : "identity",
                   cudnnGetErrorString(st), s.C, s.H, s.W, s.K, s.R, s.S, s.stride, p.algo[d],
                   log ? "" : " (VB_CUDNN_LOG=1 names every such layer)");
    }
    return false;
  }

  // ---- bf16 mode (Precision::BF16, NHWC): activations are bf16 (the model sizes them by activation_element_bytes) ----
  bool bf16() const { return precision_ == Precision::BF16; }
  // What a recording (capture) may not contain: a host wait, a copy to or from the host, an allocation.
  void outside_capture(const char* what) const { VB_CHECK(!capturing_, what, " inside a captured step"); }
  static vb::bf16* B(float* p) { return reinterpret_cast<vb::bf16*>(p); }
  static const vb::bf16* B(const float* p) { return reinterpret_cast<const vb::bf16*>(p); }
  // The layer's weights as bf16 KRSC (1x1: the OIHW order is the same): permuted in float, then rounded.
  const vb::bf16* bf16_weights(const ConvShape& s, const float* w) {
    vb::bf16* out = bf16_filter_scratch(s);
    const float* krsc = permuted(s) ? krsc_weights(s, w) : w;
    cuda::float_to_bf16(st_, int64_t(s.K) * s.C * s.R * s.S, krsc, out);
    return out;
  }
  vb::bf16* bf16_filter_scratch(const ConvShape& s) {
    grow_buffer(wt16_, wt16_size_, sizeof(vb::bf16) * size_t(s.K) * s.C * s.R * s.S, "the bf16 filter scratch");
    return static_cast<vb::bf16*>(wt16_);
  }
  vb::bf16* head_scratch(int64_t n) {
    grow_buffer(head16_, head16_size_, sizeof(vb::bf16) * size_t(n), "the bf16 head scratch");
    return static_cast<vb::bf16*>(head16_);
  }
  // A rounded float copy of n values in scratch slot i (the head's operands).
  const float* rounded(int i, const float* p, int64_t n) {
    grow_buffer(round_[i], round_size_[i], sizeof(float) * size_t(n), "the bf16 operand scratch");
    cuda::round_to_bf16(st_, n, p, static_cast<float*>(round_[i]));
    return static_cast<const float*>(round_[i]);
  }
  // After a bf16 batch norm written without its residual: + residual rounded, then ReLU. (So y must not alias the
  // residual in bf16, which the float kernels allow; the model never does it.)
  void bf16_residual_relu(int64_t n, const float* residual, bool relu, float* y) {
    if (!residual) return;  // the ReLU, if any, was the batch norm kernel's
    cuda::add_bf16(st_, n, B(y), B(residual), B(y));
    if (relu) cuda::relu_bf16(st_, n, B(y), B(y));
  }

  // NHWC: whether a layer's filter goes through the KRSC scratch (not a 1x1 one); the scratch (sized in the
  // constructor for ResNet-50, grown for a larger filter), and w permuted into it.
  bool permuted(const ConvShape& s) const { return nhwc_ && s.R * s.S > 1; }
  float* krsc_scratch(const ConvShape& s) {
    grow_buffer(wt_, wt_size_, sizeof(float) * size_t(s.K) * s.C * s.R * s.S, "the filter scratch");
    return static_cast<float*>(wt_);
  }
  const float* krsc_weights(const ConvShape& s, const float* w) {
    float* krsc = krsc_scratch(s);
    cuda::nchw_to_nhwc(st_, s.K, s.C, s.R * s.S, w, krsc);
    return krsc;
  }

  // Only while an algorithm is being chosen (or a reused one needs more for its actual shape).
  void grow_workspace(size_t bytes) { grow_buffer(ws_, ws_size_, bytes, "the cuDNN workspace"); }

  // One convolution: the layer's algorithm (resolved once per exact shape), then the call. A choice reused
  // from a larger batch that cuDNN still refuses at run time is replaced by a search for this shape.
  void conv_run(const ConvShape& s, ConvDir dir, const void* a, const void* b, const void* c) {
    ConvPlan& p = plan(s);
    const int d = int(dir);
    if (!p.chosen[d]) resolve(s, p, dir, a, b, c);
    cudnnStatus_t st = conv_call(p, dir, a, b, c);
    if (st != CUDNN_STATUS_SUCCESS && p.reused[d]) {
      search(s, p, dir, a, b, c);
      st = conv_call(p, dir, a, b, c);
    }
    VB_CUDNN_CHECK(st);
  }

  cudnnStatus_t conv_call(ConvPlan& p, ConvDir dir, const void* a, const void* b, const void* c) {
    const int d = int(dir);
    const float one = 1.f, zero = 0.f;
    VB_CUDNN_CHECK(cudnnSetConvolutionMathType(p.conv, p.math[d]));
    if (dir == ConvDir::Fwd)
      return cudnnConvolutionForward(dnn_, &one, p.x, a, p.w, b, p.conv, cudnnConvolutionFwdAlgo_t(p.algo[d]), ws_,
                                     p.ws[d], &zero, p.y, const_cast<void*>(c));
    if (dir == ConvDir::BwdData)
      return cudnnConvolutionBackwardData(dnn_, &one, p.w, b, p.y, c, p.conv,
                                          cudnnConvolutionBwdDataAlgo_t(p.algo[d]), ws_, p.ws[d], &zero, p.x,
                                          const_cast<void*>(a));
    return cudnnConvolutionBackwardFilter(dnn_, &one, p.x, a, p.y, c, p.conv,
                                          cudnnConvolutionBwdFilterAlgo_t(p.algo[d]), ws_, p.ws[d], &zero, p.w,
                                          const_cast<void*>(b));
  }

  ConvLayerKey layer_key(const ConvShape& s, ConvDir dir) const {
    return ConvLayerKey{s.C, s.H, s.W, s.K, s.R, s.S, s.stride, s.pad, int(precision_), deterministic_ ? 1 : 0,
                        int(dir)};
  }

  // cuDNN's workspace for (algorithm, math) on this exact shape; false when cuDNN does not support it here.
  bool workspace_for(ConvPlan& p, ConvDir dir, int algo, cudnnMathType_t math, size_t* ws) {
    VB_CUDNN_CHECK(cudnnSetConvolutionMathType(p.conv, math));
    cudnnStatus_t st;
    if (dir == ConvDir::Fwd)
      st = cudnnGetConvolutionForwardWorkspaceSize(dnn_, p.x, p.w, p.conv, p.y, cudnnConvolutionFwdAlgo_t(algo), ws);
    else if (dir == ConvDir::BwdData)
      st = cudnnGetConvolutionBackwardDataWorkspaceSize(dnn_, p.w, p.y, p.conv, p.x,
                                                        cudnnConvolutionBwdDataAlgo_t(algo), ws);
    else
      st = cudnnGetConvolutionBackwardFilterWorkspaceSize(dnn_, p.x, p.y, p.conv, p.w,
                                                          cudnnConvolutionBwdFilterAlgo_t(algo), ws);
    return st == CUDNN_STATUS_SUCCESS;
  }

  // The algorithm of (shape, direction): the layer's choice from a batch >= N when cuDNN accepts it for this
  // shape within the workspace limit, else a search at this batch.
  void resolve(const ConvShape& s, ConvPlan& p, ConvDir dir, const void* a, const void* b, const void* c) {
    const int d = int(dir);
    if (auto hit = algo_cache_.find(layer_key(s, dir), s.N)) {
      const cudnnMathType_t math = cudnnMathType_t(hit->choice.math);
      size_t ws = 0;
      if (workspace_for(p, dir, hit->choice.algo, math, &ws) && ws <= kMaxConvWorkspace) {
        grow_workspace(ws);  // a no-op in practice: a smaller batch does not need more than the searched one
        p.algo[d] = hit->choice.algo;
        p.math[d] = math;
        p.ws[d] = ws;
        p.chosen[d] = true;
        p.reused[d] = hit->batch != s.N;
        if (std::getenv("VB_CUDNN_LOG"))
          std::fprintf(stderr, "cudnn %s %s N%d C%d %dx%d K%d %dx%d/%d: algo %d of batch %d reused, workspace %.1f MiB\n",
                       precision_name(precision_), kDirNames[d], s.N, s.C, s.H, s.W, s.K, s.R, s.S, s.stride,
                       hit->choice.algo, hit->batch, double(ws) / (1 << 20));
        return;
      }
    }
    search(s, p, dir, a, b, c);
  }

  void search(const ConvShape& s, ConvPlan& p, ConvDir dir, const void* a, const void* b, const void* c) {
    VB_CHECK(!capturing_, "a cuDNN algorithm search inside a captured step (a layer that had not run at this size "
             "before the capture)");
    const int d = int(dir);
    choose(s, p, dir, a, b, c);
    p.reused[d] = false;
    algo_cache_.record(layer_key(s, dir), s.N, ConvAlgoChoice{p.algo[d], int(p.math[d]), p.ws[d]});
  }

  ConvPlan& plan(const ConvShape& s) {
    const ConvKey key{s.N, s.C, s.H, s.W, s.K, s.R, s.S, s.stride, s.pad, int(precision_), deterministic_ ? 1 : 0};
    auto it = plans_.find(key);
    if (it != plans_.end()) return *it->second;
    VB_CHECK(s.N > 0 && s.C > 0 && s.H > 0 && s.W > 0 && s.K > 0 && s.R > 0 && s.S > 0 && s.stride > 0 &&
                 s.pad >= 0 && s.P() > 0 && s.Q() > 0,
             "conv: bad shape N=", s.N, " C=", s.C, " H=", s.H, " W=", s.W, " K=", s.K, " R=", s.R, " S=", s.S,
             " stride=", s.stride, " pad=", s.pad);
    auto p = std::make_unique<ConvPlan>();
    VB_CUDNN_CHECK(cudnnCreateTensorDescriptor(&p->x));
    VB_CUDNN_CHECK(cudnnCreateTensorDescriptor(&p->y));
    VB_CUDNN_CHECK(cudnnCreateFilterDescriptor(&p->w));
    VB_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&p->conv));
    // NHWC: activations NHWC and the filter KRSC (cuDNN's NHWC filter format), so no transposes inside cuDNN.
    const cudnnTensorFormat_t f = nhwc_ ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW;
    // bf16: bf16 activations and filters, float accumulation (the convolution descriptor's compute type).
    const cudnnDataType_t dt = bf16() ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
    VB_CUDNN_CHECK(cudnnSetTensor4dDescriptor(p->x, f, dt, s.N, s.C, s.H, s.W));
    VB_CUDNN_CHECK(cudnnSetTensor4dDescriptor(p->y, f, dt, s.N, s.K, s.P(), s.Q()));
    VB_CUDNN_CHECK(cudnnSetFilter4dDescriptor(p->w, dt, f, s.K, s.C, s.R, s.S));
    VB_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(p->conv, s.pad, s.pad, s.stride, s.stride, 1, 1,
                                                   CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
    int n = 0, c = 0, h = 0, w = 0;
    VB_CUDNN_CHECK(cudnnGetConvolution2dForwardOutputDim(p->conv, p->x, p->w, &n, &c, &h, &w));
    VB_CHECK(n == s.N && c == s.K && h == s.P() && w == s.Q(), "conv: cuDNN output ", n, "x", c, "x", h, "x", w,
             " differs from ", s.N, "x", s.K, "x", s.P(), "x", s.Q());
    ConvPlan& ref = *p;
    plans_.emplace(key, std::move(p));
    return ref;
  }

  bool acceptable(const Candidate& c) const {
    if (c.status != CUDNN_STATUS_SUCCESS || c.memory > kMaxConvWorkspace) return false;
    if (deterministic_ && !c.deterministic) return false;  // --deterministic: bit-reproducible algorithms only
    // Never down-conversion to fp16/bf16. Strict fp32 also refuses tensor-op results; cuDNN may label its
    // plain-FMA results CUDNN_DEFAULT_MATH, so those stay, and the call runs with CUDNN_FMA_MATH (as PyTorch
    // does with TF32 off).
    if (c.math == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION) return false;
    return precision_ != Precision::FP32 || c.math != CUDNN_TENSOR_OP_MATH;  // tf32 and bf16: tensor cores
  }

  // Heuristics first (to size the workspace for the plausible candidates), then cuDNN times every candidate
  // once on the real buffers; the fastest acceptable one is kept for this (shape, direction, precision).
  // a, b, c: the direction's buffers (fwd: x, w, y; bwd-data: dx, w, dy; bwd-filter: x, dw, dy); the
  // direction's output is overwritten by the timing runs and then written by the real call.
  void choose(const ConvShape& s, ConvPlan& p, ConvDir dir, const void* a, const void* b, const void* c) {
    const int d = int(dir);
    VB_CUDNN_CHECK(cudnnSetConvolutionMathType(
        p.conv, precision_ == Precision::FP32 ? CUDNN_FMA_MATH : CUDNN_TENSOR_OP_MATH));
    std::vector<Candidate> heur;
    int maxc = 0, got = 0;
    if (dir == ConvDir::Fwd) {
      VB_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithmMaxCount(dnn_, &maxc));
      std::vector<cudnnConvolutionFwdAlgoPerf_t> r(static_cast<size_t>(maxc));
      VB_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(dnn_, p.x, p.w, p.conv, p.y, maxc, &got, r.data()));
      heur = candidates(r.data(), got);
    } else if (dir == ConvDir::BwdData) {
      VB_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithmMaxCount(dnn_, &maxc));
      std::vector<cudnnConvolutionBwdDataAlgoPerf_t> r(static_cast<size_t>(maxc));
      VB_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithm_v7(dnn_, p.w, p.y, p.conv, p.x, maxc, &got, r.data()));
      heur = candidates(r.data(), got);
    } else {
      VB_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(dnn_, &maxc));
      std::vector<cudnnConvolutionBwdFilterAlgoPerf_t> r(static_cast<size_t>(maxc));
      VB_CUDNN_CHECK(
          cudnnGetConvolutionBackwardFilterAlgorithm_v7(dnn_, p.x, p.y, p.conv, p.w, maxc, &got, r.data()));
      heur = candidates(r.data(), got);
    }
    size_t need = 0;
    for (const Candidate& h : heur)
      if (acceptable(h) && h.memory > need) need = h.memory;
    grow_workspace(need);

    // --deterministic: no timing, so the choice (the heuristics' first acceptable deterministic candidate, a
    // fixed order for a given cuDNN and GPU) is the same in every run and after a resume.
    std::vector<Candidate> timed;
    if (!deterministic_) {
      if (dir == ConvDir::Fwd) {
        std::vector<cudnnConvolutionFwdAlgoPerf_t> r(static_cast<size_t>(maxc));
        VB_CUDNN_CHECK(cudnnFindConvolutionForwardAlgorithmEx(dnn_, p.x, a, p.w, b, p.conv, p.y, const_cast<void*>(c),
                                                              maxc, &got, r.data(), ws_, ws_size_));
        timed = candidates(r.data(), got);
      } else if (dir == ConvDir::BwdData) {
        std::vector<cudnnConvolutionBwdDataAlgoPerf_t> r(static_cast<size_t>(maxc));
        VB_CUDNN_CHECK(cudnnFindConvolutionBackwardDataAlgorithmEx(dnn_, p.w, b, p.y, c, p.conv, p.x,
                                                                   const_cast<void*>(a), maxc, &got, r.data(), ws_,
                                                                   ws_size_));
        timed = candidates(r.data(), got);
      } else {
        std::vector<cudnnConvolutionBwdFilterAlgoPerf_t> r(static_cast<size_t>(maxc));
        VB_CUDNN_CHECK(cudnnFindConvolutionBackwardFilterAlgorithmEx(dnn_, p.x, a, p.y, c, p.conv, p.w,
                                                                     const_cast<void*>(b), maxc, &got, r.data(), ws_,
                                                                     ws_size_));
        timed = candidates(r.data(), got);
      }
    }
    // Timed results come fastest first, then the heuristics' order as a fallback. The first candidate whose
    // (algorithm, math type) cuDNN accepts as it will run wins; its exact workspace is then reserved.
    std::vector<Candidate> order = timed;
    order.insert(order.end(), heur.begin(), heur.end());
    for (const Candidate& c : order) {
      if (!acceptable(c) || c.memory > ws_size_) continue;
      const cudnnMathType_t math = precision_ == Precision::FP32 ? CUDNN_FMA_MATH : c.math;
      size_t ws = 0;
      if (!workspace_for(p, dir, c.algo, math, &ws) || ws > kMaxConvWorkspace) continue;
      grow_workspace(ws);
      p.algo[d] = c.algo;
      p.math[d] = math;
      p.ws[d] = ws;
      p.chosen[d] = true;
      if (std::getenv("VB_CUDNN_LOG"))  // which algorithm each layer got, for performance work
        std::fprintf(stderr, "cudnn %s %s N%d C%d %dx%d K%d %dx%d/%d: algo %d math %d workspace %.1f MiB, %.3f ms\n",
                     precision_name(precision_), kDirNames[d], s.N, s.C, s.H, s.W, s.K, s.R, s.S, s.stride, c.algo,
                     int(math), double(ws) / (1 << 20), double(c.time));
      return;
    }
    fail("conv: no cuDNN ", kDirNames[d], " algorithm for ", precision_name(precision_), " N=", s.N, " C=", s.C,
         " ", s.H, "x", s.W, " K=", s.K, " ", s.R, "x", s.S, "/", s.stride, " within the ", kMaxConvWorkspace >> 20,
         " MiB workspace limit");
  }

  int dev_;
  bool nhwc_;  // activation layout NHWC (filters KRSC for cuDNN), else NCHW
  bool deterministic_ = false;
  cudaStream_t st_ = nullptr;
  cudnnHandle_t dnn_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  void* blas_ws_ = nullptr;
  void* ws_ = nullptr;  // cuDNN workspace shared by every convolution
  size_t ws_size_ = 0;
  float* bn_work_ = nullptr;
  size_t bn_work_floats_ = 0;
  void* stage_ = nullptr;  // NHWC: upload_activation / download_activation's NCHW staging buffer
  size_t stage_size_ = 0;
  void* stage2_ = nullptr;  // bf16: their float NHWC staging buffer
  size_t stage2_size_ = 0;
  // bf16 mode's scratch: the layer's bf16 KRSC filter, the pooled features, the head's rounded operands.
  void* wt16_ = nullptr;
  size_t wt16_size_ = 0;
  void* head16_ = nullptr;
  size_t head16_size_ = 0;
  void* round_[3] = {};
  size_t round_size_[3] = {};
  // upload_images: the copy stream, its two uint8 staging buffers (taken in turn) and their events.
  cudaStream_t copy_st_ = nullptr;
  void* img_stage_[2] = {};
  size_t img_stage_size_[2] = {};
  cudaEvent_t img_copied_ev_[2] = {}, img_read_ev_[2] = {};
  int64_t images_uploaded_ = 0;
  cudaEvent_t download_ev_[kDownloadTickets] = {};  // download_async: the event after ticket t's copy, t % 8
  // The captured step (capture / replay): the graph, its executable, and its AdamW launches by parameter range.
  struct AdamNode {
    cudaGraphNode_t node = nullptr;
    int64_t n = 0;
    const float* g = nullptr;
    float *m = nullptr, *v = nullptr;
    bool updated = false;  // given its scalars in the current replay's update
  };
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t graph_exec_ = nullptr;
  std::map<const float*, AdamNode> adam_nodes_;
  bool replaying_ = false, capturing_ = false;
  size_t adam_updates_ = 0;
  void* wt_ = nullptr;  // one layer's filter: KRSC (NHWC), or folded for evaluation
  size_t wt_size_ = 0;
  float* fold_bias_ = nullptr;  // conv_bn_eval's folded bias, kBnChannels floats
  cudnnActivationDescriptor_t relu_ = nullptr, identity_ = nullptr;  // conv_bn_eval's activations
  cudnnActivationDescriptor_t relu_np_ = nullptr, identity_np_ = nullptr;  // the same, NaN not propagated
  bool fused_propagates_nan_ = true;  // false once cuDNN refused the fused call only for NaN propagation
  bool told_relu_refusal_ = false;
  size_t fused_evals_ = 0;  // conv_bn_eval calls that ran fused
  // VB_CUDA_FOLD_BN=0: evaluation runs convolution then batch norm (for comparisons, or should cuDNN's fused
  // call misbehave on some GPU).
  bool fold_bn_ = [] {
    const char* e = std::getenv("VB_CUDA_FOLD_BN");
    return !(e && std::string(e) == "0");
  }();
  std::string desc_;
  std::map<ConvKey, std::unique_ptr<ConvPlan>> plans_;
  std::map<void*, size_t> sizes_;  // live allocations, for release and the memory figures
  size_t in_use_ = 0, peak_ = 0, allocations_ = 0;
  size_t limit_ = 0;  // set_memory_limit; 0: none
  ConvAlgoCache algo_cache_;
  float* scalar_host_ = nullptr;  // kScalarSlots page-locked floats
  cudaEvent_t scalar_ev_[kScalarSlots] = {};
  int64_t scalar_pushed_ = 0, scalar_taken_ = 0;  // slots filled and read so far (slot = count % kScalarSlots)
  cudaEvent_t upload_ev_ = nullptr;  // recorded after the latest upload
};

}  // namespace

bool cuda_available() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear it: no device is an answer, not an error state
    return false;
  }
  return n > 0;
}

namespace {
void check_cuda_device(int device_index) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    fail("no CUDA device: ", cudaGetErrorString(e));
  }
  if (n == 0) fail("no CUDA device: the driver sees none");
  if (device_index < 0 || device_index >= n)
    fail("no CUDA device: index ", device_index, " requested, ", n, " visible");
}
}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device_index, Layout layout) {
  check_cuda_device(device_index);
  return std::make_unique<CudaBackend>(device_index, layout);
}
std::unique_ptr<Backend> make_cuda_backend(int device_index) {
  check_cuda_device(device_index);  // "no CUDA device" first, whatever VB_CUDA_LAYOUT says
  return std::make_unique<CudaBackend>(device_index, default_cuda_layout());
}

}  // namespace vb
