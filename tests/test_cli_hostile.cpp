// The command level against a hostile or careless user (issue 9, items 4-7): nothing lost (train --out over a
// run, synth --out over a dataset, --resume without checkpoint-last), nothing silent (every skipped frame of
// every split listed, an all-unreadable split an error, no validation split warned about), nonsense refused
// (every numeric option), and one error style (one escaped line, exit 1 or 2, nothing reaching terminate).
// Runs the real binaries on a tiny synthetic set, on the CPU.
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "data/dataset.h"
#include "tests/test_process.h"
#include "tools/commands.h"

namespace fs = std::filesystem;

namespace {

using vbtest::Result;
using vbtest::run_tool;
Result run(const std::string& args) { return run_tool("vbtrain", args); }

// A shell word: single-quoted, so any byte but NUL passes (newlines and 0xff included).
std::string q(const std::string& s) {
  std::string o = "'";
  for (char c : s) o += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return o + "'";
}

std::string read(const fs::path& p) { return vbtest::read_text(p); }
using vbtest::learning_rows;

const fs::path& work() {
  static const fs::path w = vbtest::scratch_dir("vbtrain_hostile");
  return w;
}

// 55 videos x 2 clips at 160x90: 48 train, 30 val, 32 test clips.
const fs::path& dataset() {
  static const fs::path d = [] {
    const fs::path p = work() / "synth";
    Result r = run("synth --out " + q(p.string()) + " --clips-per-video 2 --scale 0.125 --seed 3");
    INFO(r.out);
    REQUIRE(r.code == 0);
    return p;
  }();
  return d;
}

// A copy of the dataset to damage.
fs::path copy_dataset(const std::string& name) {
  const fs::path p = work() / name;
  fs::remove_all(p);
  fs::copy(dataset(), p, fs::copy_options::recursive);
  return p;
}

std::vector<vb::data::Sample> samples_of(const fs::path& data, vb::data::Split s) {
  return vb::data::select_split(vb::data::build_index(data.string()).samples, s);
}

// A frame cut to its first 100 bytes: the header is incomplete, so no decoder makes a picture of it.
void truncate_frame(const std::string& path) { fs::resize_file(path, 100); }

std::string tiny(const fs::path& data, const fs::path& out, int epochs) {
  return "train --device cpu --threads 2 --data " + q(data.string()) + " --out " + q(out.string()) + " --epochs " +
         std::to_string(epochs) + " --blocks 1,1,1,1 --width 8 --image-size 32 --batch-size 16 --seed 11";
}

// Every failure is one line "<tool>: error: ..." (the warning about random initialisation aside).
void check_one_error_line(const Result& r, const std::string& tool, int code) {
  INFO(r.out);
  CHECK(r.code == code);
  size_t errors = 0, pos = 0;
  while ((pos = r.out.find(tool + ": error: ", pos)) != std::string::npos) ++errors, ++pos;
  CHECK(errors == 1);
  const size_t at = r.out.find(tool + ": error: ");
  if (at != std::string::npos) CHECK(r.out.find('\n', at) == r.out.size() - 1);  // the error is the last line
}

}  // namespace

TEST_CASE("nonsense options are refused with the option's name, one line, exit 2") {
  const std::string d = q(dataset().string());
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"train --data " + d + " --lr nan", "--lr"},
      {"train --data " + d + " --lr inf", "--lr"},
      {"train --data " + d + " --lr -0.1", "--lr"},
      {"train --data " + d + " --lr 0", "--lr"},
      {"train --data " + d + " --gamma nan", "--gamma"},
      {"train --data " + d + " --gamma -1", "--gamma"},
      {"train --data " + d + " --weight-decay nan", "--weight-decay"},
      {"train --data " + d + " --weight-decay -0.5", "--weight-decay"},
      {"train --data " + d + " --seed -1", "--seed"},
      {"train --data " + d + " --threads -1", "--threads"},
      {"train --data " + d + " --threads 100000", "--threads"},
      {"train --data " + d + " --freeze-backbone-epochs -2", "--freeze-backbone-epochs"},
      {"train --data " + d + " --epochs 0", "--epochs"},
      {"train --data " + d + " --epochs -3", "--epochs"},
      {"train --data " + d + " --epochs 2.5", "--epochs"},
      {"train --data " + d + " --batch-size 0", "--batch-size"},
      {"train --data " + d + " --batch-size 10000000", "--batch-size"},
      {"train --data " + d + " --step-size 0", "--step-size"},
      {"train --data " + d + " --width -8", "--width"},
      {"train --data " + d + " --image-size 8", "--image-size"},
      {"train --data " + d + " --stop-after-steps -1", "--stop-after-steps"},
      {"train --data " + d + " --step-delay-ms -5", "--step-delay-ms"},
      {"eval --data " + d + " --model m --threads 100000", "--threads"},
      {"eval --data " + d + " --model m --batch-size 0", "--batch-size"},
      {"eval --data " + d + " --model m --image-size -224", "--image-size"},
      {"predict --model m x.jpg --threads -1", "--threads"},
      {"predict --model m x.jpg --image-size nan", "--image-size"},
      {"synth --out x --scale nan", "--scale"},
      {"synth --out x --scale inf", "--scale"},
      {"synth --out x --seed -4", "--seed"},
      {"synth --out x --threads 100000", "--threads"},
      {"synth --out x --videos 0", "--videos"},
      {"synth --out x --quality 101", "--quality"},
      {"bench-loader --data " + d + " --threads 100000", "--threads"},
      {"bench-loader --data " + d + " --images 0", "--images"},
      {"bench-ops --threads -1", "--threads"},
      {"bench-ops --min-seconds nan", "--min-seconds"},
      {"bench-ops --batch 0", "--batch"},
      {"bench --threads 100000", "--threads"},
      {"bench --batch-size -1", "--batch-size"},
      {"bench --width 0", "--width"},
      {"verify --weights w --reference r --threads -2", "--threads"},
  };
  for (const auto& [args, option] : cases) {
    Result r = run(args);
    INFO(args);
    check_one_error_line(r, "vbtrain", 2);
    CHECK(r.has(option));
  }
  // Nothing was created by a refused command.
  CHECK(!fs::exists("x"));
}

TEST_CASE("settings from a run's config.json are checked too (NaN there is refused, naming the file)") {
  const fs::path out = work() / "nan_config";
  REQUIRE(run(tiny(dataset(), out, 1) + " --stop-after-steps 1").code == 130);
  auto cfg = nlohmann::json::parse(read(out / "config.json"));
  cfg["lr"] = -1.0;
  std::ofstream(out / "config.json") << cfg.dump(2);
  Result r = run("train --resume " + q(out.string()));
  check_one_error_line(r, "vbtrain", 1);
  CHECK(r.has("config.json"));
  CHECK(r.has("learning rate"));
}

TEST_CASE("train --out on a folder that holds a run refuses unless --resume or --overwrite") {
  const fs::path out = work() / "finished";
  Result first = run(tiny(dataset(), out, 2));
  INFO(first.out);
  REQUIRE(first.code == 0);
  const std::string model = read(out / "final_model.safetensors"), best = read(out / "checkpoint-best.safetensors");
  const auto rows = learning_rows(out);

  Result again = run(tiny(dataset(), out, 1) + " --lr 0.01");
  check_one_error_line(again, "vbtrain", 1);
  CHECK(again.has("already holds a training run"));
  CHECK(again.has("--resume"));
  CHECK(again.has("--overwrite"));
  CHECK(read(out / "final_model.safetensors") == model);
  CHECK(read(out / "checkpoint-best.safetensors") == best);
  CHECK(learning_rows(out) == rows);

  // The notebook's checkpoint continued into the same folder is a new run too.
  Result nb = run("train --device cpu --data " + q(dataset().string()) + " --out " + q(out.string()) + " --resume " +
                  q(vbtest::fixture("mini_seed_checkpoint_epoch2.pth")) + " --epochs 4 --image-size 32");
  check_one_error_line(nb, "vbtrain", 1);
  CHECK(learning_rows(out) == rows);

  // --resume with --overwrite contradicts itself.
  Result both = run("train --resume " + q(out.string()) + " --overwrite");
  check_one_error_line(both, "vbtrain", 1);
  CHECK(learning_rows(out) == rows);

  // --overwrite with a dataset that cannot be read: the error comes before anything is removed.
  Result typo = run(tiny(work() / "no_such_dataset", out, 1) + " --overwrite");
  check_one_error_line(typo, "vbtrain", 1);
  CHECK(read(out / "final_model.safetensors") == model);
  CHECK(learning_rows(out) == rows);

  // --overwrite replaces the run: its files go (a stale model-epoch20 from a longer run too), others stay.
  std::ofstream(out / "model-epoch20.safetensors") << "stale";
  std::ofstream(out / "notes.txt") << "mine";
  Result over = run(tiny(dataset(), out, 1) + " --overwrite");
  INFO(over.out);
  REQUIRE(over.code == 0);
  CHECK(over.has("--overwrite: removed"));
  CHECK(!fs::exists(out / "model-epoch20.safetensors"));
  CHECK(read(out / "notes.txt") == "mine");
  CHECK(learning_rows(out).size() == 1);
  CHECK(learning_rows(out)[0] == rows[0]);  // the same settings: the same first epoch

  // A folder with other things in it (no run) is fine.
  const fs::path other = work() / "other_files";
  fs::create_directories(other);
  std::ofstream(other / "README") << "x";
  CHECK(run(tiny(dataset(), other, 1)).code == 0);
  // A file where the folder should be: one line.
  std::ofstream(work() / "a_file") << "x";
  check_one_error_line(run(tiny(dataset(), work() / "a_file", 1)), "vbtrain", 1);
}

TEST_CASE("synth --out refuses a folder that is not empty unless --overwrite") {
  const fs::path d = work() / "synth_target";
  REQUIRE(run("synth --out " + q(d.string()) + " --videos 2 --clips-per-video 1 --scale 0.05").code == 0);
  const fs::path ann = d / "videos" / "0" / "annotations.txt";
  const std::string before = read(ann);
  REQUIRE(!before.empty());
  Result r = run("synth --out " + q(d.string()) + " --videos 2 --clips-per-video 3 --scale 0.05 --seed 9");
  check_one_error_line(r, "vbtrain", 1);
  CHECK(r.has("not empty"));
  CHECK(r.has("--overwrite"));
  CHECK(read(ann) == before);
  Result o = run("synth --out " + q(d.string()) + " --videos 2 --clips-per-video 3 --scale 0.05 --seed 9 --overwrite");
  INFO(o.out);
  CHECK(o.code == 0);
  CHECK(read(ann) != before);
  // An empty folder is fine.
  const fs::path e = work() / "synth_empty";
  fs::create_directories(e);
  CHECK(run("synth --out " + q(e.string()) + " --videos 1 --clips-per-video 1 --scale 0.05").code == 0);
}

TEST_CASE("--resume without checkpoint-last continues from checkpoint-best, exactly, and says so") {
  const fs::path a = work() / "resume_ref", b = work() / "resume_best", c = work() / "resume_bad_last";
  REQUIRE(run(tiny(dataset(), a, 3)).code == 0);
  const auto reference = learning_rows(a);
  REQUIRE(reference.size() == 3);

  fs::copy(a, b, fs::copy_options::recursive);
  fs::remove(b / "checkpoint-last.safetensors");
  Result r = run("train --resume " + q(b.string()));
  INFO(r.out);
  REQUIRE(r.code == 0);
  CHECK(r.has("checkpoint-last.safetensors is missing; continuing from checkpoint-best.safetensors"));
  CHECK(learning_rows(b) == reference);  // the epochs after the best one, trained again, bit for bit
  CHECK(read(b / "final_model.safetensors") == read(a / "final_model.safetensors"));

  // An unreadable checkpoint-last: a warning naming it, then the same fall-back.
  fs::copy(a, c, fs::copy_options::recursive);
  fs::resize_file(c / "checkpoint-last.safetensors", 1000);
  Result rc = run("train --resume " + q(c.string()));
  INFO(rc.out);
  REQUIRE(rc.code == 0);
  CHECK(rc.has("warning: " + (c / "checkpoint-last.safetensors").string()));
  CHECK(rc.has("checkpoint-last.safetensors is unreadable; continuing from checkpoint-best.safetensors"));
  CHECK(learning_rows(c) == reference);
}

TEST_CASE("--resume with no checkpoint left refuses rather than restart over finished epochs") {
  const fs::path a = work() / "resume_none";
  REQUIRE(run(tiny(dataset(), a, 2)).code == 0);
  const auto rows = learning_rows(a);
  fs::remove(a / "checkpoint-last.safetensors");
  fs::remove(a / "checkpoint-best.safetensors");
  const std::string model = read(a / "final_model.safetensors");
  Result r = run("train --resume " + q(a.string()));
  check_one_error_line(r, "vbtrain", 1);
  CHECK(r.has("no checkpoint to continue from"));
  CHECK(r.has("2 finished epochs"));
  CHECK(learning_rows(a) == rows);
  CHECK(read(a / "final_model.safetensors") == model);
  // Both checkpoints unreadable: refused too, nothing rewritten.
  const fs::path b = work() / "resume_unreadable";
  REQUIRE(run(tiny(dataset(), b, 2)).code == 0);
  fs::resize_file(b / "checkpoint-last.safetensors", 10);
  fs::resize_file(b / "checkpoint-best.safetensors", 10);
  Result rb = run("train --resume " + q(b.string()));
  check_one_error_line(rb, "vbtrain", 1);
  CHECK(rb.has("no readable checkpoint"));
  CHECK(learning_rows(b).size() == 2);
}

TEST_CASE("every skipped frame of every split is listed by train, eval and bench-loader") {
  const fs::path d = copy_dataset("one_bad_per_split");
  const std::string bad_train = samples_of(d, vb::data::Split::Train).at(5).path;
  const std::string bad_val = samples_of(d, vb::data::Split::Val).at(3).path;
  const std::string bad_test = samples_of(d, vb::data::Split::Test).at(7).path;
  for (const auto& p : {bad_train, bad_val, bad_test}) truncate_frame(p);

  const fs::path out = work() / "skips";
  Result r = run(tiny(d, out, 1));
  INFO(r.out);
  REQUIRE(r.code == 0);
  CHECK(r.has("3 unreadable frames skipped (train 1, val 1, test 1)"));
  CHECK(r.has(bad_train));
  const std::string csv = read(out / "skipped.csv");
  CHECK(csv.rfind("split,file,reason\n", 0) == 0);
  CHECK(csv.find("train," + bad_train + ",") != std::string::npos);
  CHECK(csv.find("val," + bad_val + ",") != std::string::npos);
  CHECK(csv.find("test," + bad_test + ",") != std::string::npos);
  CHECK(std::count(csv.begin(), csv.end(), '\n') == 4);
  CHECK(nlohmann::json::parse(read(out / "test_metrics.json")).at("images") == 31);

  // A resumed run keeps the list its first process wrote, though it reads no training frame again.
  Result res = run("train --resume " + q(out.string()) + " --epochs 1");
  INFO(res.out);
  REQUIRE(res.code == 0);
  CHECK(read(out / "skipped.csv") == csv);

  const fs::path ev = work() / "skips_eval";
  Result e = run("eval --device cpu --data " + q(d.string()) + " --model " + q((out / "final_model.safetensors").string()) +
                 " --split val --out " + q(ev.string()));
  INFO(e.out);
  REQUIRE(e.code == 0);
  CHECK(e.has("1 unreadable frame skipped (val 1): " + bad_val));
  CHECK(read(ev / "skipped.csv").find("val," + bad_val + ",") != std::string::npos);
  CHECK(nlohmann::json::parse(read(ev / "metrics.json")).at("skipped") == 1);

  // bench-loader: no abort (it was exit 134 on a truncated JPEG), the frame listed, the others measured.
  Result b = run("bench-loader --data " + q(d.string()) + " --images 12 --threads 2 --batch 4 --image-size 32 --repeat 1");
  INFO(b.out);
  CHECK(b.code == 0);
  const auto all = vb::data::build_index(d.string()).samples;  // bench-loader takes the first 12 of these
  int listed = 0;
  for (size_t i = 0; i < 12; ++i)
    if (all[i].path == bad_train || all[i].path == bad_val || all[i].path == bad_test) {
      CHECK(b.has("skipped: " + all[i].path + ": "));
      ++listed;
    }
  REQUIRE(listed == 1);  // the val frame, in video 2
  CHECK(b.has("11 frames of"));
}

TEST_CASE("a split whose every frame is unreadable is an error, not a NaN loss") {
  const fs::path d = copy_dataset("bad_train_split");
  const auto train = samples_of(d, vb::data::Split::Train);
  for (const auto& s : train) truncate_frame(s.path);
  const fs::path out = work() / "all_bad_train";
  Result r = run(tiny(d, out, 2));
  check_one_error_line(r, "vbtrain", 1);
  CHECK(r.has("every frame of the training split (48 clips) is unreadable"));
  const std::string csv = read(out / "skipped.csv");
  CHECK(std::count(csv.begin(), csv.end(), '\n') == 49);
  CHECK(learning_rows(out).empty());

  const fs::path t = copy_dataset("bad_test_split");
  for (const auto& s : samples_of(t, vb::data::Split::Test)) truncate_frame(s.path);
  const fs::path model_run = work() / "for_eval";
  REQUIRE(run(tiny(dataset(), model_run, 1)).code == 0);
  Result e = run("eval --device cpu --data " + q(t.string()) + " --model " +
                 q((model_run / "final_model.safetensors").string()) + " --out " + q((work() / "eval_all_bad").string()));
  check_one_error_line(e, "vbtrain", 1);
  CHECK(e.has("every frame of the test split (32 clips) is unreadable"));
  // Training on it: the model is trained and saved, the test split is the error.
  const fs::path tr = work() / "all_bad_test";
  Result rt = run(tiny(t, tr, 1));
  check_one_error_line(rt, "vbtrain", 1);
  CHECK(rt.has("test split"));
  CHECK(fs::exists(tr / "final_model.safetensors"));
}

TEST_CASE("no validation videos: a warning, no NaN printed, the run completes") {
  const fs::path d = copy_dataset("no_val");
  for (int v : vb::data::split_videos(vb::data::Split::Val)) fs::remove_all(d / "videos" / std::to_string(v));
  const fs::path out = work() / "no_val_run";
  Result r = run(tiny(d, out, 2));
  INFO(r.out);
  REQUIRE(r.code == 0);
  CHECK(r.has("warning: " + d.string() + ": no validation clips"));
  CHECK(r.has("no validation split"));
  CHECK(!r.has("nan"));
  CHECK(learning_rows(out).size() == 2);
  CHECK(!fs::exists(out / "checkpoint-best.safetensors"));
}

TEST_CASE("paths that are not UTF-8: stored exactly in config.json, the run resumes; messages stay one line") {
  const fs::path out = work() / "run_\xff\xfe";
  Result r = run(tiny(dataset(), out, 2) + " --stop-after-steps 4");
  INFO(r.out);
  REQUIRE(r.code == 130);
  auto cfg = nlohmann::json::parse(read(out / "config.json"));
  std::string hex;
  for (unsigned char c : out.string()) {
    char b[3];
    std::snprintf(b, sizeof b, "%02x", c);
    hex += b;
  }
  CHECK(cfg.at("out_hex") == hex);
  Result res = run("train --resume " + q(out.string()));
  INFO(res.out);
  CHECK(res.code == 0);
  CHECK(learning_rows(out).size() == 2);

  // eval writes metrics.json naming such a model file without a JSON exception.
  const fs::path ev = work() / "eval_\xff";
  Result e = run("eval --device cpu --data " + q(dataset().string()) + " --model " +
                 q((out / "final_model.safetensors").string()) + " --out " + q(ev.string()));
  INFO(e.out);
  CHECK(e.code == 0);
  CHECK(!e.has("type_error"));
  CHECK(nlohmann::json::parse(read(ev / "metrics.json")).at("model").get<std::string>().find("run_") != std::string::npos);

  // A newline, an escape sequence and a bad byte in a path: one line, the bytes written as \xHH.
  Result bad = run("train --device cpu --data " + q("/nonexistent/a\nb\x1b[31m\xff"));
  check_one_error_line(bad, "vbtrain", 1);
  CHECK(bad.has("a\\x0ab\\x1b[31m\\xff"));
}

TEST_CASE("run_guarded: whatever is thrown becomes one line and exit 1; bad_alloc is out of memory") {
  auto capture = [](const std::function<int()>& fn, int& code) {
    std::fflush(stderr);
    FILE* tmp = std::tmpfile();
    REQUIRE(tmp);
    const int saved = ::dup(2);
    ::dup2(::fileno(tmp), 2);
    code = vb::tools::run_guarded("vbtrain", "loading frames", fn);
    std::fflush(stderr);
    ::dup2(saved, 2);
    ::close(saved);
    std::rewind(tmp);
    std::string s;
    char buf[512];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, tmp)) > 0) s.append(buf, n);
    std::fclose(tmp);
    return s;
  };
  int code = -1;
  CHECK(capture([]() -> int { throw std::bad_alloc(); }, code) == "vbtrain: error: out of memory while loading frames\n");
  CHECK(code == 1);
  CHECK(capture([]() -> int { throw 42; }, code) ==
        "vbtrain: error: unexpected failure (a non-standard exception) while loading frames\n");
  CHECK(code == 1);
  CHECK(capture([]() -> int { throw std::runtime_error("f.jpg\nline two\x07 \xc3\xa9 \xff"); }, code) ==
        "vbtrain: error: f.jpg\\x0aline two\\x07 \xc3\xa9 \\xff\n");
  CHECK(code == 1);
  CHECK(capture([]() -> int { return 7; }, code).empty());
  CHECK(code == 7);
  // C1 controls (U+009B is a terminal's CSI) are escaped although they are valid UTF-8.
  CHECK(vb::tools::one_line("a\xc2\x9b" "b") == "a\\xc2\\x9bb");
  CHECK(vb::tools::one_line(std::string(5000, 'x')).size() == 4003);
}

TEST_CASE("vbconvert: the same one-line errors") {
  Result r = run_tool("vbconvert", "--num-classes");
  check_one_error_line(r, "vbconvert", 2);
  Result m = run_tool("vbconvert", q("/nonexistent/w\n.pth") + " " + q((work() / "o.safetensors").string()));
  check_one_error_line(m, "vbconvert", 1);
  CHECK(m.has("/nonexistent/w\\x0a.pth"));
}

TEST_CASE("predict: an unreadable image is listed; when none can be read, one error line") {
  const fs::path m = work() / "for_predict";
  REQUIRE(run(tiny(dataset(), m, 1)).code == 0);
  const fs::path bad = work() / "bad.jpg";
  std::ofstream(bad) << "not a jpeg";
  const std::string good = samples_of(dataset(), vb::data::Split::Test).at(0).path;
  const std::string model = q((m / "final_model.safetensors").string());
  Result mixed = run("predict --device cpu --model " + model + " " + q(bad.string()) + " " + q(good));
  INFO(mixed.out);
  CHECK(mixed.code == 0);
  CHECK(mixed.has("skipped: " + bad.string()));
  CHECK(mixed.has(good + "  "));
  Result none = run("predict --device cpu --model " + model + " " + q(bad.string()));
  check_one_error_line(none, "vbtrain", 1);
  CHECK(none.has("none of the 1 image could be read"));
}
