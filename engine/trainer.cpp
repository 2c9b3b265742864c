#include "engine/trainer.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <thread>

#include "data/dataset.h"
#include "data/loader.h"
#include "engine/checkpoint.h"
#include "engine/optimizer.h"
#include "engine/progress.h"
#include "engine/text.h"
#include "engine/weights.h"
#include "kernels/cpu/ops.h"

namespace fs = std::filesystem;

namespace vb {

// ------------------------------------------------------------------------------------------------ options

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

namespace {
// The files a training run writes into its folder (model-epochN.safetensors matched apart).
const char* const kRunFiles[] = {"config.json", "metrics.jsonl", "metrics.csv", "checkpoint-last.safetensors",
                                 "checkpoint-best.safetensors", "final_model.safetensors", "report.html",
                                 "test_metrics.json", "test_confusion.csv", "test_confusion.svg",
                                 "val_confusion_best.csv", "skipped.csv"};
bool is_epoch_model_file(const std::string& n) {
  return n.rfind("model-epoch", 0) == 0 && n.size() > 23 && n.compare(n.size() - 12, 12, ".safetensors") == 0;
}
}  // namespace

std::string run_file_in(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return "";
  for (const char* f : kRunFiles)
    if (fs::exists(fs::path(dir) / f, ec)) return f;
  std::vector<std::string> models;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (is_epoch_model_file(e.path().filename().string())) models.push_back(e.path().filename().string());
  std::sort(models.begin(), models.end());
  return models.empty() ? "" : models[0];
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

// ------------------------------------------------------------------------------------------------ Ctrl-C

namespace {
std::atomic<bool> g_interrupted{false};
extern "C" void on_sigint(int) {
  if (g_interrupted.exchange(true)) _exit(130);  // a second Ctrl-C: leave at once
  const char msg[] = "\nvbtrain: interrupted; finishing the current step and saving (Ctrl-C again to quit now)\n";
  ssize_t ignored = ::write(STDERR_FILENO, msg, sizeof msg - 1);
  (void)ignored;
}
struct SigintGuard {
  void (*previous)(int);
  SigintGuard() : previous(std::signal(SIGINT, on_sigint)) { g_interrupted = false; }
  ~SigintGuard() { std::signal(SIGINT, previous); }
};

std::string fmt_g(double v) {
  if (std::isnan(v)) return "nan";
  char b[40];
  std::snprintf(b, sizeof b, "%.9g", v);
  return b;
}

void write_text_atomic(const fs::path& p, const std::string& s) { write_file_atomic(p.string(), s); }

// ------------------------------------------------------------------------------------------------ metrics

struct EpochRow {
  int64_t epoch = 0;  // 1-based, as printed
  double train_loss = NAN, val_loss = NAN, val_accuracy = NAN, lr = NAN, images_per_s = 0, seconds = 0;
  std::vector<double> class_accuracy;  // per class, validation

  nlohmann::json to_json() const {
    nlohmann::json ca = nlohmann::json::array();
    for (double v : class_accuracy) ca.push_back(std::isnan(v) ? nlohmann::json(nullptr) : nlohmann::json(v));
    auto num = [](double v) { return std::isnan(v) ? nlohmann::json(nullptr) : nlohmann::json(v); };
    return {{"epoch", epoch},
            {"train_loss", num(train_loss)},
            {"val_loss", num(val_loss)},
            {"val_accuracy", num(val_accuracy)},
            {"val_class_accuracy", ca},
            {"lr", lr},
            {"images_per_s", images_per_s},
            {"seconds", seconds}};
  }
  static EpochRow from_json(const nlohmann::json& j) {
    auto num = [](const nlohmann::json& v) { return v.is_null() ? double(NAN) : v.get<double>(); };
    EpochRow r;
    r.epoch = j.at("epoch");
    r.train_loss = num(j.at("train_loss"));
    r.val_loss = num(j.at("val_loss"));
    r.val_accuracy = num(j.at("val_accuracy"));
    for (const auto& v : j.at("val_class_accuracy")) r.class_accuracy.push_back(num(v));
    r.lr = j.at("lr");
    r.images_per_s = j.value("images_per_s", 0.0);
    r.seconds = j.value("seconds", 0.0);
    return r;
  }
};

void write_metrics(const fs::path& dir, const std::vector<EpochRow>& rows) {
  std::ostringstream csv, jl;
  csv << "epoch,train_loss,val_loss,val_accuracy,lr,images_per_s,seconds";
  for (const auto& n : class_names()) csv << ",val_acc_" << n;
  csv << "\n";
  for (const EpochRow& r : rows) {
    csv << r.epoch << ',' << fmt_g(r.train_loss) << ',' << fmt_g(r.val_loss) << ',' << fmt_g(r.val_accuracy) << ','
        << fmt_g(r.lr) << ',' << fmt_g(r.images_per_s) << ',' << fmt_g(r.seconds);
    for (double v : r.class_accuracy) csv << ',' << fmt_g(v);
    csv << "\n";
    jl << r.to_json().dump() << "\n";
  }
  write_text_atomic(dir / "metrics.csv", csv.str());
  write_text_atomic(dir / "metrics.jsonl", jl.str());
}

std::vector<EpochRow> read_metrics(const fs::path& dir) {
  std::vector<EpochRow> rows;
  std::ifstream f(dir / "metrics.jsonl");
  std::string line;
  int n = 0;
  while (std::getline(f, line)) {
    ++n;
    if (line.empty()) continue;
    try {
      rows.push_back(EpochRow::from_json(nlohmann::json::parse(line)));
    } catch (const std::exception& e) {
      fail((dir / "metrics.jsonl").string(), ":", n, ": unreadable metrics line (", e.what(), ")");
    }
  }
  return rows;
}

void write_report(const fs::path& dir, const TrainOptions& opt, const std::string& model_desc,
                  const std::vector<EpochRow>& rows, const Confusion* val_best, int64_t best_epoch,
                  const Confusion* test) {
  std::vector<double> tl, vl, va;
  for (const auto& r : rows) {
    tl.push_back(r.train_loss);
    vl.push_back(r.val_loss);
    va.push_back(r.val_accuracy);
  }
  const auto names = class_names();
  std::ostringstream h;
  h << "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>vbtrain report</title>\n"
    << "<style>body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse}"
       "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}"
       "pre{background:#f8f8f8;padding:8px}</style></head><body>\n";
  h << "<h1>B1 training report</h1>\n<p>" << html_escape(model_desc) << "; data <code>" << html_escape(opt.data)
    << "</code>; " << rows.size() << " of " << opt.epochs << " epochs";
  if (!opt.preset.empty()) h << "; preset <b>" << html_escape(opt.preset) << "</b>";
  h << ".</p>\n";
  h << svg_line_chart("Training and Validation Loss", "loss",
                      {{"Training Loss", "#1f4fd0", tl}, {"Validation Loss", "#d0301f", vl}});
  h << svg_line_chart("Validation Accuracy", "accuracy", {{"Validation Accuracy", "#1f9d3a", va}});
  if (val_best) {
    h << "<h2>Validation confusion matrix (best epoch, " << best_epoch + 1 << ")</h2>\n";
    h << val_best->to_svg(names, "validation, epoch " + std::to_string(best_epoch + 1));
  }
  if (test) {
    h << "<h2>Test split (final model)</h2>\n" << test->to_svg(names, "test");
    h << "<pre>" << html_escape(test->report_text(names)) << "</pre>\n";
  }
  h << "<h2>Epochs</h2>\n<table><tr><th>epoch</th><th>train loss</th><th>val loss</th><th>val acc</th><th>lr</th>"
       "<th>img/s</th><th>s</th></tr>\n";
  for (const auto& r : rows)
    h << "<tr><td>" << r.epoch << "</td><td>" << fmt_g(r.train_loss) << "</td><td>" << fmt_g(r.val_loss)
      << "</td><td>" << fmt_g(r.val_accuracy) << "</td><td>" << fmt_g(r.lr) << "</td><td>"
      << int64_t(r.images_per_s) << "</td><td>" << fmt_g(r.seconds) << "</td></tr>\n";
  h << "</table>\n<h2>Configuration</h2>\n<pre>" << html_escape(json_dump(opt.to_json(), 2)) << "</pre>\n</body></html>\n";
  write_text_atomic(dir / "report.html", h.str());
}

data::LoaderOptions loader_options(const TrainOptions& o, bool train, Backend& be) {
  data::LoaderOptions lo;
  lo.batch_size = o.batch_size;
  lo.image_size = o.image_size;
  lo.threads = o.threads;
  lo.train = train;
  lo.shuffle = train;
  lo.seed = o.seed;
  lo.on_bad = data::parse_bad_image_policy(o.on_bad_image);
  lo.cache = data::parse_cache_policy(o.cache);
  lo.dct_scaling = o.dct_scaling;
  Backend* b = &be;  // outlives the loaders (declared before them in run_training)
  lo.alloc = [b](size_t n) { return b->host_alloc(n); };
  lo.free = [b](void* p) { b->host_free(p); };
  return lo;
}

// Every frame the run's loaders skipped (train, val, test), kept in skipped.csv. A resumed run starts from the
// list its earlier processes wrote, so frames that this process has not read again stay listed.
struct SkipList {
  std::vector<data::SkippedFrame> frames;
  size_t announced = 0;
  void merge(const std::vector<data::SkippedFrame>& more) {
    for (const auto& f : more) {
      bool known = false;
      for (const auto& g : frames) known = known || (g.split == f.split && g.path == f.path);
      if (!known) frames.push_back(f);
    }
  }
  size_t count(const std::string& split) const {
    return size_t(std::count_if(frames.begin(), frames.end(), [&](const auto& f) { return f.split == split; }));
  }
  // Writes skipped.csv (when there is something to list) and prints a line when the list has grown.
  void save(const fs::path& dir) {
    if (frames.empty()) return;
    std::stable_sort(frames.begin(), frames.end(), [](const auto& a, const auto& b) { return rank(a.split) < rank(b.split); });
    write_file_atomic((dir / "skipped.csv").string(), data::skipped_csv(frames));
    if (frames.size() != announced) {
      std::printf("%s; all listed in %s\n", data::skipped_summary(frames).c_str(),
                  escape((dir / "skipped.csv").string()).c_str());
      std::fflush(stdout);
      announced = frames.size();
    }
  }
  static int rank(const std::string& split) { return split == "train" ? 0 : split == "val" ? 1 : 2; }
};

// A split whose every frame was unreadable: an error (a loss or an accuracy over no images means nothing).
[[noreturn]] void fail_all_skipped(const std::string& data, const char* split, size_t clips, SkipList& skipped,
                                   const fs::path& out) {
  skipped.save(out);
  fail(data, ": every frame of the ", split, " split (", clips, " clips) is unreadable; see ",
       (out / "skipped.csv").string());
}

void upload_batch(Model& model, const data::Batch& b, int64_t* labels_dev) {
  const data::ImageSize S = model.image_size();
  model.backend().upload_activation(model.input(), b.images, b.size, 3, S.h, S.w);
  model.backend().upload(labels_dev, b.labels, sizeof(int64_t) * size_t(b.size));
}

}  // namespace

// ------------------------------------------------------------------------------------------------ evaluate

std::vector<float> class_weights_for(const std::vector<data::Sample>& train) {
  std::vector<float> cw(data::kNumClasses, 1.f);
  std::vector<int64_t> labels;
  for (const auto& s : train) labels.push_back(s.label);
  if (!labels.empty()) cpu::class_weights_from_labels(int64_t(labels.size()), labels.data(), data::kNumClasses, cw.data());
  return cw;
}

LossBuffers::LossBuffers(Backend& b, const std::vector<float>& weights, int max_batch)
    : be(b),
      class_weights(static_cast<float*>(b.alloc(sizeof(float) * weights.size()))),
      labels(static_cast<int64_t*>(b.alloc(sizeof(int64_t) * size_t(max_batch)))),
      loss(static_cast<float*>(b.alloc(sizeof(float)))) {
  b.upload(class_weights, weights.data(), sizeof(float) * weights.size());
}

LossBuffers::~LossBuffers() {
  be.release(class_weights);
  be.release(labels);
  be.release(loss);
}

EvalResult evaluate(Model& model, data::Loader& loader, LossBuffers& lb) {
  Backend& be = model.backend();
  const int C = model.config().num_classes;
  EvalResult r;
  r.confusion = Confusion(C);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<float> logits(size_t(model.max_batch()) * C);
  double loss_sum = 0;
  int64_t batches = 0;
  loader.start_epoch(0);
  Progress progress("eval", loader.batches_per_epoch(), 10.0);
  while (const data::Batch* b = loader.next()) {
    if (b->size == 0) continue;
    upload_batch(model, *b, lb.labels);
    model.forward(b->size, false);
    be.softmax_wce(b->size, C, model.logits(), lb.labels, lb.class_weights, nullptr, nullptr, lb.loss);
    float loss = 0;
    be.download(&loss, lb.loss, sizeof(float));
    be.download(logits.data(), model.logits(), sizeof(float) * size_t(b->size) * C);
    for (int i = 0; i < b->size; ++i) {
      const float* row = logits.data() + size_t(i) * C;
      r.confusion.add(int(b->labels[i]), int(std::max_element(row, row + C) - row));
    }
    loss_sum += loss;
    ++batches;
    r.images += b->size;
    progress.update(batches, b->size, loss);
  }
  progress.finish();
  r.loss = batches ? loss_sum / double(batches) : NAN;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

LoadedModel load_model_file(Backend& be, const std::string& path, data::ImageSize image_size_default) {
  StateDict sd = load_state_dict_file(path);
  LoadedModel lm;
  lm.image_size = image_size_default;
  ModelConfig cfg = infer_model_config(sd);
  auto it = sd.metadata.find("vbtrain.config");
  if (it != sd.metadata.end()) {
    try {
      auto j = nlohmann::json::parse(it->second);
      if (j.contains("image_size")) lm.image_size = j.at("image_size").get<data::ImageSize>();
    } catch (const std::exception&) {
      // a damaged metadata entry leaves the tensors' own configuration in force
    }
  }
  if (cfg.num_classes != data::kNumClasses)
    fail(path, ": the model has ", cfg.num_classes, " outputs, B1 needs ", data::kNumClasses,
         " (convert ImageNet weights with vbconvert first)");
  sd.metadata.clear();
  lm.model = std::make_unique<Model>(be, cfg);
  lm.model->load_state_dict(sd, path);
  return lm;
}

// ------------------------------------------------------------------------------------------------ training

int run_training(TrainOptions opt, const std::string& resume, bool epochs_given) {
  const auto names = class_names();
  const bool overwrite = opt.overwrite;
  bool resume_run = false, resume_notebook = false;
  std::vector<fs::path> checkpoints;  // of a run folder to resume, newest first
  std::unique_ptr<NotebookCheckpoint> notebook;
  if (!resume.empty()) {
    if (fs::is_directory(resume)) {
      resume_run = true;
      const fs::path cfg = fs::path(resume) / "config.json";
      if (!fs::exists(cfg)) fail(resume, ": not a vbtrain run folder (no config.json)");
      const int epochs = opt.epochs;
      const uint64_t stop = opt.stop_after_steps;
      const int delay = opt.step_delay_ms;
      try {
        opt = TrainOptions::from_json(nlohmann::json::parse(read_file(cfg.string())));
      } catch (const nlohmann::json::exception& e) {
        fail(cfg.string(), ": unreadable (", e.what(), ")");
      } catch (const Error& e) {
        fail(cfg.string(), ": ", e.what());
      }
      if (epochs_given) opt.epochs = epochs;
      opt.stop_after_steps = int64_t(stop);
      opt.step_delay_ms = delay;
      opt.out = resume;
      try {
        opt.validate();
      } catch (const Error& e) {
        fail(cfg.string(), ": ", e.what());
      }
      if (overwrite)
        fail(resume, ": --resume continues this run and --overwrite would replace it: pass one of them");
      // checkpoint-last is the newest; checkpoint-best (the end of the best epoch, written the same way) is the
      // fall-back. Model files (model-epochN, final_model) hold no optimizer state: not resumable.
      for (const char* f : {"checkpoint-last.safetensors", "checkpoint-best.safetensors"})
        if (fs::exists(fs::path(resume) / f)) checkpoints.push_back(fs::path(resume) / f);
    } else if (fs::is_regular_file(resume)) {
      resume_notebook = true;
      notebook = std::make_unique<NotebookCheckpoint>(read_notebook_checkpoint(resume));
      const ModelConfig nc = infer_model_config(notebook->model);  // the checkpoint decides the model
      opt.blocks = nc.blocks;
      opt.width = nc.width;
      opt.hidden = nc.hidden;
      if (nc.num_classes != data::kNumClasses)
        fail(resume, ": the checkpoint's model has ", nc.num_classes, " outputs, B1 has ", data::kNumClasses);
    } else {
      fail(resume, ": no such run folder or checkpoint file");
    }
  }
  if (opt.data.empty()) fail("no dataset: pass --data DIR (the Volleyball videos/ folder or its parent)");
  opt.validate();
  const fs::path out(opt.out);
  if (fs::exists(out) && !fs::is_directory(out)) fail(opt.out, ": exists and is not a folder");
  // Never over a finished or unfinished run without being told: its model, checkpoints and metrics. With
  // --overwrite its files are removed once the data and the model have been set up (so a typo in another
  // option does not cost the old run).
  bool remove_old_run = false;
  if (!resume_run) {
    const std::string existing = run_file_in(opt.out);
    if (!existing.empty() && !overwrite)
      fail(opt.out, ": already holds a training run (", existing, "); continue it with --resume ", opt.out,
           ", or pass --overwrite to replace it");
    remove_old_run = !existing.empty();
  }
  fs::create_directories(out);
  if (resume_run && checkpoints.empty()) {
    // Nothing to continue from. Starting again is right only when nothing beyond the first epoch would be
    // lost (a run killed before its first checkpoint; the first epoch is redone identically).
    const std::vector<EpochRow> done = read_metrics(out);
    if (done.size() > 1 || fs::exists(out / "final_model.safetensors"))
      fail(resume, ": no checkpoint to continue from (checkpoint-last.safetensors and checkpoint-best.safetensors "
                   "are missing), but the folder holds ", done.size(), " finished epochs; model files hold no "
                   "optimizer state, so the run cannot continue exactly: start a new run (a new --out, or "
                   "--overwrite to replace this one)");
    std::printf("%s: stopped before its first checkpoint; starting it again from epoch 1\n", escape(opt.out).c_str());
    resume_run = false;
  }
  // Temporary files of saves that a crash interrupted (write_file_atomic names them <file>.tmp.<pid>).
  for (const auto& e : fs::directory_iterator(out))
    if (e.is_regular_file() && e.path().filename().string().find(".tmp.") != std::string::npos) fs::remove(e.path());

  // ---- data ----
  data::DatasetIndex index = data::build_index(opt.data);
  for (const auto& s : index.skipped_entries) std::printf("note: %s\n", escape(s).c_str());
  std::vector<data::Sample> train = data::select_split(index.samples, data::Split::Train);
  std::vector<data::Sample> val = data::select_split(index.samples, data::Split::Val);
  std::vector<data::Sample> test = data::select_split(index.samples, data::Split::Test);
  if (train.empty()) fail(opt.data, ": no training clips (videos of the train split with annotations)");
  const std::vector<float> cw = class_weights_for(train);

  // ---- device, model ----
  std::unique_ptr<Backend> be = make_backend(opt.device, opt.threads);
  if (opt.precision != "tf32" && opt.precision != "fp32") fail("--precision must be tf32 or fp32, got '", opt.precision, "'");
  be->set_precision(opt.precision == "fp32" || be->device() == Device::CPU ? Precision::FP32 : Precision::TF32);
  be->set_deterministic(opt.deterministic);
  StateDict init;
  if (!opt.weights.empty() && !resume_run && !resume_notebook) {
    init = load_state_dict_file(opt.weights);
    ModelConfig wc = infer_model_config(init);
    if (wc.num_classes != data::kNumClasses)
      fail(opt.weights, ": the weights have a ", wc.num_classes, "-class head; B1 has ", data::kNumClasses,
           " classes: convert them first (vbconvert ", opt.weights, " engine.safetensors)");
    opt.blocks = wc.blocks;
    opt.width = wc.width;
    opt.hidden = wc.hidden;
    init.metadata.clear();
  }
  const ModelConfig cfg = opt.model_config();
  Model model(*be, cfg);
  if (!init.order.empty()) {
    model.load_state_dict(init, opt.weights);
  } else if (!resume_run && !resume_notebook) {
    model.init_torchvision(opt.seed);
    std::fprintf(stderr, "warning: no --weights: the model starts from torchvision's random initialisation, not "
                         "ImageNet weights (see weights/README.md)\n");
  }
  model.plan(opt.batch_size, opt.image_size);
  AdamW adamw(model, AdamWOptions{opt.lr, 0.9, 0.999, 1e-8, opt.weight_decay});
  StepLR sched(opt.lr, opt.step_size, opt.gamma);
  TrainPosition pos;
  std::vector<EpochRow> rows;
  std::unique_ptr<Confusion> best_confusion;
  if (resume_run) {
    std::string why;  // why the newer checkpoints were passed over
    for (size_t i = 0;; ++i) {
      if (i == checkpoints.size())
        fail(resume, ": no readable checkpoint to continue from (", why, ")");
      try {
        pos = load_checkpoint(checkpoints[i].string(), model, adamw, sched);
      } catch (const Error& e) {
        std::fprintf(stderr, "warning: %s\n", escape(e.what(), 1000).c_str());
        why += std::string(why.empty() ? "" : "; ") + e.what();
        continue;
      }
      if (checkpoints[i].filename() != "checkpoint-last.safetensors")
        std::printf("note: %s: checkpoint-last.safetensors is %s; continuing from %s (the end of epoch %lld): "
                    "the epochs after it are trained again\n",
                    escape(opt.out).c_str(), why.empty() ? "missing" : "unreadable",
                    checkpoints[i].filename().string().c_str(), (long long)pos.epoch);
      break;
    }
    rows = read_metrics(out);
    while (!rows.empty() && rows.back().epoch > pos.epoch) rows.pop_back();  // epochs after the checkpoint
    if (!pos.best_confusion.empty())
      best_confusion = std::make_unique<Confusion>(Confusion::from_counts(data::kNumClasses, pos.best_confusion));
    if (pos.epoch >= opt.epochs)
      std::printf("%s: all %d epochs are done (pass a larger --epochs to train further)\n", out.string().c_str(),
                  opt.epochs);
    else
      std::printf("resuming %s at epoch %lld%s with its saved settings (config.json; only --epochs is taken "
                  "from the command line)\n",
                  out.string().c_str(), (long long)pos.epoch + 1,
                  pos.step_in_epoch ? (", step " + std::to_string(pos.step_in_epoch + 1)).c_str() : "");
  } else if (resume_notebook) {
    NotebookCheckpoint& nb = *notebook;
    model.load_state_dict(nb.model, resume);
    std::vector<HostTensor> m, v;
    std::vector<int64_t> steps;
    for (const auto& [idx, st] : nb.optimizer_state) {
      if (idx != int64_t(m.size())) fail(resume, ": optimizer state is missing parameter ", m.size());
      m.push_back(st.exp_avg);
      v.push_back(st.exp_avg_sq);
      steps.push_back(st.step);
    }
    adamw.load_torch_state(m, v, steps, resume);
    if (nb.scheduler && !nb.scheduler->last_lr.empty())
      sched.set_state(nb.scheduler->last_epoch, nb.scheduler->last_lr[0]);
    pos.epoch = nb.epoch + 1;  // the notebook saves after finishing epoch `epoch` (0-based)
    std::printf("continuing the notebook's checkpoint %s: epoch %lld done, next epoch %lld, lr %g\n", resume.c_str(),
                (long long)nb.epoch + 1, (long long)pos.epoch + 1, sched.lr());
  }
  if (remove_old_run) {
    for (const auto& e : std::vector<fs::directory_entry>(fs::directory_iterator(out), fs::directory_iterator())) {
      const std::string n = e.path().filename().string();
      if (std::find(std::begin(kRunFiles), std::end(kRunFiles), n) != std::end(kRunFiles) || is_epoch_model_file(n))
        fs::remove(e.path());
    }
    std::printf("--overwrite: removed the previous run's files from %s\n", escape(opt.out).c_str());
  }
  nlohmann::json config = opt.to_json();
  config["model"] = cfg.describe();
  config["backend"] = be->description();
  config["compute_precision"] = precision_name(be->precision());  // the CPU computes in fp32 whatever --precision
  config["train_clips"] = train.size();
  config["val_clips"] = val.size();
  config["test_clips"] = test.size();
  config["class_weights"] = cw;
  write_text_atomic(out / "config.json", json_dump(config, 2) + "\n");

  data::Loader train_loader(train, loader_options(opt, true, *be));
  std::unique_ptr<data::Loader> val_loader;
  if (!val.empty()) val_loader = std::make_unique<data::Loader>(val, loader_options(opt, false, *be));
  LossBuffers dev(*be, cw, opt.batch_size);
  SkipList skipped;
  if (resume_run && fs::exists(out / "skipped.csv")) {
    const fs::path p = out / "skipped.csv";
    skipped.merge(data::parse_skipped_csv(read_file(p.string()), p.string()));
    skipped.announced = skipped.frames.size();
  }
  if (val.empty())
    std::fprintf(stderr, "warning: %s: no validation clips (no annotated videos of the val split): the validation "
                         "loss and accuracy stay empty and no checkpoint-best is written\n", escape(opt.data).c_str());
  if (test.empty() && opt.evaluate_test)
    std::fprintf(stderr, "warning: %s: no test clips: the final model is not evaluated on a test split\n",
                 escape(opt.data).c_str());

  std::printf("vbtrain: %s on %s (%s); %zu train / %zu val / %zu test clips; batch %d, image %s, %d epochs\n",
              cfg.describe().c_str(), be->description().c_str(), precision_name(be->precision()), train.size(),
              val.size(), test.size(), opt.batch_size, opt.image_size.str().c_str(), opt.epochs);
  std::fflush(stdout);

  SigintGuard sigint;
  int64_t steps_this_run = 0;
  auto save_last = [&](const TrainPosition& p) {
    save_checkpoint((out / "checkpoint-last.safetensors").string(), model, adamw, sched, p, config);
  };
  auto interrupted = [&] {
    return g_interrupted.load() || (opt.stop_after_steps > 0 && steps_this_run >= opt.stop_after_steps);
  };
  auto announce_stop = [&] {
    std::printf("stopped; resume with: vbtrain train --resume %s\n", out.string().c_str());
    std::fflush(stdout);
  };

  for (int64_t epoch = pos.epoch; epoch < opt.epochs; ++epoch) {
    const auto t0 = std::chrono::steady_clock::now();
    model.set_backbone_frozen(epoch < opt.freeze_backbone_epochs);
    const double lr = sched.lr();
    train_loader.start_epoch(int(epoch));
    int64_t step = 0;
    double loss_sum = 0;
    if (pos.epoch == epoch && pos.step_in_epoch > 0) {  // resuming inside this epoch: replay the order only
      while (step < pos.step_in_epoch) {
        const data::Batch* b = train_loader.next();
        if (!b) break;
        if (b->size) ++step;  // as training counts them: batches whose frames were all skipped do not count
      }
      loss_sum = pos.partial_loss_sum;
    }
    const int64_t total = train_loader.batches_per_epoch();
    Progress progress("epoch " + std::to_string(epoch + 1) + "/" + std::to_string(opt.epochs), total, 10.0);
    int64_t images = 0;
    // The losses come back without stalling the device (Backend::scalar_push/pop): read about one step late,
    // in order, and summed in that order, so the sum is the same as reading each at once.
    int64_t read = step;
    std::deque<int> unread_sizes;
    auto read_losses = [&](bool wait) {
      float loss = 0;
      while (!unread_sizes.empty() && be->scalar_pop(&loss, wait)) {
        if (!std::isfinite(loss)) fail("the training loss is ", loss, " at epoch ", epoch + 1, ", step ", read + 1, " (lr ", lr, ")");
        loss_sum += loss;
        ++read;
        progress.update(read, unread_sizes.front(), loss);
        unread_sizes.pop_front();
      }
    };
    while (const data::Batch* b = train_loader.next()) {
      if (b->size == 0) continue;
      upload_batch(model, *b, dev.labels);
      model.forward(b->size, true);
      be->softmax_wce(b->size, data::kNumClasses, model.logits(), dev.labels, dev.class_weights, nullptr,
                      model.dlogits(), dev.loss);
      model.backward(b->size);
      adamw.step(lr);
      be->scalar_push(dev.loss);
      unread_sizes.push_back(b->size);
      ++step;
      ++steps_this_run;
      images += b->size;
      be->wait_uploads();  // the loader reuses this batch's buffer at its next call
      read_losses(false);
      if (opt.step_delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(opt.step_delay_ms));
      if (interrupted() && step < total) {
        read_losses(true);
        progress.finish();
        TrainPosition p = pos;
        p.epoch = epoch;
        p.step_in_epoch = step;
        p.partial_loss_sum = loss_sum;
        save_last(p);
        skipped.merge(train_loader.skipped("train"));
        skipped.save(out);
        announce_stop();
        return 130;
      }
    }
    read_losses(true);
    progress.finish();
    skipped.merge(train_loader.skipped("train"));
    if (step == 0) fail_all_skipped(opt.data, "training", train.size(), skipped, out);
    const double train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EpochRow row;
    row.epoch = epoch + 1;
    row.train_loss = step ? loss_sum / double(step) : NAN;
    row.lr = lr;
    row.images_per_s = train_seconds > 0 ? double(images) / train_seconds : 0;
    std::unique_ptr<Confusion> conf;
    if (val_loader) {
      EvalResult v = evaluate(model, *val_loader, dev);
      skipped.merge(val_loader->skipped("val"));
      if (v.images == 0) fail_all_skipped(opt.data, "validation", val.size(), skipped, out);
      row.val_loss = v.loss;
      row.val_accuracy = v.confusion.accuracy();
      for (int c = 0; c < data::kNumClasses; ++c) row.class_accuracy.push_back(v.confusion.recall(c));
      conf = std::make_unique<Confusion>(v.confusion);
    } else {
      row.class_accuracy.assign(data::kNumClasses, NAN);
    }
    row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sched.step();

    pos.epoch = epoch + 1;
    pos.step_in_epoch = 0;
    pos.partial_loss_sum = 0;
    const bool best = conf && row.val_accuracy > pos.best_val_accuracy;
    if (best) {
      pos.best_val_accuracy = row.val_accuracy;
      pos.best_epoch = epoch;
      best_confusion = std::make_unique<Confusion>(*conf);
      pos.best_confusion = conf->counts();
      write_text_atomic(out / "val_confusion_best.csv", conf->to_csv(names));
    }
    // checkpoint-last is the commit point of the epoch, so it is written last: a crash before it redoes the
    // epoch (identically), and the files written before it are then written again.
    if (best) save_checkpoint((out / "checkpoint-best.safetensors").string(), model, adamw, sched, pos, config);
    if (epoch % 10 == 0) save_model_file((out / ("model-epoch" + std::to_string(epoch) + ".safetensors")).string(), model, opt.image_size);
    rows.push_back(row);
    write_metrics(out, rows);
    write_report(out, opt, cfg.describe(), rows, best_confusion.get(), pos.best_epoch, nullptr);
    save_last(pos);

    skipped.save(out);
    const data::LoaderStats ls = train_loader.stats();
    char val_text[64] = "no validation split";
    if (conf) std::snprintf(val_text, sizeof val_text, "val loss %.4f  val acc %.4f", row.val_loss, row.val_accuracy);
    std::printf("epoch %lld/%d  train loss %.4f  %s  lr %.3g  %.0f img/s  %.1f s  (waited %.1f s for data)%s\n",
                (long long)epoch + 1, opt.epochs, row.train_loss, val_text, lr, row.images_per_s, row.seconds,
                ls.wait_seconds, best ? "  (best)" : "");
    if (conf) {
      std::printf("  per class:");
      for (int c = 0; c < data::kNumClasses; ++c)
        std::printf(" %s %.2f", names[size_t(c)].c_str(), row.class_accuracy[size_t(c)]);
      std::printf("\n");
    }
    std::fflush(stdout);
    if (interrupted() && epoch + 1 < opt.epochs) {
      announce_stop();
      return 130;
    }
  }

  save_model_file((out / "final_model.safetensors").string(), model, opt.image_size);
  std::unique_ptr<Confusion> test_conf;
  if (opt.evaluate_test && !test.empty()) {
    data::Loader test_loader(test, loader_options(opt, false, *be));
    EvalResult t = evaluate(model, test_loader, dev);
    skipped.merge(test_loader.skipped("test"));
    if (t.images == 0) fail_all_skipped(opt.data, "test", test.size(), skipped, out);
    test_conf = std::make_unique<Confusion>(t.confusion);
    write_text_atomic(out / "test_confusion.csv", t.confusion.to_csv(names));
    write_text_atomic(out / "test_confusion.svg", t.confusion.to_svg(names, "test"));
    nlohmann::json tj = {{"loss", t.loss}, {"accuracy", t.confusion.accuracy()}, {"images", t.images},
                         {"skipped", skipped.count("test")}};
    write_text_atomic(out / "test_metrics.json", json_dump(tj, 2) + "\n");
    std::printf("test: loss %.4f  accuracy %.4f (%lld / %lld)\n%s", t.loss, t.confusion.accuracy(),
                (long long)t.confusion.correct(), (long long)t.confusion.total(),
                t.confusion.report_text(names).c_str());
  }
  write_report(out, opt, cfg.describe(), rows, best_confusion.get(), pos.best_epoch, test_conf.get());
  skipped.announced = 0;  // the summary once more, at the end, where it is seen
  skipped.save(out);
  std::printf("done: %s (final model, checkpoints, metrics.csv, report.html)\n", escape(opt.out).c_str());
  return 0;
}

}  // namespace vb
