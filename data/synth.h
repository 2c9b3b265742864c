// A synthetic Volleyball dataset in the real layout (see data/README.md), for demos, tests and
// benchmarks: <out>/videos/<video>/annotations.txt with player boxes and actions, <clip>/<frame>.jpg frames,
// the notebook's splits, class frequencies proportional to the real per-split counts, videos
// 2, 37, 38, 39, 40, 41, 44, 45 at 1920x1080 and the others at 1280x720 (times `scale`), baseline JPEG
// 4:2:0 at quality 95.
//
// The pictures carry their label in large-scale structure that must be learned: a court with a net in the
// middle; twelve players (two teams, left in red, right in blue) whose formation depends on the kind of
// play (pass: the acting team spread out in its back court; set: a setter at the net under a high ball,
// hitters approaching; spike: a player jumping at the net with the ball above it, two opponents blocking;
// winpoint: the acting team huddled in the middle of its half, the ball on the floor of the other side);
// the acting side (l/r) decides which team does this and where the ball is. On top: per-frame lighting,
// colour casts, pixel noise, camera shifts and zoom, and jittered player positions, so no single pixel
// gives the label away. Everything is a pure function of (seed, video, clip, frame).
#pragma once
#include <cstdint>
#include <string>

namespace vb::data {

struct SynthOptions {
  int videos = 55;           // video ids 0 .. videos-1
  int clips_per_video = 88;  // about the real 4,830 clips over 55 videos
  int frames_per_clip = 1;   // 1 (the target frame only, all B1 reads) or 41 (target-20 .. target+20)
  double scale = 1.0;        // frame size factor (0.25 gives 320x180 / 480x270)
  uint64_t seed = 0;
  int quality = 95;
  int threads = 0;           // 0 = all cores
};

struct SynthSummary {
  int64_t clips = 0, frames = 0, bytes = 0;
};

// Writes the dataset under `out_dir` (creating <out_dir>/videos). Existing files of the same names are
// overwritten; the same options always produce the same files.
SynthSummary generate_synthetic(const std::string& out_dir, const SynthOptions& opt);

}  // namespace vb::data
