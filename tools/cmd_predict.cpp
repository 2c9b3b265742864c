// vbtrain predict: the class and the eight probabilities of each image, through the evaluation transform.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>

#include "data/jpeg.h"
#include "data/transforms.h"
#include "engine/text.h"
#include "engine/train/evaluate.h"
#include "engine/train/options.h"
#include "kernels/cpu/ops.h"
#include "tools/commands.h"
#include "tools/image_size_option.h"

namespace {

struct PredictArgs {
  std::string model, device = "auto";
  std::vector<std::string> inputs;
  bool json = false;
  int threads = 0, batch_size = 64;
  vb::data::ImageSize image_size{0};  // 0: the model file's
};

std::vector<std::string> expand_inputs(const std::vector<std::string>& in) {
  namespace fs = std::filesystem;
  std::vector<std::string> out;
  for (const auto& p : in) {
    if (fs::is_directory(p)) {
      std::vector<std::string> files;
      for (const auto& e : fs::recursive_directory_iterator(p)) {
        std::string ext = e.path().extension().string();
        std::transform(ext.begin(), ext.end(), ext.begin(), ::tolower);
        if (e.is_regular_file() && (ext == ".jpg" || ext == ".jpeg")) files.push_back(e.path().string());
      }
      std::sort(files.begin(), files.end());
      if (files.empty()) vb::fail(p, ": no .jpg files in this folder");
      out.insert(out.end(), files.begin(), files.end());
    } else {
      out.push_back(p);
    }
  }
  return out;
}

int run_predict(const PredictArgs& a) {
  const std::vector<std::string> files = expand_inputs(a.inputs);
  std::unique_ptr<vb::Backend> be = vb::make_backend(a.device, a.threads);
  vb::LoadedModel lm = vb::load_model_file(*be, a.model, 224);
  if (a.image_size.h) lm.image_size = a.image_size;
  const vb::data::ImageSize S = lm.image_size;
  const int C = lm.model->config().num_classes, B = a.batch_size;
  const size_t per_image = 3 * size_t(S.pixels());
  lm.model->plan(B, S);
  const auto names = vb::class_names();
  nlohmann::ordered_json results = nlohmann::ordered_json::array();
  std::vector<float> images(size_t(B) * per_image), logits(size_t(B) * C), probs(logits.size());
  int failures = 0;
  vb::EvalPass pass(*be);  // the model's weights stay as they are for every batch below
  for (size_t start = 0; start < files.size(); start += size_t(B)) {
    std::vector<std::string> ok;
    for (size_t i = start; i < files.size() && i < start + size_t(B); ++i) {
      try {
        vb::data::Image img = vb::data::decode_jpeg_file(files[i]);
        vb::data::eval_transform(img, S, images.data() + ok.size() * per_image);
        ok.push_back(files[i]);
      } catch (const std::exception& e) {
        ++failures;
        std::fprintf(stderr, "skipped: %s\n", vb::escape(e.what(), 1000).c_str());
        if (a.json) results.push_back({{"image", files[i]}, {"error", e.what()}});
      }
    }
    if (ok.empty()) continue;
    const int n = int(ok.size());
    be->upload_activation(lm.model->input(), images.data(), n, 3, S.h, S.w);
    lm.model->forward(n, false);
    be->download(logits.data(), lm.model->logits(), sizeof(float) * size_t(n) * C);
    vb::cpu::softmax<float>(n, C, logits.data(), probs.data());
    for (int i = 0; i < n; ++i) {
      const float* p = probs.data() + size_t(i) * C;
      const int best = int(std::max_element(p, p + C) - p);
      if (a.json) {
        nlohmann::ordered_json pj;
        for (int c = 0; c < C; ++c) pj[names[size_t(c)]] = p[c];
        results.push_back({{"image", ok[size_t(i)]}, {"class", names[size_t(best)]}, {"index", best}, {"probabilities", pj}});
      } else {
        std::printf("%s  %-10s %.3f  [", vb::escape(ok[size_t(i)]).c_str(), names[size_t(best)].c_str(), p[best]);
        for (int c = 0; c < C; ++c) std::printf("%s%s %.3f", c ? ", " : "", names[size_t(c)].c_str(), p[c]);
        std::printf("]\n");
      }
    }
  }
  if (a.json) std::printf("%s\n", vb::json_dump(results, 2).c_str());
  if (failures == int(files.size()))
    vb::fail("none of the ", files.size(), files.size() == 1 ? " image" : " images", " could be read (the reasons are above)");
  return 0;
}

}  // namespace

VB_COMMAND("predict", "Classify images (files or folders of .jpg) with a trained model",
           [](CLI::App& app) -> std::function<int()> {
             auto a = std::make_shared<PredictArgs>();
             app.add_option("--model", a->model, "model file (.safetensors or .pth)")->required();
             app.add_option("images", a->inputs, "JPEG files or folders")->required();
             app.add_flag("--json", a->json, "print JSON");
             app.add_option("--device", a->device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
             app.add_option("--threads", a->threads, "CPU threads (0 = all cores)")->check(vb::tools::thread_count());
             vb::tools::add_image_size_option(app, a->image_size, "input size S or HxW (default: the model file's, else 224)");
             return [a] { return run_predict(*a); };
           });
