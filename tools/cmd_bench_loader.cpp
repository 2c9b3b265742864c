// vbtrain bench-loader: decode-only and full-pipeline images/s, with and without the decoded-frame cache,
// over 1..N threads. The targets: full pipeline >= 85% of (threads x single-thread decode rate);
// cached per-epoch training transforms >= 1,000 img/s per core.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>

#include "data/dataset.h"
#include "data/jpeg.h"
#include "data/loader.h"
#include "kernels/check.h"
#include "data/transforms.h"
#include "tools/commands.h"
#include "tools/image_size_option.h"

namespace {

struct BenchArgs {
  std::string data;
  int threads = 0, images = 300, batch = 50, repeat = 3;
  vb::data::ImageSize size = 224;
  bool dct = false;
  bool normalized = false;  // --normalized: the loader normalises (float batches); else uint8, as training uses
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Decodes every sample once on `threads` threads; images/s. The frames were screened (screen_frames), so a
// failure here is a file that changed since: counted as decoded, never thrown out of a thread (which would
// end the process with std::terminate).
double decode_rate(const std::vector<vb::data::Sample>& s, int threads, int min_side) {
  std::atomic<size_t> next{0};
  auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&] {
      for (size_t i; (i = next++) < s.size();) {
        try {
          vb::data::decode_jpeg_file(s[i].path, min_side, min_side);
        } catch (...) {
        }
      }
    });
  for (auto& t : ts) t.join();
  return double(s.size()) / seconds_since(t0);
}

// Decodes every frame once (this also warms the page cache): the unreadable ones are listed, file and
// reason, and left out of the measurements, which are of decoding JPEGs, not of failing to.
std::vector<vb::data::Sample> screen_frames(const std::vector<vb::data::Sample>& s, int min_side) {
  std::vector<vb::data::Sample> good;
  std::vector<vb::data::SkippedFrame> bad;
  for (const auto& x : s) {
    try {
      vb::data::decode_jpeg_file(x.path, min_side, min_side);
      good.push_back(x);
    } catch (const std::bad_alloc&) {
      bad.push_back({vb::data::split_name(x.split), x.path, "out of memory while decoding the frame"});
    } catch (const std::exception& e) {
      std::string reason = e.what();
      if (reason.rfind(x.path + ": ", 0) == 0) reason.erase(0, x.path.size() + 2);
      bad.push_back({vb::data::split_name(x.split), x.path, reason});
    }
  }
  if (!bad.empty()) {
    std::printf("bench-loader: %s\n", vb::data::skipped_summary(bad, 3).c_str());
    for (const auto& b : bad) std::printf("  skipped: %s: %s\n", vb::escape(b.path).c_str(), vb::escape(b.reason).c_str());
  }
  if (good.empty()) vb::fail("every one of the ", s.size(), " frames is unreadable (first: ", bad[0].path, ": ", bad[0].reason, ")");
  return good;
}

// One epoch of the loader (after `warm` epochs that fill the cache); images/s and consumer wait.
vb::data::LoaderStats loader_epoch(const std::vector<vb::data::Sample>& s, const BenchArgs& a, int threads, bool train,
                                   vb::data::CachePolicy cache, int warm) {
  vb::data::LoaderOptions o;
  o.batch_size = a.batch;
  o.image_size = a.size;
  o.threads = threads;
  o.train = train;
  o.shuffle = train;
  o.cache = cache;
  o.dct_scaling = a.dct;
  o.format = a.normalized ? vb::data::PixelFormat::NormalizedNCHW : vb::data::PixelFormat::Uint8NHWC;
  vb::data::Loader L(s, o);
  for (int e = 0; e <= warm; ++e) {
    L.start_epoch(e);
    while (L.next()) {
    }
  }
  return L.stats();
}

int run_bench(const BenchArgs& a) {
  using namespace vb::data;
  DatasetIndex idx = build_index(a.data);
  std::vector<Sample> s = idx.samples;
  if (s.empty()) vb::fail(a.data, ": no samples");
  if (int64_t(s.size()) > a.images) s.resize(size_t(a.images));
  const int N = a.threads > 0 ? a.threads : int(std::max(1u, std::thread::hardware_concurrency()));
  const int min_side = a.dct ? vb::data::resize_size(std::max(a.size.h, a.size.w)) : 0;
  s = screen_frames(s, min_side);
  JpegHeader h = read_jpeg_header(read_file_bytes(s[0].path), s[0].path);
  std::printf("bench-loader: %zu frames of %s (first %dx%d), image size %s, batch %d, DCT scaling %s, batches of %s, %d "
              "threads max\n",
              s.size(), vb::escape(idx.videos_dir).c_str(), h.width, h.height, a.size.str().c_str(), a.batch, a.dct ? "on" : "off",
              a.normalized ? "normalised floats" : "uint8 pixels", N);
  decode_rate(std::vector<Sample>(s.begin(), s.begin() + long(std::min<size_t>(s.size(), 20))), 1, min_side);  // warm
  // Each figure is the best of `repeat` rounds, a round measuring everything once: on a shared machine the
  // best is the least disturbed, and spreading the runs over time keeps one busy spell from spoiling a column.
  struct Row {
    double decode = 0, train = 0, eval = 0, train_fill = 0, train_cached = 0, eval_cached = 0, wait = 0;
  };
  std::vector<Row> rows(size_t(N) + 1);
  for (int r = 0; r < a.repeat; ++r)
    for (int t = 1; t <= N; ++t) {
      Row& w = rows[size_t(t)];
      w.decode = std::max(w.decode, decode_rate(s, t, min_side));
      w.train = std::max(w.train, loader_epoch(s, a, t, true, CachePolicy::Off, 0).images_per_second);
      w.eval = std::max(w.eval, loader_epoch(s, a, t, false, CachePolicy::Off, 0).images_per_second);
      w.train_fill = std::max(w.train_fill, loader_epoch(s, a, t, true, CachePolicy::On, 0).images_per_second);
      LoaderStats tc = loader_epoch(s, a, t, true, CachePolicy::On, 1);
      if (tc.images_per_second > w.train_cached) w.train_cached = tc.images_per_second, w.wait = tc.wait_seconds;
      w.eval_cached = std::max(w.eval_cached, loader_epoch(s, a, t, false, CachePolicy::On, 1).images_per_second);
    }
  std::printf("\n%-8s %9s %14s %14s %9s %12s %13s %12s %11s %8s\n", "threads", "decode", "train nocache", "eval nocache",
              "vs decode", "train fill", "train cached", "eval cached", "train/core", "wait(s)");
  bool ok_pipeline = true, ok_cache = true;
  for (int t = 1; t <= N; ++t) {
    const Row& w = rows[size_t(t)];
    const double ratio = w.train / (t * rows[1].decode);
    std::printf("%-8d %9.1f %14.1f %14.1f %8.0f%% %12.1f %13.1f %12.1f %11.1f %8.3f\n", t, w.decode, w.train, w.eval,
                100 * ratio, w.train_fill, w.train_cached, w.eval_cached, w.train_cached / t, w.wait);
    if (ratio < 0.85) ok_pipeline = false;
    if (w.train_cached / t < 1000) ok_cache = false;
  }
  std::printf("\n(img/s; 'vs decode' = uncached training pipeline / (threads x 1-thread decode); 'train fill' = the "
              "first epoch with the cache on, which also resizes whole frames to keep them; cached = the next epoch)\n");
  std::printf("full pipeline >= 85%% of threads x single-thread decode: %s\n", ok_pipeline ? "yes" : "NO");
  std::printf("cached training transforms >= 1000 img/s per core:    %s\n", ok_cache ? "yes" : "NO");
  return 0;
}

}  // namespace

VB_COMMAND("bench-loader", "Measure the data loader: decode-only and full-pipeline img/s, cache on/off, 1..N threads",
           [](CLI::App& app) -> std::function<int()> {
             auto a = std::make_shared<BenchArgs>();
             app.add_option("--data", a->data, "the videos/ folder or its parent")->required();
             app.add_option("--threads", a->threads, "largest thread count (0 = all cores)")->check(vb::tools::thread_count());
             app.add_option("--images", a->images, "frames to use (default 300)")->check(CLI::Range(1, 1000000));
             app.add_option("--batch", a->batch, "batch size (default 50)")->check(CLI::Range(1, 100000));
             vb::tools::add_image_size_option(app, a->size, "image size S or HxW (default 224)");
             app.add_option("--repeat", a->repeat, "runs per measurement, best kept (default 3)")->check(CLI::Range(1, 100));
             app.add_flag("--dct-scaling", a->dct, "decode at a DCT-scaled size (faster, not Pillow-exact)");
             app.add_flag("--normalized", a->normalized,
                          "batches of normalised floats made by the loader (default: uint8 pixels, as training)");
             return [a] { return run_bench(*a); };
           });
