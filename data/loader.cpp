#include "data/loader.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <system_error>

#include "data/rng.h"
#include "data/transforms.h"
#include "kernels/check.h"

namespace vb::data {

namespace {

double now_seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

size_t physical_memory() {
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? size_t(pages) * size_t(page) : size_t(8) << 30;
}

size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

}  // namespace

CachePolicy parse_cache_policy(const std::string& s) {
  if (s == "auto") return CachePolicy::Auto;
  if (s == "on") return CachePolicy::On;
  if (s == "off") return CachePolicy::Off;
  fail("unknown cache policy '", s, "' (expected auto, on or off)");
}

std::string skipped_csv(const std::vector<SkippedFrame>& frames) {
  auto field = [](const std::string& f) {
    if (f.find_first_of(",\"\n\r") == std::string::npos) return f;
    std::string q = "\"";
    for (char c : f) q += c == '"' ? std::string("\"\"") : std::string(1, c);
    return q + "\"";
  };
  std::string out = "split,file,reason\n";
  for (const SkippedFrame& f : frames) out += field(f.split) + ',' + field(f.path) + ',' + field(f.reason) + '\n';
  return out;
}

std::vector<SkippedFrame> parse_skipped_csv(const std::string& text, const std::string& where) {
  // Records as skipped_csv writes them: quoted fields may hold commas, quotes ("") and line breaks.
  std::vector<std::vector<std::string>> rows(1, std::vector<std::string>(1));
  bool quoted = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (quoted) {
      if (c == '"' && i + 1 < text.size() && text[i + 1] == '"') rows.back().back() += '"', ++i;
      else if (c == '"') quoted = false;
      else rows.back().back() += c;
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      rows.back().emplace_back();
    } else if (c == '\n') {
      rows.emplace_back(1);
    } else if (c != '\r') {
      rows.back().back() += c;
    }
  }
  if (quoted) fail(where, ": unterminated quoted field");
  if (rows.empty() || rows[0] != std::vector<std::string>{"split", "file", "reason"})
    fail(where, ": not a skipped-frames list (the header is not split,file,reason)");
  std::vector<SkippedFrame> out;
  for (size_t r = 1; r < rows.size(); ++r) {
    if (rows[r].size() == 1 && rows[r][0].empty()) continue;  // the final line break
    if (rows[r].size() != 3) fail(where, ": record ", r + 1, " has ", rows[r].size(), " fields, not 3");
    out.push_back({rows[r][0], rows[r][1], rows[r][2]});
  }
  return out;
}

std::string skipped_summary(const std::vector<SkippedFrame>& frames, size_t first) {
  std::vector<std::pair<std::string, size_t>> per;
  for (const SkippedFrame& f : frames) {
    auto it = std::find_if(per.begin(), per.end(), [&](const auto& p) { return p.first == f.split; });
    if (it == per.end()) per.emplace_back(f.split, 1);
    else ++it->second;
  }
  std::string s = std::to_string(frames.size()) + (frames.size() == 1 ? " unreadable frame" : " unreadable frames") +
                  " skipped (";
  for (size_t i = 0; i < per.size(); ++i) s += (i ? ", " : "") + escape(per[i].first) + " " + std::to_string(per[i].second);
  s += ")";
  for (size_t i = 0; i < frames.size() && i < first; ++i)
    s += (i ? "; " : ": ") + escape(frames[i].path) + " (" + escape(frames[i].reason) + ")";
  if (frames.size() > first) s += "; ...";
  return s;
}

std::vector<int64_t> shuffle_order(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> order(size_t(std::max<int64_t>(n, 0)));
  for (int64_t i = 0; i < n; ++i) order[size_t(i)] = i;
  CounterRng rng(seed, RngStream::Shuffle, uint64_t(epoch));
  for (int64_t i = n - 1; i > 0; --i) std::swap(order[size_t(i)], order[size_t(rng.below(uint64_t(i + 1)))]);
  return order;
}

Loader::Loader(std::vector<Sample> samples, LoaderOptions opt) : samples_(std::move(samples)), opt_(std::move(opt)) {
  VB_CHECK(opt_.batch_size > 0, "batch size ", opt_.batch_size);
  VB_CHECK(opt_.image_size.h > 0 && opt_.image_size.h <= 4096 && opt_.image_size.w > 0 && opt_.image_size.w <= 4096,
           "image size ", opt_.image_size.str());
  VB_CHECK(opt_.prefetch_batches > 0, "prefetch_batches ", opt_.prefetch_batches);
  VB_CHECK(bool(opt_.alloc) == bool(opt_.free), "loader options: give both alloc and free, or neither");
  for (const Sample& s : samples_)
    VB_CHECK(s.label >= 0 && s.label < kNumClasses, "label ", s.label, " out of range for ", s.path);
  if (!opt_.alloc) {
    opt_.alloc = [](size_t n) { return std::aligned_alloc(64, round_up(n, 64)); };
    opt_.free = [](void* p) { std::free(p); };
  }
  const ImageSize S = opt_.image_size;
  const int R = train_resize_side(S);
  const bool u8 = opt_.format == PixelFormat::Uint8NHWC;
  image_bytes_ = size_t(3 * S.pixels()) * (u8 ? 1 : sizeof(float));

  // The cache estimate assumes 16:9 frames, as the dataset's; the budget still bounds what is really kept.
  cache_budget_ = opt_.cache_budget_bytes ? opt_.cache_budget_bytes : physical_memory() / 2;
  size_t per_frame = opt_.train ? size_t(R) * size_t((R * 16 + 8) / 9) * 3 : size_t(S.pixels()) * 3;
  switch (opt_.cache) {
    case CachePolicy::Off: cache_enabled_ = false; break;
    case CachePolicy::On: cache_enabled_ = true; cache_budget_ = SIZE_MAX; break;
    case CachePolicy::Auto: cache_enabled_ = per_frame * samples_.size() <= cache_budget_; break;
  }
  cache_.resize(samples_.size());
  bad_.assign(samples_.size(), 0);
  bad_reason_.resize(samples_.size());

  const size_t bs = size_t(opt_.batch_size);
  const size_t img_bytes = round_up(bs * image_bytes_, 256);
  const size_t bytes = img_bytes + 2 * round_up(bs * sizeof(int64_t), 64);
  slots_.resize(size_t(opt_.prefetch_batches));
  for (Slot& s : slots_) {
    s.mem = opt_.alloc(bytes);
    if (!s.mem) fail("loader: cannot allocate a ", bytes, "-byte batch buffer");
    auto* base = static_cast<uint8_t*>(s.mem);
    if (u8) s.view.pixels = base;
    else s.view.images = reinterpret_cast<float*>(base);
    s.view.labels = reinterpret_cast<int64_t*>(base + img_bytes);
    s.view.sample_indices = reinterpret_cast<int64_t*>(base + img_bytes + round_up(bs * sizeof(int64_t), 64));
    s.ok.assign(bs, 0);
  }
  int n = opt_.threads > 0 ? opt_.threads : int(std::max(1u, std::thread::hardware_concurrency()));
  try {
    for (int i = 0; i < n; ++i) workers_.emplace_back([this] { worker(); });
  } catch (const std::system_error& e) {
    // The destructor does not run for a constructor that throws: stop what started, then report.
    const size_t started = workers_.size();
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (std::thread& t : workers_) t.join();
    for (Slot& s : slots_) opt_.free(s.mem);
    fail("loader: cannot start ", n, " decoding threads (", started, " started): ", e.what());
  }
}

Loader::~Loader() {
  {
    std::lock_guard<std::mutex> g(m_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
  for (Slot& s : slots_) opt_.free(s.mem);
}

int64_t Loader::batches_per_epoch() const { return (size() + opt_.batch_size - 1) / opt_.batch_size; }

int Loader::batch_count(int64_t b) const {
  return int(std::min<int64_t>(opt_.batch_size, size() - b * opt_.batch_size));
}

void Loader::start_epoch(int64_t epoch) {
  std::unique_lock<std::mutex> lk(m_);
  ++generation_;  // completions of the old epoch no longer count
  n_tasks_ = 0;   // and no more of its samples are claimed
  idle_cv_.wait(lk, [&] { return in_flight_ == 0; });
  epoch_ = epoch;
  if (opt_.shuffle) {
    order_ = shuffle_order(size(), opt_.seed, epoch);
  } else {
    order_.resize(size_t(size()));
    for (int64_t i = 0; i < size(); ++i) order_[size_t(i)] = i;
  }
  next_task_ = 0;
  n_tasks_ = size();
  released_ = 0;
  next_batch_ = 0;
  active_batch_ = -1;
  for (Slot& s : slots_) s.batch = -1, s.done = 0;
  epoch_start_ = last_batch_time_ = now_seconds();
  wait_ = 0;
  delivered_ = decoded_ = cache_hits_ = 0;
  lk.unlock();
  work_cv_.notify_all();
}

void Loader::worker() {
  std::unique_lock<std::mutex> lk(m_);
  const int64_t R = int64_t(slots_.size());
  for (;;) {
    work_cv_.wait(lk, [&] {
      return stop_ || (epoch_ >= 0 && next_task_ < n_tasks_ && next_task_ / opt_.batch_size < released_ + R);
    });
    if (stop_) return;
    const int64_t task = next_task_++;
    const int64_t b = task / opt_.batch_size;
    Slot& slot = slots_[size_t(b % R)];
    if (slot.batch != b) slot.batch = b, slot.done = 0;
    const uint64_t gen = generation_;
    const int64_t epoch = epoch_;
    ++in_flight_;
    lk.unlock();
    process(task, slot, epoch);
    lk.lock();
    --in_flight_;
    if (gen == generation_ && ++slot.done == batch_count(b)) done_cv_.notify_all();
    if (in_flight_ == 0) idle_cv_.notify_all();
  }
}

void Loader::process(int64_t task, Slot& slot, int64_t epoch) {
  const int64_t k = order_[size_t(task)];
  const int pos = int(task % opt_.batch_size);
  const Sample& s = samples_[size_t(k)];
  const ImageSize S = opt_.image_size;
  const int R = train_resize_side(S);
  // Where the sample goes: one of the two formats (the other pointer is null).
  const bool u8 = slot.view.pixels != nullptr;
  uint8_t* out_u8 = u8 ? slot.view.pixels + size_t(pos) * image_bytes_ : nullptr;
  float* out = u8 ? nullptr : slot.view.images + size_t(pos) * (image_bytes_ / sizeof(float));
  slot.view.labels[pos] = s.label;
  slot.view.sample_indices[pos] = k;
  slot.ok[size_t(pos)] = 0;
  bool may_cache;  // whether the cache has room (a hint: the budget is checked again on insertion)
  {
    std::lock_guard<std::mutex> g(m_);
    if (bad_[size_t(k)]) return;
    may_cache = cache_enabled_ && cache_bytes_ < cache_budget_;
  }
  try {
    const Image* frame = &cache_[size_t(k)];
    Image fresh;
    bool hit = !frame->empty();
    if (!hit) {
      // Evaluation's Resize((R_h, R_w)) needs R_w columns and R_h rows; training's shorter side needs R.
      const ImageSize re = resize_size(S);
      const int min_w = !opt_.dct_scaling ? 0 : opt_.train ? R : re.w;
      const int min_h = !opt_.dct_scaling ? 0 : opt_.train ? R : re.h;
      Image decoded = decode_jpeg_file(s.path, min_w, min_h);
      if (opt_.train && !may_cache) {
        // Nothing to keep: resize only the window the random crop reads (the same pixels, less work).
        const CropBox rs = resize_shorter_size(decoded.width, decoded.height, R);
        TrainDraw d = draw_train_params(opt_.seed, epoch, k, rs.width, rs.height);
        Image part = train_resize_crop(decoded, S, d.box);
        d.box = CropBox{0, 0, part.height, part.width};
        if (u8) train_random_part_u8(part, S, d, out_u8);
        else train_random_part(part, S, d, out);
        slot.ok[size_t(pos)] = 1;
        std::lock_guard<std::mutex> g(m_);
        ++decoded_;
        return;
      }
      fresh = opt_.train ? train_resize(decoded, S) : eval_crop(decoded, S);
      frame = &fresh;
    }
    if (opt_.train) {
      TrainDraw d = draw_train_params(opt_.seed, epoch, k, frame->width, frame->height);
      if (u8) train_random_part_u8(*frame, S, d, out_u8);
      else train_random_part(*frame, S, d, out);
    } else if (u8) {
      std::memcpy(out_u8, frame->pixels.data(), image_bytes_);  // eval_crop's (h, w, 3) pixels as they are
    } else {
      to_normalized_chw(*frame, out);
    }
    slot.ok[size_t(pos)] = 1;
    std::lock_guard<std::mutex> g(m_);
    if (hit) {
      ++cache_hits_;
    } else {
      ++decoded_;
      size_t bytes = fresh.pixels.size();
      if (cache_enabled_ && cache_bytes_ + bytes <= cache_budget_) {
        cache_bytes_ += bytes;
        ++cached_frames_;
        cache_[size_t(k)] = std::move(fresh);
      }
    }
  } catch (const std::bad_alloc&) {
    std::lock_guard<std::mutex> g(m_);
    bad_[size_t(k)] = 1;
    bad_reason_[size_t(k)] = s.path + ": out of memory while decoding and transforming the frame";
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> g(m_);
    bad_[size_t(k)] = 1;
    bad_reason_[size_t(k)] = e.what();
  }
}

void Loader::compact(Slot& s, int count) {
  int w = 0;
  for (int r = 0; r < count; ++r) {
    if (!s.ok[size_t(r)]) continue;
    if (w != r) {
      uint8_t* base = s.view.pixels ? s.view.pixels : reinterpret_cast<uint8_t*>(s.view.images);
      std::memmove(base + size_t(w) * image_bytes_, base + size_t(r) * image_bytes_, image_bytes_);
      s.view.labels[w] = s.view.labels[r];
      s.view.sample_indices[w] = s.view.sample_indices[r];
    }
    ++w;
  }
  s.view.size = w;
}

const Batch* Loader::next() {
  std::unique_lock<std::mutex> lk(m_);
  VB_CHECK(epoch_ >= 0, "Loader::next() before start_epoch()");
  const int64_t R = int64_t(slots_.size());
  for (;;) {
    if (active_batch_ >= 0) {
      active_batch_ = -1;
      ++released_;
      work_cv_.notify_all();
    }
    if (next_batch_ >= batches_per_epoch()) return nullptr;
    const int64_t b = next_batch_;
    Slot& slot = slots_[size_t(b % R)];
    const double t0 = now_seconds();
    done_cv_.wait(lk, [&] { return slot.batch == b && slot.done == batch_count(b); });
    wait_ += now_seconds() - t0;
    ++next_batch_;
    active_batch_ = b;
    // Under Fail, the first bad frame of the batch in order stops the run: the same one for any thread count.
    if (opt_.on_bad == BadImagePolicy::Fail)
      for (int r = 0; r < batch_count(b); ++r)
        if (!slot.ok[size_t(r)])
          fail("loader (--on-bad-image fail): ", bad_reason_[size_t(slot.view.sample_indices[r])]);
    lk.unlock();
    slot.view.index = b;
    compact(slot, batch_count(b));
    lk.lock();
    delivered_ += slot.view.size;
    last_batch_time_ = now_seconds();
    if (slot.view.size > 0) return &slot.view;
  }
}

LoaderStats Loader::stats() const {
  std::lock_guard<std::mutex> g(m_);
  LoaderStats st;
  st.epoch = epoch_;
  st.images = delivered_;
  st.seconds = last_batch_time_ - epoch_start_;
  st.images_per_second = st.seconds > 0 ? double(delivered_) / st.seconds : 0;
  st.wait_seconds = wait_;
  st.decoded = decoded_;
  st.cache_hits = cache_hits_;
  st.cached_frames = cached_frames_;
  st.cache_bytes = cache_bytes_;
  st.cache_enabled = cache_enabled_;
  return st;
}

std::vector<SkippedFrame> Loader::skipped(const std::string& split) const {
  std::lock_guard<std::mutex> g(m_);
  std::vector<SkippedFrame> out;
  for (size_t k = 0; k < samples_.size(); ++k) {
    if (!bad_[k]) continue;
    const std::string& path = samples_[k].path;
    std::string reason = bad_reason_[k];
    if (reason.rfind(path + ": ", 0) == 0) reason.erase(0, path.size() + 2);  // the path is a column of its own
    out.push_back({split, path, reason});
  }
  return out;
}

std::vector<std::string> Loader::skipped_files() const {
  std::lock_guard<std::mutex> g(m_);
  std::vector<std::string> out;
  for (size_t k = 0; k < samples_.size(); ++k)
    if (bad_[k]) out.push_back(bad_reason_[k]);
  return out;
}

}  // namespace vb::data
