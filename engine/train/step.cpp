#include "engine/train/step.h"

#include <cstdlib>
#include <string>

namespace vb {

TrainStep::TrainStep(Model& model, AdamW& opt, const int64_t* labels, const float* class_weights, float* loss,
                     bool capture)
    : model_(model),
      opt_(opt),
      labels_(labels),
      class_weights_(class_weights),
      loss_(loss),
      capture_(capture && model.backend().can_capture()),
      frozen_(model.backbone_frozen()) {}

TrainStep::~TrainStep() {
  if (!captured_) return;
  try {
    model_.backend().drop_capture();
  } catch (...) {  // no throwing from a destructor; the backend goes soon after
  }
}

void TrainStep::compute(int n, double lr) {
  Backend& be = model_.backend();
  model_.forward(n, true);
  be.softmax_wce(n, model_.config().num_classes, model_.logits(), labels_, class_weights_, nullptr, model_.dlogits(),
                 loss_);
  model_.backward(n);
  opt_.step(lr);
}

void TrainStep::run(int n, double lr) {
  Backend& be = model_.backend();
  if (!capture_) return compute(n, lr);
  if (model_.backbone_frozen() != frozen_) {  // another step: record it again once it has run
    if (captured_) be.drop_capture();
    captured_ = warm_ = false;
    frozen_ = model_.backbone_frozen();
  }
  if (captured_ && !be.has_capture()) captured_ = warm_ = false;  // dropped by the backend: record it again
  const bool full = n == model_.max_batch();
  if (full && captured_) {
    be.replay([&] { opt_.step(lr); });
    model_.count_training_forward();  // the host's part of the forward the graph ran
    ++replays_;
  } else if (full && warm_) {
    try {
      be.capture([&] { compute(n, lr); });
    } catch (const std::exception& e) {
      fail("capturing the training step as a CUDA graph: ", e.what(), " (train without VB_CUDA_GRAPH=1)");
    }
    captured_ = true;
    ++captures_;
  } else {
    // Warm: a full step that allocated nothing and searched for no algorithm, so the same step can be recorded
    // (a recording may do neither).
    const size_t allocs = be.allocations(), searches = be.conv_algo_searches();
    compute(n, lr);
    if (full) warm_ = be.allocations() == allocs && be.conv_algo_searches() == searches;
  }
}

bool cuda_graph_requested() {
  const char* e = std::getenv("VB_CUDA_GRAPH");
  if (!e || std::string(e) == "0" || std::string(e).empty()) return false;
  if (std::string(e) == "1") return true;
  fail("VB_CUDA_GRAPH='", e, "': use 1 (capture the training step as a CUDA graph) or 0");
}

}  // namespace vb
