#include "data/synth.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "data/annotations.h"
#include "data/image.h"
#include "data/jpeg.h"
#include "data/rng.h"
#include "kernels/check.h"
#include "engine/file_io.h"
#include "data/dataset.h"

namespace fs = std::filesystem;

namespace vb::data {

namespace {

// The real per-split class counts (volleyball.md), in kClassNames order.
constexpr std::array<std::array<int, kNumClasses>, 3> kRealCounts = {{
    {289, 304, 283, 353, 261, 378, 123, 161},  // train
    {174, 160, 169, 238, 189, 222, 85, 104},   // val
    {179, 168, 192, 210, 173, 226, 87, 102},   // test
}};

bool is_full_hd(int video) {
  for (int v : {2, 37, 38, 39, 40, 41, 44, 45})
    if (v == video) return true;
  return false;
}

enum class Kind { Spike, Set, Pass, Winpoint };
Kind kind_of(int label) {
  std::string n = kClassNames[size_t(label)];
  if (n.find("spike") != std::string::npos) return Kind::Spike;
  if (n.find("set") != std::string::npos) return Kind::Set;
  if (n.find("pass") != std::string::npos) return Kind::Pass;
  return Kind::Winpoint;
}
bool left_side(int label) { return kClassNames[size_t(label)][0] == 'l'; }

// Labels of every clip of a split, in proportion to the real counts (largest remainder), shuffled.
std::vector<int> split_labels(int split_index, int64_t n, uint64_t seed) {
  const auto& c = kRealCounts[size_t(split_index)];
  double total = 0;
  for (int x : c) total += x;
  std::vector<int> out;
  std::vector<std::pair<double, int>> rem;
  int64_t given = 0;
  for (int k = 0; k < kNumClasses; ++k) {
    double q = double(n) * c[size_t(k)] / total;
    int64_t f = int64_t(std::floor(q));
    for (int64_t i = 0; i < f; ++i) out.push_back(k);
    given += f;
    rem.emplace_back(-(q - double(f)), k);
  }
  std::sort(rem.begin(), rem.end());
  for (int64_t i = 0; given < n; ++i, ++given) out.push_back(rem[size_t(i)].second);
  CounterRng rng(seed, RngStream::Synth, 1000 + uint64_t(split_index));
  for (size_t i = out.size(); i > 1; --i) std::swap(out[i - 1], out[size_t(rng.below(i))]);
  return out;
}

struct Rgb {
  float r, g, b;
};

struct Canvas {
  Image img;
  std::vector<float> f;  // (H, W, 3) before noise and quantisation
  int W, H;
  Canvas(int w, int h) : img(w, h), f(size_t(w) * h * 3), W(w), H(h) {}
  void rect(double x0, double y0, double x1, double y1, Rgb c) {
    int a = std::max(0, int(std::lround(x0))), b = std::min(W, int(std::lround(x1)));
    int t = std::max(0, int(std::lround(y0))), u = std::min(H, int(std::lround(y1)));
    for (int y = t; y < u; ++y)
      for (int x = a; x < b; ++x) set(x, y, c);
  }
  void circle(double cx, double cy, double r, Rgb c) {
    int t = std::max(0, int(cy - r)), u = std::min(H, int(cy + r) + 1);
    int a = std::max(0, int(cx - r)), b = std::min(W, int(cx + r) + 1);
    for (int y = t; y < u; ++y)
      for (int x = a; x < b; ++x)
        if ((x + 0.5 - cx) * (x + 0.5 - cx) + (y + 0.5 - cy) * (y + 0.5 - cy) <= r * r) set(x, y, c);
  }
  void set(int x, int y, Rgb c) {
    float* p = &f[(size_t(y) * W + x) * 3];
    p[0] = c.r, p[1] = c.g, p[2] = c.b;
  }
};

struct Player {
  double u, v;       // feet position in court coordinates: u in [0, 1] left to right, v in [0, 1] top to bottom
  double lift = 0;   // jump height (fraction of the frame height)
  const char* action = "standing";
  bool left_team = true;
};

struct Scene {
  std::vector<Player> players;
  double ball_u = 0.5, ball_v = 0.5, ball_lift = 0;
};

// Formations in the acting team's frame (the acting team on the left); mirrored for the right side.
Scene make_scene(int label, CounterRng& rng) {
  const Kind kind = kind_of(label);
  const bool left = left_side(label);
  auto jit = [&](double s) { return rng.uniform(-s, s); };
  Scene sc;
  std::vector<Player> act, opp;
  // The other team in a neutral base formation on its own half (mirrored frame: u > 0.5).
  const double base[6][2] = {{0.60, 0.58}, {0.62, 0.72}, {0.60, 0.86}, {0.75, 0.60}, {0.78, 0.74}, {0.76, 0.88}};
  switch (kind) {
    case Kind::Pass: {
      const double p[6][2] = {{0.10, 0.60}, {0.17, 0.74}, {0.10, 0.88}, {0.24, 0.62}, {0.30, 0.80}, {0.22, 0.90}};
      const char* a[6] = {"digging", "waiting", "moving", "waiting", "standing", "moving"};
      for (int i = 0; i < 6; ++i) act.push_back({p[i][0] + jit(0.02), p[i][1] + jit(0.02), 0, a[i], true});
      sc.ball_u = 0.13 + jit(0.03), sc.ball_v = 0.64 + jit(0.04), sc.ball_lift = 0.10 + jit(0.03);
      for (int i = 0; i < 6; ++i) opp.push_back({base[i][0] + jit(0.02), base[i][1] + jit(0.02), 0, "standing", false});
      break;
    }
    case Kind::Set: {
      const double p[6][2] = {{0.45, 0.60}, {0.32, 0.56}, {0.30, 0.78}, {0.34, 0.90}, {0.15, 0.68}, {0.14, 0.86}};
      const char* a[6] = {"setting", "moving", "moving", "waiting", "standing", "standing"};
      for (int i = 0; i < 6; ++i) act.push_back({p[i][0] + jit(0.015), p[i][1] + jit(0.02), 0, a[i], true});
      sc.ball_u = 0.44 + jit(0.02), sc.ball_v = 0.60 + jit(0.02), sc.ball_lift = 0.38 + jit(0.04);
      for (int i = 0; i < 6; ++i) opp.push_back({base[i][0] + jit(0.02), base[i][1] + jit(0.02), 0, "waiting", false});
      break;
    }
    case Kind::Spike: {
      const double p[6][2] = {{0.45, 0.64}, {0.38, 0.56}, {0.28, 0.80}, {0.18, 0.62}, {0.16, 0.84}, {0.34, 0.90}};
      const char* a[6] = {"spiking", "standing", "waiting", "moving", "standing", "waiting"};
      for (int i = 0; i < 6; ++i) act.push_back({p[i][0] + jit(0.015), p[i][1] + jit(0.02), i == 0 ? 0.14 : 0, a[i], true});
      sc.ball_u = 0.47 + jit(0.015), sc.ball_v = 0.62 + jit(0.02), sc.ball_lift = 0.36 + jit(0.03);
      const double b[6][2] = {{0.55, 0.60}, {0.55, 0.70}, {0.70, 0.62}, {0.74, 0.78}, {0.82, 0.66}, {0.80, 0.88}};
      for (int i = 0; i < 6; ++i)
        opp.push_back({b[i][0] + jit(0.015), b[i][1] + jit(0.02), i < 2 ? 0.11 : 0, i < 2 ? "blocking" : "waiting", false});
      break;
    }
    case Kind::Winpoint: {
      const double cu = 0.26 + jit(0.04), cv = 0.74 + jit(0.05);
      for (int i = 0; i < 6; ++i)
        act.push_back({cu + 0.035 * std::cos(i * 1.047) + jit(0.01), cv + 0.05 * std::sin(i * 1.047) + jit(0.01), 0,
                       i % 2 ? "jumping" : "standing", true});
      sc.ball_u = 0.70 + jit(0.12), sc.ball_v = 0.80 + jit(0.08), sc.ball_lift = 0;
      for (int i = 0; i < 6; ++i)
        opp.push_back({rng.uniform(0.55, 0.95), rng.uniform(0.55, 0.92), 0, i % 2 ? "moving" : "standing", false});
      break;
    }
  }
  for (Player& p : act) p.left_team = left;
  for (Player& p : opp) p.left_team = !left;
  sc.players = act;
  sc.players.insert(sc.players.end(), opp.begin(), opp.end());
  if (!left) {
    for (Player& p : sc.players) p.u = 1.0 - p.u;
    sc.ball_u = 1.0 - sc.ball_u;
  }
  return sc;
}

struct Camera {
  double dx, dy, zoom;
  int W, H;
  double px(double u) const { return W * 0.5 + (u - 0.5) * W * zoom + dx; }
  double py(double v) const { return H * 0.5 + (v - 0.5) * H * zoom + dy; }
};

// Draws frame `t` (-20..20 around the target) of a clip; fills `boxes` with the players' boxes.
Image render(const Scene& sc0, int W, int H, uint64_t key, int t, std::vector<PlayerBox>* boxes) {
  CounterRng rng(key, RngStream::Synth, 7);  // per-clip appearance (same for all frames of the clip)
  Camera cam{rng.uniform(-0.04, 0.04) * W, rng.uniform(-0.03, 0.03) * H, rng.uniform(0.94, 1.06), W, H};
  const double light = rng.uniform(0.75, 1.2);
  const Rgb cast{float(rng.uniform(-14, 14)), float(rng.uniform(-14, 14)), float(rng.uniform(-14, 14))};
  const Rgb stands{float(rng.uniform(40, 80)), float(rng.uniform(40, 80)), float(rng.uniform(60, 100))};
  const Rgb court{float(rng.uniform(190, 230)), float(rng.uniform(100, 140)), float(rng.uniform(50, 80))};
  const Rgb floor_{float(rng.uniform(150, 190)), float(rng.uniform(120, 150)), float(rng.uniform(90, 120))};
  Canvas c(W, H);
  // Stands, floor, court, lines, net.
  c.rect(0, 0, W, cam.py(0.42), stands);
  c.rect(0, cam.py(0.42), W, H, floor_);
  c.rect(cam.px(0.04), cam.py(0.50), cam.px(0.96), cam.py(0.96), court);
  const double lw = std::max(1.0, 0.004 * H);
  const Rgb white{235, 235, 235};
  c.rect(cam.px(0.04), cam.py(0.50), cam.px(0.96), cam.py(0.50) + lw, white);
  c.rect(cam.px(0.04), cam.py(0.96) - lw, cam.px(0.96), cam.py(0.96), white);
  c.rect(cam.px(0.04), cam.py(0.50), cam.px(0.04) + lw, cam.py(0.96), white);
  c.rect(cam.px(0.96) - lw, cam.py(0.50), cam.px(0.96), cam.py(0.96), white);
  c.rect(cam.px(0.33), cam.py(0.50), cam.px(0.33) + lw, cam.py(0.96), white);
  c.rect(cam.px(0.67) - lw, cam.py(0.50), cam.px(0.67), cam.py(0.96), white);
  c.rect(cam.px(0.497), cam.py(0.28), cam.px(0.503), cam.py(0.62), Rgb{30, 30, 30});
  c.rect(cam.px(0.497), cam.py(0.28), cam.px(0.503), cam.py(0.30), white);
  // Players, back to front so nearer ones cover farther ones.
  std::vector<Player> ps = sc0.players;
  const double drift = 0.0012 * t;
  for (size_t i = 0; i < ps.size(); ++i) ps[i].u += drift * ((i % 3) - 1.0);
  std::vector<size_t> order(ps.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ps[a].v < ps[b].v; });
  const Rgb red{200, 35, 35}, blue{35, 60, 205}, skin{225, 185, 150}, shorts{25, 25, 25};
  if (boxes) boxes->clear();
  for (size_t i : order) {
    const Player& p = ps[i];
    const double ph = 0.16 * H * cam.zoom * (0.8 + 0.4 * p.v), pw = 0.40 * ph;
    const double fx = cam.px(p.u), fy = cam.py(p.v) - p.lift * H;
    const double x0 = fx - pw / 2, y0 = fy - ph;
    c.rect(x0, y0 + 0.22 * ph, x0 + pw, y0 + 0.62 * ph, p.left_team ? red : blue);
    c.rect(x0 + 0.1 * pw, y0 + 0.62 * ph, x0 + 0.9 * pw, y0 + ph, shorts);
    c.circle(fx, y0 + 0.11 * ph, 0.13 * ph, skin);
    if (boxes)
      boxes->push_back({int(std::lround(x0)), int(std::lround(y0)), int(std::lround(pw)), int(std::lround(ph)), p.action});
  }
  // The ball, with its shadow on the floor.
  const double br = 0.03 * H * cam.zoom;
  const double bu = sc0.ball_u + 0.002 * t, bx = cam.px(bu), by = cam.py(sc0.ball_v) - sc0.ball_lift * H;
  c.circle(bx, cam.py(sc0.ball_v), br * 0.8, Rgb{60, 50, 40});
  c.circle(bx, by - br, br, Rgb{250, 235, 90});
  // Lighting, colour cast, vignetting and noise, then quantisation.
  CounterRng noise(key, RngStream::Synth, 100 + uint64_t(t + 20));
  for (int y = 0; y < H; ++y) {
    const double vy = (y - H * 0.5) / H;
    for (int x = 0; x < W; ++x) {
      const double vx = (x - W * 0.5) / W;
      const float vig = float(light * (1.0 - 0.35 * (vx * vx + vy * vy)));
      uint64_t r = noise.next();
      float* p = &c.f[(size_t(y) * W + x) * 3];
      uint8_t* o = c.img.row(y) + size_t(x) * 3;
      const float cs[3] = {cast.r, cast.g, cast.b};
      for (int k = 0; k < 3; ++k) {
        // Triangular noise, about +-10.
        float n = float(int((r >> (k * 16)) & 0xFF) + int((r >> (k * 16 + 8)) & 0xFF) - 255) * (10.0f / 255.0f);
        float v = p[k] * vig + cs[k] + n;
        o[k] = uint8_t(v < 0 ? 0 : v > 255 ? 255 : v + 0.5f);
      }
    }
  }
  return c.img;
}

}  // namespace

SynthSummary generate_synthetic(const std::string& out_dir, const SynthOptions& opt) {
  VB_CHECK(opt.videos > 0 && opt.videos <= 1000, "synthetic videos ", opt.videos);
  VB_CHECK(opt.clips_per_video > 0, "clips per video ", opt.clips_per_video);
  VB_CHECK(opt.frames_per_clip == 1 || opt.frames_per_clip == 41, "frames per clip must be 1 or 41, not ",
           opt.frames_per_clip);
  VB_CHECK(opt.scale > 0 && opt.scale <= 4, "scale ", opt.scale);
  const fs::path videos = fs::path(out_dir) / "videos";
  fs::create_directories(videos);

  // Labels: each split's clips in proportion to the real counts, dealt to its videos in id order.
  std::vector<std::vector<int>> labels(size_t(opt.videos));
  for (int si = 0; si < 3; ++si) {
    std::vector<int> vids;
    for (int v = 0; v < opt.videos; ++v)
      if (int(video_split(v)) == si) vids.push_back(v);
    std::vector<int> l = split_labels(si, int64_t(vids.size()) * opt.clips_per_video, opt.seed);
    for (size_t i = 0; i < vids.size(); ++i)
      labels[size_t(vids[i])].assign(l.begin() + long(i) * opt.clips_per_video, l.begin() + long(i + 1) * opt.clips_per_video);
  }
  for (int v = 0; v < opt.videos; ++v)
    if (labels[size_t(v)].empty()) labels[size_t(v)] = split_labels(0, opt.clips_per_video, opt.seed + 1 + uint64_t(v));

  std::atomic<int> next{0};
  std::atomic<int64_t> frames{0}, bytes{0};
  std::mutex err_m;
  std::string err;
  auto work = [&] {
    for (int v; (v = next++) < opt.videos;) {
      try {
        const int W = std::max(16, int(std::lround((is_full_hd(v) ? 1920 : 1280) * opt.scale)));
        const int H = std::max(16, int(std::lround((is_full_hd(v) ? 1080 : 720) * opt.scale)));
        CounterRng vr(opt.seed, RngStream::Synth, 2000 + uint64_t(v));
        int64_t clip = 1000 + int64_t(vr.below(20000));
        std::ostringstream ann;
        const fs::path vdir = videos / std::to_string(v);
        fs::create_directories(vdir);
        for (int j = 0; j < opt.clips_per_video; ++j) {
          clip += 60 + int64_t(vr.below(400));
          const int label = labels[size_t(v)][size_t(j)];
          const uint64_t key = splitmix64(opt.seed ^ splitmix64(uint64_t(v) * 100003 + uint64_t(j)));
          CounterRng sr(key, RngStream::Synth, 1);
          Scene sc = make_scene(label, sr);
          const fs::path cdir = vdir / std::to_string(clip);
          fs::create_directories(cdir);
          std::vector<PlayerBox> boxes;
          const int half = opt.frames_per_clip == 41 ? 20 : 0;
          for (int t = -half; t <= half; ++t) {
            Image img = render(sc, W, H, key, t, t == 0 ? &boxes : nullptr);
            std::vector<uint8_t> jpg = encode_jpeg(img, opt.quality);
            std::string path = (cdir / (std::to_string(clip + t) + ".jpg")).string();
            std::ofstream f(path, std::ios::binary);
            if (!f.write(reinterpret_cast<const char*>(jpg.data()), std::streamsize(jpg.size())))
              fail(path, ": write failed");
            ++frames;
            bytes += int64_t(jpg.size());
          }
          ann << clip << ".jpg " << kClassNames[size_t(label)];
          for (const PlayerBox& b : boxes) ann << ' ' << b.x << ' ' << b.y << ' ' << b.w << ' ' << b.h << ' ' << b.action;
          ann << '\n';
        }
        write_file_atomic((vdir / "annotations.txt").string(), ann.str());
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> g(err_m);
        if (err.empty()) err = e.what();
      }
    }
  };
  int nt = opt.threads > 0 ? opt.threads : int(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> ts;
  for (int i = 0; i < std::min(nt, opt.videos); ++i) ts.emplace_back(work);
  for (auto& t : ts) t.join();
  if (!err.empty()) fail("synthetic dataset: ", err);
  SynthSummary s;
  s.clips = int64_t(opt.videos) * opt.clips_per_video;
  s.frames = frames;
  s.bytes = bytes;
  return s;
}

}  // namespace vb::data
