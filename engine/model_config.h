// The B1 model's configuration and its tensor table: every parameter and buffer with torchvision's name,
// shape and dtype, in torchvision's state_dict order (parameters in named_parameters() order, which is what
// a PyTorch optimizer's state indices refer to).
#pragma once
#include <string>
#include <vector>

#include "engine/state_dict.h"
#include "engine/tensor.h"

namespace vb {

struct ModelConfig {
  std::vector<int> blocks{3, 4, 6, 3};  // bottleneck blocks per stage (ResNet-50)
  int width = 64;                       // channels of conv1; stage i has width * 2^i planes, 4x that out
  int num_classes = 8;
  std::vector<int> hidden;              // the notebook's head: Linear+ReLU per hidden size, then Linear

  int features() const { return width * (1 << (int(blocks.size()) - 1)) * 4; }  // 2048 for ResNet-50
  std::string describe() const;  // "ResNet [3,4,6,3] width 64, head 2048->8"
  bool operator==(const ModelConfig&) const = default;
};

enum class TensorKind { Parameter, Buffer };
enum class TensorRole {
  ConvWeight, BnWeight, BnBias, BnRunningMean, BnRunningVar, BnNumBatches, FcWeight, FcBias
};

struct TensorSpec {
  std::string name;  // torchvision's: "layer1.0.conv1.weight", "fc.0.weight"
  Shape shape;
  DType dtype = DType::F32;
  TensorKind kind = TensorKind::Parameter;
  TensorRole role = TensorRole::ConvWeight;
  bool head = false;  // part of `fc` (trains while the backbone is frozen)
  int fan_in = 0;     // for initialisation: conv C*R*S, linear in-features
};

// state_dict order: per module, parameters then buffers.
std::vector<TensorSpec> model_tensor_specs(const ModelConfig& cfg);

// Reads the configuration from a state dict with torchvision names (no prefix): stages and blocks from the
// layerN.M keys, width from conv1.weight, head from fc.* (a plain `fc.weight` is an ImageNet-style head).
// Errors start with `source` (the file the weights came from) when it is given.
ModelConfig infer_model_config(const StateDict& sd, const std::string& source = "");

// Parses "3,4,6,3" or "" into integers; errors name the flag.
std::vector<int> parse_int_list(const std::string& s, const std::string& what);

}  // namespace vb
