// vbtrain verify: the golden protocol of a PyTorch reference file (see engine/golden.h), every stage's
// relative error printed against its tolerance; exit 1 when one is above.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "engine/golden.h"
#include "engine/weights.h"
#include "tools/commands.h"

namespace {

struct VerifyArgs {
  std::string weights, reference, device = "cpu", precision = "auto", json;
  int threads = 0;
  bool quiet = false;
};

int run_verify(const VerifyArgs& a) {
  const vb::StateDict weights = vb::load_state_dict_file(a.weights);
  const vb::StateDict reference = vb::load_safetensors(a.reference);
  const bool cuda = a.device == "cuda" || (a.device == "auto" && vb::cuda_available());
  // The CPU defaults to its double-precision reference path; the engine's fp32 arithmetic is `--precision fp32`.
  const std::string precision = a.precision != "auto" ? a.precision : cuda ? "fp32" : "fp64";
  std::vector<vb::GoldenEntry> rows;
  if (precision == "fp64") {
    if (cuda) vb::fail("--precision fp64 is the CPU reference path: use --device cpu");
    auto be = vb::make_cpu_backend_f64(a.threads);
    std::printf("verify: %s against %s on %s, fp64 (the CPU reference path)\n", a.weights.c_str(),
                a.reference.c_str(), be->description().c_str());
    rows = vb::run_golden(*be, weights, reference);
  } else {
    std::unique_ptr<vb::Backend> be = vb::make_backend(cuda ? "cuda" : "cpu", a.threads);
    if (precision == "tf32" && !cuda) vb::fail("--precision tf32 needs --device cuda");
    be->set_precision(precision == "fp32" ? vb::Precision::FP32 : vb::Precision::TF32);
    std::printf("verify: %s against %s on %s, %s\n", a.weights.c_str(), a.reference.c_str(),
                be->description().c_str(), vb::precision_name(be->precision()));
    rows = vb::run_golden(*be, weights, reference);
  }
  int bad = 0;
  double worst = 0;
  std::string worst_name;
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const auto& r : rows) {
    if (!r.ok()) ++bad;
    if (!(r.rel_err / r.tol <= worst)) { worst = r.rel_err / r.tol; worst_name = r.name; }
    if (!a.quiet || !r.ok())
      std::printf("  %-62s %10.3e  (tol %.0e)  %s\n", r.name.c_str(), r.rel_err, r.tol, r.ok() ? "ok" : "FAIL");
    j[r.name] = std::isfinite(r.rel_err) ? nlohmann::ordered_json(r.rel_err) : nlohmann::ordered_json(nullptr);
  }
  if (!a.json.empty()) {
    std::ofstream f(a.json);
    if (!f) vb::fail(a.json, ": cannot write");
    f << j.dump(1) << "\n";
  }
  std::printf("verify: %zu checks, %d above tolerance; the largest error against its bound: %s (%.3g of the bound)\n",
              rows.size(), bad, worst_name.c_str(), worst);
  return bad ? 1 : 0;
}

}  // namespace

VB_COMMAND("verify", "Check the engine against a PyTorch golden run (logits, losses, gradients, AdamW steps)",
           [](CLI::App& app) -> std::function<int()> {
             auto a = std::make_shared<VerifyArgs>();
             app.add_option("--weights", a->weights, "initial weights (.pth or .safetensors)")->required();
             app.add_option("--reference", a->reference, "golden-run reference (.safetensors)")->required();
             app.add_option("--device", a->device, "cpu, cuda or auto")->check(CLI::IsMember({"cpu", "cuda", "auto"}));
             app.add_option("--precision", a->precision, "auto (CPU: fp64, CUDA: fp32), fp64 (CPU), fp32, tf32 (CUDA)")
                 ->check(CLI::IsMember({"auto", "fp64", "fp32", "tf32"}));
             app.add_option("--threads", a->threads, "CPU threads (0 = all cores)");
             app.add_option("--json", a->json, "write {name: relative error} to this file");
             app.add_flag("--quiet", a->quiet, "print only the failures and the summary");
             return [a] { return run_verify(*a); };
           });
