#include "engine/train/run_folder.h"

#include <algorithm>
#include <cstdio>

#include "data/annotations.h"
#include "engine/file_io.h"
#include "engine/train/history.h"
#include "kernels/check.h"

namespace fs = std::filesystem;

namespace vb {

namespace {

// The files a training run writes into its folder (model-epochN.safetensors matched apart).
const char* const kRunFiles[] = {"config.json", "metrics.jsonl", "metrics.csv", "checkpoint-last.safetensors",
                                 "checkpoint-best.safetensors", "final_model.safetensors", "report.html",
                                 "test_metrics.json", "test_confusion.csv", "test_confusion.svg",
                                 "val_confusion_best.csv", "skipped.csv", "timing.json"};
bool is_epoch_model_file(const std::string& n) {
  return n.rfind("model-epoch", 0) == 0 && n.size() > 23 && n.compare(n.size() - 12, 12, ".safetensors") == 0;
}

// The notebook's checkpoint decides the model.
void take_notebook_model(TrainOptions& opt, const NotebookCheckpoint& nb, const std::string& path) {
  const ModelConfig nc = infer_model_config(nb.model, path);
  opt.blocks = nc.blocks;
  opt.width = nc.width;
  opt.hidden = nc.hidden;
  if (nc.num_classes != data::kNumClasses)
    fail(path, ": the checkpoint's model has ", nc.num_classes, " outputs, B1 has ", data::kNumClasses);
}

// A run folder without a checkpoint. Starting again is right only when nothing beyond the first epoch would be
// lost (a run killed before its first checkpoint; the first epoch is redone identically).
void restart_without_checkpoint(ResolvedRun& r) {
  const fs::path out(r.opt.out);
  const std::vector<EpochRow> done = read_metrics(out);
  if (done.size() > 1 || fs::exists(out / "final_model.safetensors"))
    fail(r.resume, ": no checkpoint to continue from (checkpoint-last.safetensors and checkpoint-best.safetensors "
                   "are missing), but the folder holds ", done.size(), " finished epochs; model files hold no "
                   "optimizer state, so the run cannot continue exactly: start a new run (a new --out, or "
                   "--overwrite to replace this one)");
  std::printf("%s: stopped before its first checkpoint; starting it again from epoch 1\n", escape(r.opt.out).c_str());
  r.from = ResumeFrom::Nothing;
}

void prepare_out_folder(ResolvedRun& r) {
  const fs::path out(r.opt.out);
  if (fs::exists(out) && !fs::is_directory(out)) fail(r.opt.out, ": exists and is not a folder");
  // Never over a finished or unfinished run without being told: its model, checkpoints and metrics. With
  // --overwrite its files are removed once the data and the model have been set up (so a typo in another
  // option does not cost the old run).
  if (r.from != ResumeFrom::RunFolder) {
    const std::string existing = run_file_in(r.opt.out);
    if (!existing.empty() && !r.opt.overwrite)
      fail(r.opt.out, ": already holds a training run (", existing, "); continue it with --resume ", r.opt.out,
           ", or pass --overwrite to replace it");
    r.remove_old_run = !existing.empty();
  }
  fs::create_directories(out);
  if (r.from == ResumeFrom::RunFolder && r.checkpoints.empty()) restart_without_checkpoint(r);
  // Temporary files of saves that a crash interrupted (write_file_atomic names them <file>.tmp.<pid>).
  for (const auto& e : fs::directory_iterator(out))
    if (e.is_regular_file() && e.path().filename().string().find(".tmp.") != std::string::npos) fs::remove(e.path());
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

void remove_run_files(const fs::path& dir) {
  for (const auto& e : std::vector<fs::directory_entry>(fs::directory_iterator(dir), fs::directory_iterator())) {
    const std::string n = e.path().filename().string();
    if (std::find(std::begin(kRunFiles), std::end(kRunFiles), n) != std::end(kRunFiles) || is_epoch_model_file(n))
      fs::remove(e.path());
  }
}

TrainOptions options_of_run_folder(const std::string& dir, const TrainOptions& cmdline, bool epochs_given) {
  const fs::path cfg = fs::path(dir) / "config.json";
  if (!fs::exists(cfg)) fail(dir, ": not a vbtrain run folder (no config.json)");
  TrainOptions opt;
  try {
    opt = TrainOptions::from_json(nlohmann::json::parse(read_file(cfg.string())));
  } catch (const nlohmann::json::exception& e) {
    fail(cfg.string(), ": unreadable (", e.what(), ")");
  } catch (const Error& e) {
    fail(cfg.string(), ": ", e.what());
  }
  if (epochs_given) opt.epochs = cmdline.epochs;
  opt.stop_after_steps = cmdline.stop_after_steps;
  opt.step_delay_ms = cmdline.step_delay_ms;
  opt.out = dir;
  try {
    opt.validate();
  } catch (const Error& e) {
    fail(cfg.string(), ": ", e.what());
  }
  if (cmdline.overwrite)
    fail(dir, ": --resume continues this run and --overwrite would replace it: pass one of them");
  return opt;
}

ResolvedRun resolve_run(TrainOptions opt, const std::string& resume, bool epochs_given) {
  ResolvedRun r;
  r.resume = resume;
  r.opt = std::move(opt);
  if (!resume.empty()) {
    if (fs::is_directory(resume)) {
      r.opt = options_of_run_folder(resume, r.opt, epochs_given);
      r.from = ResumeFrom::RunFolder;
      // checkpoint-last is the newest; checkpoint-best (the end of the best epoch, written the same way) is the
      // fall-back. Model files (model-epochN, final_model) hold no optimizer state: not resumable.
      for (const char* f : {"checkpoint-last.safetensors", "checkpoint-best.safetensors"})
        if (fs::exists(fs::path(resume) / f)) r.checkpoints.push_back(fs::path(resume) / f);
    } else if (fs::is_regular_file(resume)) {
      r.from = ResumeFrom::Notebook;
      r.notebook = std::make_unique<NotebookCheckpoint>(read_notebook_checkpoint(resume));
      take_notebook_model(r.opt, *r.notebook, resume);
    } else {
      fail(resume, ": no such run folder or checkpoint file");
    }
  }
  if (r.opt.data.empty()) fail("no dataset: pass --data DIR (the Volleyball videos/ folder or its parent)");
  r.opt.validate();
  prepare_out_folder(r);
  return r;
}

}  // namespace vb
