#include "engine/train/options.h"

#include <cmath>

#include "data/annotations.h"
#include "engine/text.h"
#include "kernels/check.h"

namespace vb {

nlohmann::json TrainOptions::to_json() const {
  nlohmann::json j = {{"data", utf8_for_json(data)},
          {"weights", utf8_for_json(weights)},
          {"out", utf8_for_json(out)},
          {"epochs", epochs},
          {"batch_size", batch_size},
          {"lr", lr},
          {"weight_decay", weight_decay},
          {"step_size", step_size},
          {"gamma", gamma},
          {"hidden_layers", hidden},
          {"freeze_backbone_epochs", freeze_backbone_epochs},
          {"device", device},
          {"precision", precision},
          {"threads", threads},
          {"seed", seed},
          {"deterministic", deterministic},
          {"blocks", blocks},
          {"width", width},
          {"image_size", image_size},
          {"on_bad_image", on_bad_image},
          {"cache", cache},
          {"dct_scaling", dct_scaling},
          {"evaluate_test", evaluate_test},
          {"preset", utf8_for_json(preset)}};
  // A path that is not UTF-8 (JSON cannot hold it) is kept exactly as <key>_hex; the readable field shows
  // U+FFFD for its bad bytes.
  for (const auto& [k, v] : {std::pair<const char*, const std::string*>{"data", &data}, {"weights", &weights}, {"out", &out}})
    if (!is_valid_utf8(*v)) j[std::string(k) + "_hex"] = hex_bytes(*v);
  return j;
}

TrainOptions TrainOptions::from_json(const nlohmann::json& j) {
  TrainOptions o;
  auto get = [&](const char* k, auto& v) {
    if (j.contains(k) && !j.at(k).is_null()) j.at(k).get_to(v);
  };
  get("data", o.data);
  get("weights", o.weights);
  get("out", o.out);
  get("epochs", o.epochs);
  get("batch_size", o.batch_size);
  get("lr", o.lr);
  get("weight_decay", o.weight_decay);
  get("step_size", o.step_size);
  get("gamma", o.gamma);
  get("hidden_layers", o.hidden);
  get("freeze_backbone_epochs", o.freeze_backbone_epochs);
  get("device", o.device);
  get("precision", o.precision);
  get("threads", o.threads);
  get("seed", o.seed);
  get("deterministic", o.deterministic);
  get("blocks", o.blocks);
  get("width", o.width);
  get("image_size", o.image_size);
  get("on_bad_image", o.on_bad_image);
  get("cache", o.cache);
  get("dct_scaling", o.dct_scaling);
  get("evaluate_test", o.evaluate_test);
  get("preset", o.preset);
  for (auto [k, v] : {std::pair<const char*, std::string*>{"data", &o.data}, {"weights", &o.weights}, {"out", &o.out}}) {
    const std::string hk = std::string(k) + "_hex";
    if (j.contains(hk) && !(j.at(hk).is_string() && from_hex(j.at(hk).get<std::string>(), *v)))
      fail("'", hk, "' is not a string of hex digits");
  }
  return o;
}

void TrainOptions::validate() const {
  auto finite_above = [](double v, double lo, bool open) { return std::isfinite(v) && (open ? v > lo : v >= lo); };
  if (epochs < 1) fail("epochs must be at least 1, got ", epochs);
  if (batch_size < 1 || batch_size > 65536) fail("the batch size must be from 1 to 65536, got ", batch_size);
  if (!finite_above(lr, 0, true)) fail("the learning rate must be a finite number > 0, got ", lr);
  if (!finite_above(weight_decay, 0, false)) fail("the weight decay must be a finite number >= 0, got ", weight_decay);
  if (step_size < 1) fail("the StepLR step size must be at least 1, got ", step_size);
  if (!finite_above(gamma, 0, true)) fail("the StepLR gamma must be a finite number > 0, got ", gamma);
  if (freeze_backbone_epochs < 0) fail("freeze_backbone_epochs must be 0 or more, got ", freeze_backbone_epochs);
  if (threads < 0 || threads > 1024) fail("threads must be from 0 (all cores) to 1024, got ", threads);  // as --threads
  if (width < 1 || width > 4096) fail("the width must be from 1 to 4096, got ", width);
  if (image_size.h < 32 || image_size.w < 32 || image_size.h > 4096 || image_size.w > 4096)
    fail("the image size must be from 32 to 4096 on each side, got ", image_size.str());
  for (int b : blocks)
    if (b < 1 || b > 1000) fail("blocks per stage must be from 1 to 1000, got ", b);
  for (int h : hidden)
    if (h < 1 || h > 1000000) fail("hidden layer sizes must be from 1 to 1000000, got ", h);
  if (stop_after_steps < 0) fail("stop_after_steps must be 0 or more, got ", stop_after_steps);
  if (step_delay_ms < 0) fail("step_delay_ms must be 0 or more, got ", step_delay_ms);
}

ModelConfig TrainOptions::model_config() const {
  ModelConfig c;
  c.blocks = blocks;
  c.width = width;
  c.hidden = hidden;
  c.num_classes = data::kNumClasses;
  return c;
}

std::vector<std::string> class_names() { return {data::kClassNames.begin(), data::kClassNames.end()}; }

}  // namespace vb
