// The trainer's steps that need no dataset or model, alone: the options' JSON round trip and checks, the
// resume decision and the run folder (resolve_run), and the metrics files.
#include <doctest/doctest.h>
#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <fstream>
#include <string>

#include "engine/file_io.h"
#include "engine/train/history.h"
#include "engine/train/options.h"
#include "engine/train/run_folder.h"
#include "engine/train/step.h"

namespace fs = std::filesystem;
using namespace vb;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/vb_trainer_steps_XXXXXX";
    REQUIRE(mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

void touch(const fs::path& p, const std::string& text = "x") {
  std::ofstream f(p, std::ios::binary);
  f << text;
}

// A run folder as a run leaves it: config.json, and what else is named.
TrainOptions make_run_folder(const fs::path& dir, int epochs_done, bool checkpoint_last, bool checkpoint_best) {
  TrainOptions o;
  o.data = "/some/data";
  o.out = dir.string();
  o.epochs = 7;
  o.seed = 5;
  fs::create_directories(dir);
  touch(dir / "config.json", o.to_json().dump());
  std::vector<EpochRow> rows;
  for (int e = 1; e <= epochs_done; ++e) {
    EpochRow r;
    r.epoch = e;
    r.train_loss = 1.0 / e;
    r.lr = 1e-3;
    r.class_accuracy.assign(8, NAN);
    rows.push_back(r);
  }
  if (epochs_done) write_metrics(dir, rows);
  if (checkpoint_last) touch(dir / "checkpoint-last.safetensors");
  if (checkpoint_best) touch(dir / "checkpoint-best.safetensors");
  return o;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("TrainOptions: JSON round trip, non-UTF-8 paths kept exactly, and the checks") {
  TrainOptions o;
  o.data = std::string("/data/\xff\xfe/videos");
  o.weights = "w.safetensors";
  o.out = "runs/x";
  o.epochs = 3;
  o.batch_size = 16;
  o.lr = 2e-3;
  o.hidden = {512, 256};
  o.blocks = {1, 1, 1, 1};
  o.width = 16;
  o.image_size = data::ImageSize(48, 80);
  o.seed = 1234567890123ull;
  o.preset = "p";
  const nlohmann::json j = o.to_json();
  CHECK(j.contains("data_hex"));
  CHECK(!j.contains("out_hex"));
  CHECK(j.at("image_size") == "48x80");
  const TrainOptions b = TrainOptions::from_json(nlohmann::json::parse(j.dump()));
  CHECK(b.data == o.data);
  CHECK(b.image_size == o.image_size);
  CHECK(b.to_json() == j);
  CHECK_NOTHROW(b.validate());
  CHECK(b.model_config().num_classes == 8);

  TrainOptions bad = o;
  bad.lr = NAN;
  CHECK(error_of([&] { bad.validate(); }).find("learning rate") != std::string::npos);
  bad = o;
  bad.threads = 1025;
  CHECK(error_of([&] { bad.validate(); }).find("threads") != std::string::npos);
  CHECK(error_of([] { TrainOptions::from_json({{"data_hex", "zz"}}); }).find("data_hex") != std::string::npos);
}

TEST_CASE("resolve_run: a new run, and a folder that already holds one") {
  TempDir t;
  TrainOptions o;
  o.data = "/some/data";
  o.out = (t.path / "new").string();
  ResolvedRun r = resolve_run(o, "", false);
  CHECK(r.from == ResumeFrom::Nothing);
  CHECK(!r.remove_old_run);
  CHECK(fs::is_directory(t.path / "new"));

  touch(t.path / "new" / "metrics.csv");
  CHECK(run_file_in(o.out) == "metrics.csv");
  CHECK(error_of([&] { resolve_run(o, "", false); }).find("already holds a training run (metrics.csv)") != std::string::npos);
  o.overwrite = true;
  r = resolve_run(o, "", false);
  CHECK(r.remove_old_run);
  CHECK(fs::exists(t.path / "new" / "metrics.csv"));  // removed only once the set-up has succeeded

  o.data.clear();
  CHECK(error_of([&] { resolve_run(o, "", false); }).find("no dataset") != std::string::npos);
  CHECK(error_of([&] { resolve_run(o, (t.path / "nothing").string(), false); }).find("no such run folder") != std::string::npos);
}

TEST_CASE("resolve_run: resuming a run folder with and without checkpoint-last") {
  TempDir t;
  const fs::path dir = t.path / "run";
  TrainOptions cmdline;  // what the command line says besides --resume
  cmdline.epochs = 12;
  cmdline.seed = 99;

  SUBCASE("checkpoint-last and checkpoint-best: both, newest first; settings from config.json") {
    make_run_folder(dir, 3, true, true);
    touch(dir / "checkpoint-last.safetensors.tmp.123");  // an interrupted save
    ResolvedRun r = resolve_run(cmdline, dir.string(), false);
    CHECK(r.from == ResumeFrom::RunFolder);
    REQUIRE(r.checkpoints.size() == 2);
    CHECK(r.checkpoints[0].filename() == "checkpoint-last.safetensors");
    CHECK(r.checkpoints[1].filename() == "checkpoint-best.safetensors");
    CHECK(r.opt.epochs == 7);
    CHECK(r.opt.seed == 5);
    CHECK(r.opt.out == dir.string());
    CHECK(!fs::exists(dir / "checkpoint-last.safetensors.tmp.123"));
    CHECK(resolve_run(cmdline, dir.string(), true).opt.epochs == 12);  // --epochs given
  }
  SUBCASE("checkpoint-best alone: the fall-back") {
    make_run_folder(dir, 3, false, true);
    ResolvedRun r = resolve_run(cmdline, dir.string(), false);
    CHECK(r.from == ResumeFrom::RunFolder);
    REQUIRE(r.checkpoints.size() == 1);
    CHECK(r.checkpoints[0].filename() == "checkpoint-best.safetensors");
  }
  SUBCASE("no checkpoint, at most one epoch lost: a new run in the same folder") {
    make_run_folder(dir, 1, false, false);
    ResolvedRun r = resolve_run(cmdline, dir.string(), false);
    CHECK(r.from == ResumeFrom::Nothing);
    CHECK(!r.remove_old_run);
    CHECK(r.opt.seed == 5);
  }
  SUBCASE("no checkpoint, finished epochs: refused") {
    make_run_folder(dir, 2, false, false);
    CHECK(error_of([&] { resolve_run(cmdline, dir.string(), false); }).find("no checkpoint to continue from") !=
          std::string::npos);
  }
  SUBCASE("--overwrite with --resume: refused") {
    make_run_folder(dir, 3, true, false);
    cmdline.overwrite = true;
    CHECK(error_of([&] { resolve_run(cmdline, dir.string(), false); }).find("pass one of them") != std::string::npos);
  }
  SUBCASE("not a run folder") {
    fs::create_directories(dir);
    CHECK(error_of([&] { resolve_run(cmdline, dir.string(), false); }).find("no config.json") != std::string::npos);
  }
}

TEST_CASE("remove_run_files removes a run's files and keeps the others") {
  TempDir t;
  for (const char* f : {"config.json", "metrics.jsonl", "model-epoch10.safetensors", "skipped.csv", "timing.json", "notes.txt",
                        "model-epoch.txt"})
    touch(t.path / f);
  remove_run_files(t.path);
  CHECK(run_file_in(t.path.string()).empty());
  CHECK(fs::exists(t.path / "notes.txt"));
  CHECK(fs::exists(t.path / "model-epoch.txt"));
}

TEST_CASE("metrics.jsonl round trip: NaN as null, rows in order") {
  TempDir t;
  EpochRow a;
  a.epoch = 1;
  a.train_loss = 2.5;
  a.lr = 1e-3;
  a.class_accuracy = {0.5, NAN};
  EpochRow b = a;
  b.epoch = 2;
  b.val_loss = 1.25;
  write_metrics(t.path, {a, b});
  const std::vector<EpochRow> rows = read_metrics(t.path);
  REQUIRE(rows.size() == 2);
  CHECK(rows[0].to_json() == a.to_json());
  CHECK(rows[1].to_json() == b.to_json());
  CHECK(std::isnan(rows[0].val_loss));
  CHECK(std::isnan(rows[1].class_accuracy[1]));
  CHECK(read_file((t.path / "metrics.csv").string()).find("\n1,2.5,nan,nan,0.001,") != std::string::npos);
}

TEST_CASE("VB_CUDA_GRAPH: 1 asks for the captured step, 0 or unset not, anything else is a one-line error") {
  const char* old = std::getenv("VB_CUDA_GRAPH");
  const std::string saved = old ? old : "";
  unsetenv("VB_CUDA_GRAPH");
  CHECK_FALSE(cuda_graph_requested());
  setenv("VB_CUDA_GRAPH", "0", 1);
  CHECK_FALSE(cuda_graph_requested());
  setenv("VB_CUDA_GRAPH", "1", 1);
  CHECK(cuda_graph_requested());
  setenv("VB_CUDA_GRAPH", "yes", 1);
  CHECK_THROWS_WITH_AS(cuda_graph_requested(), doctest::Contains("VB_CUDA_GRAPH='yes'"), Error);
  if (old) setenv("VB_CUDA_GRAPH", saved.c_str(), 1);
  else unsetenv("VB_CUDA_GRAPH");
}
