// vbtrain bench: the whole training step (forward, weighted cross-entropy, backward, AdamW) and the
// evaluation forward on random data, in img/s with peak device memory: the figures of
// docs/STATUS.md (PyTorch on the H200), measured the same way (median of the timed steps after warm-up).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>

#include "engine/model.h"
#include "engine/optimizer.h"
#include "tools/commands.h"
#include "tools/image_size_option.h"

namespace {

struct BenchArgs {
  std::string device = "auto", precision = "tf32", blocks = "3,4,6,3", json;
  int batch_size = 0, steps = 0, warmup = 0, width = 64, threads = 0;
  vb::data::ImageSize image_size = 224;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

int run_bench(BenchArgs a) {
  std::unique_ptr<vb::Backend> be = vb::make_backend(a.device, a.threads);
  const bool cpu = be->device() == vb::Device::CPU;
  if (!a.batch_size) a.batch_size = cpu ? 1 : 150;
  if (!a.steps) a.steps = cpu ? 3 : 30;
  if (!a.warmup) a.warmup = cpu ? 1 : 5;
  if (!cpu) be->set_precision(a.precision == "fp32" ? vb::Precision::FP32 : vb::Precision::TF32);
  vb::ModelConfig cfg;
  cfg.blocks = vb::parse_int_list(a.blocks, "--blocks");
  cfg.width = a.width;
  vb::Model model(*be, cfg);
  model.init_torchvision(1);
  const int N = a.batch_size, C = cfg.num_classes;
  const vb::data::ImageSize S = a.image_size;
  model.plan(N, S);
  vb::AdamW opt(model, {});
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> x(size_t(N) * 3 * size_t(S.pixels()));
  for (float& v : x) v = nd(rng);
  std::vector<int64_t> y(static_cast<size_t>(N));
  for (int i = 0; i < N; ++i) y[size_t(i)] = i % C;
  std::vector<float> cw(static_cast<size_t>(C), 1.f);
  auto* d_y = static_cast<int64_t*>(be->alloc(sizeof(int64_t) * y.size()));
  auto* d_cw = static_cast<float*>(be->alloc(sizeof(float) * cw.size()));
  auto* d_loss = static_cast<float*>(be->alloc(sizeof(float)));
  be->upload(d_y, y.data(), sizeof(int64_t) * y.size());
  be->upload(d_cw, cw.data(), sizeof(float) * cw.size());
  be->upload_activation(model.input(), x.data(), N, 3, S.h, S.w);
  std::printf("bench: %s, batch %d, %dx%d, on %s (%s)\n", cfg.describe().c_str(), N, S.h, S.w, be->description().c_str(),
              vb::precision_name(be->precision()));
  std::fflush(stdout);
  auto timed = [&](auto&& fn, int steps) {
    std::vector<double> t;
    for (int i = 0; i < steps; ++i) {
      be->sync();
      auto t0 = std::chrono::steady_clock::now();
      fn();
      be->sync();
      t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return t;
  };
  auto train_step = [&] {
    model.forward(N, true);
    be->softmax_wce(N, C, model.logits(), d_y, d_cw, nullptr, model.dlogits(), d_loss);
    model.backward(N);
    opt.step(1e-3);
  };
  auto eval_step = [&] { model.forward(N, false); };
  train_step();  // the first step's loss is the one worth printing: later steps fit the one random batch
  float loss = 0;
  be->download(&loss, d_loss, sizeof(float));
  timed(train_step, a.warmup - 1);
  const double train_s = median(timed(train_step, a.steps));
  timed(eval_step, a.warmup);
  const double eval_s = median(timed(eval_step, a.steps));
  const double gib = double(be->memory_peak()) / double(1ull << 30);
  std::printf("training step: %.1f ms (%.1f img/s)  evaluation: %.1f ms (%.1f img/s)  peak memory %.2f GiB  (first loss %.3f)\n",
              train_s * 1e3, N / train_s, eval_s * 1e3, N / eval_s, gib, loss);
  if (cpu && N == 1)
    std::printf("one %dx%d image, forward + backward + AdamW: %.2f s on %s\n", S.h, S.w, train_s, be->description().c_str());
  if (!a.json.empty()) {
    nlohmann::ordered_json j = {{"model", cfg.describe()}, {"device", be->description()},
                                {"precision", vb::precision_name(be->precision())}, {"batch", N}, {"image_size", S},
                                {"train_ms", train_s * 1e3}, {"train_img_s", N / train_s}, {"eval_ms", eval_s * 1e3},
                                {"eval_img_s", N / eval_s}, {"peak_gib", gib}};
    std::ofstream(a.json) << j.dump(2) << "\n";
  }
  be->release(d_y);
  be->release(d_cw);
  be->release(d_loss);
  return 0;
}

}  // namespace

VB_COMMAND("bench", "Time the training step and the evaluation forward on random data",
           [](CLI::App& app) -> std::function<int()> {
             auto a = std::make_shared<BenchArgs>();
             app.add_option("--device", a->device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
             app.add_option("--precision", a->precision, "tf32 or fp32")->check(CLI::IsMember({"tf32", "fp32"}));
             app.add_option("--batch-size", a->batch_size, "batch (default 150 on CUDA, 1 on the CPU)");
             app.add_option("--steps", a->steps, "timed steps (default 30 on CUDA, 3 on the CPU)");
             app.add_option("--warmup", a->warmup, "untimed steps first (default 5 / 1)");
             app.add_option("--blocks", a->blocks, "blocks per stage (default 3,4,6,3)");
             app.add_option("--width", a->width, "base width (default 64)");
             vb::tools::add_image_size_option(app, a->image_size, "input size S or HxW (default 224)");
             app.add_option("--threads", a->threads, "CPU threads (0 = all cores)");
             app.add_option("--json", a->json, "also write the figures as JSON");
             return [a] { return run_bench(*a); };
           });
