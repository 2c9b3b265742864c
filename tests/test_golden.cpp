// The golden run of tests/fixtures/mini_train_golden.safetensors (PyTorch, float64) through the same code as
// `vbtrain verify`, on the CPU reference path (double): logits and losses within 1e-4 relative, gradients
// 1e-3, tensors after three AdamW steps 1e-5, their updates 2e-2 (issue 2's bounds). The float32 engine is
// held to those bounds where float32 can be: the first forward and loss, and the gradients above the one
// ReLU whose input (-9e-6 in float32, at layer3.2's output, channel 1, image 0, position 6) lies within
// float32's accumulated error of zero, so the mask flips and everything below it and every later step
// diverges from the float64 reference (see docs/STATUS.md). So the float32 run as a whole is judged beside
// PyTorch's own float32 run (`verify --against`, below): within 2x of its distance to the golden, group by group.
#include <cstdlib>
#include <cstring>
#include <random>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>

#include <nlohmann/json.hpp>
#include <sys/wait.h>

#include "engine/backend_bf16.h"
#include "kernels/bf16.h"
#include "engine/golden.h"
#include "engine/weights.h"
#include "tests/test_util.h"

namespace {

template <class B>
std::map<std::string, vb::GoldenEntry> run_cpu_golden(B& be) {
  vb::StateDict w = vb::load_state_dict_file(vbtest::fixture("mini_seed_b1_init.pth"));
  vb::StateDict ref = vb::load_safetensors(vbtest::fixture("mini_train_golden.safetensors"));
  std::map<std::string, vb::GoldenEntry> m;
  for (const auto& e : vb::run_golden(be, w, ref)) m[e.name] = e;
  return m;
}

}  // namespace

TEST_CASE("golden run on the CPU reference path: every stage within issue 2's tolerances") {
  auto be = vb::make_cpu_backend_f64(0);
  const auto rows = run_cpu_golden(*be);
  vb::StateDict ref = vb::load_safetensors(vbtest::fixture("mini_train_golden.safetensors"));
  // Every comparable key of the reference was compared (nothing silently skipped).
  size_t expected = 0;
  for (const auto& k : ref.order) {
    if (k.rfind("grad0.", 0) == 0 || k.rfind("logits", 0) == 0 || k.rfind("loss", 0) == 0 ||
        k.rfind("eval_logits", 0) == 0 || k.rfind("lr", 0) == 0 || k == "class_weights") {
      ++expected;
      CHECK_MESSAGE(rows.count(k), "not compared: " << k);
    }
    if (k.rfind("after3.", 0) == 0) {
      expected += 2;
      CHECK_MESSAGE(rows.count(k), "not compared: " << k);
      CHECK_MESSAGE(rows.count("update." + k.substr(7)), "update not compared: " << k);
    }
  }
  CHECK(rows.size() == expected);
  for (const auto& [name, e] : rows) {
    INFO(name << ": relative error " << e.rel_err << " (tolerance " << e.tol << ")");
    CHECK(e.ok());
  }
  // The bounds themselves are issue 2's.
  CHECK(rows.at("logits0").tol == 1e-4);
  CHECK(rows.at("loss2").tol == 1e-4);
  CHECK(rows.at("grad0.model.conv1.weight").tol == 1e-3);
  CHECK(rows.at("after3.model.fc.2.bias").tol == 1e-5);
  CHECK(rows.at("update.model.layer4.2.bn3.weight").tol == 2e-2);
}

TEST_CASE("golden run in float32: the first step within the bounds, above the one ReLU that flips") {
  auto be = vb::make_cpu_backend(0);
  const auto rows = run_cpu_golden(*be);
  for (const char* k : {"eval_logits_init.x0", "logits0", "loss0", "class_weights", "lr0", "lr1", "lr2"}) {
    INFO(k << ": " << rows.at(k).rel_err);
    CHECK(rows.at(k).ok());
  }
  int checked = 0;
  for (const auto& [name, e] : rows) {
    const bool above = name.rfind("grad0.model.fc.", 0) == 0 || name.rfind("grad0.model.layer4.", 0) == 0 ||
                       name.rfind("grad0.model.layer3.3.", 0) == 0 || name.rfind("grad0.model.layer3.4.", 0) == 0 ||
                       name.rfind("grad0.model.layer3.5.", 0) == 0;
    if (!above) continue;
    INFO(name << ": relative error " << e.rel_err);
    CHECK(e.rel_err < 1e-4);  // ten times inside the bound
    ++checked;
  }
  CHECK(checked == 4 + 30 + 27);  // fc (4 tensors), layer4 (30, its downsample included), layer3.3-5 (27)
  // The flip itself: layer3.2's bn3 bias gradient, channel 1, is where float32 leaves the reference.
  CHECK_FALSE(rows.at("grad0.model.layer3.2.bn3.bias").ok());
}

TEST_CASE("golden run: a corrupted reference is caught") {
  // The comparison can fail: perturb one gradient and one logit of the reference.
  auto be = vb::make_cpu_backend_f64(0);
  vb::StateDict w = vb::load_state_dict_file(vbtest::fixture("mini_seed_b1_init.pth"));
  vb::StateDict ref = vb::load_safetensors(vbtest::fixture("mini_train_golden.safetensors"));
  ref.at("grad0.model.layer2.0.conv2.weight").as<float>()[3] += 0.05f;
  ref.at("logits1").as<float>()[0] *= 1.01f;
  std::map<std::string, vb::GoldenEntry> m;
  for (const auto& e : vb::run_golden(*be, w, ref)) m[e.name] = e;
  CHECK_FALSE(m.at("grad0.model.layer2.0.conv2.weight").ok());
  CHECK_FALSE(m.at("logits1").ok());
  CHECK(m.at("logits0").ok());
}

TEST_CASE("vbtrain verify: exit code and the JSON table") {
  const std::string bin = vbtest::binary_dir() + "/tools/vbtrain";
  const std::string json = (std::filesystem::temp_directory_path() / "vbtrain_verify_test.json").string();
  const std::string cmd = bin + " verify --device cpu --quiet --weights " + vbtest::fixture("mini_seed_b1_init.pth") +
                          " --reference " + vbtest::fixture("mini_train_golden.safetensors") + " --json " + json +
                          " > /dev/null 2>&1";
  REQUIRE(std::system(cmd.c_str()) == 0);
  std::ifstream f(json);
  nlohmann::json j = nlohmann::json::parse(f);
  CHECK(j.contains("logits0"));
  CHECK(j.contains("grad0.model.fc.0.weight"));
  CHECK(j.contains("update.model.bn1.running_mean"));
  CHECK(j.at("loss0").get<double>() < 1e-4);
  // A wrong reference makes it exit non-zero.
  const std::string bad = bin + " verify --device cpu --quiet --weights " + vbtest::fixture("mini_imagenet_style.pth") +
                          " --reference " + vbtest::fixture("mini_train_golden.safetensors") + " > /dev/null 2>&1";
  CHECK(std::system(bad.c_str()) != 0);
}

// ---- Beside PyTorch at the same precision (verify --against, issue 8 part A item 2) ----
// tests/fixtures/torch_distances_fp32_cpu.json is PyTorch's own float32 run of the golden protocol on the CPU
// (tools/torch_distances.py, PyTorch 2.15), made once and committed: CI has no PyTorch.

namespace {

const char* kDistances = "torch_distances_fp32_cpu.json";

std::vector<vb::GoldenEntry> fp32_rows(const vb::StateDict* weights = nullptr) {
  auto be = vb::make_cpu_backend(0);
  vb::StateDict w = weights ? *weights : vb::load_state_dict_file(vbtest::fixture("mini_seed_b1_init.pth"));
  vb::StateDict ref = vb::load_safetensors(vbtest::fixture("mini_train_golden.safetensors"));
  return vb::run_golden(*be, w, ref);
}

const vb::ParityGroup& group(const vb::ParityReport& r, const std::string& name) {
  for (const auto& g : r.groups)
    if (g.name == name) return g;
  FAIL("no group " << name);
  throw 0;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

std::string temp_json(const std::string& name, const nlohmann::json& j) {
  const std::string p = (std::filesystem::temp_directory_path() / name).string();
  std::ofstream(p) << j.dump(1);
  return p;
}

nlohmann::json committed_distances() {
  std::ifstream f(vbtest::fixture(kDistances));
  return nlohmann::json::parse(f);
}

}  // namespace

TEST_CASE("float32 beside PyTorch's float32: every group within 2x of PyTorch's distance, the first step strict") {
  const vb::TorchDistances td = vb::load_torch_distances(vbtest::fixture(kDistances));
  CHECK(td.precision == "fp32");
  CHECK(td.device == "cpu");
  const auto rows = fp32_rows();
  REQUIRE(td.distances.size() == rows.size());  // one PyTorch distance per entry verify checks
  const vb::ParityReport rep = vb::judge_parity(rows, td, vb::Precision::FP32, {6, 3, 64, 64});
  CHECK(rep.ok);
  REQUIRE(rep.groups.size() == 6);
  size_t n = 0;
  for (const auto& g : rep.groups) {
    INFO(g.name << ": max " << g.ours_max << " vs PyTorch " << g.torch_max << ", median " << g.ours_median
                << " vs " << g.torch_median);
    CHECK(g.ok);
    // PyTorch's float32 is itself far above the floor (the chaos this comparison exists for), so the 2x bound,
    // not the floor, is what holds us here.
    CHECK(g.torch_median > 100 * vb::kParityFloor);
    n += g.count;
  }
  CHECK(n + 4 == rows.size());  // all but class_weights and lr0..2 belong to a group
  // The float64 golden's own bounds do not hold in float32 (why this mode exists): the updates are ~1 apart.
  CHECK(group(rep, "updates").ours_max > 0.5);
  CHECK(group(rep, "gradients").count == 163);
  REQUIRE(rep.strict.size() == 7);
  for (const auto& s : rep.strict) {
    INFO(s.name << ": " << s.ours << " (tol " << s.tol << ")");
    CHECK(s.ok);
    if (s.name == "logits0" || s.name == "loss0" || s.name == "eval_logits_init.x0") CHECK(s.tol == 1e-4);
  }
}

TEST_CASE("beside PyTorch: a doctored distances file or a perturbed weight fails") {
  const auto rows = fp32_rows();
  SUBCASE("PyTorch's gradient distances a third of what they are") {
    vb::TorchDistances td = vb::load_torch_distances(vbtest::fixture(kDistances));
    for (auto& [k, v] : td.distances)
      if (k.rfind("grad", 0) == 0) v /= 3;
    const vb::ParityReport rep = vb::judge_parity(rows, td, vb::Precision::FP32);
    CHECK_FALSE(rep.ok);
    CHECK_FALSE(group(rep, "gradients").ok);
    CHECK(group(rep, "updates").ok);
    CHECK(group(rep, "logits").ok);
  }
  SUBCASE("the median alone: PyTorch's median update halved, its maximum kept") {
    vb::TorchDistances td = vb::load_torch_distances(vbtest::fixture(kDistances));
    double mx = 0;
    for (auto& [k, v] : td.distances)
      if (k.rfind("update.", 0) == 0) mx = std::max(mx, v);
    for (auto& [k, v] : td.distances)
      if (k.rfind("update.", 0) == 0 && v < mx) v /= 4;
    const vb::ParityReport rep = vb::judge_parity(rows, td, vb::Precision::FP32);
    const auto& g = group(rep, "updates");
    CHECK(g.ours_max <= g.bound_max);
    CHECK(g.ours_median > g.bound_median);
    CHECK_FALSE(g.ok);
    CHECK_FALSE(rep.ok);
  }
  SUBCASE("a strict entry: the first loss 1e-3 off") {
    vb::TorchDistances td = vb::load_torch_distances(vbtest::fixture(kDistances));
    auto r = rows;
    for (auto& e : r)
      if (e.name == "loss0") e.rel_err = 1e-3;
    td.distances["loss0"] = 1e-3;  // even were PyTorch as far: the first loss stays strict
    const vb::ParityReport rep = vb::judge_parity(r, td, vb::Precision::FP32);
    CHECK_FALSE(rep.ok);
    for (const auto& g : rep.groups) CHECK(g.ok);
  }
  SUBCASE("one weight of the initial model moved by 1e-3 of its size") {
    vb::StateDict w = vb::load_state_dict_file(vbtest::fixture("mini_seed_b1_init.pth"));
    float* p = w.at("layer2.0.conv2.weight").as<float>();
    p[0] += 1e-3f * std::fabs(p[0]) + 1e-4f;
    const vb::ParityReport rep =
        vb::judge_parity(fp32_rows(&w), vb::load_torch_distances(vbtest::fixture(kDistances)), vb::Precision::FP32);
    CHECK_FALSE(rep.ok);
    // Caught twice: by the strict first forward (logits0 4e-4 off) and, beyond it, by the gradients (8x PyTorch's
    // distance at the maximum, 9x at the median).
    CHECK_FALSE(rep.ok);
    CHECK_FALSE(group(rep, "gradients").ok);
    for (const auto& s : rep.strict)
      if (s.name == "logits0") CHECK_FALSE(s.ok);
  }
}

TEST_CASE("beside PyTorch: a distances file of another precision or another reference is refused") {
  const auto rows = fp32_rows();
  vb::TorchDistances td = vb::load_torch_distances(vbtest::fixture(kDistances));
  const std::string tf32 = error_of([&] {
    auto t = td;
    t.precision = "tf32";
    vb::judge_parity(rows, t, vb::Precision::FP32);
  });
  CHECK(tf32.find("made at tf32, but this run computes in fp32") != std::string::npos);
  CHECK(error_of([&] { vb::judge_parity(rows, td, vb::Precision::TF32); }).find("made at fp32, but this run computes in tf32") !=
        std::string::npos);
  CHECK(error_of([&] { vb::judge_parity(rows, td, vb::Precision::FP64); }).find("fp64 reference path") != std::string::npos);
  CHECK(error_of([&] { vb::judge_parity(rows, td, vb::Precision::FP32, {6, 3, 48, 80}); }).find("x0 is [6, 3, 64, 64]") !=
        std::string::npos);
  auto missing = td;
  missing.distances.erase("grad0.model.conv1.weight");
  CHECK(error_of([&] { vb::judge_parity(rows, missing, vb::Precision::FP32); }).find("no PyTorch distance for 'grad0.model.conv1.weight'") !=
        std::string::npos);
  auto extra = td;
  extra.distances["grad0.model.conv9.weight"] = 1;
  CHECK(error_of([&] { vb::judge_parity(rows, extra, vb::Precision::FP32); }).find("'grad0.model.conv9.weight' is not an entry") !=
        std::string::npos);
  // The file itself.
  nlohmann::json j = committed_distances();
  j["distances"]["loss2"] = nullptr;
  CHECK(error_of([&] { vb::load_torch_distances(temp_json("vb_dist_null.json", j)); }).find("'loss2' is not finite") !=
        std::string::npos);
  j = committed_distances();
  j["format"] = "something else";
  CHECK(error_of([&] { vb::load_torch_distances(temp_json("vb_dist_format.json", j)); }).find("not a distances file") !=
        std::string::npos);
}

TEST_CASE("vbtrain verify --against: exit code, report and JSON") {
  const std::string bin = vbtest::binary_dir() + "/tools/vbtrain";
  const std::string tmp = std::filesystem::temp_directory_path().string();
  const std::string base = bin + " verify --device cpu --precision fp32 --quiet --weights " +
                           vbtest::fixture("mini_seed_b1_init.pth") + " --reference " +
                           vbtest::fixture("mini_train_golden.safetensors");
  const std::string json = tmp + "/vbtrain_verify_against.json", log = tmp + "/vbtrain_verify_against.log";
  REQUIRE(std::system((base + " --against " + vbtest::fixture(kDistances) + " --json " + json + " > " + log + " 2>&1").c_str()) == 0);
  {
    std::ifstream f(json);
    nlohmann::json j = nlohmann::json::parse(f);
    CHECK(j.at("passed") == true);
    CHECK(j.at("against").at("precision") == "fp32");
    CHECK(j.at("groups").size() == 6);
    CHECK(j.at("groups").at("gradients").at("ok") == true);
    CHECK(j.at("groups").at("updates").at("torch_max").get<double>() > 0.5);
    CHECK(j.at("strict").at("logits0").at("ours").get<double>() < 1e-4);
    CHECK(j.at("entries").size() == 819);
    std::ifstream l(log);
    const std::string text((std::istreambuf_iterator<char>(l)), std::istreambuf_iterator<char>());
    CHECK(text.find("passed") != std::string::npos);
    CHECK(text.find("eval_logits") != std::string::npos);
  }
  // A doctored file (PyTorch's distances all a tenth): exit 1.
  nlohmann::json j = committed_distances();
  for (auto& [k, v] : j["distances"].items())
    if (k.rfind("after", 0) == 0) v = v.get<double>() / 10;
  const std::string doctored = temp_json("vb_dist_doctored.json", j);
  const int doctored_rc = std::system((base + " --against " + doctored + " > /dev/null 2>&1").c_str());
  CHECK(WIFEXITED(doctored_rc));
  CHECK(WEXITSTATUS(doctored_rc) == 1);
  // Another precision: refused with the reason on one line.
  j = committed_distances();
  j["precision"] = "tf32";
  const std::string other = temp_json("vb_dist_tf32.json", j);
  const int rc = std::system((base + " --against " + other + " > " + log + " 2>&1").c_str());
  CHECK(rc != 0);
  std::ifstream l(log);
  const std::string text((std::istreambuf_iterator<char>(l)), std::istreambuf_iterator<char>());
  CHECK(text.find("vbtrain: error: ") != std::string::npos);
  CHECK(text.find("made at tf32, but this run computes in fp32") != std::string::npos);
}

TEST_CASE("the non-square golden run (48x80, tools/make_goldens.py) verifies: fp64 exactly, fp32 beside PyTorch") {
  // The same mini model and protocol as mini_train_golden.safetensors with 6 x 3 x 48 x 80 inputs (issue 10
  // part 2: any input shape), made by PyTorch in float64; its float32 distances by tools/torch_distances.py.
  const vb::StateDict w = vb::load_state_dict_file(vbtest::fixture("mini_seed_b1_init.pth"));
  const vb::StateDict ref = vb::load_safetensors(vbtest::fixture("mini_train_golden_48x80.safetensors"));
  REQUIRE(ref.at("x0").shape == vb::Shape{6, 3, 48, 80});
  {
    auto be = vb::make_cpu_backend_f64(0);
    const auto rows = vb::run_golden(*be, w, ref);
    CHECK(rows.size() == 819);
    for (const auto& e : rows) {
      INFO(e.name << ": relative error " << e.rel_err << " (tolerance " << e.tol << ")");
      CHECK(e.ok());
    }
  }
  auto be = vb::make_cpu_backend(0);
  const auto rows = vb::run_golden(*be, w, ref);
  const vb::TorchDistances td = vb::load_torch_distances(vbtest::fixture("torch_distances_fp32_cpu_48x80.json"));
  const vb::ParityReport rep = vb::judge_parity(rows, td, vb::Precision::FP32, {6, 3, 48, 80});
  for (const auto& g : rep.groups) {
    INFO(g.name << ": max " << g.ours_max << " (bound " << g.bound_max << "), median " << g.ours_median << " (bound "
                << g.bound_median << ")");
    CHECK(g.ok);
  }
  for (const auto& st : rep.strict) {
    INFO(st.name << ": " << st.ours << " (tol " << st.tol << ")");
    CHECK(st.ok);
  }
  CHECK(rep.ok);
  // The square run's distances do not fit this reference: refused, not misjudged.
  CHECK_THROWS(vb::judge_parity(rows, vb::load_torch_distances(vbtest::fixture(kDistances)), vb::Precision::FP32,
                                {6, 3, 48, 80}));
}

// ---- bf16 (engine/backend_bf16.h) beside PyTorch's CPU autocast ----
// tests/fixtures/torch_distances_bf16_cpu.json: PyTorch 2.15's torch.autocast(bfloat16) run of the golden protocol
// on the CPU. The emulation rounds where autocast keeps bf16 tensors; its first forward lands where PyTorch's
// does (the same roundings; only float32 summation orders differ), and every later group within 2x.
namespace {
std::vector<vb::GoldenEntry> bf16_rows() {
  auto be = vb::make_bf16_emulation(vb::make_cpu_backend(0));
  CHECK(be->precision() == vb::Precision::BF16);
  vb::StateDict w = vb::load_state_dict_file(vbtest::fixture("mini_seed_b1_init.pth"));
  vb::StateDict ref = vb::load_safetensors(vbtest::fixture("mini_train_golden.safetensors"));
  return vb::run_golden(*be, w, ref);
}
}  // namespace

TEST_CASE("bf16 emulation beside PyTorch's autocast: the first forward where PyTorch's lands, every group within 2x") {
  const vb::TorchDistances td = vb::load_torch_distances(vbtest::fixture("torch_distances_bf16_cpu.json"));
  CHECK(td.precision == "bf16");
  const auto rows = bf16_rows();
  const vb::ParityReport rep = vb::judge_parity(rows, td, vb::Precision::BF16, {6, 3, 64, 64});
  CHECK(rep.ok);
  for (const auto& g : rep.groups) {
    INFO(g.name << ": max " << g.ours_max << " vs PyTorch " << g.torch_max);
    CHECK(g.ok);
  }
  for (const auto& s : rep.strict) {
    INFO(s.name << ": " << s.ours << " vs PyTorch " << s.torch << " (tol " << s.tol << ")");
    CHECK(s.ok);
    // Before any step the distance is bf16's rounding alone, and the emulation rounds as autocast does: within
    // 5% of PyTorch's (float32 without rounding lands at 1e-7, a thousandth of it).
    if (s.name == "eval_logits_init.x0" || s.name == "logits0" || s.name == "loss0") {
      CHECK(s.torch > 1e-3);
      CHECK(std::fabs(s.ours - s.torch) < 0.05 * s.torch);
    }
  }
  // The float32 engine is far closer to the golden's first forward than bf16: the closeness above is the
  // rounding's doing, not the golden's.
  for (const auto& r : fp32_rows())
    if (r.name == "eval_logits_init.x0") CHECK(r.rel_err < 1e-5);
  // A file of another precision is refused.
  CHECK(error_of([&] { vb::judge_parity(rows, vb::load_torch_distances(vbtest::fixture(kDistances)),
                                        vb::Precision::BF16); }).find("made at fp32") != std::string::npos);
  // PyTorch's distances a third of what they are: the emulation is no longer within 2x.
  vb::TorchDistances third = td;
  for (auto& [k, v] : third.distances) v /= 3;
  CHECK_FALSE(vb::judge_parity(rows, third, vb::Precision::BF16).ok);
}

TEST_CASE("bf16 emulation against PyTorch's own bf16 autocast run, tensor by tensor") {
  // tests/fixtures/mini_train_bf16_autocast.safetensors: the golden protocol run by PyTorch 2.15 in float32 under
  // torch.autocast(bfloat16) on the CPU (tools/make_goldens.py --autocast bf16). The first forward is the same
  // roundings: it agrees bit for bit here; the first step's gradients differ where the two backward passes round
  // differently; later steps by the chaos any two bf16 runs of this golden fall into (golden_tolerance).
  auto be = vb::make_bf16_emulation(vb::make_cpu_backend(0));
  const vb::StateDict w = vb::load_state_dict_file(vbtest::fixture("mini_seed_b1_init.pth"));
  vb::StateDict ref = vb::load_safetensors(vbtest::fixture("mini_train_bf16_autocast.safetensors"));
  CHECK(ref.metadata.at("math").find("autocast(bfloat16)") != std::string::npos);
  auto rows = vb::run_golden(*be, w, ref);
  vb::add_bf16_group_medians(rows);
  REQUIRE(rows.size() == 821);
  for (const auto& r : rows) {
    INFO(r.name << ": " << r.rel_err << " (tol " << r.tol << ")");
    CHECK(r.ok());
    if (r.name == "eval_logits_init.x0" || r.name == "logits0" || r.name == "loss0") CHECK(r.rel_err < 1e-6);
    if (r.name == "median(grad*)") CHECK(r.rel_err < 2e-2);
  }
  // A first step whose weight gradients are 1.6x PyTorch's fails, one by one and by the median.
  for (auto& [k, t] : ref.map)
    if (k.rfind("grad0.", 0) == 0 && k.find("conv") != std::string::npos) {
      float* v = t.as<float>();
      for (int64_t i = 0; i < t.numel(); ++i) v[i] /= 1.6f;
    }
  rows = vb::run_golden(*be, w, ref);
  vb::add_bf16_group_medians(rows);
  int bad = 0;
  for (const auto& r : rows) bad += !r.ok();
  CHECK(bad > 20);
}

TEST_CASE("bf16 beside the autocast distances: a run that does not round fails the first forward from below") {
  // The float32 engine's first forward is 1e-7 from the golden, far inside 2x PyTorch's bf16 distance: only the
  // lower bound on the first forward (judge_parity) tells that it is not bf16 at all.
  const vb::TorchDistances td = vb::load_torch_distances(vbtest::fixture("torch_distances_bf16_cpu.json"));
  const vb::ParityReport rep = vb::judge_parity(fp32_rows(), td, vb::Precision::BF16);
  CHECK_FALSE(rep.ok);
  for (const auto& s : rep.strict)
    if (s.name == "eval_logits_init.x0") CHECK_FALSE(s.ok);
}

namespace {
// The op-by-op bf16 tests: normal random values from one seeded generator, and values rounded to bf16.
struct NormalValues {
  std::mt19937 rng;
  std::normal_distribution<float> nd;
  explicit NormalValues(uint32_t seed) : rng(seed) {}
  std::vector<float> operator()(size_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = nd(rng);
    return v;
  }
};
std::vector<float> rounded(std::vector<float> v) {
  for (float& x : v) x = vb::round_bf16(x);
  return v;
}
}  // namespace

TEST_CASE("bf16 emulation, op by op: rounded operands and outputs, batch norm's output rounded before the residual add") {
  auto cpu = vb::make_cpu_backend(1);
  auto be = vb::make_bf16_emulation(vb::make_cpu_backend(1));
  NormalValues randv(5);
  // A convolution: the float32 convolution of the rounded operands, rounded.
  const vb::ConvShape s{2, 5, 7, 6, 4, 3, 3, 1, 1};
  const auto x = randv(size_t(2) * 5 * 7 * 6), w = randv(size_t(4) * 5 * 9);
  std::vector<float> y(size_t(2) * 4 * 7 * 6), want(y.size());
  be->conv_fwd(s, x.data(), w.data(), y.data());
  const auto xr = rounded(x), wr = rounded(w);
  cpu->conv_fwd(s, xr.data(), wr.data(), want.data());
  want = rounded(want);
  CHECK(std::memcmp(y.data(), want.data(), y.size() * sizeof(float)) == 0);
  CHECK(y != std::vector<float>(y.size(), 0.f));
  // Batch norm with residual and ReLU: bn in float32, rounded; + residual, rounded; ReLU. The statistics float32.
  const int N = 2, C = 4, H = 7, W = 6;
  const auto in = rounded(randv(y.size())), res = rounded(randv(y.size()));
  const std::vector<float> gamma = {1.f, 0.5f, 2.f, 1.5f}, beta = {0.1f, -0.2f, 0.f, 0.3f};
  std::vector<float> out(y.size()), mean(C), invstd(C), rm(C, 0.f), rv(C, 1.f);
  be->bn_train_fwd(N, C, H, W, in.data(), gamma.data(), beta.data(), res.data(), true, out.data(), mean.data(),
                   invstd.data(), rm.data(), rv.data(), 0.1, 1e-5);
  std::vector<float> ref(y.size()), m2(C), i2(C), rm2(C, 0.f), rv2(C, 1.f);
  cpu->bn_train_fwd(N, C, H, W, in.data(), gamma.data(), beta.data(), nullptr, false, ref.data(), m2.data(), i2.data(),
                    rm2.data(), rv2.data(), 0.1, 1e-5);
  ref = rounded(ref);
  for (size_t i = 0; i < ref.size(); ++i) ref[i] = std::max(0.f, vb::round_bf16(ref[i] + res[i]));
  CHECK(std::memcmp(out.data(), ref.data(), out.size() * sizeof(float)) == 0);
  CHECK(mean == m2);  // statistics untouched by the rounding
  CHECK(rm == rm2);
  CHECK(rounded(mean) != mean);
  // The fused single rounding differs: the emulation's two roundings matter.
  std::vector<float> fused(y.size());
  cpu->bn_train_fwd(N, C, H, W, in.data(), gamma.data(), beta.data(), res.data(), true, fused.data(), m2.data(),
                    i2.data(), rm2.data(), rv2.data(), 0.1, 1e-5);
  CHECK(rounded(fused) != out);
}

TEST_CASE("vbtrain verify --precision bf16: against PyTorch's own bf16 run, or beside its distances; refusals") {
  const std::string bin = vbtest::binary_dir() + "/tools/vbtrain";
  const std::string log = (std::filesystem::temp_directory_path() / "vbtrain_verify_bf16.log").string();
  const std::string base = bin + " verify --device cpu --quiet --weights " + vbtest::fixture("mini_seed_b1_init.pth");
  const std::string golden = " --reference " + vbtest::fixture("mini_train_golden.safetensors");
  const std::string autocast = " --reference " + vbtest::fixture("mini_train_bf16_autocast.safetensors");
  auto run = [&](const std::string& args) {
    const int rc = std::system((base + args + " > " + log + " 2>&1").c_str());
    std::ifstream l(log);
    return std::make_pair(WIFEXITED(rc) ? WEXITSTATUS(rc) : -1,
                          std::string((std::istreambuf_iterator<char>(l)), std::istreambuf_iterator<char>()));
  };
  // PyTorch's own bf16 run as the reference: the precision follows from it.
  auto [rc, text] = run(autocast);
  CHECK(rc == 0);
  CHECK(text.find("bf16 emulated") != std::string::npos);
  CHECK(text.find("PyTorch's own bf16 autocast run") != std::string::npos);
  CHECK(text.find("821 checks, 0 above tolerance") != std::string::npos);
  // Beside the autocast distances to the float64 golden.
  std::tie(rc, text) = run(" --precision bf16" + golden + " --against " + vbtest::fixture("torch_distances_bf16_cpu.json"));
  CHECK(rc == 0);
  CHECK(text.find("passed") != std::string::npos);
  // Refused: bf16 held to the float64 golden's own bounds; --against with the bf16 reference; another precision
  // with it; fp32 distances for a bf16 run.
  std::tie(rc, text) = run(" --precision bf16" + golden);
  CHECK(rc == 1);  // vbtrain's one-line errors exit 1
  CHECK(text.find("is a float64 golden run") != std::string::npos);
  std::tie(rc, text) = run(autocast + " --against " + vbtest::fixture("torch_distances_bf16_cpu.json"));
  CHECK(rc != 0);
  CHECK(text.find("compare with it directly") != std::string::npos);
  std::tie(rc, text) = run(autocast + " --precision fp32");
  CHECK(rc != 0);
  CHECK(text.find("use --precision bf16") != std::string::npos);
  std::tie(rc, text) = run(" --precision bf16" + golden + " --against " + vbtest::fixture(kDistances));
  CHECK(rc != 0);
  CHECK(text.find("made at fp32, but this run computes in bf16") != std::string::npos);
}

TEST_CASE("bf16 emulation, backward and the other ops: each the float32 op on rounded operands, rounded") {
  auto cpu = vb::make_cpu_backend(1);
  auto be = vb::make_bf16_emulation(vb::make_cpu_backend(1));
  NormalValues randv(9);
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  auto all_bf16 = [&](const std::vector<float>& v) { return same(v, rounded(v)); };
  const vb::ConvShape s{2, 5, 7, 6, 4, 3, 3, 2, 1};
  const size_t nx = size_t(2) * 5 * 7 * 6, nw = size_t(4) * 5 * 9, ny = size_t(2) * 4 * s.P() * s.Q();
  const auto x = randv(nx), w = randv(nw), dy = randv(ny);
  SUBCASE("convolution backward") {
    std::vector<float> dx(nx), want(nx), dw(nw), wantw(nw);
    be->conv_bwd_data(s, dy.data(), w.data(), dx.data());
    cpu->conv_bwd_data(s, rounded(dy).data(), rounded(w).data(), want.data());
    CHECK(same(dx, rounded(want)));
    be->conv_bwd_filter(s, x.data(), dy.data(), dw.data());
    cpu->conv_bwd_filter(s, rounded(x).data(), rounded(dy).data(), wantw.data());
    CHECK(same(dw, rounded(wantw)));
    CHECK_FALSE(all_bf16(want));  // the float32 results do need the rounding
  }
  SUBCASE("linear forward and backward, the bias rounded too") {
    const int N = 3, IN = 20, OUT = 6;
    const auto a = randv(size_t(N) * IN), lw = randv(size_t(OUT) * IN), b = randv(OUT), g = randv(size_t(N) * OUT);
    std::vector<float> y(size_t(N) * OUT), wy(y.size());
    be->linear_fwd(N, IN, OUT, a.data(), lw.data(), b.data(), y.data());
    cpu->linear_fwd(N, IN, OUT, rounded(a).data(), rounded(lw).data(), rounded(b).data(), wy.data());
    CHECK(same(y, rounded(wy)));
    std::vector<float> dx(a.size()), dw(lw.size()), db(OUT), wdx(a.size()), wdw(lw.size()), wdb(OUT);
    be->linear_bwd(N, IN, OUT, a.data(), lw.data(), g.data(), dx.data(), dw.data(), db.data());
    cpu->linear_bwd(N, IN, OUT, rounded(a).data(), rounded(lw).data(), rounded(g).data(), wdx.data(), wdw.data(),
                    wdb.data());
    CHECK(same(dx, rounded(wdx)));
    CHECK(same(dw, rounded(wdw)));
    CHECK(same(db, rounded(wdb)));
  }
  SUBCASE("pooling, the loss's gradient") {
    const auto xr = rounded(x);
    std::vector<float> avg(10), wavg(10), dxa(nx), wdxa(nx);
    be->avgpool_fwd(2, 5, 7, 6, xr.data(), avg.data());
    cpu->avgpool_fwd(2, 5, 7, 6, xr.data(), wavg.data());
    CHECK(same(avg, rounded(wavg)));
    const auto g = rounded(randv(10));
    be->avgpool_bwd(2, 5, 7, 6, g.data(), dxa.data());
    cpu->avgpool_bwd(2, 5, 7, 6, g.data(), wdxa.data());
    CHECK(same(dxa, rounded(wdxa)));
    CHECK_FALSE(all_bf16(wdxa));
    const int P = (7 + 2 - 3) / 2 + 1, Q = (6 + 2 - 3) / 2 + 1;
    std::vector<float> mp(size_t(2) * 5 * P * Q), dmp(nx), wdmp(nx);
    cpu->maxpool_fwd(2, 5, 7, 6, 3, 2, 1, xr.data(), mp.data());
    const auto gm = rounded(randv(mp.size()));
    be->maxpool_bwd(2, 5, 7, 6, 3, 2, 1, xr.data(), mp.data(), gm.data(), dmp.data());
    cpu->maxpool_bwd(2, 5, 7, 6, 3, 2, 1, xr.data(), mp.data(), gm.data(), wdmp.data());
    CHECK(same(dmp, rounded(wdmp)));
    const auto logits = rounded(randv(24));
    const std::vector<int64_t> labels = {0, 3, 7};
    const std::vector<float> cw(8, 1.f);
    std::vector<float> dl(24), wdl(24);
    float loss = 0, wloss = 0;
    be->softmax_wce(3, 8, logits.data(), labels.data(), cw.data(), nullptr, dl.data(), &loss);
    cpu->softmax_wce(3, 8, logits.data(), labels.data(), cw.data(), nullptr, wdl.data(), &wloss);
    CHECK(loss == wloss);  // the loss stays float32
    CHECK(same(dl, rounded(wdl)));
    CHECK_FALSE(all_bf16(wdl));
  }
  SUBCASE("batch norm: backward, evaluation, the recomputed output, the unfolded conv_bn_eval") {
    const int N = 2, C = 5, H = 7, W = 6;
    const auto xr = rounded(x), dyr = rounded(randv(nx)), res = rounded(randv(nx));
    const std::vector<float> gamma = {1.f, 0.5f, 2.f, 1.5f, 0.8f}, beta = {0.1f, -0.2f, 0.f, 0.3f, 0.05f};
    std::vector<float> y(nx), mean(C), invstd(C), rm(C, 0.f), rv(C, 1.f);
    be->bn_train_fwd(N, C, H, W, xr.data(), gamma.data(), beta.data(), nullptr, true, y.data(), mean.data(),
                     invstd.data(), rm.data(), rv.data(), 0.1, 1e-5);
    std::vector<float> dx(nx), dg(C), db(C), scr(nx), wdx(nx), wdg(C), wdb(C), wscr(nx);
    be->bn_bwd(N, C, H, W, xr.data(), y.data(), dyr.data(), gamma.data(), mean.data(), invstd.data(), true, dx.data(),
               nullptr, dg.data(), db.data(), scr.data());
    cpu->bn_bwd(N, C, H, W, xr.data(), y.data(), dyr.data(), gamma.data(), mean.data(), invstd.data(), true,
                wdx.data(), nullptr, wdg.data(), wdb.data(), wscr.data());
    CHECK(same(dx, rounded(wdx)));
    CHECK(dg == wdg);  // the parameters' gradients stay float32
    CHECK(db == wdb);
    std::vector<float> again(nx), want(nx);
    be->bn_apply(N, C, H, W, xr.data(), gamma.data(), beta.data(), mean.data(), invstd.data(), true, again.data());
    CHECK(same(again, y));  // backward's recomputation gives the forward's bits
    std::vector<float> ev(nx);
    be->bn_eval_fwd(N, C, H, W, xr.data(), gamma.data(), beta.data(), rm.data(), rv.data(), 1e-5, res.data(), true,
                    ev.data());
    cpu->bn_eval_fwd(N, C, H, W, xr.data(), gamma.data(), beta.data(), rm.data(), rv.data(), 1e-5, nullptr, false,
                     want.data());
    want = rounded(want);
    for (size_t i = 0; i < want.size(); ++i) want[i] = std::max(0.f, vb::round_bf16(want[i] + res[i]));
    CHECK(same(ev, want));
    const vb::ConvShape cs{2, 5, 7, 6, 5, 3, 3, 1, 1};
    const auto cw = randv(size_t(5) * 5 * 9);
    std::vector<float> fused(nx), apart(nx);
    be->conv_bn_eval(cs, x.data(), cw.data(), gamma.data(), beta.data(), rm.data(), rv.data(), 1e-5, res.data(), true,
                     fused.data());
    be->conv_fwd(cs, x.data(), cw.data(), apart.data());  // autocast does not fold: the two ops, each rounding
    be->bn_eval_fwd(N, C, H, W, apart.data(), gamma.data(), beta.data(), rm.data(), rv.data(), 1e-5, res.data(), true,
                    apart.data());
    CHECK(same(fused, apart));
    CHECK(all_bf16(fused));
  }
}
