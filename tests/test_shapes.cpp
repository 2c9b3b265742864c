// Non-square input sizes end to end (`--image-size HxW`): train, eval, predict and bench on the CPU, the size
// kept in config.json and in the model file, and predict using the model file's size.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "engine/state_dict.h"
#include "tests/test_process.h"

namespace fs = std::filesystem;
using vbtest::run_vbtrain;

namespace {

const fs::path& work() {
  static const fs::path w = vbtest::scratch_dir("vbtrain_shapes");
  return w;
}

std::string slurp(const fs::path& p) { return vbtest::read_text(p); }

}  // namespace

TEST_CASE("train, eval, predict and bench at 40x56 (height x width)") {
  const fs::path data = work() / "synth", out = work() / "run";
  auto r = run_vbtrain("synth --out " + data.string() + " --clips-per-video 2 --scale 0.125 --seed 5");
  INFO(r.out);
  REQUIRE(r.code == 0);
  r = run_vbtrain("train --device cpu --threads 2 --data " + data.string() + " --out " + out.string() +
                  " --epochs 1 --blocks 1,1,1,1 --width 8 --image-size 40x56 --batch-size 16 --seed 2");
  INFO(r.out);
  REQUIRE(r.code == 0);
  CHECK(r.out.find("image 40x56") != std::string::npos);
  const auto cfg = nlohmann::json::parse(slurp(out / "config.json"));
  CHECK(cfg.at("image_size") == "40x56");
  const vb::StateDict sd = vb::load_safetensors((out / "final_model.safetensors").string());
  const auto meta = nlohmann::json::parse(sd.metadata.at("vbtrain.config"));
  CHECK(meta.at("image_size") == "40x56");

  r = run_vbtrain("eval --device cpu --threads 2 --data " + data.string() + " --model " +
                  (out / "final_model.safetensors").string() + " --split test --out " + (work() / "eval").string());
  INFO(r.out);
  REQUIRE(r.code == 0);
  CHECK(r.out.find("40x56 px") != std::string::npos);

  // predict takes the size from the model file; the same frame at another size gives other probabilities.
  fs::path frame;
  for (const auto& e : fs::recursive_directory_iterator(data))
    if (e.path().extension() == ".jpg") {
      frame = e.path();
      break;
    }
  REQUIRE(!frame.empty());
  const std::string model = (out / "final_model.safetensors").string();
  auto p1 = run_vbtrain("predict --device cpu --json --model " + model + " " + frame.string());
  auto p2 = run_vbtrain("predict --device cpu --json --model " + model + " --image-size 40x56 " + frame.string());
  auto p3 = run_vbtrain("predict --device cpu --json --model " + model + " --image-size 56x40 " + frame.string());
  INFO(p1.out << p3.out);
  REQUIRE(p1.code == 0);
  REQUIRE(p3.code == 0);
  CHECK(p1.out == p2.out);
  CHECK(p1.out != p3.out);

  r = run_vbtrain("bench --device cpu --threads 2 --blocks 1,1,1,1 --width 8 --image-size 40x72 --batch-size 2 --steps 1");
  INFO(r.out);
  CHECK(r.code == 0);
  CHECK(r.out.find("40x72") != std::string::npos);
}

TEST_CASE("a malformed --image-size is refused with the text named, by every command") {
  for (const char* cmd : {"train --device cpu --data /nonexistent", "eval --data /nonexistent --model m.safetensors",
                          "predict --model m.safetensors x.jpg", "bench --device cpu", "bench-loader --data /nonexistent"}) {
    auto r = run_vbtrain(std::string(cmd) + " --image-size 224x");
    INFO(cmd << "\n" << r.out);
    CHECK(r.code != 0);
    CHECK(r.out.find("image size '224x'") != std::string::npos);
  }
}
