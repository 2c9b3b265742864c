#include "engine/model_config.h"

#include <map>
#include <regex>
#include <sstream>

namespace vb {

std::string ModelConfig::describe() const {
  std::ostringstream s;
  s << "ResNet [";
  for (size_t i = 0; i < blocks.size(); ++i) s << (i ? "," : "") << blocks[i];
  s << "] width " << width << ", head " << features();
  for (int h : hidden) s << "->" << h;
  s << "->" << num_classes;
  return s.str();
}

namespace {
void add_conv(std::vector<TensorSpec>& v, const std::string& name, int out, int in, int k) {
  v.push_back({name + ".weight", {out, in, k, k}, DType::F32, TensorKind::Parameter, TensorRole::ConvWeight, false,
               in * k * k});
}
void add_bn(std::vector<TensorSpec>& v, const std::string& name, int c) {
  v.push_back({name + ".weight", {c}, DType::F32, TensorKind::Parameter, TensorRole::BnWeight});
  v.push_back({name + ".bias", {c}, DType::F32, TensorKind::Parameter, TensorRole::BnBias});
  v.push_back({name + ".running_mean", {c}, DType::F32, TensorKind::Buffer, TensorRole::BnRunningMean});
  v.push_back({name + ".running_var", {c}, DType::F32, TensorKind::Buffer, TensorRole::BnRunningVar});
  v.push_back({name + ".num_batches_tracked", {}, DType::I64, TensorKind::Buffer, TensorRole::BnNumBatches});
}
}  // namespace

std::vector<TensorSpec> model_tensor_specs(const ModelConfig& cfg) {
  std::vector<TensorSpec> v;
  add_conv(v, "conv1", cfg.width, 3, 7);
  add_bn(v, "bn1", cfg.width);
  int inp = cfg.width;
  for (size_t st = 0; st < cfg.blocks.size(); ++st) {
    const int planes = cfg.width << st, out = planes * 4;
    for (int b = 0; b < cfg.blocks[st]; ++b) {
      const std::string p = "layer" + std::to_string(st + 1) + "." + std::to_string(b);
      add_conv(v, p + ".conv1", planes, inp, 1);
      add_bn(v, p + ".bn1", planes);
      add_conv(v, p + ".conv2", planes, planes, 3);
      add_bn(v, p + ".bn2", planes);
      add_conv(v, p + ".conv3", out, planes, 1);
      add_bn(v, p + ".bn3", out);
      if (b == 0) {  // stride 2 (stages 2..) or a channel change: 1x1 conv + BN downsample
        add_conv(v, p + ".downsample.0", out, inp, 1);
        add_bn(v, p + ".downsample.1", out);
      }
      inp = out;
    }
  }
  int in = cfg.features(), idx = 0;
  auto add_fc = [&](int out) {
    const std::string p = "fc." + std::to_string(idx);
    v.push_back({p + ".weight", {out, in}, DType::F32, TensorKind::Parameter, TensorRole::FcWeight, true, in});
    v.push_back({p + ".bias", {out}, DType::F32, TensorKind::Parameter, TensorRole::FcBias, true, in});
    in = out;
    idx += 2;  // Linear, ReLU, Linear, ...: the ReLUs take the odd indices
  };
  for (int h : cfg.hidden) add_fc(h);
  add_fc(cfg.num_classes);
  return v;
}

ModelConfig infer_model_config(const StateDict& sd, const std::string& source) {
  const std::string at = source.empty() ? std::string() : escape(source) + ": ";
  ModelConfig cfg;
  if (!sd.has("conv1.weight"))
    fail(at, "not the weights of a ResNet: it has no 'conv1.weight' (expected torchvision's names: conv1.weight, "
         "layer1.0.conv1.weight, ..., fc.weight; the notebook's model.* and module.* prefixes are accepted)");
  const HostTensor& c1 = sd.at("conv1.weight");
  if (c1.shape.size() != 4 || c1.shape[1] != 3 || c1.shape[2] != 7 || c1.shape[3] != 7 || c1.shape[0] < 1 ||
      c1.shape[0] > 4096)
    fail(at, "conv1.weight has shape ", shape_str(c1.shape), ", expected [width, 3, 7, 7] with width 1..4096");
  cfg.width = int(c1.shape[0]);
  std::map<int, int> blocks;
  static const std::regex re(R"(^layer(\d{1,9})\.(\d{1,9})\.)");
  for (const auto& k : sd.order) {
    std::smatch m;
    if (std::regex_search(k, m, re)) {
      const long st = std::stol(m[1]), b = std::stol(m[2]);
      if (st < 1 || st > 16 || b > 1000)
        fail(at, "'", escape(k), "' is not a ResNet layer (stages 1..16, at most 1,000 blocks each)");
      blocks[int(st)] = std::max(blocks[int(st)], int(b) + 1);
    }
  }
  if (blocks.empty()) fail(at, "not the weights of a ResNet: no layerN.M.* keys (e.g. layer1.0.conv1.weight)");
  cfg.blocks.clear();
  for (int st = 1; st <= int(blocks.size()); ++st) {
    if (!blocks.count(st)) fail(at, "the weights have no layer", st, " but have later stages");
    cfg.blocks.push_back(blocks[st]);
  }
  cfg.hidden.clear();
  auto rows_of = [&](const std::string& k) {
    const HostTensor& t = sd.at(k);
    if (t.shape.size() != 2 || t.shape[0] < 1 || t.shape[0] > 1000000)
      fail(at, k, " has shape ", shape_str(t.shape), ", expected [out, in] with 1..1000000 outputs");
    return int(t.shape[0]);
  };
  if (sd.has("fc.weight")) {  // torchvision's single Linear head (an ImageNet head)
    cfg.num_classes = rows_of("fc.weight");
    return cfg;
  }
  std::vector<int> outs;
  for (int idx = 0;; idx += 2) {
    const std::string k = "fc." + std::to_string(idx) + ".weight";
    if (!sd.has(k)) break;
    outs.push_back(rows_of(k));
  }
  if (outs.empty()) fail(at, "the weights have no head (neither fc.weight nor fc.0.weight)");
  cfg.num_classes = outs.back();
  outs.pop_back();
  cfg.hidden = outs;
  return cfg;
}

std::vector<int> parse_int_list(const std::string& s, const std::string& what) {
  std::vector<int> out;
  if (s.empty() || s == "none") return out;
  size_t pos = 0;
  while (pos <= s.size()) {
    size_t comma = s.find(',', pos);
    std::string tok = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    try {
      size_t used = 0;
      int v = std::stoi(tok, &used);
      if (used != tok.size() || v <= 0) throw std::invalid_argument("bad");
      out.push_back(v);
    } catch (const std::exception&) {
      fail(what, ": '", s, "' is not a comma-separated list of positive integers");
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

}  // namespace vb
