// The threaded loader: N worker threads decode and transform samples into a ring of batch buffers ahead of
// the consumer.
//
// Determinism: the sample order of epoch e is shuffle_order(n, seed, e) (or 0..n-1 without shuffling), the
// random draws of sample k in epoch e are draw_train_params(seed, e, k, ...), and each sample is written to
// its own position in its batch; so the batches are the same whatever the number of threads or timing, and
// an epoch can be reproduced after a restart with nothing saved but (seed, epoch).
// Every sample appears once per epoch; the last batch is short when batch_size does not divide the count
// (no drop_last, as the notebook). A frame that cannot be decoded is left out of its batch (which is then
// shorter) and listed by skipped_files() under BadImagePolicy::Skip; under Fail, next() throws with its path.
//
// The decoded-frame cache (CachePolicy::Auto: on when the estimate fits the budget): a training frame is kept
// after Resize(R) as uint8 and an evaluation frame after Resize((R,R)) + CenterCrop(S) as uint8, so only the
// random part (and the exact, table-driven normalisation) runs again; cached and uncached batches are equal.
// Without room in the cache, a training frame is resized only over the window its random crop reads
// (train_resize_crop: the same pixels at about half the cost).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "data/dataset.h"
#include "data/image.h"
#include "data/jpeg.h"

namespace vb::data {

enum class CachePolicy : uint8_t { Auto, On, Off };
// What a batch holds: normalised float32 planes (ToTensor + Normalize done on the loader's threads), or the
// uint8 pixels before that step, interleaved (N, h, w, 3): a quarter of the bytes to copy, normalised to the
// same float32 values by the backend (Backend::upload_images), on the device where there is one.
enum class PixelFormat : uint8_t { NormalizedNCHW, Uint8NHWC };
CachePolicy parse_cache_policy(const std::string& s);  // "auto" | "on" | "off"

struct LoaderOptions {
  int batch_size = 150;
  ImageSize image_size = 224;  // S = (h, w); training's shorter-side resize is R = train_resize_side(S)
  int threads = 0;       // 0 = all cores
  bool train = false;    // training transforms (random) or evaluation transforms
  bool shuffle = false;
  uint64_t seed = 0;
  BadImagePolicy on_bad = BadImagePolicy::Skip;
  CachePolicy cache = CachePolicy::Auto;
  size_t cache_budget_bytes = 0;  // 0 = half of physical memory
  int prefetch_batches = 3;       // ring size: batches produced ahead of the consumer
  // Decode at a DCT-scaled size (>= R on both sides) when the frame is much larger: faster, but no longer
  // Pillow's pixels. Off by default (the notebook's exact pipeline).
  bool dct_scaling = false;
  PixelFormat format = PixelFormat::NormalizedNCHW;
  // Batch buffer memory (e.g. cudaMallocHost / cudaFreeHost for page-locked buffers). Both or neither;
  // default: 64-byte aligned host memory.
  std::function<void*(size_t)> alloc;
  std::function<void(void*)> free;
};

struct Batch {
  int64_t index = 0;              // batch number within the epoch
  int size = 0;                   // samples in it (fewer than batch_size for the last one or after skips)
  float* images = nullptr;        // (size, 3, h, w) NCHW contiguous, normalised (PixelFormat::NormalizedNCHW)
  uint8_t* pixels = nullptr;      // (size, h, w, 3) uint8 RGB (PixelFormat::Uint8NHWC); the other one is null
  int64_t* labels = nullptr;      // (size)
  int64_t* sample_indices = nullptr;  // (size) positions in the loader's sample list
};

struct LoaderStats {
  int64_t epoch = -1;
  int64_t images = 0;         // delivered this epoch
  double seconds = 0;         // from start_epoch to the latest batch handed out
  double images_per_second = 0;
  double wait_seconds = 0;    // time the consumer spent blocked in next() this epoch
  int64_t decoded = 0;        // JPEG decodes this epoch (cache misses)
  int64_t cache_hits = 0;     // this epoch
  int64_t cached_frames = 0;  // in the cache now
  size_t cache_bytes = 0;
  bool cache_enabled = false;
};

// A frame a loader left out, with the reason (the decoder's message without the leading path).
struct SkippedFrame {
  std::string split;  // "train", "val", "test" (set by whoever knows which loader this was)
  std::string path;
  std::string reason;
};
// skipped.csv: header `split,file,reason`, one row per frame (fields quoted CSV style when they hold a comma,
// quote or line break), and back (for a resumed run, which keeps the rows of its earlier processes).
std::string skipped_csv(const std::vector<SkippedFrame>& frames);
std::vector<SkippedFrame> parse_skipped_csv(const std::string& text, const std::string& where);
// One line for a terminal: the count per split and the first `first` frames with their reasons (escaped).
std::string skipped_summary(const std::vector<SkippedFrame>& frames, size_t first = 3);

// The sample order of epoch `epoch`: a Fisher-Yates permutation of 0..n-1 drawn from (seed, epoch) alone.
std::vector<int64_t> shuffle_order(int64_t n, uint64_t seed, int64_t epoch);

class Loader {
 public:
  Loader(std::vector<Sample> samples, LoaderOptions opt);
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  int64_t size() const { return int64_t(samples_.size()); }
  int64_t batches_per_epoch() const;
  const std::vector<Sample>& samples() const { return samples_; }
  const LoaderOptions& options() const { return opt_; }
  int threads() const { return int(workers_.size()); }

  // Starts (or restarts) epoch `epoch`; an unfinished epoch is abandoned. Workers begin at once.
  void start_epoch(int64_t epoch);
  // The next batch of the epoch, or nullptr at its end. The batch stays valid until the next call to
  // next() or start_epoch(). Throws vb::Error under BadImagePolicy::Fail when a frame cannot be decoded.
  const Batch* next();

  LoaderStats stats() const;
  // "path: reason" for every frame skipped so far (each once), in sample order.
  std::vector<std::string> skipped_files() const;
  // The same as SkippedFrame rows (path and reason apart), labelled with `split`.
  std::vector<SkippedFrame> skipped(const std::string& split) const;

 private:
  struct Slot {
    void* mem = nullptr;
    Batch view;
    std::vector<uint8_t> ok;  // per position: 1 = sample written
    int64_t batch = -1;
    int done = 0;
  };
  void worker();
  void process(int64_t task, Slot& slot, int64_t epoch);
  int batch_count(int64_t b) const;
  void compact(Slot& s, int count);

  std::vector<Sample> samples_;
  LoaderOptions opt_;
  size_t image_bytes_ = 0;  // one sample in the batch buffer: 3 * h * w floats or bytes
  bool cache_enabled_ = false;
  size_t cache_budget_ = 0;

  mutable std::mutex m_;
  std::condition_variable work_cv_, done_cv_, idle_cv_;
  std::vector<std::thread> workers_;
  std::vector<Slot> slots_;
  bool stop_ = false;
  uint64_t generation_ = 0;
  int64_t epoch_ = -1;
  std::vector<int64_t> order_;
  int64_t next_task_ = 0, n_tasks_ = 0;
  int64_t released_ = 0;      // batches whose slots are free again
  int64_t next_batch_ = 0;    // the next batch next() hands out
  int64_t active_batch_ = -1;  // the batch the consumer holds
  int in_flight_ = 0;

  // Per sample: the cache (written by the one worker that processes the sample in an epoch; epochs are
  // ordered through m_) and whether it is known to be bad.
  std::vector<Image> cache_;
  std::vector<uint8_t> bad_;
  std::vector<std::string> bad_reason_;
  size_t cache_bytes_ = 0;
  int64_t cached_frames_ = 0;

  // Statistics of the current epoch.
  double epoch_start_ = 0, last_batch_time_ = 0, wait_ = 0;
  int64_t delivered_ = 0, decoded_ = 0, cache_hits_ = 0;
};

}  // namespace vb::data
