// vbtrain synth: writes the synthetic Volleyball dataset (data/synth.h) in the real layout.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "data/synth.h"
#include "kernels/check.h"
#include "tools/commands.h"

namespace {

struct SynthArgs {
  std::string out;
  bool overwrite = false;
  vb::data::SynthOptions o;
};

int run_synth(const SynthArgs& a) {
  namespace fs = std::filesystem;
  // A dataset (or anything else) already in the folder is not rewritten without being told.
  if (fs::exists(a.out) && !fs::is_directory(a.out)) vb::fail(a.out, ": exists and is not a folder");
  if (fs::is_directory(a.out) && !fs::is_empty(a.out)) {
    if (!a.overwrite)
      vb::fail(a.out, ": is not empty (", fs::exists(fs::path(a.out) / "videos") ? "it holds a videos/ folder" : "it holds files",
               "): pass --overwrite to write the synthetic dataset into it anyway, or choose an empty or new folder");
    std::printf("synth: --overwrite: writing into %s, which is not empty\n", vb::escape(a.out).c_str());
  }
  auto t0 = std::chrono::steady_clock::now();
  vb::data::SynthSummary s = vb::data::generate_synthetic(a.out, a.o);
  double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("synth: %s/videos: %d videos, %lld clips, %lld frames (%.1f MB) at scale %g in %.1f s\n", vb::escape(a.out).c_str(),
              a.o.videos, (long long)s.clips, (long long)s.frames, double(s.bytes) / 1e6, a.o.scale, sec);
  return 0;
}

}  // namespace

VB_COMMAND("synth", "Write a synthetic Volleyball dataset (real layout, labels learnable from the pictures)",
           [](CLI::App& app) -> std::function<int()> {
             auto a = std::make_shared<SynthArgs>();
             app.add_option("--out", a->out, "output folder (videos/ is created in it)")->required();
             app.add_flag("--overwrite", a->overwrite, "write into --out even when it is not empty");
             app.add_option("--videos", a->o.videos, "number of videos, ids 0..N-1 (default 55)")->check(vb::tools::integer_in(1, 1000));
             app.add_option("--clips-per-video", a->o.clips_per_video, "clips per video (default 88)")->check(vb::tools::integer_in(1, 100000));
             app.add_option("--frames-per-clip", a->o.frames_per_clip, "1 (target frame) or 41 (default 1)")
                 ->check(CLI::IsMember({1, 41}));
             app.add_option("--scale", a->o.scale, "frame size factor on 1280x720 / 1920x1080 (default 1)")->check(vb::tools::finite_number(0.01, 4.0));
             app.add_option("--seed", a->o.seed, "seed (default 0)")->check(vb::tools::seed_value());
             app.add_option("--quality", a->o.quality, "JPEG quality (default 95)")->check(vb::tools::integer_in(1, 100));
             app.add_option("--threads", a->o.threads, "threads (0 = all cores)")->check(vb::tools::thread_count());
             return [a] { return run_synth(*a); };
           });
