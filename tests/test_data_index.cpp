// annotations.txt parsing (real-format lines, malformed ones), the index over a synthetic set in the real
// layout (counts, splits, non-video folders), and dataset.csv.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>

#include "data/annotations.h"
#include "data/dataset.h"
#include "data/jpeg.h"
#include "data/synth.h"
#include "kernels/check.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using namespace vb;
using namespace vb::data;

namespace {

// A temporary folder removed at the end of the test case.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag) {
    path = fs::temp_directory_path() / ("vb_" + tag + "_" + std::to_string(getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_CASE("label mapping is the notebook's order") {
  CHECK(label_index("l-spike") == 0);
  CHECK(label_index("l_set") == 1);
  CHECK(label_index("r_set") == 2);
  CHECK(label_index("r-pass") == 3);
  CHECK(label_index("r_spike") == 4);
  CHECK(label_index("l-pass") == 5);
  CHECK(label_index("r_winpoint") == 6);
  CHECK(label_index("l_winpoint") == 7);
  CHECK(label_index("r-spike") == -1);  // the dataset writes r_spike: the other spelling is not a label
  CHECK(label_index("l_pass") == -1);
}

TEST_CASE("splits are the notebook's video lists") {
  CHECK(split_videos(Split::Train).size() == 24);
  CHECK(split_videos(Split::Val).size() == 15);
  CHECK(split_videos(Split::Test).size() == 16);
  CHECK(video_split(1) == Split::Train);
  CHECK(video_split(54) == Split::Train);
  CHECK(video_split(0) == Split::Val);
  CHECK(video_split(51) == Split::Val);
  CHECK(video_split(4) == Split::Test);
  CHECK(video_split(47) == Split::Test);
  CHECK(video_split(55) == Split::None);
  for (int v = 0; v < 55; ++v) CHECK(video_split(v) != Split::None);
  CHECK(parse_split("val") == Split::Val);
  CHECK_THROWS_AS(parse_split("validation"), Error);
}

TEST_CASE("parser: real-format lines") {
  ClipAnnotation a = parse_annotation_line(
      "29885.jpg r_spike 430 575 82 170 waiting 722 487 58 180 standing 1141 429 73 168 spiking", "v/annotations.txt", 3);
  CHECK(a.frame_file == "29885.jpg");
  CHECK(a.frame_id == 29885);
  CHECK(a.label == "r_spike");
  CHECK(a.label_index == 4);
  REQUIRE(a.players.size() == 3);
  CHECK(a.players[0].x == 430);
  CHECK(a.players[0].y == 575);
  CHECK(a.players[0].w == 82);
  CHECK(a.players[0].h == 170);
  CHECK(a.players[0].action == "waiting");
  CHECK(a.players[2].action == "spiking");
  // Tabs, CR line ends and no players at all are fine.
  ClipAnnotation b = parse_annotation_line("3596.jpg\tl-pass\r", "f", 1);
  CHECK(b.label_index == 5);
  CHECK(b.players.empty());
}

TEST_CASE("parser: malformed lines are errors naming file:line") {
  const std::string f = "videos/7/annotations.txt";
  auto err = [&](const std::string& line) { return error_of([&] { parse_annotation_line(line, f, 12); }); };
  std::string m = err("29885.jpg r_kill 1 2 3 4 standing");
  CHECK(m.find("videos/7/annotations.txt:12") != std::string::npos);
  CHECK(m.find("r_kill") != std::string::npos);
  CHECK(err("29885.jpg").find(":12") != std::string::npos);
  CHECK(err("29885.png r_spike").find("does not end in .jpg") != std::string::npos);
  CHECK(err("abc.jpg r_spike").find("not <number>.jpg") != std::string::npos);
  CHECK(err("29885.jpg r_spike 1 2 3 4").find("fives") != std::string::npos);
  CHECK(err("29885.jpg r_spike 1 2 x 4 standing").find("'x' is not an integer") != std::string::npos);
  CHECK(err("29885.jpg r_spike 1 2 3 4 5 6 7 8 9 10").find("no action") != std::string::npos);
  CHECK(err("29885.jpg r_spike 1 2 -3 4 standing").find("negative") != std::string::npos);

  TempDir t("ann");
  std::string path = (t.path / "annotations.txt").string();
  {
    std::ofstream o(path);
    o << "100.jpg l_set 1 2 3 4 setting\n\n200.jpg r_winpoint\n300.jpg wrong\n";
  }
  std::string e = error_of([&] { read_annotations(path); });
  CHECK(e.find(path + ":4") != std::string::npos);  // the blank line 2 is skipped, but still counted
  CHECK(error_of([&] { read_annotations((t.path / "none.txt").string()); }).find("none.txt") != std::string::npos);
}

TEST_CASE("index and dataset.csv on a synthetic set in the real layout") {
  TempDir t("index");
  SynthOptions so;
  so.clips_per_video = 3;
  so.scale = 0.1;
  so.seed = 5;
  SynthSummary sum = generate_synthetic(t.path.string(), so);
  CHECK(sum.clips == 55 * 3);
  CHECK(sum.frames == 55 * 3);
  // A stray file and a non-video folder are reported and skipped.
  fs::create_directories(t.path / "videos" / "notes");
  std::ofstream(t.path / "videos" / "README.txt") << "x";

  DatasetIndex idx = build_index(t.path.string());  // the parent of videos/
  CHECK(idx.videos_dir == (t.path / "videos").string());
  REQUIRE(idx.samples.size() == 165);
  REQUIRE(idx.skipped_entries.size() == 2);
  CHECK(idx.skipped_entries[0].find("README.txt") != std::string::npos);
  CHECK(idx.skipped_entries[1].find("notes") != std::string::npos);
  DatasetIndex idx2 = build_index((t.path / "videos").string() + "/");  // videos/ itself
  CHECK(idx2.samples.size() == 165);
  CHECK(idx2.videos_dir == idx.videos_dir);

  auto train = select_split(idx.samples, Split::Train), val = select_split(idx.samples, Split::Val),
       test = select_split(idx.samples, Split::Test);
  CHECK(train.size() == 24 * 3);
  CHECK(val.size() == 15 * 3);
  CHECK(test.size() == 16 * 3);
  for (const Sample& s : train) CHECK(video_split(s.video) == Split::Train);
  // Class frequencies follow the real ones: the largest train class (l-pass, 378/2152 -> 12.6 of 72).
  auto c = class_counts(train);
  CHECK(c[5] == 13);
  CHECK(c[6] == 4);  // r_winpoint, 123/2152 of 72 = 4.1
  int64_t total = 0;
  for (auto x : c) total += x;
  CHECK(total == 72);
  // Paths: <videos>/<video>/<clip>/<clip>.jpg, existing, at the stated sizes (video 2 is 1920x1080 x 0.1).
  for (const Sample& s : idx.samples) {
    CHECK(s.path == idx.videos_dir + "/" + std::to_string(s.video) + "/" + std::to_string(s.clip) + "/" +
                        std::to_string(s.clip) + ".jpg");
    CHECK(fs::exists(s.path));
  }
  for (const Sample& s : idx.samples) {
    if (s.video != 2 && s.video != 3) continue;
    JpegHeader h = read_jpeg_header(read_file_bytes(s.path), s.path);
    CHECK(h.width == (s.video == 2 ? 192 : 128));
    CHECK(h.height == (s.video == 2 ? 108 : 72));
  }
  // Annotation lines carry 12 players with actions.
  auto ann = read_annotations((t.path / "videos" / "3" / "annotations.txt").string());
  REQUIRE(ann.size() == 3);
  CHECK(ann[0].players.size() == 12);

  std::string csv = (t.path / "dataset.csv").string();
  write_dataset_csv(csv, idx.samples);
  std::ifstream in(csv);
  std::string header, row;
  std::getline(in, header);
  std::getline(in, row);
  CHECK(header == "FrameID,Label,video_names,Mapped_Label,img_path");
  const Sample& s0 = idx.samples[0];
  CHECK(row == s0.frame_file + "," + s0.label_name + "," + std::to_string(s0.video) + "," + std::to_string(s0.label) +
                   "," + s0.path);
  CHECK(s0.video == 0);
  std::vector<Sample> back = read_dataset_csv(csv);
  REQUIRE(back.size() == idx.samples.size());
  for (size_t i = 0; i < back.size(); ++i) {
    CHECK(back[i].path == idx.samples[i].path);
    CHECK(back[i].label == idx.samples[i].label);
    CHECK(back[i].split == idx.samples[i].split);
    CHECK(back[i].clip == idx.samples[i].clip);
  }
  // A video folder without annotations.txt is an error naming it.
  fs::create_directories(t.path / "videos" / "60");
  CHECK(error_of([&] { build_index(t.path.string()); }).find("60/annotations.txt") != std::string::npos);
}

TEST_CASE("the synthetic generator is deterministic") {
  TempDir a("synth_a"), b("synth_b");
  SynthOptions so;
  so.videos = 2;
  so.clips_per_video = 2;
  so.scale = 0.05;
  so.frames_per_clip = 41;
  so.threads = 1;
  generate_synthetic(a.path.string(), so);
  so.threads = 2;
  generate_synthetic(b.path.string(), so);
  DatasetIndex ia = build_index(a.path.string()), ib = build_index(b.path.string());
  REQUIRE(ia.samples.size() == 4);
  for (size_t i = 0; i < 4; ++i) {
    CHECK(ia.samples[i].label == ib.samples[i].label);
    CHECK(read_file_bytes(ia.samples[i].path) == read_file_bytes(ib.samples[i].path));
    // 41 frames: target-20 .. target+20.
    fs::path dir = fs::path(ia.samples[i].path).parent_path();
    int n = 0;
    for (auto& e : fs::directory_iterator(dir)) n += e.path().extension() == ".jpg";
    CHECK(n == 41);
    CHECK(fs::exists(dir / (std::to_string(ia.samples[i].clip - 20) + ".jpg")));
    CHECK(fs::exists(dir / (std::to_string(ia.samples[i].clip + 20) + ".jpg")));
  }
}
