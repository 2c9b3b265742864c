// The settings of a training run: the notebook's defaults, their JSON form (config.json) and their checks.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/image.h"
#include "engine/model_config.h"

namespace vb {

struct TrainOptions {
  std::string data;     // the dataset folder (videos/ or its parent)
  std::string weights;  // initial engine weights (.safetensors or .pth); empty: torchvision's initialisation
  std::string out = "runs/b1";
  int epochs = 50;
  int batch_size = 150;
  double lr = 1e-3;
  double weight_decay = 0.01;
  int step_size = 2;
  double gamma = 0.6;
  std::vector<int> hidden;  // the notebook's hidden_layers
  int freeze_backbone_epochs = 0;
  std::string device = "auto";
  std::string precision = "tf32";
  int threads = 0;
  uint64_t seed = 42;
  bool deterministic = false;
  std::vector<int> blocks{3, 4, 6, 3};
  int width = 64;
  data::ImageSize image_size = 224;  // height x width; `--image-size 224x400`
  std::string on_bad_image = "skip";
  std::string cache = "auto";   // auto | on | off: the decoded-frame cache
  bool dct_scaling = false;     // decode large frames at a DCT-scaled size first (faster, not Pillow's pixels)
  bool evaluate_test = true;    // after the last epoch, evaluate the test split
  std::string preset;           // informational: which built-in preset filled the options
  // For tests of interruption: stop (as Ctrl-C would) after this many training steps in total; 0 = never.
  int64_t stop_after_steps = 0;
  // For tests of kill -9: sleep this long after each training step (not saved in config.json).
  int step_delay_ms = 0;
  // Replace a run already in `out` (its files are removed first); without it such a folder is refused.
  // Not saved in config.json.
  bool overwrite = false;

  nlohmann::json to_json() const;
  static TrainOptions from_json(const nlohmann::json& j);
  ModelConfig model_config() const;
  // Throws, naming the setting, when one makes no sense (NaN or infinite rates, negative counts, absurd
  // thread counts): they come from the command line or from a run's config.json.
  void validate() const;
};

// The B1 class names, in label order.
std::vector<std::string> class_names();

}  // namespace vb
