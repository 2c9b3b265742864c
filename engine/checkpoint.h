// Training checkpoints: one safetensors file holding the model's state dict (torchvision names), the AdamW
// state (`optimizer.exp_avg`, `optimizer.exp_avg_sq`, `optimizer.step`) and, in the metadata, the training
// position (`vbtrain.state`: epoch, step within the epoch, partial sums, scheduler, best so far) and the
// resolved configuration (`vbtrain.config`). Written atomically, so a crash leaves the previous file intact.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "engine/model.h"
#include "engine/optimizer.h"

namespace vb {

struct TrainPosition {
  int64_t epoch = 0;          // the epoch in progress (0-based); epochs before it are complete
  int64_t step_in_epoch = 0;  // training batches of `epoch` already applied (0 at an epoch boundary)
  double partial_loss_sum = 0;  // sum of the applied batches' mean losses in `epoch`
  double best_val_accuracy = -1;
  int64_t best_epoch = -1;
  std::vector<int64_t> best_confusion;  // validation confusion matrix of the best epoch (for the report)
};

void save_checkpoint(const std::string& path, Model& model, AdamW& opt, const StepLR& sched,
                     const TrainPosition& pos, const nlohmann::json& config);
// Restores model, optimizer and scheduler; returns the position and (in `config`) the saved configuration.
TrainPosition load_checkpoint(const std::string& path, Model& model, AdamW& opt, StepLR& sched,
                              nlohmann::json* config = nullptr);
// The saved configuration alone (to rebuild the model before loading).
nlohmann::json read_checkpoint_config(const std::string& path);

// The model alone, as a safetensors file that torchvision's resnet50 (with the notebook's head) loads;
// metadata: format "vbtrain", `vbtrain.config` (blocks, width, hidden, classes, image size).
void save_model_file(const std::string& path, Model& model, data::ImageSize image_size);
nlohmann::json model_config_json(const ModelConfig& cfg, data::ImageSize image_size);

}  // namespace vb
