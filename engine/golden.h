// The golden protocol of the PyTorch reference files (tests/fixtures/mini_train_golden.safetensors and any
// file made the same way): load the initial weights, evaluate x0, take T training steps (weighted
// cross-entropy, AdamW, StepLR stepped after every step), compare logits, losses, the first step's
// gradients, every state-dict entry after the T steps and its change, and the final evaluation logits.
// `vbtrain verify` and the tests run this same code.
#pragma once
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/state_dict.h"

namespace vb {

struct GoldenEntry {
  std::string name;  // the reference file's own tensor name (`logits0`, `grad0.model.conv1.weight`, ...)
                     // or `update.<key>` (`update.model.conv1.weight`) for the change of the state-dict entry
                     // `after<T>.<key>` over the T steps
  double rel_err = 0;  // ||ours - ref|| / ||ref||
  double tol = 0;
  bool ok() const { return rel_err <= tol; }  // false on NaN
};

struct GoldenOptions {
  double lr = 1e-3;
  int step_size = 2;
  double gamma = 0.6;
};

// Tolerances per kind of entry for a precision on a device: the CPU (fp32) bounds of issue 2; on CUDA, 10x
// those in strict fp32, and TF32 bounds (1e-2 on logits and losses) in tf32.
double golden_tolerance(const std::string& name, Device device, Precision precision);

// `weights`: the initial state dict (prefixes already stripped); `reference`: the golden file.
std::vector<GoldenEntry> run_golden(Backend& backend, const StateDict& weights, const StateDict& reference,
                                    const GoldenOptions& opt = {});
// The same on the double-precision CPU reference path.
std::vector<GoldenEntry> run_golden(BackendT<double>& backend, const StateDict& weights, const StateDict& reference,
                                    const GoldenOptions& opt = {});

}  // namespace vb
