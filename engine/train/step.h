// One training step on the batch already in the model's input: forward, softmax + weighted cross-entropy,
// backward, AdamW. With capture on and a backend that can (CUDA), the step is recorded as one CUDA graph once
// a full-batch step has run uncaptured without allocating or searching for an algorithm (the backend's
// counters say so; the first full step chooses cuDNN's algorithms and sizes every buffer, which a recording may
// not do), and from then on replayed: one launch instead of several hundred, no host work per op.
// Only AdamW's scalars change between replays (the step count, the learning rate); they are given to the
// graph's AdamW launch before each replay, computed on the host exactly as for an uncaptured step, so in
// deterministic mode a replayed step gives the uncaptured step's bits. A batch of another size (an epoch's
// last, one that lost skipped frames) runs uncaptured; freezing or thawing the backbone changes the step's
// ops, so the graph is dropped and recorded again once the new step has run uncaptured; so is a graph the
// backend dropped (memory it used was replaced: Backend::has_capture).
#pragma once
#include <cstdint>

#include "engine/model.h"
#include "engine/optimizer.h"

namespace vb {

class TrainStep {
 public:
  // labels, class_weights, loss: backend memory the loss reads and writes (fixed for the run, as a graph needs).
  TrainStep(Model& model, AdamW& opt, const int64_t* labels, const float* class_weights, float* loss, bool capture);
  ~TrainStep();
  TrainStep(const TrainStep&) = delete;
  TrainStep& operator=(const TrainStep&) = delete;

  // The step on the first n images of the model's input, with learning rate lr. The loss lands in `loss`.
  void run(int n, double lr);
  bool capturing() const { return capture_; }  // asked for and possible on this backend
  int64_t captures() const { return captures_; }  // graphs recorded so far
  int64_t replays() const { return replays_; }    // steps run by replaying one

 private:
  void compute(int n, double lr);

  Model& model_;
  AdamW& opt_;
  const int64_t* labels_;
  const float* class_weights_;
  float* loss_;
  bool capture_;
  bool captured_ = false, warm_ = false;  // a graph is held; a full step has run uncaptured since the last change
  bool frozen_ = false;                   // the backbone's state the graph and warm_ refer to
  int64_t captures_ = 0, replays_ = 0;
};

// Whether VB_CUDA_GRAPH asks for the captured step: "1" on, unset or "0" off; anything else is an error.
bool cuda_graph_requested();

}  // namespace vb
