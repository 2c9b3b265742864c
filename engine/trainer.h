// The B1 training program: the notebook's loop (train, validate, StepLR per epoch, checkpoint every epoch,
// model files every 10 epochs and at the end) with exact resume, progress, metrics files and a report.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/metrics.h"
#include "engine/model.h"

namespace vb::data {
struct Sample;
class Loader;
}  // namespace vb::data

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

// The first file of a vbtrain run found in `dir` (config.json, metrics, checkpoints, model files), or ""
// when there is none (or no such folder): what `train --out` will not replace without --overwrite.
std::string run_file_in(const std::string& dir);

// Runs (or resumes) a training run; returns the process exit code (130 when interrupted by Ctrl-C).
// resume_dir: a run folder to continue, or a notebook checkpoint (.pth) to continue from.
int run_training(TrainOptions opt, const std::string& resume, bool epochs_given);

struct EvalResult {
  double loss = 0;       // mean of the per-batch mean losses, as the notebook reports it
  Confusion confusion{8};
  int64_t images = 0;
  double seconds = 0;
};
// The notebook's criterion weights: n / count per class over the training clips (0 for an absent class);
// all 1 when there are no training clips.
std::vector<float> class_weights_for(const std::vector<data::Sample>& train);

// Backend memory the loss needs: the class weights (uploaded once), a batch of labels, the loss.
struct LossBuffers {
  Backend& be;
  float* class_weights;  // (classes)
  int64_t* labels;       // (max batch)
  float* loss;           // (1)
  LossBuffers(Backend& b, const std::vector<float>& weights, int max_batch);
  ~LossBuffers();
  LossBuffers(const LossBuffers&) = delete;
  LossBuffers& operator=(const LossBuffers&) = delete;
};

// Evaluation-mode pass over a loader (one epoch), the loss with the notebook's weighted criterion.
EvalResult evaluate(Model& model, data::Loader& loader, LossBuffers& loss);

std::vector<std::string> class_names();

// Loads a model file for eval/predict: weights with their configuration (from the file's metadata or
// inferred from its tensors) and the image size (metadata, else `image_size_default`).
struct LoadedModel {
  std::unique_ptr<Model> model;
  data::ImageSize image_size = 224;
};
LoadedModel load_model_file(Backend& be, const std::string& path, data::ImageSize image_size_default);

}  // namespace vb
