// The rule every backend keeps (engine/backend.h): nothing inside a training step allocates, so that a step can
// be captured (a CUDA graph) and memory stays what the first step set. Shared by the CPU test (test_model) and
// the GPU test (test_cuda_ops, both layouts).
#pragma once
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "engine/backend.h"
#include "engine/model.h"
#include "engine/optimizer.h"

namespace vbtest {

// The small model of the GPU-rule tests (this one and tests/step_capture.h): a [1,1,1,1] ResNet of width 16,
// torchvision's initialisation (seed 3), planned for batches of B at H x W, with AdamW.
struct SmallRig {
  static constexpr int B = 8, Bp = 5, H = 40, W = 48;
  static vb::ModelConfig config() {
    vb::ModelConfig cfg;
    cfg.blocks = {1, 1, 1, 1};
    cfg.width = 16;
    return cfg;
  }
  vb::Model m;
  std::unique_ptr<vb::AdamW> opt;
  explicit SmallRig(vb::Backend& be) : m(be, config()) {
    m.init_torchvision(3);
    m.plan(B, vb::data::ImageSize{H, W});
    opt = std::make_unique<vb::AdamW>(m, vb::AdamWOptions{});
  }
};

// A [1,1,1,1] ResNet of width 16 at 40x48 with AdamW and weighted cross-entropy. Warm-up: one full training
// step, one partial step, and an evaluation of each batch size (buffers, cuDNN's algorithms and workspace).
// Training steps take uint8 frames (upload_images, as the trainer), evaluations float batches (upload_activation).
// Then two full steps, a partial one and both evaluations again: returns the allocations those made.
inline size_t steady_state_allocations(vb::Backend& be) {
  constexpr int B = SmallRig::B, Bp = SmallRig::Bp, H = SmallRig::H, W = SmallRig::W;
  SmallRig rig(be);
  vb::Model& m = rig.m;
  vb::AdamW& opt = *rig.opt;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> x(size_t(B) * 3 * H * W);
  for (float& v : x) v = nd(rng);
  std::vector<uint8_t> px(size_t(B) * H * W * 3);  // the trainer's input: uint8 frames (Backend::upload_images)
  for (uint8_t& v : px) v = uint8_t(rng());
  std::vector<int64_t> y(B);
  for (int i = 0; i < B; ++i) y[size_t(i)] = (3 * i) % 8;
  const std::vector<float> cw(8, 1.f);
  auto* labels = static_cast<int64_t*>(be.alloc(sizeof(int64_t) * y.size()));
  auto* weights = static_cast<float*>(be.alloc(sizeof(float) * cw.size()));
  auto* loss = static_cast<float*>(be.alloc(sizeof(float)));
  be.upload(labels, y.data(), sizeof(int64_t) * y.size());
  be.upload(weights, cw.data(), sizeof(float) * cw.size());
  auto step = [&](int n) {
    be.upload_images(m.input(), px.data(), n, H, W);
    m.forward(n, true);
    be.softmax_wce(n, 8, m.logits(), labels, weights, nullptr, m.dlogits(), loss);
    m.backward(n);
    opt.step(1e-3);
  };
  auto evaluate = [&](int n) {
    be.upload_activation(m.input(), x.data(), n, 3, H, W);
    m.forward(n, false);
  };
  step(B);
  step(Bp);
  evaluate(B);
  evaluate(Bp);
  be.sync();
  const size_t before = be.allocations();
  step(B);
  step(B);
  step(Bp);
  evaluate(B);
  evaluate(Bp);
  be.sync();
  const size_t made = be.allocations() - before;
  be.release(labels);
  be.release(weights);
  be.release(loss);
  return made;
}

}  // namespace vbtest
