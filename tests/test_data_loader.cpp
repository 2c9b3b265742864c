// The threaded loader: batches identical for 1, 2 and 3 threads and with or without the cache, equal to the
// transforms applied directly, every sample once per epoch, shuffles that are pure functions of
// (seed, epoch), the short last batch, and bad files skipped (listed) or fatal (with their path).
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <cstring>
#include <set>

#include "data/dataset.h"
#include "data/jpeg.h"
#include "data/loader.h"
#include "data/synth.h"
#include "data/transforms.h"
#include "kernels/check.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using namespace vb;
using namespace vb::data;

namespace {

constexpr int kSize = 40;  // S; R = resize_size(40) = 46

// 48 frames (4 videos x 12 clips, 128x72 and 192x108), made once per process.
const std::vector<Sample>& samples() {
  static fs::path dir = fs::temp_directory_path() / ("vb_loader_" + std::to_string(getpid()));
  static std::vector<Sample> s = [] {
    fs::remove_all(dir);
    SynthOptions so;
    so.videos = 4;
    so.clips_per_video = 12;
    so.scale = 0.1;
    so.seed = 3;
    generate_synthetic(dir.string(), so);
    std::atexit([] { fs::remove_all(dir); });
    return build_index(dir.string()).samples;
  }();
  return s;
}

struct Epoch {
  std::vector<float> images;  // normalised NCHW; a uint8 batch is normalised here with norm_table()
  std::vector<int64_t> labels, indices;
  std::vector<int> sizes;
};

Epoch run_epoch(Loader& L, int64_t epoch) {
  Epoch e;
  L.start_epoch(epoch);
  while (const Batch* b = L.next()) {
    e.sizes.push_back(b->size);
    const size_t hw = size_t(kSize) * kSize;
    REQUIRE((b->images == nullptr) != (b->pixels == nullptr));  // exactly one format
    if (b->images) {
      e.images.insert(e.images.end(), b->images, b->images + size_t(b->size) * 3 * hw);
    } else {
      const NormTable& L = norm_table();
      for (int n = 0; n < b->size; ++n)
        for (int c = 0; c < 3; ++c)
          for (size_t i = 0; i < hw; ++i) e.images.push_back(L.v[c][b->pixels[(size_t(n) * hw + i) * 3 + size_t(c)]]);
    }
    e.labels.insert(e.labels.end(), b->labels, b->labels + b->size);
    e.indices.insert(e.indices.end(), b->sample_indices, b->sample_indices + b->size);
  }
  return e;
}

LoaderOptions options(bool train, int threads, CachePolicy cache) {
  LoaderOptions o;
  o.batch_size = 10;
  o.image_size = kSize;
  o.threads = threads;
  o.train = train;
  o.shuffle = train;
  o.seed = 42;
  o.cache = cache;
  o.prefetch_batches = 2;
  return o;
}

void check_same(const Epoch& a, const Epoch& b) {
  CHECK(a.sizes == b.sizes);
  CHECK(a.labels == b.labels);
  CHECK(a.indices == b.indices);
  REQUIRE(a.images.size() == b.images.size());
  CHECK(std::memcmp(a.images.data(), b.images.data(), a.images.size() * sizeof(float)) == 0);
}

}  // namespace

TEST_CASE("shuffle_order is a permutation and a pure function of (seed, epoch)") {
  std::vector<int64_t> a = shuffle_order(1000, 9, 4), b = shuffle_order(1000, 9, 4);
  CHECK(a == b);
  CHECK(a != shuffle_order(1000, 9, 5));
  CHECK(a != shuffle_order(1000, 10, 4));
  std::vector<int64_t> s = a;
  std::sort(s.begin(), s.end());
  for (int64_t i = 0; i < 1000; ++i) CHECK(s[size_t(i)] == i);
  int fixed = 0;
  for (int64_t i = 0; i < 1000; ++i) fixed += a[size_t(i)] == i;
  CHECK(fixed < 10);
}

TEST_CASE("training batches: identical for 1, 2, 3 threads, cache on or off, and after a restart") {
  const auto& s = samples();
  REQUIRE(s.size() == 48);
  Loader l1(s, options(true, 1, CachePolicy::Off));
  Loader l2(s, options(true, 2, CachePolicy::On));
  Loader l3(s, options(true, 3, CachePolicy::Auto));
  CHECK(l1.batches_per_epoch() == 5);
  for (int64_t e = 0; e < 3; ++e) {
    Epoch a = run_epoch(l1, e), b = run_epoch(l2, e), c = run_epoch(l3, e);
    check_same(a, b);
    check_same(a, c);
    // Every sample once, the last batch short (48 = 4 x 10 + 8), labels matching their samples.
    CHECK(a.sizes == std::vector<int>{10, 10, 10, 10, 8});
    std::set<int64_t> seen(a.indices.begin(), a.indices.end());
    CHECK(seen.size() == 48);
    for (size_t i = 0; i < a.indices.size(); ++i) CHECK(a.labels[i] == s[size_t(a.indices[i])].label);
    CHECK(a.indices == shuffle_order(48, 42, e));
  }
  CHECK(l2.stats().cache_hits == 48);  // epochs after the first come from the cache
  CHECK(l2.stats().decoded == 0);
  CHECK(l1.stats().decoded == 48);
  CHECK(l3.stats().cache_enabled);
  // Epoch 0 and 1 differ (order and augmentation); a fresh loader reproduces epoch 2 without history.
  Loader fresh(s, options(true, 2, CachePolicy::Off));
  Epoch e2 = run_epoch(fresh, 2);
  Epoch again = run_epoch(l1, 2);
  check_same(e2, again);
  Epoch e1 = run_epoch(l1, 1);
  CHECK(e1.indices != e2.indices);
}

TEST_CASE("uint8 batches hold the pixels that normalise to the float batches, cached or not, train and eval") {
  const auto& s = samples();
  for (bool train : {true, false}) {
    CAPTURE(train);
    LoaderOptions f = options(train, 2, CachePolicy::Off);
    LoaderOptions u = f;
    u.format = PixelFormat::Uint8NHWC;
    LoaderOptions uc = u;
    uc.cache = CachePolicy::On;
    uc.threads = 3;
    Loader lf(s, f), lu(s, u), luc(s, uc);
    for (int64_t e = 0; e < 2; ++e) {  // the second epoch of luc comes from its cache
      Epoch a = run_epoch(lf, e), b = run_epoch(lu, e), c = run_epoch(luc, e);
      check_same(a, b);
      check_same(a, c);
    }
    CHECK(luc.stats().cache_hits == 48);
  }
  // The bytes themselves: channels interleaved per pixel, as the transforms leave them.
  LoaderOptions o = options(false, 1, CachePolicy::Off);
  o.shuffle = false;
  o.format = PixelFormat::Uint8NHWC;
  Loader L(s, o);
  L.start_epoch(0);
  const Batch* b = L.next();
  REQUIRE(b);
  const Image want = eval_crop(decode_jpeg_file(s[0].path), kSize);
  CHECK(std::memcmp(b->pixels, want.pixels.data(), want.pixels.size()) == 0);
}

TEST_CASE("batches equal the transforms applied directly") {
  const auto& s = samples();
  Loader tl(s, options(true, 2, CachePolicy::Off));
  Epoch t = run_epoch(tl, 1);
  Loader el(s, options(false, 2, CachePolicy::On));
  Epoch v = run_epoch(el, 0);
  Epoch v2 = run_epoch(el, 1);  // from the cache
  check_same(v, v2);
  const size_t n = 3 * kSize * kSize;
  std::vector<float> want(n);
  for (size_t i : {size_t(0), size_t(17), size_t(47)}) {
    const int64_t k = t.indices[i];
    Image r = train_resize(decode_jpeg_file(s[size_t(k)].path), kSize);
    TrainDraw d = draw_train_params(42, 1, k, r.width, r.height);
    train_random_part(r, kSize, d, want.data());
    vbtest::check_close("train sample", t.images.data() + i * n, want.data(), n, 0, 0);
    // Evaluation: in order, Resize((R,R)) -> CenterCrop(S) -> normalise.
    CHECK(v.indices[i] == int64_t(i));
    eval_transform(decode_jpeg_file(s[i].path), kSize, want.data());
    vbtest::check_close("eval sample", v.images.data() + i * n, want.data(), n, 0, 0);
  }
  // Normalised ImageNet-style values, not raw bytes.
  auto [mn, mx] = std::minmax_element(v.images.begin(), v.images.end());
  CHECK(*mn < -0.5f);
  CHECK(*mx > 0.5f);
  CHECK(*mx < 2.7f);
  CHECK(*mn > -2.2f);
}

TEST_CASE("the allocator hook provides the batch buffers; an abandoned epoch restarts cleanly") {
  std::atomic<int> allocs{0}, frees{0};
  LoaderOptions o = options(true, 2, CachePolicy::Off);
  o.alloc = [&](size_t n) {
    ++allocs;
    return std::aligned_alloc(256, (n + 255) / 256 * 256);
  };
  o.free = [&](void* p) {
    ++frees;
    std::free(p);
  };
  {
    Loader L(samples(), o);
    CHECK(allocs == 2);  // one per ring slot
    L.start_epoch(0);
    const Batch* b = L.next();
    REQUIRE(b);
    CHECK(reinterpret_cast<uintptr_t>(b->images) % 256 == 0);
    L.start_epoch(0);  // abandon after one batch
    Epoch e = run_epoch(L, 0);
    CHECK(e.indices == shuffle_order(48, 42, 0));
    LoaderStats st = L.stats();
    CHECK(st.images == 48);
    CHECK(st.images_per_second > 0);
    CHECK(st.wait_seconds >= 0);
  }
  CHECK(frees == 2);
}

TEST_CASE("bad files: truncated, empty, PNG named .jpg and missing are skipped and listed, or fatal") {
  fs::path dir = fs::temp_directory_path() / ("vb_loader_bad_" + std::to_string(getpid()));
  fs::remove_all(dir);
  SynthOptions so;
  so.videos = 2;
  so.clips_per_video = 8;
  so.scale = 0.1;
  generate_synthetic(dir.string(), so);
  std::vector<Sample> s = build_index(dir.string()).samples;
  REQUIRE(s.size() == 16);
  {
    std::vector<uint8_t> b = read_file_bytes(s[1].path);
    std::ofstream(s[1].path, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(b.data()), long(b.size() / 2));
    std::ofstream(s[4].path, std::ios::binary | std::ios::trunc);
    const unsigned char png[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
    std::ofstream(s[9].path, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(png), sizeof png);
    fs::remove(s[14].path);
  }
  const std::set<int64_t> bad = {1, 4, 9, 14};
  LoaderOptions o = options(false, 3, CachePolicy::Off);
  o.batch_size = 5;
  Loader L(s, o);
  for (int64_t e = 0; e < 2; ++e) {
    Epoch ep = run_epoch(L, e);
    CHECK(ep.sizes == std::vector<int>{3, 4, 4, 1});
    CHECK(ep.indices.size() == 12);
    for (int64_t k : ep.indices) CHECK(bad.count(k) == 0);
    for (size_t i = 0; i < ep.indices.size(); ++i) CHECK(ep.labels[i] == s[size_t(ep.indices[i])].label);
  }
  {  // uint8 batches close the same gaps
    LoaderOptions u = o;
    u.format = PixelFormat::Uint8NHWC;
    Loader U(s, u);
    check_same(run_epoch(L, 2), run_epoch(U, 2));
  }
  std::vector<std::string> sk = L.skipped_files();
  REQUIRE(sk.size() == 4);  // each once, however many epochs
  for (size_t i = 0; i < 4; ++i) {
    int64_t k = *std::next(bad.begin(), long(i));
    CHECK(sk[i].find(s[size_t(k)].path) != std::string::npos);
  }
  CHECK(sk[0].find("decode") != std::string::npos);   // truncated
  CHECK(sk[1].find("empty") != std::string::npos);
  CHECK(sk[2].find("not a JPEG") != std::string::npos);
  CHECK(sk[3].find("cannot open") != std::string::npos);

  o.on_bad = BadImagePolicy::Fail;
  Loader F(s, o);
  F.start_epoch(0);
  std::string msg;
  try {
    while (F.next()) {
    }
  } catch (const Error& e) {
    msg = e.what();
  }
  CHECK(msg.find(s[1].path) != std::string::npos);  // the first bad file in order stops the run
  fs::remove_all(dir);
}
