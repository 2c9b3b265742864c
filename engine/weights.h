// Weights in: any file a user may hold (a PyTorch .pth in the zip or legacy format, or safetensors) to a
// state dict with torchvision's names; the notebook's training checkpoint (model, AdamW and StepLR state);
// and the check of a state dict against the model's tensor table. Weights out are safetensors
// (save_safetensors in engine/state_dict.h).
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "engine/model_config.h"
#include "engine/pickle.h"
#include "engine/state_dict.h"

namespace vb {

enum class WeightFormat { PthZip, PthLegacy, Safetensors };
const char* weight_format_name(WeightFormat f);  // "PyTorch zip", "PyTorch legacy", "safetensors"
// By content, not by name. A file that is none of them: "<path>: not a checkpoint (...)".
WeightFormat detect_weight_format(const std::string& bytes, const std::string& path);

// Reads a state dict from any supported file. The tensors are found at the top level or nested under
// `state_dict`, `model_state_dict` or `model` (when that is a dict of tensors); a `module.` (DataParallel)
// and a `model.` (the notebook's wrapper) prefix shared by every key is stripped. Dtypes are kept as stored
// (num_batches_tracked stays int64). Errors name the file.
StateDict load_state_dict_file(const std::string& path);
// The same from the file's bytes; `format` (optional) receives what the file was.
StateDict load_state_dict_bytes(const std::string& bytes, const std::string& path, WeightFormat* format = nullptr);
// The state dict inside an unpickled checkpoint (the nesting and prefix rules above); errors name `path`.
StateDict state_dict_from_value(const pickle::ValuePtr& root, const std::string& path);
// Strips `module.` and `model.` when every key starts with it; returns what was stripped ("" if nothing).
std::string strip_key_prefixes(StateDict& sd);

// Every spec present with its shape, nothing else: one error listing the missing keys, the unexpected
// keys and the wrong shapes (each list cut after a few entries), naming `path`.
void check_against_specs(const StateDict& sd, const std::vector<TensorSpec>& specs, const std::string& path);

// The notebook's checkpoint dict (`epoch`, `model_state_dict`, `optimizer_state_dict`,
// `scheduler_state_dict`) as torch.optim.AdamW and StepLR write their state.
struct AdamWParamState {
  int64_t step = 0;  // PyTorch keeps it as a float tensor; it counts steps
  HostTensor exp_avg, exp_avg_sq;
};
struct AdamWParamGroup {
  double lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;
  std::optional<double> initial_lr;  // present once a scheduler has driven the group
  bool amsgrad = false, maximize = false;
  std::vector<int64_t> params;  // indices into the model's parameters in named_parameters() order
};
struct StepLRState {
  int64_t step_size = 0;
  double gamma = 0.1;
  std::vector<double> base_lrs;
  int64_t last_epoch = -1;
  std::vector<double> last_lr;  // `_last_lr`
  int64_t step_count = 0;       // `_step_count`
};
struct NotebookCheckpoint {
  int64_t epoch = 0;
  StateDict model;                                     // prefixes stripped
  std::map<int64_t, AdamWParamState> optimizer_state;  // by parameter index
  std::vector<AdamWParamGroup> param_groups;
  std::optional<StepLRState> scheduler;  // the notebook stores None when it runs without one
};
NotebookCheckpoint read_notebook_checkpoint(const std::string& path);

}  // namespace vb
