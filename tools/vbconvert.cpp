// vbconvert: PyTorch / timm weights to engine weights (safetensors with torchvision's names).
//
//   vbconvert IN OUT.safetensors [--num-classes 8] [--hidden-layers 512,256] [--seed 0]
//
// IN is torchvision's ImageNet file (resnet50-11ad3fa6.pth), a timm safetensors file, a notebook model or
// checkpoint, or an engine file. The backbone is kept; the head is taken from IN when it has exactly the
// requested shape, otherwise IN's head is dropped and a new one is initialised as nn.Linear does.
// Errors: one line on stderr, exit code 1 (2 for bad flags).
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>

#include "engine/model_config.h"
#include "engine/sha256.h"
#include "engine/state_dict.h"
#include "engine/weights.h"
#include "tools/commands.h"

namespace {

using namespace vb;

bool is_head_key(const std::string& k) { return k.rfind("fc.", 0) == 0; }

// The backbone's configuration (blocks, width) from the file, whatever head it has (or none).
ModelConfig backbone_config(const StateDict& sd, const std::string& source) {
  bool has_head = false;
  for (const auto& k : sd.order) has_head |= is_head_key(k);
  if (has_head) return infer_model_config(sd, source);
  StateDict probe;  // infer_model_config wants a head: lend it a placeholder (only names and conv1's shape count)
  for (const auto& k : sd.order)
    if (k.rfind("layer", 0) == 0) probe.set(k, HostTensor());
  if (sd.has("conv1.weight")) probe.set("conv1.weight", HostTensor(sd.at("conv1.weight").shape, DType::U8));
  probe.set("fc.weight", HostTensor({1, 1}, DType::U8));
  return infer_model_config(probe, source);
}

// nn.Linear's default initialisation: kaiming_uniform_(a=sqrt(5)) on the weight and the bias both come to
// U(-1/sqrt(fan_in), 1/sqrt(fan_in)). The draws are our own (mt19937_64, 53-bit uniforms) so that a seed
// gives the same head on every platform; they do not reproduce PyTorch's stream.
HostTensor linear_init(const Shape& shape, int fan_in, std::mt19937_64& rng) {
  HostTensor t(shape, DType::F32);
  const double bound = 1.0 / std::sqrt(double(fan_in));
  float* p = t.as<float>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double u = double(rng() >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
    p[i] = float((2 * u - 1) * bound);
  }
  return t;
}

std::string config_json(const ModelConfig& c) {
  nlohmann::ordered_json j = {{"arch", "resnet_bottleneck"}, {"blocks", c.blocks}, {"width", c.width},
                              {"num_classes", c.num_classes}, {"hidden", c.hidden}};
  return j.dump();
}

std::string shape_list(const StateDict& sd, const std::vector<std::string>& keys) {
  std::string s;
  for (const auto& k : keys) s += (s.empty() ? "" : ", ") + k + " " + shape_str(sd.at(k).shape);
  return s;
}

struct Args {
  std::string in, out;
  int num_classes = 8;
  std::string hidden;
  bool hidden_given = false;
  uint64_t seed = 0;
  bool ignore_hash = false;
};

int run(const Args& a) {
  const std::string bytes = read_file(a.in);
  const std::string sha = sha256_hex(bytes);
  WeightFormat fmt;
  StateDict sd = load_state_dict_bytes(bytes, a.in, &fmt);
  std::printf("input:   %s (%s, %zu tensors, %.1f MB)\n", a.in.c_str(), weight_format_name(fmt), sd.size(),
              double(bytes.size()) / 1e6);
  std::printf("sha256:  %s\n", sha.c_str());

  // torch.hub names files name-<first hex digits of the SHA-256>.ext and refuses a file that does not match.
  static const std::regex hub(R"(-([0-9a-f]{8,64})\.[A-Za-z0-9]+$)");
  std::smatch m;
  const std::string base = std::filesystem::path(a.in).filename().string();
  if (std::regex_search(base, m, hub)) {
    const std::string prefix = m[1];
    if (sha.compare(0, prefix.size(), prefix) == 0) {
      std::printf("hash:    matches the file name's prefix %s\n", prefix.c_str());
    } else if (a.ignore_hash) {
      std::printf("hash:    does NOT match the file name's prefix %s (ignored: --ignore-hash)\n", prefix.c_str());
    } else {
      fail(a.in, ": SHA-256 ", sha.substr(0, 16), "... does not match the prefix ", prefix,
           " in the file name (corrupt or incomplete download?); --ignore-hash converts it anyway");
    }
  } else {
    std::printf("hash:    no torch-hub hash prefix in the file name to check\n");
  }

  ModelConfig cfg = backbone_config(sd, a.in);
  cfg.num_classes = a.num_classes;
  if (a.num_classes <= 0) fail("--num-classes must be positive");
  // Without --hidden-layers a notebook head with the requested class count keeps its hidden layers.
  cfg.hidden.clear();
  if (a.hidden_given) {
    cfg.hidden = parse_int_list(a.hidden, "--hidden-layers");
  } else if (sd.has("fc.0.weight") && !sd.has("fc.weight")) {
    const ModelConfig in_cfg = infer_model_config(sd, a.in);
    if (in_cfg.num_classes == cfg.num_classes) cfg.hidden = in_cfg.hidden;
  }
  const std::vector<TensorSpec> specs = model_tensor_specs(cfg);

  // A single torchvision Linear already of the requested size is the notebook's head without hidden layers.
  std::vector<std::string> notes;
  if (cfg.hidden.empty() && sd.has("fc.weight") && sd.has("fc.bias") && sd.at("fc.weight").shape == Shape{cfg.num_classes, cfg.features()}) {
    HostTensor w = sd.at("fc.weight"), b = sd.at("fc.bias");
    sd.erase("fc.weight");
    sd.erase("fc.bias");
    sd.set("fc.0.weight", std::move(w));
    sd.set("fc.0.bias", std::move(b));
    notes.push_back("renamed: fc.weight, fc.bias -> fc.0.weight, fc.0.bias (the notebook's Sequential head)");
  }
  // The head: from the file when every head tensor is there with its shape and nothing else is.
  std::vector<std::string> file_head;
  for (const auto& k : sd.order)
    if (is_head_key(k)) file_head.push_back(k);
  bool head_fits = !file_head.empty();
  size_t n_head_specs = 0;
  for (const auto& s : specs) {
    if (!s.head) continue;
    ++n_head_specs;
    if (!sd.has(s.name) || sd.at(s.name).shape != s.shape) head_fits = false;
  }
  head_fits = head_fits && file_head.size() == n_head_specs;

  if (!head_fits && !file_head.empty()) {
    std::string why = sd.has("fc.weight") ? "an ImageNet-style head of " + std::to_string(sd.at("fc.weight").shape[0]) + " classes"
                                          : "a head that does not match the requested one";
    notes.push_back("dropped: " + shape_list(sd, file_head) + " (" + why + ")");
    for (const auto& k : file_head) sd.erase(k);
  }

  StateDict out;
  std::mt19937_64 rng(a.seed);
  std::vector<std::string> added, converted;
  int64_t n_params = 0;
  for (const auto& s : specs) {
    if (s.head && !head_fits) {
      out.set(s.name, linear_init(s.shape, s.fan_in, rng));
      added.push_back(s.name + " " + shape_str(s.shape));
    } else if (!sd.has(s.name) && s.role == TensorRole::BnNumBatches) {
      // Older torchvision files predate num_batches_tracked; PyTorch fills it with 0 on load, as here.
      int64_t zero = 0;
      out.set(s.name, HostTensor::from_i64({}, &zero));
      added.push_back(s.name);
    } else if (sd.has(s.name)) {
      HostTensor t = sd.at(s.name);
      if (t.dtype != s.dtype) {
        if (s.dtype == DType::F32) {
          converted.push_back(s.name + " (" + dtype_name(t.dtype) + ")");
          t = HostTensor::from_f32(t.shape, t.to_f32().data());
        } else if (s.dtype == DType::I64) {
          std::vector<double> v = t.to_f64();
          std::vector<int64_t> iv(v.begin(), v.end());
          converted.push_back(s.name + " (" + dtype_name(t.dtype) + ")");
          t = HostTensor::from_i64(t.shape, iv.data());
        }
      }
      out.set(s.name, std::move(t));
    }
    if (s.kind == TensorKind::Parameter) n_params += numel(s.shape);
  }
  // Anything left in the file that the model does not have, or a shape that differs, is an error here.
  for (const auto& k : sd.order)
    if (!out.has(k)) out.set(k, sd.at(k));
  check_against_specs(out, specs, a.in);

  out.metadata["format"] = "vbtrain";
  out.metadata["vbtrain.config"] = config_json(cfg);
  out.metadata["vbtrain.source"] = base;
  out.metadata["vbtrain.source_sha256"] = sha;
  save_safetensors(a.out, out);

  std::printf("model:   %s\n", cfg.describe().c_str());
  std::printf("tensors: %zu (%lld parameters)\n", out.size(), (long long)n_params);
  for (const auto& n : notes) std::printf("%s\n", n.c_str());
  if (head_fits) std::printf("head:    taken from the file (%zu tensors)\n", n_head_specs);
  if (!added.empty()) {
    std::string list;
    for (const auto& s : added) list += (list.empty() ? "" : ", ") + s;
    std::printf("added:   %s\n", list.c_str());
    if (!head_fits) std::printf("         (new head initialised as nn.Linear does, seed %llu)\n", (unsigned long long)a.seed);
  }
  if (!converted.empty()) std::printf("converted to the engine's dtype: %zu tensors (e.g. %s)\n", converted.size(), converted[0].c_str());
  std::printf("output:  %s\n", a.out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vbconvert: PyTorch (.pth, zip or legacy) or safetensors ResNet weights to vbtrain weights (safetensors)"};
  Args a;
  app.add_option("IN", a.in, "torchvision / timm / notebook weights or checkpoint")->required();
  app.add_option("OUT", a.out, "output .safetensors")->required();
  app.add_option("--num-classes", a.num_classes, "classes of the new head")->capture_default_str()->check(vb::tools::integer_in(1, 100000));
  auto* hid = app.add_option("--hidden-layers", a.hidden, "hidden sizes of the head, e.g. 512,256 (default: none, or the file's)");
  app.add_option("--seed", a.seed, "seed of a newly initialised head")->capture_default_str()->check(vb::tools::seed_value());
  app.add_flag("--ignore-hash", a.ignore_hash, "convert even when the SHA-256 does not match the file name's prefix");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return vb::tools::parse_error(app, e, "vbconvert");  // --help is a success; bad flags exit 2, as vbtrain's do
  }
  a.hidden_given = hid->count() > 0;
  return vb::tools::run_guarded("vbconvert", "converting " + a.in, [&] { return run(a); });
}
