// The captured training step's scenario (engine/train/step.h), shared by the CPU test (test_model, on the
// GraphTwin of tests/graph_twin.h) and the GPU test (test_cuda_ops, real CUDA graphs): fourteen steps of a
// [1,1,1,1] ResNet of width 16 at 40x48 through TrainStep, with a short batch in the middle, the learning rate
// changed twice, and the backbone frozen for three steps and thawed again. With capture: the first full step
// runs uncaptured, the second is recorded, the third replayed; the short batch runs uncaptured and the next
// full one replays with the new learning rate; freezing drops the graph, and the frozen step is recorded once
// it has run uncaptured; thawing does the same; and after the backend drops the graph (as when a workspace it
// used is replaced), the step runs uncaptured once and is recorded again. Every loss and the whole model and
// optimizer state come back.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

#include "engine/backend.h"
#include "engine/model.h"
#include "engine/optimizer.h"
#include "engine/train/step.h"
#include "tests/steady_state.h"

namespace vbtest {

struct CaptureRun {
  std::vector<float> losses;
  vb::StateDict model, opt;
  int64_t captures = 0, replays = 0;
  bool held_before_release = false, held_after_release = true;  // has_capture() around the release
};

inline CaptureRun run_capture_scenario(vb::Backend& be, bool capture) {
  constexpr int B = SmallRig::B, Bp = SmallRig::Bp, H = SmallRig::H, W = SmallRig::W;
  SmallRig rig(be);
  vb::Model& m = rig.m;
  vb::AdamW& opt = *rig.opt;
  const std::vector<float> cw = {1.f, 2.f, 0.5f, 1.f, 1.5f, 1.f, 3.f, 1.f};
  auto* labels = static_cast<int64_t*>(be.alloc(sizeof(int64_t) * B));
  auto* weights = static_cast<float*>(be.alloc(sizeof(float) * cw.size()));
  auto* loss = static_cast<float*>(be.alloc(sizeof(float)));
  be.upload(weights, cw.data(), sizeof(float) * cw.size());
  CaptureRun r;
  {
    vb::TrainStep step(m, opt, labels, weights, loss, capture);
    struct Step {
      int n;
      double lr;
      bool frozen;
    };
    const std::vector<Step> plan = {{B, 1e-3, false}, {B, 1e-3, false}, {B, 1e-3, false}, {Bp, 1e-3, false},
                                    {B, 5e-4, false}, {B, 5e-4, true},  {B, 5e-4, true},  {B, 5e-4, true},
                                    {B, 2e-4, false}, {B, 2e-4, false}, {B, 2e-4, false}, {B, 1e-4, false},
                                    {B, 1e-4, false}, {B, 1e-4, false}};
    const size_t drop_before = 11;  // memory goes before this step: the backend drops its graph
    std::mt19937 rng(11);
    std::vector<uint8_t> px(size_t(B) * H * W * 3);
    std::vector<int64_t> y(B);
    for (size_t i = 0; i < plan.size(); ++i) {
      const Step& s = plan[i];
      if (i == drop_before) {
        r.held_before_release = be.has_capture();
        be.release(be.alloc(256));
        r.held_after_release = be.has_capture();
      }
      for (uint8_t& v : px) v = uint8_t(rng());
      for (int64_t& v : y) v = int64_t(rng() % 8);
      be.upload_images(m.input(), px.data(), s.n, H, W);
      be.upload(labels, y.data(), sizeof(int64_t) * size_t(s.n));
      m.set_backbone_frozen(s.frozen);
      step.run(s.n, s.lr);
      be.scalar_push(loss);  // read back later, as the trainer does: the host runs ahead of the device
      be.wait_uploads();
    }
    float l = 0;
    while (be.scalar_pop(&l, true)) r.losses.push_back(l);
    r.captures = step.captures();
    r.replays = step.replays();
  }
  r.model = m.state_dict();
  r.opt = opt.state_dict();
  be.release(labels);
  be.release(weights);
  be.release(loss);
  return r;
}

// The number of tensors of a and b whose bytes differ (names, shapes and dtypes must match).
inline int differing_tensors(const vb::StateDict& a, const vb::StateDict& b) {
  if (a.order != b.order) return -1;
  int bad = 0;
  for (const std::string& k : a.order) {
    const vb::HostTensor &x = a.at(k), &y = b.at(k);
    bad += x.shape != y.shape || x.dtype != y.dtype || x.bytes != y.bytes;
  }
  return bad;
}

}  // namespace vbtest
