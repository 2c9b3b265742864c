// The B1 model: torchvision's ResNet (bottleneck v1.5: stride on the 3x3 convolution, 1x1 conv + BN
// downsample) with the notebook's head (Linear+ReLU per hidden layer, then Linear to the classes), wired by
// hand against a Backend. All memory comes from the backend once: parameters and their gradients (one flat
// allocation each, cut in model_tensor_specs() order), buffers (running statistics), and the activations
// planned for a (max batch, image size). forward() and backward() allocate nothing.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/image.h"
#include "engine/backend.h"
#include "engine/model_config.h"
#include "engine/state_dict.h"

namespace vb {

// Where one tensor of the table lives.
struct TensorSlot {
  TensorSpec spec;
  int64_t offset = 0;  // into params/grads (parameters) or buffers (running statistics), in floats
  int bn_index = -1;   // num_batches_tracked: which batch norm
};

// T: the element type (float to train; double for the CPU reference path of the golden checks).
template <class T>
class ModelT {
 public:
  ModelT(BackendT<T>& backend, const ModelConfig& cfg);
  ~ModelT();
  ModelT(const ModelT&) = delete;
  ModelT& operator=(const ModelT&) = delete;

  const ModelConfig& config() const { return cfg_; }
  BackendT<T>& backend() { return be_; }
  const std::vector<TensorSlot>& slots() const { return slots_; }

  // ---- parameters (flat, spec order of the Parameter entries; the head comes last) ----
  int64_t num_params() const { return n_params_; }
  int64_t num_head_params() const { return n_params_ - head_offset_; }
  int64_t head_offset() const { return head_offset_; }  // first T of the head in params()/grads()
  T* params() { return params_; }
  T* grads() { return grads_; }

  // torchvision's initialisation: conv kaiming_normal(fan_out, relu), BN weight 1 bias 0, running stats 0/1,
  // Linear as nn.Linear (uniform +-1/sqrt(fan_in) for weight and bias). Seeded, reproducible.
  void init_torchvision(uint64_t seed);
  // Loads every tensor of the table from `sd` (names without prefix); errors name `source` and list the
  // missing, unexpected and mis-shaped keys.
  void load_state_dict(const StateDict& sd, const std::string& source);
  StateDict state_dict();  // host copy, torchvision names, state_dict order

  // ---- running ----
  // Allocates the activations for batches of up to max_batch images of h x w (an int is a square size).
  // Call again to re-plan.
  void plan(int max_batch, data::ImageSize image_size);
  int max_batch() const { return max_batch_; }
  data::ImageSize image_size() const { return image_size_; }
  T* input() { return input_; }    // (max_batch, 3, S, S) in the backend's activation layout
  T* logits() { return logits_; }  // (max_batch, classes) row-major
  T* dlogits() { return dlogits_; }

  // Forward of the first n images of input(). train: batch statistics (and running-statistics update);
  // otherwise running statistics, each convolution and its batch norm as one backend op (conv_bn_eval).
  void forward(int n, bool train);
  // The host's part of a training forward alone: every batch norm's num_batches_tracked counts one batch. For a
  // replayed step (a CUDA graph), whose device work was recorded by an earlier forward.
  void count_training_forward();
  // Backward from dlogits() (n rows): parameter gradients into grads(), assigned. With a frozen backbone only
  // the head's gradients are computed (the backbone's are left as they are).
  void backward(int n);
  void set_backbone_frozen(bool frozen) { frozen_ = frozen; }
  bool backbone_frozen() const { return frozen_; }

 private:
  struct Conv;
  struct Bn;
  struct Block;
  struct Linear;

  void release_activations();
  // n elements of type T (statistics, the head) or, with activation = true, n activation elements
  // (Backend::activation_element_bytes each).
  T* act_alloc(int64_t n, bool activation = false);
  void check_plan() const;
  void head_forward(int n);  // global average pool and the head, from the last block's output

  BackendT<T>& be_;
  ModelConfig cfg_;
  std::vector<TensorSlot> slots_;
  int64_t n_params_ = 0, n_buffers_ = 0, head_offset_ = 0;
  T* params_ = nullptr;   // (n_params)
  T* grads_ = nullptr;    // (n_params)
  T* buffers_ = nullptr;  // (n_buffers) running means and variances
  std::vector<int64_t> num_batches_;  // one per batch norm, host side

  std::vector<std::unique_ptr<Conv>> convs_;
  std::vector<std::unique_ptr<Bn>> bns_;
  std::vector<Block> blocks_;
  std::vector<Linear> fcs_;
  Conv* stem_conv_ = nullptr;
  Bn* stem_bn_ = nullptr;

  int max_batch_ = 0;
  data::ImageSize image_size_{0};
  std::vector<void*> act_allocs_;
  size_t act_bytes_ = sizeof(T);  // Backend::activation_element_bytes() when plan() ran
  T* input_ = nullptr;
  T *stem_c_ = nullptr, *stem_a_ = nullptr, *pool_ = nullptr;  // stem conv out, bn+relu out, maxpool out
  T* feat_ = nullptr;                                          // (N, F) after the average pool
  std::vector<T*> fc_out_;                                      // per linear: its output (after ReLU)
  T *logits_ = nullptr, *dlogits_ = nullptr;
  T* g_[4] = {};      // gradient scratch of the stem and shallow stages (inside the deep stages' arena)
  T* gdeep_[4] = {};  // gradient scratch of the deep stages (the same as g_ when there is no split)
  int deep_from_ = 0;  // first stage whose activations live in the arena
  T *gfc_[2] = {};  // head gradient scratch, each (N, max head width)
  bool frozen_ = false;
};

using Model = ModelT<float>;

}  // namespace vb
