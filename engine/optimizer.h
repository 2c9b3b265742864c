// AdamW exactly as torch.optim.AdamW with its defaults (decoupled weight decay on every parameter, bias
// correction, a step count per parameter tensor), over the model's flat parameter buffer; and StepLR as
// torch.optim.lr_scheduler.StepLR (the learning rate multiplied by gamma every step_size epochs, computed by
// the same chain of multiplications so that it matches PyTorch bit for bit).
#pragma once
#include <cstdint>
#include <vector>

#include "engine/model.h"
#include "engine/state_dict.h"

namespace vb {

struct AdamWOptions {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;
};

template <class T>
class AdamWT {
 public:
  AdamWT(ModelT<T>& model, AdamWOptions opt);
  ~AdamWT();
  AdamWT(const AdamWT&) = delete;
  AdamWT& operator=(const AdamWT&) = delete;

  // One update of every parameter that has a gradient this step (only the head while the backbone is
  // frozen: PyTorch skips parameters whose grad is None, their step counts included).
  void step(double lr);
  const AdamWOptions& options() const { return opt_; }
  // Step count of each parameter tensor, in the model's parameter order.
  const std::vector<int64_t>& steps() const { return steps_; }

  // State: "exp_avg" and "exp_avg_sq" (flat, the model's parameter order) and "step" (per tensor).
  StateDict state_dict();
  void load_state_dict(const StateDict& sd, const std::string& source);
  // PyTorch's per-parameter state (index order = named_parameters() order), e.g. from the notebook.
  void load_torch_state(const std::vector<HostTensor>& exp_avg, const std::vector<HostTensor>& exp_avg_sq,
                        const std::vector<int64_t>& steps, const std::string& source);

 private:
  ModelT<T>& model_;
  AdamWOptions opt_;
  T* m_ = nullptr;  // (n_params)
  T* v_ = nullptr;  // (n_params)
  std::vector<int64_t> steps_;      // per parameter tensor
  std::vector<int64_t> offsets_;    // per parameter tensor: first float
  std::vector<int64_t> sizes_;      // per parameter tensor: floats
  std::vector<bool> head_;          // per parameter tensor
};

using AdamW = AdamWT<float>;

class StepLR {
 public:
  StepLR(double base_lr, int step_size, double gamma);
  double lr() const { return lr_; }
  int64_t last_epoch() const { return last_epoch_; }
  void step();  // once per epoch, after validation (as the notebook)
  // State as PyTorch keeps it: the current learning rate and the epoch counter.
  void set_state(int64_t last_epoch, double lr) { last_epoch_ = last_epoch; lr_ = lr; }
  int step_size() const { return step_size_; }
  double gamma() const { return gamma_; }
  double base_lr() const { return base_lr_; }

 private:
  double base_lr_, gamma_, lr_;
  int step_size_;
  int64_t last_epoch_ = 0;
};

}  // namespace vb
