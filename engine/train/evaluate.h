// The evaluation side of training, shared with `eval` and `predict`: the notebook's weighted criterion (its
// class weights and the backend buffers it needs), an evaluation pass over a loader, and model files.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "data/image.h"
#include "engine/backend.h"
#include "engine/metrics.h"
#include "engine/model.h"

namespace vb::data {
struct Sample;
struct Batch;
class Loader;
}  // namespace vb::data

namespace vb {

struct EvalResult {
  double loss = 0;       // mean of the per-batch mean losses, as the notebook reports it
  Confusion confusion{8};
  int64_t images = 0;
  double seconds = 0;
};
// The notebook's criterion weights: n / count per class over the training clips (0 for an absent class);
// all 1 when there are no training clips.
std::vector<float> class_weights_for(const std::vector<data::Sample>& train);

// Backend memory the loss needs: the class weights (uploaded once), a batch of labels, the loss; and the host
// memory evaluation reads a batch's logits and loss back into (two batches, taken in turn).
struct LossBuffers {
  Backend& be;
  float* class_weights;  // (classes)
  int64_t* labels;       // (max batch)
  float* loss;           // (1)
  float* readback[2];    // host (Backend::host_alloc): max batch x classes logits, then the loss
  int readback_batch, readback_classes;  // what readback holds (rows, classes)
  LossBuffers(Backend& b, const std::vector<float>& weights, int max_batch);
  ~LossBuffers();
  LossBuffers(const LossBuffers&) = delete;
  LossBuffers& operator=(const LossBuffers&) = delete;
};

// A batch's images into the model's input and its labels into `labels_dev`.
void upload_batch(Model& model, const data::Batch& b, int64_t* labels_dev);

// Evaluation-mode pass over a loader (one epoch), the loss with the notebook's weighted criterion. A batch's
// logits and loss are read back while the next batch is uploaded and computed (Backend::download_async), so the
// device does not wait for the host between batches; the sums are taken in batch order as before.
EvalResult evaluate(Model& model, data::Loader& loader, LossBuffers& loss);

// Loads a model file for eval/predict: weights with their configuration (from the file's metadata or
// inferred from its tensors) and the image size (metadata, else `image_size_default`).
struct LoadedModel {
  std::unique_ptr<Model> model;
  data::ImageSize image_size = 224;
};
LoadedModel load_model_file(Backend& be, const std::string& path, data::ImageSize image_size_default);

}  // namespace vb
