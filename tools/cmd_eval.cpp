// vbtrain eval: a model on a split: accuracy, per-class precision, recall and F1, the confusion matrix
// (text on the terminal, CSV and SVG files).
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>

#include "data/dataset.h"
#include "data/loader.h"
#include "engine/text.h"
#include "engine/train/evaluate.h"
#include "engine/train/options.h"
#include "tools/commands.h"
#include "tools/image_size_option.h"

namespace {

struct EvalArgs {
  std::string data, model, split = "test", out, device = "auto", on_bad = "skip";
  int threads = 0, batch_size = 150;
  vb::data::ImageSize image_size{0};  // 0: the model file's
};

int run_eval(const EvalArgs& a) {
  namespace fs = std::filesystem;
  const vb::data::Split split = vb::data::parse_split(a.split);
  vb::data::DatasetIndex index = vb::data::build_index(a.data);
  std::vector<vb::data::Sample> samples = vb::data::select_split(index.samples, split);
  if (samples.empty()) vb::fail(a.data, ": the ", a.split, " split has no clips");
  // The loss uses the notebook's criterion: class weights from the training split's labels.
  const std::vector<float> cw = vb::class_weights_for(vb::data::select_split(index.samples, vb::data::Split::Train));

  std::unique_ptr<vb::Backend> be = vb::make_backend(a.device, a.threads);
  vb::LoadedModel lm = vb::load_model_file(*be, a.model, 224);
  if (a.image_size.h) lm.image_size = a.image_size;
  lm.model->plan(a.batch_size, lm.image_size);
  vb::data::LoaderOptions lo;
  lo.batch_size = a.batch_size;
  lo.image_size = lm.image_size;
  lo.threads = a.threads;
  lo.on_bad = vb::data::parse_bad_image_policy(a.on_bad);
  lo.cache = vb::data::CachePolicy::Off;  // one pass: nothing to reuse
  lo.format = vb::data::PixelFormat::Uint8NHWC;  // normalised by the backend, as in training
  vb::data::Loader loader(samples, lo);
  vb::LossBuffers lb(*be, cw, a.batch_size);
  std::printf("eval: %s (%s, %s px) on %zu %s clips, %s\n", vb::escape(a.model).c_str(), lm.model->config().describe().c_str(),
              lm.image_size.str().c_str(), samples.size(), a.split.c_str(), be->description().c_str());
  const vb::EvalResult r = vb::evaluate(*lm.model, loader, lb);
  const std::vector<vb::data::SkippedFrame> skipped = loader.skipped(a.split);
  const fs::path out = a.out.empty() ? fs::path(a.model).parent_path() / ("eval-" + a.split) : fs::path(a.out);
  auto list_skipped = [&] {
    if (skipped.empty()) return;
    fs::create_directories(out);
    vb::write_file_atomic((out / "skipped.csv").string(), vb::data::skipped_csv(skipped));
    std::printf("%s; all listed in %s\n", vb::data::skipped_summary(skipped).c_str(),
                vb::escape((out / "skipped.csv").string()).c_str());
  };
  if (r.images == 0) {
    list_skipped();
    vb::fail(a.data, ": every frame of the ", a.split, " split (", samples.size(), " clips) is unreadable; see ",
             (out / "skipped.csv").string());
  }

  const auto names = vb::class_names();
  std::printf("%s\n%s", r.confusion.report_text(names).c_str(), r.confusion.to_text(names).c_str());
  std::printf("loss %.4f  (%lld images in %.1f s)\n", r.loss, (long long)r.images, r.seconds);
  fs::create_directories(out);
  vb::write_file_atomic((out / "confusion.csv").string(), r.confusion.to_csv(names));
  vb::write_file_atomic((out / "confusion.svg").string(), r.confusion.to_svg(names, a.split + " split"));
  vb::write_file_atomic((out / "confusion.txt").string(), r.confusion.to_text(names));
  nlohmann::ordered_json j = {{"model", vb::utf8_for_json(a.model)}, {"split", a.split}, {"images", r.images},
                              {"skipped", skipped.size()}, {"loss", r.loss}, {"accuracy", r.confusion.accuracy()}};
  for (int c = 0; c < vb::data::kNumClasses; ++c) {
    auto num = [](double v) { return std::isnan(v) ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(v); };
    j["classes"][names[size_t(c)]] = {{"precision", num(r.confusion.precision(c))}, {"recall", num(r.confusion.recall(c))},
                                      {"f1", num(r.confusion.f1(c))}, {"support", r.confusion.support(c)}};
  }
  vb::write_file_atomic((out / "metrics.json").string(), vb::json_dump(j, 2) + "\n");
  std::printf("wrote %s/{metrics.json, confusion.csv, confusion.svg, confusion.txt}\n", vb::escape(out.string()).c_str());
  list_skipped();
  return 0;
}

}  // namespace

VB_COMMAND("eval", "Evaluate a model on a split: accuracy, per-class precision/recall/F1, confusion matrix",
           [](CLI::App& app) -> std::function<int()> {
             auto a = std::make_shared<EvalArgs>();
             app.add_option("--data", a->data, "dataset folder")->required();
             app.add_option("--model", a->model, "model file (.safetensors or .pth)")->required();
             app.add_option("--split", a->split, "train, val or test (default test)")->check(CLI::IsMember({"train", "val", "test"}));
             app.add_option("--out", a->out, "where to write the files (default: next to the model, eval-<split>/)");
             app.add_option("--device", a->device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
             app.add_option("--threads", a->threads, "CPU threads (0 = all cores)")->check(vb::tools::thread_count());
             app.add_option("--batch-size", a->batch_size, "batch size (default 150)")->check(vb::tools::integer_in(1, 65536));
             vb::tools::add_image_size_option(app, a->image_size, "input size S or HxW (default: the model file's, else 224)");
             app.add_option("--on-bad-image", a->on_bad, "skip (default) or fail")->check(CLI::IsMember({"skip", "fail"}));
             return [a] { return run_eval(*a); };
           });
