#include "engine/train/evaluate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>

#include "data/dataset.h"
#include "data/loader.h"
#include "engine/progress.h"
#include "engine/weights.h"
#include "kernels/cpu/ops.h"

namespace vb {

void upload_batch(Model& model, const data::Batch& b, int64_t* labels_dev) {
  const data::ImageSize S = model.image_size();
  if (b.pixels)
    model.backend().upload_images(model.input(), b.pixels, b.size, S.h, S.w);
  else
    model.backend().upload_activation(model.input(), b.images, b.size, 3, S.h, S.w);
  model.backend().upload(labels_dev, b.labels, sizeof(int64_t) * size_t(b.size));
}

std::vector<float> class_weights_for(const std::vector<data::Sample>& train) {
  std::vector<float> cw(data::kNumClasses, 1.f);
  std::vector<int64_t> labels;
  for (const auto& s : train) labels.push_back(s.label);
  if (!labels.empty()) cpu::class_weights_from_labels(int64_t(labels.size()), labels.data(), data::kNumClasses, cw.data());
  return cw;
}

LossBuffers::LossBuffers(Backend& b, const std::vector<float>& weights, int max_batch)
    : be(b),
      class_weights(static_cast<float*>(b.alloc(sizeof(float) * weights.size()))),
      labels(static_cast<int64_t*>(b.alloc(sizeof(int64_t) * size_t(max_batch)))),
      loss(static_cast<float*>(b.alloc(sizeof(float)))),
      readback{nullptr, nullptr},
      readback_batch(max_batch),
      readback_classes(int(weights.size())) {
  for (float*& r : readback) r = static_cast<float*>(b.host_alloc(sizeof(float) * (size_t(max_batch) * weights.size() + 1)));
  b.upload(class_weights, weights.data(), sizeof(float) * weights.size());
}

LossBuffers::~LossBuffers() {
  be.release(class_weights);
  be.release(labels);
  be.release(loss);
  for (float* r : readback) be.host_free(r);
}

EvalResult evaluate(Model& model, data::Loader& loader, LossBuffers& lb) {
  Backend& be = model.backend();
  const int C = model.config().num_classes;
  EvalResult r;
  r.confusion = Confusion(C);
  const auto t0 = std::chrono::steady_clock::now();
  double loss_sum = 0;
  int64_t batches = 0;
  loader.start_epoch(0);
  EvalPass pass(be);  // the parameters stay as they are until this returns
  Progress progress("eval", loader.batches_per_epoch(), 10.0);
  // The batch in flight: its logits and loss are on their way into lb.readback[slot].
  struct InFlight {
    int size = 0, slot = 0;
    uint64_t ticket = 0;
    std::vector<int64_t> labels;  // the loader reuses the batch's own memory
  } prev;
  auto take = [&](const InFlight& f) {
    be.wait_download(f.ticket);
    const float* logits = lb.readback[f.slot];
    const float loss = logits[size_t(f.size) * C];
    for (int i = 0; i < f.size; ++i) {
      const float* row = logits + size_t(i) * C;
      r.confusion.add(int(f.labels[size_t(i)]), int(std::max_element(row, row + C) - row));
    }
    loss_sum += loss;
    ++batches;
    r.images += f.size;
    progress.update(batches, f.size, loss);
  };
  VB_CHECK(lb.readback_classes == C && lb.readback_batch >= model.max_batch(), "evaluate: the loss buffers hold ",
           lb.readback_batch, " x ", lb.readback_classes, " logits, the model makes ", model.max_batch(), " x ", C);
  int slot = 0;
  while (const data::Batch* b = loader.next()) {
    if (b->size == 0) continue;
    upload_batch(model, *b, lb.labels);
    model.forward(b->size, false);
    be.softmax_wce(b->size, C, model.logits(), lb.labels, lb.class_weights, nullptr, nullptr, lb.loss);
    float* dst = lb.readback[slot];
    be.download_async(dst, model.logits(), sizeof(float) * size_t(b->size) * C);
    InFlight now;
    now.size = b->size;
    now.slot = slot;
    now.ticket = be.download_async(dst + size_t(b->size) * C, lb.loss, sizeof(float));
    now.labels.assign(b->labels, b->labels + b->size);
    be.wait_uploads();  // the loader reuses this batch's buffer at its next call
    if (prev.size) take(prev);  // the previous batch, while this one computes
    prev = std::move(now);
    slot ^= 1;
  }
  if (prev.size) take(prev);
  progress.finish();
  r.loss = batches ? loss_sum / double(batches) : NAN;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

LoadedModel load_model_file(Backend& be, const std::string& path, data::ImageSize image_size_default) {
  StateDict sd = load_state_dict_file(path);
  LoadedModel lm;
  lm.image_size = image_size_default;
  ModelConfig cfg = infer_model_config(sd, path);
  auto it = sd.metadata.find("vbtrain.config");
  if (it != sd.metadata.end()) {
    try {
      auto j = nlohmann::json::parse(it->second);
      if (j.contains("image_size")) lm.image_size = j.at("image_size").get<data::ImageSize>();
    } catch (const std::exception&) {
      // a damaged metadata entry leaves the tensors' own configuration in force
    }
  }
  if (cfg.num_classes != data::kNumClasses)
    fail(path, ": the model has ", cfg.num_classes, " outputs, B1 needs ", data::kNumClasses,
         " (convert ImageNet weights with vbconvert first)");
  sd.metadata.clear();
  lm.model = std::make_unique<Model>(be, cfg);
  lm.model->load_state_dict(sd, path);
  return lm;
}

}  // namespace vb
