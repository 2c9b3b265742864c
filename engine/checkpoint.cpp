#include "engine/checkpoint.h"

#include "engine/text.h"

namespace vb {

nlohmann::json model_config_json(const ModelConfig& cfg, data::ImageSize image_size) {
  return {{"arch", "resnet_bottleneck"}, {"blocks", cfg.blocks}, {"width", cfg.width}, {"hidden", cfg.hidden}, {"num_classes", cfg.num_classes},
          {"image_size", image_size}};
}

void save_model_file(const std::string& path, Model& model, data::ImageSize image_size) {
  StateDict sd = model.state_dict();
  sd.metadata["format"] = "vbtrain";
  sd.metadata["vbtrain.config"] = model_config_json(model.config(), image_size).dump();
  save_safetensors(path, sd);
}

void save_checkpoint(const std::string& path, Model& model, AdamW& opt, const StepLR& sched,
                     const TrainPosition& pos, const nlohmann::json& config) {
  StateDict sd = model.state_dict();
  StateDict os = opt.state_dict();
  for (const auto& k : os.order) sd.set("optimizer." + k, std::move(os.at(k)));
  nlohmann::json state = {{"epoch", pos.epoch},
                          {"step_in_epoch", pos.step_in_epoch},
                          {"partial_loss_sum", pos.partial_loss_sum},
                          {"best_val_accuracy", pos.best_val_accuracy},
                          {"best_epoch", pos.best_epoch},
                          {"best_confusion", pos.best_confusion},
                          {"scheduler", {{"last_epoch", sched.last_epoch()}, {"lr", sched.lr()},
                                         {"step_size", sched.step_size()}, {"gamma", sched.gamma()},
                                         {"base_lr", sched.base_lr()}}}};
  sd.metadata["format"] = "vbtrain-checkpoint";
  sd.metadata["vbtrain.state"] = state.dump();
  sd.metadata["vbtrain.config"] = json_dump(config);  // paths: never type_error.316
  save_safetensors(path, sd);
}

namespace {
nlohmann::json meta_json(const StateDict& sd, const std::string& key, const std::string& path) {
  auto it = sd.metadata.find(key);
  if (it == sd.metadata.end()) fail(path, ": not a vbtrain checkpoint (no '", key, "' metadata)");
  try {
    return nlohmann::json::parse(it->second);
  } catch (const std::exception& e) {
    fail(path, ": checkpoint metadata '", key, "' is not valid JSON (", e.what(), ")");
  }
}
}  // namespace

nlohmann::json read_checkpoint_config(const std::string& path) {
  return meta_json(load_safetensors(path), "vbtrain.config", path);
}

TrainPosition load_checkpoint(const std::string& path, Model& model, AdamW& opt, StepLR& sched,
                              nlohmann::json* config) {
  StateDict sd = load_safetensors(path);
  const nlohmann::json state = meta_json(sd, "vbtrain.state", path);
  if (config) *config = meta_json(sd, "vbtrain.config", path);
  StateDict os;
  for (const auto& k : std::vector<std::string>(sd.order))
    if (k.rfind("optimizer.", 0) == 0) {
      os.set(k.substr(10), std::move(sd.at(k)));
      sd.erase(k);
    }
  sd.metadata.clear();
  model.load_state_dict(sd, path);
  opt.load_state_dict(os, path);
  TrainPosition pos;
  try {
    pos.epoch = state.at("epoch");
    pos.step_in_epoch = state.at("step_in_epoch");
    pos.partial_loss_sum = state.at("partial_loss_sum");
    pos.best_val_accuracy = state.at("best_val_accuracy");
    pos.best_epoch = state.at("best_epoch");
    if (state.contains("best_confusion")) pos.best_confusion = state.at("best_confusion").get<std::vector<int64_t>>();
    sched.set_state(state.at("scheduler").at("last_epoch"), state.at("scheduler").at("lr"));
  } catch (const std::exception& e) {
    fail(path, ": checkpoint state is incomplete (", e.what(), ")");
  }
  return pos;
}

}  // namespace vb
