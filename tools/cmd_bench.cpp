// vbtrain bench: the whole training step (forward, weighted cross-entropy, backward, AdamW) and the
// evaluation forward on random data, in img/s with peak device memory: the figures of docs/STATUS.md
// (PyTorch on the H200), measured the same way.
//
// Two passes, reported apart:
// - throughput: `steps` steps back to back after warm-up, one wait at the end (as a training loop runs; the
//   input stays on the device, as in tools/torch_bench.py), so no phase waits for another;
// - breakdown: the same step with a wait after each phase, so each phase's time is its own: the upload of
//   a batch of uint8 frames from page-locked host memory, normalised on the device (what the loader hands
//   over each step, and what the trainer does with it), forward with the loss,
//   backward, optimizer. Medians. Its sum exceeds the throughput step by the launch gaps the waits expose.
// Peak memory is what the backend allocated (activations, parameters, gradients, AdamW state, batch-norm
// scratch, cuBLAS's and cuDNN's workspaces, which it allocates and counts itself); on CUDA also the device's
// own count (total minus free: adds the CUDA context and the libraries' state), for comparison with tools
// that report either.
// VB_CUDA_GRAPH=1: the throughput pass runs the step as the trainer then does, captured as a CUDA graph and
// replayed (engine/train/step.h); the breakdown pass stays uncaptured (a wait between phases).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>

#ifdef VB_WITH_CUDA
#include <cuda_runtime.h>
#endif

#include "engine/backend_bf16.h"
#include "engine/model.h"
#include "engine/optimizer.h"
#include "engine/train/step.h"
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

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Bytes in use on the device as the driver counts them (0 where not known).
double device_used_gib(vb::Backend& be) {
#ifdef VB_WITH_CUDA
  if (be.device() == vb::Device::CUDA) {
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) return double(total_b - free_b) / double(1ull << 30);
    cudaGetLastError();
  }
#endif
  return 0;
}

int run_bench(BenchArgs a) {
  std::unique_ptr<vb::Backend> be = vb::make_backend(a.device, a.threads);
  const bool cpu = be->device() == vb::Device::CPU;
  if (a.precision == "bf16") {  // CUDA: the bf16 mode (NHWC); the CPU: the emulation of autocast
    if (!cpu && be->activation_layout() != vb::Layout::NHWC) be = vb::make_cuda_backend(0, vb::Layout::NHWC);
    if (cpu) be = vb::make_bf16_emulation(std::move(be));
    else be->set_precision(vb::Precision::BF16);
  }
  if (!a.batch_size) a.batch_size = cpu ? 1 : 150;
  if (!a.steps) a.steps = cpu ? 3 : 30;
  if (!a.warmup) a.warmup = cpu ? 1 : 5;
  if (!cpu && a.precision != "bf16") be->set_precision(a.precision == "fp32" ? vb::Precision::FP32 : vb::Precision::TF32);
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
  const size_t in_bytes = size_t(N) * 3 * size_t(S.pixels());
  // The batch as the loader hands it over: uint8 frames in host memory meant for the device (page-locked on
  // CUDA).
  auto* x = static_cast<uint8_t*>(be->host_alloc(in_bytes));
  for (size_t i = 0; i < in_bytes; ++i) x[i] = uint8_t(rng());
  std::vector<int64_t> y(static_cast<size_t>(N));
  for (int i = 0; i < N; ++i) y[size_t(i)] = i % C;
  std::vector<float> cw(static_cast<size_t>(C), 1.f);
  auto* d_y = static_cast<int64_t*>(be->alloc(sizeof(int64_t) * y.size()));
  auto* d_cw = static_cast<float*>(be->alloc(sizeof(float) * cw.size()));
  auto* d_loss = static_cast<float*>(be->alloc(sizeof(float)));
  be->upload(d_cw, cw.data(), sizeof(float) * cw.size());
  auto upload = [&] {
    be->upload_images(model.input(), x, N, S.h, S.w);
    be->upload(d_y, y.data(), sizeof(int64_t) * y.size());
  };
  upload();
  vb::TrainStep captured(model, opt, d_y, d_cw, d_loss, vb::cuda_graph_requested());
  std::printf("bench: %s, batch %d, %dx%d, on %s (%s)%s\n", cfg.describe().c_str(), N, S.h, S.w,
              be->description().c_str(), vb::precision_name(be->precision()),
              captured.capturing() ? ", training step captured as a CUDA graph (VB_CUDA_GRAPH=1)" : "");
  std::fflush(stdout);
  auto forward_loss = [&] {
    model.forward(N, true);
    be->softmax_wce(N, C, model.logits(), d_y, d_cw, nullptr, model.dlogits(), d_loss);
  };
  auto train_step = [&] {
    forward_loss();
    model.backward(N);
    opt.step(1e-3);
  };
  auto eval_step = [&] { model.forward(N, false); };
  // Mean seconds per call over `steps` calls issued back to back, one wait at the end.
  auto throughput = [&](auto&& fn, int steps) {
    be->sync();
    const auto t0 = Clock::now();
    for (int i = 0; i < steps; ++i) fn();
    be->sync();
    return since(t0) / steps;
  };

  train_step();  // the first step's loss is the one worth printing: later steps fit the one random batch
  float loss = 0;
  be->download(&loss, d_loss, sizeof(float));
  for (int i = 1; i < a.warmup; ++i) train_step();
  // The throughput pass through TrainStep, as the trainer runs it (its first full step, uncaptured, and its
  // capture are part of the warm-up when capturing).
  auto step = [&] { captured.run(N, 1e-3); };
  if (captured.capturing()) step(), step();
  const double train_s = throughput(step, a.steps);

  // The breakdown pass: a wait after each phase.
  const int bsteps = std::min(a.steps, 10);
  std::vector<double> t_up, t_fwd, t_bwd, t_opt;
  for (int i = 0; i < bsteps; ++i) {
    be->sync();
    auto t = Clock::now();
    upload();
    be->sync();
    t_up.push_back(since(t));
    t = Clock::now();
    forward_loss();
    be->sync();
    t_fwd.push_back(since(t));
    t = Clock::now();
    model.backward(N);
    be->sync();
    t_bwd.push_back(since(t));
    t = Clock::now();
    opt.step(1e-3);
    be->sync();
    t_opt.push_back(since(t));
  }
  const double up = median(t_up), fwd = median(t_fwd), bwd = median(t_bwd), op = median(t_opt);

  // One evaluation pass, as the trainer's validation runs: the CPU backend folds and packs each layer's weights
  // on its first batch (a warm-up) and reuses them.
  double eval_s = 0;
  {
    vb::EvalPass pass(*be);
    for (int i = 0; i < std::max(a.warmup, 1); ++i) eval_step();
    eval_s = throughput(eval_step, a.steps);
  }
  const double gib = double(be->memory_peak()) / double(1ull << 30);
  const double dev_gib = device_used_gib(*be);
  const double up_gbs = double(in_bytes + y.size() * sizeof(int64_t)) / up / 1e9;

  std::printf("training step: %.1f ms (%.1f img/s), mean of %d back to back after %d warm-up\n", train_s * 1e3,
              N / train_s, a.steps, a.warmup);
  std::printf("  breakdown (median of %d steps, waiting after each phase): upload %.2f ms (%.1f GB/s), forward + loss "
              "%.2f ms, backward %.2f ms, optimizer %.2f ms; sum %.2f ms\n",
              bsteps, up * 1e3, up_gbs, fwd * 1e3, bwd * 1e3, op * 1e3, (up + fwd + bwd + op) * 1e3);
  std::printf("evaluation: %.1f ms (%.1f img/s), mean of %d back to back\n", eval_s * 1e3, N / eval_s, a.steps);
  if (cpu)
    std::printf("peak memory %.2f GiB (the backend's allocations)  (first loss %.3f)\n", gib, loss);
  else
    std::printf("peak memory %.2f GiB (the backend's allocations, cuDNN and cuBLAS workspaces included); device in "
                "use now %.2f GiB (with the CUDA context and libraries)  (first loss %.3f)\n",
                gib, dev_gib, loss);
  if (cpu && N == 1)
    std::printf("one %dx%d image, forward + backward + AdamW: %.2f s on %s\n", S.h, S.w, train_s, be->description().c_str());
  if (!a.json.empty()) {
    nlohmann::ordered_json j = {{"model", cfg.describe()}, {"device", be->description()},
                                {"precision", vb::precision_name(be->precision())}, {"batch", N}, {"image_size", S},
                                {"steps", a.steps}, {"warmup", a.warmup}, {"captured_step", captured.capturing()},
                                {"train_ms", train_s * 1e3}, {"train_img_s", N / train_s}, {"eval_ms", eval_s * 1e3},
                                {"eval_img_s", N / eval_s}, {"peak_gib", gib},
                                {"breakdown_ms", {{"steps", bsteps}, {"upload", up * 1e3}, {"upload_GB/s", up_gbs},
                                                  {"forward_loss", fwd * 1e3}, {"backward", bwd * 1e3},
                                                  {"optimizer", op * 1e3}, {"sum", (up + fwd + bwd + op) * 1e3}}},
                                {"first_loss", loss}};
    if (!cpu) j["device_used_gib"] = dev_gib;
    std::ofstream f(a.json);
    if (!f) vb::fail(a.json, ": cannot write");
    f << j.dump(2) << "\n";
  }
  be->release(d_y);
  be->release(d_cw);
  be->release(d_loss);
  be->host_free(x);
  return 0;
}

}  // namespace

VB_COMMAND("bench", "Time the training step and the evaluation forward on random data",
           [](CLI::App& app) -> std::function<int()> {
             auto a = std::make_shared<BenchArgs>();
             app.add_option("--device", a->device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
             app.add_option("--precision", a->precision,
                            "tf32, fp32 or bf16 (CUDA: bf16 activations and convolutions in NHWC; the CPU: the "
                            "emulation of autocast)")
                 ->check(CLI::IsMember({"tf32", "fp32", "bf16"}));
             app.add_option("--batch-size", a->batch_size, "batch (default 150 on CUDA, 1 on the CPU)")->check(vb::tools::integer_in(0, 65536));
             app.add_option("--steps", a->steps, "timed steps (default 30 on CUDA, 3 on the CPU)")->check(vb::tools::integer_in(0, 100000));
             app.add_option("--warmup", a->warmup, "untimed steps first (default 5 / 1)")->check(vb::tools::integer_in(0, 100000));
             app.add_option("--blocks", a->blocks, "blocks per stage (default 3,4,6,3)");
             app.add_option("--width", a->width, "base width (default 64)")->check(vb::tools::integer_in(1, 4096));
             vb::tools::add_image_size_option(app, a->image_size, "input size S or HxW (default 224)");
             app.add_option("--threads", a->threads, "CPU threads (0 = all cores)")->check(vb::tools::thread_count());
             app.add_option("--json", a->json, "also write the figures as JSON");
             return [a] { return run_bench(*a); };
           });
