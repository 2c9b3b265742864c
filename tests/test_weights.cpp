// Weights in and out: the PyTorch zip and legacy formats, safetensors, the notebook's model and checkpoint,
// the checks against the model's tensor table, the error messages on bad files, SHA-256 and vbconvert.
// The fixtures were written by torch.save and safetensors (tests/fixtures/README via make_goldens.py), so
// three independent writers must give byte-identical tensors here.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "engine/model_config.h"
#include "engine/pth.h"
#include "engine/sha256.h"
#include "engine/state_dict.h"
#include "engine/weights.h"
#include "tests/pth_writer.h"
#include "tests/test_process.h"
#include "tests/test_util.h"

using namespace vb;
namespace fs = std::filesystem;

namespace {

using vbtest::TempDir;
using vbtest::write_bytes;
const TempDir& tmp() {
  static TempDir t("vb_test_weights");
  return t;
}

// The message of the vb::Error `fn` throws ("" when it throws none).
template <class F>
std::string error_of(F fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Same names (in the same order unless `any_order`: the safetensors library writes its keys sorted),
// shapes, dtypes and bytes.
void require_same(const StateDict& a, const StateDict& b, const std::string& what, bool any_order = false) {
  if (any_order) {
    auto x = a.order, y = b.order;
    std::sort(x.begin(), x.end());
    std::sort(y.begin(), y.end());
    REQUIRE_MESSAGE(x == y, what << ": names differ");
  } else {
    REQUIRE_MESSAGE(a.order == b.order, what << ": names or order differ");
  }
  for (const auto& k : a.order) {
    const HostTensor &x = a.at(k), &y = b.at(k);
    INFO(what << ": " << k);
    CHECK(x.shape == y.shape);
    CHECK(x.dtype == y.dtype);
    CHECK(x.bytes == y.bytes);
  }
}

ModelConfig mini_config(std::vector<int> hidden, int classes) {
  ModelConfig c;
  c.blocks = {3, 4, 6, 3};
  c.width = 8;
  c.hidden = std::move(hidden);
  c.num_classes = classes;
  return c;
}

// Runs a command through the shell; returns its exit code, its stdout+stderr in `out`.
int run_cmd(const std::string& cmd, std::string& out) {
  const std::string log = tmp().file("cmd.log");
  const int rc = std::system((cmd + " > '" + log + "' 2>&1").c_str());
  out = read_file(log);
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}
std::string vbconvert() { return vbtest::binary_dir() + "/tools/vbconvert"; }

// ---- a hand-made PyTorch zip file, for views, strides and shared storages ----
using vbtest::make_zip;
using vbtest::PickleWriter;
using vbtest::put16;
using vbtest::put32;
using vbtest::put64;

}  // namespace

TEST_CASE("sha256 on the FIPS 180-2 test vectors") {
  CHECK(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  // 56 bytes: the length no longer fits the first block, padding takes a second one.
  CHECK(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  CHECK(sha256_hex(std::string(1000000, 'a')) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST_CASE("zip .pth, legacy .pth and safetensors of the same state dict are identical") {
  WeightFormat fz, fl, fs_;
  const StateDict z = load_state_dict_bytes(read_file(vbtest::fixture("mini_imagenet_style.pth")), "zip", &fz);
  const StateDict l = load_state_dict_bytes(read_file(vbtest::fixture("mini_imagenet_style_legacy.pth")), "legacy", &fl);
  const StateDict s = load_state_dict_bytes(read_file(vbtest::fixture("mini_imagenet_style.safetensors")), "st", &fs_);
  CHECK(fz == WeightFormat::PthZip);
  CHECK(fl == WeightFormat::PthLegacy);
  CHECK(fs_ == WeightFormat::Safetensors);
  require_same(z, s, "zip vs safetensors", true);
  require_same(l, s, "legacy vs safetensors", true);
  require_same(l, z, "legacy vs zip");

  // torchvision's state_dict order, which is the engine's tensor table with an ImageNet-style `fc`.
  std::vector<std::string> want;
  for (const auto& sp : model_tensor_specs(mini_config({}, 10)))
    want.push_back(sp.head ? (sp.role == TensorRole::FcWeight ? "fc.weight" : "fc.bias") : sp.name);
  CHECK(z.order == want);
  CHECK(z.size() == 320);
  CHECK(z.at("conv1.weight").shape == Shape{8, 3, 7, 7});
  CHECK(z.at("fc.weight").shape == Shape{10, 256});
  int n_tracked = 0;
  for (const auto& k : z.order) {
    if (!contains(k, "num_batches_tracked")) continue;
    const HostTensor& t = z.at(k);
    REQUIRE(t.dtype == DType::I64);
    CHECK(t.shape.empty());
    CHECK(t.as<int64_t>()[0] == 5);
    ++n_tracked;
  }
  CHECK(n_tracked == 53);
  // The BN state was randomised: a swapped or zeroed tensor would not look like this.
  const auto rv = z.at("layer3.2.bn2.running_var").to_f64();
  for (double v : rv) CHECK((v >= 1.0 && v <= 1.2));
}

TEST_CASE("the notebook's model file: prefix stripped, head fc.0 / fc.2, configuration inferred") {
  const std::string path = vbtest::fixture("mini_seed_b1_init.pth");
  const StateDict sd = load_state_dict_file(path);
  for (const auto& k : sd.order) CHECK_MESSAGE(k.rfind("model.", 0) != 0, k);
  CHECK(sd.at("fc.0.weight").shape == Shape{16, 256});
  CHECK(sd.at("fc.0.bias").shape == Shape{16});
  CHECK(sd.at("fc.2.weight").shape == Shape{8, 16});
  CHECK(sd.at("fc.2.bias").shape == Shape{8});
  const ModelConfig cfg = infer_model_config(sd);
  CHECK(cfg.blocks == std::vector<int>{3, 4, 6, 3});
  CHECK(cfg.width == 8);
  CHECK(cfg.hidden == std::vector<int>{16});
  CHECK(cfg.num_classes == 8);
  check_against_specs(sd, model_tensor_specs(cfg), path);
  // The same backbone as the ImageNet-style file (the script wraps that very module).
  const StateDict bb = load_state_dict_file(vbtest::fixture("mini_imagenet_style.pth"));
  for (const auto& k : bb.order)
    if (k.rfind("fc.", 0) != 0) CHECK_MESSAGE(sd.at(k).bytes == bb.at(k).bytes, k);
}

TEST_CASE("the notebook's checkpoint: epoch, model, AdamW and StepLR state") {
  const std::string path = vbtest::fixture("mini_seed_checkpoint_epoch2.pth");
  const NotebookCheckpoint ck = read_notebook_checkpoint(path);
  CHECK(ck.epoch == 2);
  const ModelConfig cfg = mini_config({16}, 8);
  const auto specs = model_tensor_specs(cfg);
  check_against_specs(ck.model, specs, path);

  // The model after three steps is the golden run's after3.* (the trainer saved model.float()).
  const StateDict gold = load_safetensors(vbtest::fixture("mini_train_golden.safetensors"));
  for (const auto& k : ck.model.order) {
    const HostTensor& g = gold.at("after3.model." + k);  // the golden file keeps the wrapper's names
    const HostTensor& t = ck.model.at(k);
    if (t.dtype == DType::I64) {
      CHECK_MESSAGE(t.as<int64_t>()[0] == int64_t(g.to_f64()[0]), k);
      CHECK(t.as<int64_t>()[0] == 8);  // 5 + three training steps
    } else {
      vbtest::check_close(k, t.to_f64(), g.to_f64(), 0, 0);
    }
  }

  // Optimizer state by parameter index, in named_parameters() order.
  std::vector<const TensorSpec*> params;
  for (const auto& s : specs)
    if (s.kind == TensorKind::Parameter) params.push_back(&s);
  REQUIRE(ck.optimizer_state.size() == params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    INFO("parameter " << i << " " << params[i]->name);
    auto it = ck.optimizer_state.find(int64_t(i));
    REQUIRE(it != ck.optimizer_state.end());
    CHECK(it->second.step == 3);
    CHECK(it->second.exp_avg.shape == params[i]->shape);
    CHECK(it->second.exp_avg_sq.shape == params[i]->shape);
    CHECK(it->second.exp_avg.dtype == DType::F32);
    double sq = 0;
    int negative = 0;
    for (double v : it->second.exp_avg_sq.to_f64()) {
      negative += v < 0;
      sq += v;
    }
    CHECK(negative == 0);
    CHECK(sq > 0);  // every parameter got gradients
  }
  REQUIRE(ck.param_groups.size() == 1);
  const AdamWParamGroup& g = ck.param_groups[0];
  CHECK(g.lr == doctest::Approx(6e-4).epsilon(1e-12));
  CHECK(g.beta1 == 0.9);
  CHECK(g.beta2 == 0.999);
  CHECK(g.eps == 1e-8);
  CHECK(g.weight_decay == 0.01);
  REQUIRE(g.initial_lr.has_value());
  CHECK(*g.initial_lr == 1e-3);
  REQUIRE(g.params.size() == params.size());
  for (size_t i = 0; i < params.size(); ++i) CHECK(g.params[i] == int64_t(i));

  REQUIRE(ck.scheduler.has_value());
  CHECK(ck.scheduler->step_size == 2);
  CHECK(ck.scheduler->gamma == 0.6);
  CHECK(ck.scheduler->last_epoch == 3);
  CHECK(ck.scheduler->step_count == 4);
  CHECK(ck.scheduler->base_lrs == std::vector<double>{1e-3});
  REQUIRE(ck.scheduler->last_lr.size() == 1);
  CHECK(ck.scheduler->last_lr[0] == doctest::Approx(6e-4).epsilon(1e-12));

  // The same file as a state dict source: model_state_dict is found and its prefix stripped.
  const StateDict sd = load_state_dict_file(path);
  require_same(sd, ck.model, "load_state_dict_file of the checkpoint");
}

TEST_CASE("check_against_specs names missing, unexpected and wrongly shaped keys") {
  const std::string path = vbtest::fixture("mini_seed_b1_init.pth");
  const StateDict sd = load_state_dict_file(path);
  const auto specs = model_tensor_specs(mini_config({16}, 8));
  CHECK(error_of([&] { check_against_specs(sd, specs, path); }).empty());

  StateDict missing = sd;
  missing.erase("layer2.0.bn1.running_var");
  std::string e = error_of([&] { check_against_specs(missing, specs, path); });
  CHECK(contains(e, path));
  CHECK(contains(e, "missing keys: layer2.0.bn1.running_var"));

  StateDict extra = sd;
  extra.set("extra.weight", HostTensor({2}, DType::F32));
  e = error_of([&] { check_against_specs(extra, specs, path); });
  CHECK(contains(e, "unexpected keys: extra.weight"));
  CHECK(!contains(e, "missing"));

  StateDict shape = sd;
  shape.set("fc.2.bias", HostTensor({9}, DType::F32));
  e = error_of([&] { check_against_specs(shape, specs, path); });
  CHECK(contains(e, "wrong shapes: fc.2.bias is [9], expected [8]"));

  // The ImageNet-style file against the notebook's model: its head is both unexpected and missing.
  const StateDict imnet = load_state_dict_file(vbtest::fixture("mini_imagenet_style.pth"));
  e = error_of([&] { check_against_specs(imnet, specs, "imnet.pth"); });
  CHECK(contains(e, "imnet.pth: does not fit the model"));
  CHECK(contains(e, "missing keys: fc.0.weight, fc.0.bias, fc.2.weight, fc.2.bias"));
  CHECK(contains(e, "unexpected keys: fc.weight, fc.bias"));
}

TEST_CASE("bad files: truncated, random bytes, text, unsafe or unsupported content") {
  struct Case {
    std::string fixture;
    size_t keep;  // bytes kept
  };
  const Case cases[] = {
      {"mini_imagenet_style.pth", 800000},          // zip: the central directory is gone
      {"mini_imagenet_style.pth", 100},             // zip: inside the first local header
      {"mini_imagenet_style_legacy.pth", 800000},   // legacy: inside the storages
      {"mini_imagenet_style_legacy.pth", 5000},     // legacy: inside the main pickle
      {"mini_imagenet_style.safetensors", 800000},  // safetensors: inside the data
      {"mini_imagenet_style.safetensors", 1000},    // safetensors: inside the JSON header
  };
  for (const auto& c : cases) {
    const std::string path = tmp().file("cut_" + std::to_string(c.keep) + "_" + c.fixture);
    write_bytes(path, read_file(vbtest::fixture(c.fixture)).substr(0, c.keep));
    const std::string e = error_of([&] { load_state_dict_file(path); });
    INFO(c.fixture << " cut to " << c.keep << ": " << e);
    CHECK(contains(e, path));
    CHECK(contains(e, "truncated"));
    CHECK(e.find('\n') == std::string::npos);
  }

  std::mt19937 rng(1);
  std::string noise(4096, '\0');
  for (auto& ch : noise) ch = char(rng() & 0xff);
  const std::string rnd = tmp().file("random.bin"), txt = tmp().file("notes.txt"), empty = tmp().file("empty.pth");
  write_bytes(rnd, noise);
  write_bytes(txt, "epoch,loss\n1,0.5\n2,0.25\n");
  write_bytes(empty, "");
  for (const auto& p : {rnd, txt, empty}) {
    const std::string e = error_of([&] { load_state_dict_file(p); });
    INFO(e);
    CHECK(contains(e, p));
    CHECK(contains(e, "not a checkpoint"));
  }
  CHECK(contains(error_of([&] { load_state_dict_file(tmp().file("absent.pth")); }), "cannot open"));

  // A legacy file whose main pickle calls os.system: refused by name, nothing runs.
  const std::string legacy = read_file(vbtest::fixture("mini_imagenet_style_legacy.pth"));
  const std::string header = legacy.substr(0, 137);  // magic, protocol and system-info pickles
  PickleWriter evil;
  evil.global("os", "system").str("touch pwned").op('\x85').op('R').op('.');
  std::string e = error_of([&] { parse_pth(header + evil.s, "evil.pth"); });
  CHECK(contains(e, "evil.pth"));
  CHECK(contains(e, "global 'os.system' is not allowed"));

  PickleWriter loop;  // a list appended to itself: refused, and nothing leaks
  loop.op(']').op('2').op('a').op('.');
  e = error_of([&] { parse_pth(header + loop.s, "loop.pth"); });
  CHECK(contains(e, "loop.pth: the pickle holds a container that contains itself"));

  PickleWriter odd;  // BYTEARRAY8 (protocol 5): not something torch.save writes
  odd.op('\x96');
  e = error_of([&] { parse_pth(header + odd.s, "odd.pth"); });
  CHECK(contains(e, "unsupported pickle opcode 0x96"));

  // A deflated zip entry (torch never writes one): the central directory's method field set to 8.
  std::string zip = read_file(vbtest::fixture("mini_imagenet_style.pth"));
  const size_t cd = zip.find(std::string("PK\x01\x02", 4));
  REQUIRE(cd != std::string::npos);
  zip[cd + 10] = 8;
  e = error_of([&] { parse_pth(zip, "deflated.pth"); });
  CHECK(contains(e, "deflated.pth: zip entry 'mini_imagenet_style/data.pkl' is compressed (method 8)"));

  // A zip that is not a PyTorch file.
  e = error_of([&] { load_state_dict_bytes(make_zip({{"readme.txt", "hello"}}), "other.zip"); });
  CHECK(contains(e, "other.zip: not a PyTorch checkpoint"));
}

TEST_CASE("views: storage offset, strides and shared storages are honoured") {
  // One float storage s = [0, 1.5, 3, ..., 9] shared by a strided 2x3 view at offset 1, a contiguous
  // 4-vector at offset 0 and a one-element view; an int64 storage for a 0-d tensor.
  PickleWriter p;
  p.op('}').op('(');
  p.str("a").tensor("FloatStorage", "0", 7, 1, {2, 3}, {1, 2});
  p.str("b").tensor("FloatStorage", "0", 7, 0, {4}, {1});
  p.str("c").tensor("FloatStorage", "0", 7, 6, {1, 1}, {5, 9});
  p.str("n").tensor("LongStorage", "1", 1, 0, {}, {});
  p.op('u').op('.');
  std::string s0, s1;
  for (int i = 0; i < 7; ++i) {
    float v = 1.5f * float(i);
    s0.append(reinterpret_cast<const char*>(&v), 4);
  }
  int64_t n = 42;
  s1.append(reinterpret_cast<const char*>(&n), 8);
  const std::string zip = make_zip({{"arch/data.pkl", p.s}, {"arch/byteorder", "little"}, {"arch/data/0", s0}, {"arch/data/1", s1}});

  const StateDict sd = load_state_dict_bytes(zip, "views.pth");
  REQUIRE(sd.order == std::vector<std::string>{"a", "b", "c", "n"});
  CHECK(sd.at("a").shape == Shape{2, 3});
  // a[r][c] = s[1 + r + 2c]
  CHECK(sd.at("a").to_f64() == std::vector<double>{1.5, 4.5, 7.5, 3.0, 6.0, 9.0});
  CHECK(sd.at("b").to_f64() == std::vector<double>{0, 1.5, 3.0, 4.5});
  CHECK(sd.at("c").to_f64() == std::vector<double>{9.0});
  CHECK(sd.at("n").dtype == DType::I64);
  CHECK(sd.at("n").as<int64_t>()[0] == 42);

  // Big-endian files are byte-swapped on the way in.
  std::string s0be = s0, s1be = s1;
  for (size_t i = 0; i < s0be.size(); i += 4) std::reverse(s0be.begin() + long(i), s0be.begin() + long(i + 4));
  std::reverse(s1be.begin(), s1be.end());
  const StateDict be = load_state_dict_bytes(
      make_zip({{"arch/data.pkl", p.s}, {"arch/byteorder", "big"}, {"arch/data/0", s0be}, {"arch/data/1", s1be}}), "be.pth");
  require_same(be, sd, "big-endian vs little-endian");

  // Stride-0 views of a tiny storage may not ask for an absurd allocation.
  PickleWriter huge, wide;
  huge.op('}').str("x").tensor("FloatStorage", "0", 7, 0, {1 << 16, 1 << 16}, {0, 0}).op('s').op('.');
  wide.op('}').str("x").tensor("FloatStorage", "0", 7, 0, {1 << 20, 1 << 20, 2}, {0, 0, 0}).op('s').op('.');
  CHECK(contains(error_of([&] { load_state_dict_bytes(make_zip({{"a/data.pkl", huge.s}, {"a/data/0", s0}}), "huge.pth"); }),
                 "huge.pth: malformed or hostile (its tensors would expand to 17179869184 bytes"));
  CHECK(contains(error_of([&] { load_state_dict_bytes(make_zip({{"a/data.pkl", wide.s}, {"a/data/0", s0}}), "wide.pth"); }),
                 "is too large"));

  // A view reaching past its storage is an error naming the file and the storage.
  PickleWriter bad;
  bad.op('}').str("x").tensor("FloatStorage", "0", 7, 2, {3, 2}, {2, 1}).op('s').op('.');
  const std::string e = error_of([&] { load_state_dict_bytes(make_zip({{"arch/data.pkl", bad.s}, {"arch/data/0", s0}}), "oob.pth"); });
  CHECK(contains(e, "oob.pth"));
  CHECK(contains(e, "reaches element 7 of storage '0' which has 7"));
}

TEST_CASE("safetensors round trip keeps names, order, dtypes, values and metadata") {
  StateDict sd = load_state_dict_file(vbtest::fixture("mini_seed_b1_init.pth"));
  sd.metadata["format"] = "vbtrain";
  const std::string path = tmp().file("roundtrip.safetensors");
  save_safetensors(path, sd);
  const StateDict back = load_state_dict_file(path);
  require_same(back, sd, "round trip");
  CHECK(back.metadata.at("format") == "vbtrain");
}

TEST_CASE("vbconvert: ImageNet-style head dropped, notebook head kept, hash prefix checked") {
  REQUIRE_MESSAGE(fs::exists(vbconvert()), "build the vbconvert target first: " << vbconvert());
  const std::string in = vbtest::fixture("mini_imagenet_style.pth");
  const StateDict src = load_state_dict_file(in);
  std::string log;

  const std::string out = tmp().file("converted.safetensors");
  REQUIRE_MESSAGE(run_cmd(vbconvert() + " '" + in + "' '" + out + "' --hidden-layers 16 --seed 3", log) == 0, log);
  CHECK(contains(log, "dropped: fc.weight [10, 256], fc.bias [10] (an ImageNet-style head of 10 classes)"));
  CHECK(contains(log, "sha256:  " + sha256_hex(read_file(in))));
  const ModelConfig cfg = mini_config({16}, 8);
  const StateDict conv = load_state_dict_file(out);
  check_against_specs(conv, model_tensor_specs(cfg), out);
  CHECK(conv.metadata.at("format") == "vbtrain");
  const auto j = nlohmann::json::parse(conv.metadata.at("vbtrain.config"));
  CHECK(j.at("blocks").get<std::vector<int>>() == cfg.blocks);
  CHECK(j.at("width").get<int>() == 8);
  CHECK(j.at("hidden").get<std::vector<int>>() == std::vector<int>{16});
  CHECK(j.at("num_classes").get<int>() == 8);
  for (const auto& k : src.order)
    if (k.rfind("fc.", 0) != 0) CHECK_MESSAGE(conv.at(k).bytes == src.at(k).bytes, k);
  // nn.Linear's init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), standard deviation bound/sqrt(3).
  for (const auto& [name, fan_in] : {std::pair<std::string, int>{"fc.0.weight", 256}, {"fc.0.bias", 256}, {"fc.2.weight", 16}, {"fc.2.bias", 16}}) {
    const auto v = conv.at(name).to_f64();
    const double bound = 1.0 / std::sqrt(double(fan_in));
    double mx = 0, ss = 0;
    for (double x : v) { mx = std::max(mx, std::fabs(x)); ss += x * x; }
    INFO(name);
    CHECK(mx <= bound);
    CHECK(mx > 0.8 * bound);
    if (v.size() >= 4096) CHECK(std::sqrt(ss / double(v.size())) == doctest::Approx(bound / std::sqrt(3.0)).epsilon(0.05));
  }
  // The seed decides the head, and only the seed.
  const std::string again = tmp().file("again.safetensors"), other = tmp().file("other.safetensors");
  REQUIRE(run_cmd(vbconvert() + " '" + in + "' '" + again + "' --hidden-layers 16 --seed 3", log) == 0);
  REQUIRE(run_cmd(vbconvert() + " '" + in + "' '" + other + "' --hidden-layers 16 --seed 4", log) == 0);
  CHECK(load_state_dict_file(again).at("fc.0.weight").bytes == conv.at("fc.0.weight").bytes);
  CHECK(load_state_dict_file(other).at("fc.0.weight").bytes != conv.at("fc.0.weight").bytes);

  // The notebook's model: its head fits and is taken as it is (the `model.` prefix goes).
  const std::string nb = vbtest::fixture("mini_seed_b1_init.pth"), nb_out = tmp().file("nb.safetensors");
  REQUIRE_MESSAGE(run_cmd(vbconvert() + " '" + nb + "' '" + nb_out + "' --hidden-layers 16", log) == 0, log);
  CHECK(contains(log, "head:    taken from the file (4 tensors)"));
  CHECK(!contains(log, "dropped"));
  require_same(load_state_dict_file(nb_out), load_state_dict_file(nb), "notebook model through vbconvert");
  // ... and without --hidden-layers its hidden layer is kept too; from the checkpoint as well.
  const std::string ck_out = tmp().file("ck.safetensors");
  REQUIRE_MESSAGE(run_cmd(vbconvert() + " '" + vbtest::fixture("mini_seed_checkpoint_epoch2.pth") + "' '" + ck_out + "'", log) == 0, log);
  CHECK(contains(log, "head:    taken from the file"));
  check_against_specs(load_state_dict_file(ck_out), model_tensor_specs(cfg), ck_out);

  // Torch-hub style names carry a SHA-256 prefix: a match is reported, a mismatch refused.
  const std::string bytes = read_file(in), sha = sha256_hex(bytes);
  const std::string good = tmp().file("mini-" + sha.substr(0, 8) + ".pth"), bad = tmp().file("mini-0123abcd.pth");
  write_bytes(good, bytes);
  write_bytes(bad, bytes);
  REQUIRE_MESSAGE(run_cmd(vbconvert() + " '" + good + "' '" + tmp().file("h.safetensors") + "'", log) == 0, log);
  CHECK(contains(log, "hash:    matches the file name's prefix " + sha.substr(0, 8)));
  CHECK(run_cmd(vbconvert() + " '" + bad + "' '" + tmp().file("h2.safetensors") + "'", log) == 1);
  CHECK(contains(log, "does not match the prefix 0123abcd"));
  CHECK(!fs::exists(tmp().file("h2.safetensors")));

  // Errors: one line, exit code 1.
  CHECK(run_cmd(vbconvert() + " '" + tmp().file("absent.pth") + "' '" + tmp().file("x.safetensors") + "'", log) == 1);
  CHECK(contains(log, "vbconvert: error:"));
  CHECK(std::count(log.begin(), log.end(), '\n') == 1);
  write_bytes(tmp().file("text.pth"), "not weights\n");
  CHECK(run_cmd(vbconvert() + " '" + tmp().file("text.pth") + "' '" + tmp().file("x.safetensors") + "'", log) == 1);
  CHECK(contains(log, "not a checkpoint"));
}
