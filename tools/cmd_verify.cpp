// vbtrain verify: the golden protocol of a PyTorch reference file (see engine/golden.h), every stage's
// relative error printed against its tolerance; exit 1 when one is above. With --against DISTANCES.json, a
// float32, TF32 or bf16 run is judged beside PyTorch's own distance to the golden at the same precision instead;
// with a reference that is PyTorch's own bf16 autocast run, a bf16 run is compared with it tensor by tensor.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <nlohmann/json.hpp>

#include "engine/backend_bf16.h"
#include "engine/golden.h"
#include "engine/weights.h"
#include "tools/commands.h"

namespace {

struct VerifyArgs {
  std::string weights, reference, device = "cpu", precision = "auto", json, against;
  int threads = 0;
  bool quiet = false;
};

// A JSON number, or null where the error is not finite.
nlohmann::ordered_json num(double v) { return std::isfinite(v) ? nlohmann::ordered_json(v) : nlohmann::ordered_json(nullptr); }

void write_json(const std::string& path, const nlohmann::ordered_json& j) {
  std::ofstream f(path);
  if (!f) vb::fail(path, ": cannot write");
  f << j.dump(1) << "\n";
}

// --against: every group of entries beside PyTorch's own distance to the golden (engine/golden.h).
int report_against(const VerifyArgs& a, const std::vector<vb::GoldenEntry>& rows, const vb::TorchDistances& td,
                   vb::Precision precision, const std::vector<int64_t>& x0_shape, bool cuda) {
  const vb::ParityReport rep = vb::judge_parity(rows, td, precision, x0_shape);
  std::printf("against PyTorch %s, %s on %s (%s), %s: %s\n", td.torch_version.c_str(), td.precision.c_str(),
              td.device.c_str(), td.device_name.c_str(), td.date.c_str(), a.against.c_str());
  if (td.device != (cuda ? "cuda" : "cpu"))
    std::printf("  note: PyTorch's distances were made on %s, this run is on %s\n", td.device.c_str(), cuda ? "cuda" : "cpu");
  if (!a.quiet) {
    std::printf("  %-62s %10s %10s %7s\n", "entry", "ours", "PyTorch", "ratio");
    for (const auto& r : rows) {
      const double t = td.distances.at(r.name);
      std::printf("  %-62s %10.3e %10.3e %7.2f\n", r.name.c_str(), r.rel_err, t, t > 0 ? r.rel_err / t : 0.0);
    }
  }
  if (precision == vb::Precision::BF16)
    std::printf("  strict (before any step; the first forward and loss within %g x PyTorch's bf16 distance):\n",
                vb::kParityFactor);
  else
    std::printf("  strict (before any step; the first forward and loss within %.0e):\n",
                precision == vb::Precision::TF32 ? 1e-2 : 1e-4);
  for (const auto& s : rep.strict)
    std::printf("    %-24s ours %10.3e  PyTorch %10.3e  (tol %.0e)  %s\n", s.name.c_str(), s.ours, s.torch, s.tol,
                s.ok ? "ok" : "FAIL");
  std::printf("  groups (bound: max(%g x PyTorch, %.0e), for the maximum and for the median):\n", vb::kParityFactor,
              vb::kParityFloor);
  std::printf("    %-12s %4s  %10s %10s %10s  %10s %10s %10s  %s\n", "group", "n", "ours max", "PyTorch", "bound",
              "ours med", "PyTorch", "bound", "verdict");
  for (const auto& g : rep.groups)
    std::printf("    %-12s %4zu  %10.3e %10.3e %10.3e  %10.3e %10.3e %10.3e  %s\n", g.name.c_str(), g.count, g.ours_max,
                g.torch_max, g.bound_max, g.ours_median, g.torch_median, g.bound_median, g.ok ? "ok" : "FAIL");
  if (!a.json.empty()) {
    nlohmann::ordered_json j;
    j["against"] = {{"file", a.against}, {"torch", td.torch_version}, {"precision", td.precision}, {"device", td.device},
                    {"device_name", td.device_name}, {"date", td.date}};
    j["factor"] = vb::kParityFactor;
    j["floor"] = vb::kParityFloor;
    j["passed"] = rep.ok;
    for (const auto& s : rep.strict)
      j["strict"][s.name] = {{"ours", num(s.ours)}, {"torch", s.torch}, {"tol", s.tol}, {"ok", s.ok}};
    for (const auto& g : rep.groups)
      j["groups"][g.name] = {{"n", g.count}, {"ours_max", num(g.ours_max)}, {"torch_max", g.torch_max},
                             {"bound_max", g.bound_max}, {"ours_median", num(g.ours_median)},
                             {"torch_median", g.torch_median}, {"bound_median", g.bound_median}, {"ok", g.ok}};
    for (const auto& r : rows) j["entries"][r.name] = {{"ours", num(r.rel_err)}, {"torch", td.distances.at(r.name)}};
    write_json(a.json, j);
  }
  int bad = 0;
  std::string first_bad;
  for (const auto& s : rep.strict)
    if (!s.ok && bad++ == 0) first_bad = s.name;
  for (const auto& g : rep.groups)
    if (!g.ok && bad++ == 0) first_bad = "group " + g.name;
  if (rep.ok)
    std::printf("verify: %zu checks against PyTorch %s: %zu strict entries and %zu groups, all within their bounds: passed\n",
                rows.size(), td.precision.c_str(), rep.strict.size(), rep.groups.size());
  else
    std::printf("verify: %zu checks against PyTorch %s: %d of %zu strict entries and groups outside their bounds (first: %s): FAILED\n",
                rows.size(), td.precision.c_str(), bad, rep.strict.size() + rep.groups.size(), first_bad.c_str());
  return rep.ok ? 0 : 1;
}

int run_verify(const VerifyArgs& a) {
  const vb::StateDict weights = vb::load_state_dict_file(a.weights);
  const vb::StateDict reference = vb::load_safetensors(a.reference);
  // A reference that is PyTorch's own bf16 autocast run (tools/make_goldens.py --autocast bf16), not float64.
  const auto math = reference.metadata.find("math");
  const bool autocast_ref = math != reference.metadata.end() && math->second.find("autocast(bfloat16)") != std::string::npos;
  // The CPU defaults to its double-precision reference path; the engine's fp32 arithmetic is `--precision fp32`.
  // Beside PyTorch (--against) the run's precision is the distances file's when not given.
  std::optional<vb::TorchDistances> td;
  if (!a.against.empty()) td = vb::load_torch_distances(a.against);
  const std::string precision = a.precision != "auto"  ? a.precision
                                : td                    ? td->precision
                                : autocast_ref          ? "bf16"
                                : a.device == "cuda" || (a.device == "auto" && vb::cuda_available()) ? "fp32"
                                                        : "fp64";
  const bool cuda = a.device == "cuda" || (a.device == "auto" && vb::cuda_available());
  if (precision == "bf16") {
    if (!td && !autocast_ref)
      vb::fail(a.reference, " is a float64 golden run: a bf16 run is compared with PyTorch's own bf16 autocast run "
               "(tools/make_goldens.py --autocast bf16, e.g. tests/fixtures/mini_train_bf16_autocast.safetensors), "
               "or beside PyTorch's bf16 distances to the float64 golden with --against FILE");
  }
  if (autocast_ref && td)
    vb::fail("--against judges distances to a float64 golden run, but ", a.reference,
             " is PyTorch's own bf16 autocast run: compare with it directly (no --against)");
  if (autocast_ref && precision != "bf16")
    vb::fail(a.reference, " is PyTorch's own bf16 autocast run: use --precision bf16");
  std::vector<vb::GoldenEntry> rows;
  vb::Precision prec = vb::Precision::FP64;
  if (precision == "fp64") {
    if (cuda) vb::fail("--precision fp64 is the CPU reference path: use --device cpu");
    if (td) vb::check_parity_precision(*td, prec);  // refuses before the run: --against compares fp32 or tf32
    auto be = vb::make_cpu_backend_f64(a.threads, vb::default_cpu_layout());
    std::printf("verify: %s against %s on %s, fp64 (the CPU reference path)\n", a.weights.c_str(),
                a.reference.c_str(), be->description().c_str());
    rows = vb::run_golden(*be, weights, reference);
  } else if (precision == "bf16") {
    // CUDA: the backend's bf16 mode (NHWC); the CPU: the emulation of autocast, the CUDA path's reference.
    std::unique_ptr<vb::Backend> be;
    if (cuda) {
      be = vb::make_cuda_backend(0, vb::Layout::NHWC);
      be->set_precision(vb::Precision::BF16);
    } else {
      be = vb::make_bf16_emulation(vb::make_cpu_backend(a.threads, vb::default_cpu_layout()));
    }
    prec = be->precision();
    if (td) vb::check_parity_precision(*td, prec);
    std::printf("verify: %s against %s on %s, bf16%s\n", a.weights.c_str(), a.reference.c_str(),
                be->description().c_str(), autocast_ref ? " (the reference: PyTorch's own bf16 autocast run)" : "");
    rows = vb::run_golden(*be, weights, reference);
    if (autocast_ref && !cuda) vb::add_bf16_group_medians(rows);  // on CUDA past the first forward: reported only
  } else {
    std::unique_ptr<vb::Backend> be = vb::make_backend(cuda ? "cuda" : "cpu", a.threads);
    if (precision == "tf32" && !cuda) vb::fail("--precision tf32 needs --device cuda");
    be->set_precision(precision == "fp32" ? vb::Precision::FP32 : vb::Precision::TF32);
    prec = be->precision();
    if (td) vb::check_parity_precision(*td, prec);  // a file of another precision is refused before the run
    std::printf("verify: %s against %s on %s, %s\n", a.weights.c_str(), a.reference.c_str(),
                be->description().c_str(), vb::precision_name(be->precision()));
    rows = vb::run_golden(*be, weights, reference);
  }
  if (td) return report_against(a, rows, *td, prec, reference.at("x0").shape, cuda);
  int bad = 0;
  double worst = 0;
  std::string worst_name;
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const auto& r : rows) {
    if (!r.ok()) ++bad;
    if (!(r.rel_err / r.tol <= worst)) { worst = r.rel_err / r.tol; worst_name = r.name; }
    if (!a.quiet || !r.ok())
      std::printf("  %-62s %10.3e  (tol %.0e)  %s\n", r.name.c_str(), r.rel_err, r.tol, r.ok() ? "ok" : "FAIL");
    j[r.name] = num(r.rel_err);
  }
  if (!a.json.empty()) write_json(a.json, j);
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
             app.add_option("--precision", a->precision, "auto (CPU: fp64, CUDA: fp32; with --against: the file's; a bf16 autocast reference: bf16), fp64 (CPU), "
                            "fp32, tf32 (CUDA), bf16 (CUDA's bf16 mode; the CPU: its emulation of autocast)")
                 ->check(CLI::IsMember({"auto", "fp64", "fp32", "tf32", "bf16"}));
             app.add_option("--threads", a->threads, "CPU threads (0 = all cores)")->check(vb::tools::thread_count());
             app.add_option("--json", a->json, "write {name: relative error} to this file (with --against: groups, "
                                               "strict entries and every entry beside PyTorch's)");
             app.add_option("--against", a->against,
                            "PyTorch's own distances to the golden at the run's precision (tools/torch_distances.py): "
                            "pass when every group is within 2x of them");
             app.add_flag("--quiet", a->quiet, "print only the failures and the summary");
             return [a] { return run_verify(*a); };
           });
