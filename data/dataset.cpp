#include "data/dataset.h"

#include <algorithm>
#include <charconv>
#include <filesystem>
#include <fstream>
#include <sstream>


#include "kernels/check.h"
#include "engine/file_io.h"

namespace fs = std::filesystem;

namespace vb::data {

namespace {

bool parse_video_id(const std::string& name, int& v) {
  if (name.empty() || name.size() > 6) return false;
  auto r = std::from_chars(name.data(), name.data() + name.size(), v);
  return r.ec == std::errc() && r.ptr == name.data() + name.size() && v >= 0 && std::to_string(v) == name;
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += (c == '"') ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

std::vector<std::string> csv_split(const std::string& line, const std::string& where) {
  std::vector<std::string> out;
  std::string cur;
  bool quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') cur += '"', ++i;
      else if (c == '"') quoted = false;
      else cur += c;
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      out.push_back(cur), cur.clear();
    } else if (c != '\r') {
      cur += c;
    }
  }
  if (quoted) fail(where, ": unterminated quoted field");
  out.push_back(cur);
  return out;
}

}  // namespace

std::string resolve_videos_dir(const std::string& data_dir) {
  std::error_code ec;
  if (!fs::is_directory(data_dir, ec)) fail(data_dir, ": not a directory");
  fs::path p(data_dir);
  if (fs::is_directory(p / "videos", ec)) p = p / "videos";
  std::string s = p.lexically_normal().string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

DatasetIndex build_index(const std::string& data_dir) {
  DatasetIndex idx;
  idx.videos_dir = resolve_videos_dir(data_dir);
  std::vector<std::pair<int, fs::path>> videos;
  for (const auto& e : fs::directory_iterator(idx.videos_dir)) {
    std::string name = e.path().filename().string();
    int v = 0;
    if (!e.is_directory()) {
      idx.skipped_entries.push_back(name + " (not a folder)");
    } else if (!parse_video_id(name, v)) {
      idx.skipped_entries.push_back(name + " (folder name is not a video id)");
    } else {
      videos.emplace_back(v, e.path());
    }
  }
  std::sort(videos.begin(), videos.end());
  std::sort(idx.skipped_entries.begin(), idx.skipped_entries.end());
  for (const auto& [v, dir] : videos) {
    std::string ann = (dir / "annotations.txt").string();
    if (!fs::exists(ann)) fail(ann, ": missing (video folder ", v, " has no annotations.txt)");
    for (ClipAnnotation& a : read_annotations(ann)) {
      Sample s;
      s.video = v;
      s.clip = a.frame_id;
      s.frame_file = a.frame_file;
      s.label_name = a.label;
      s.label = a.label_index;
      s.split = video_split(v);
      s.path = idx.videos_dir + "/" + std::to_string(v) + "/" + std::to_string(a.frame_id) + "/" + a.frame_file;
      idx.samples.push_back(std::move(s));
    }
  }
  return idx;
}

std::vector<Sample> select_split(const std::vector<Sample>& samples, Split s) {
  std::vector<Sample> out;
  for (const Sample& x : samples)
    if (x.split == s) out.push_back(x);
  return out;
}

std::array<int64_t, kNumClasses> class_counts(const std::vector<Sample>& samples) {
  std::array<int64_t, kNumClasses> c{};
  for (const Sample& s : samples) {
    VB_CHECK(s.label >= 0 && s.label < kNumClasses, "label out of range for ", s.path);
    ++c[size_t(s.label)];
  }
  return c;
}

void write_dataset_csv(const std::string& path, const std::vector<Sample>& samples) {
  std::ostringstream os;
  os << "FrameID,Label,video_names,Mapped_Label,img_path\n";
  for (const Sample& s : samples)
    os << csv_field(s.frame_file) << ',' << csv_field(s.label_name) << ',' << s.video << ',' << s.label << ','
       << csv_field(s.path) << '\n';
  write_file_atomic(path, os.str());
}

std::vector<Sample> read_dataset_csv(const std::string& path) {
  // read_file: regular files only, within a size limit, errors naming the file (escaped).
  std::istringstream in(read_file(path));
  std::string line;
  if (!std::getline(in, line)) fail(escape(path), ": empty file (expected a header line)");
  std::vector<std::string> head = csv_split(line, escape(path) + ":1");
  auto col = [&](const char* name) {
    for (size_t i = 0; i < head.size(); ++i)
      if (head[i] == name) return i;
    fail(path, ":1: no column '", name, "' in the header");
  };
  size_t c_frame = col("FrameID"), c_label = col("Label"), c_video = col("video_names"),
         c_mapped = col("Mapped_Label"), c_path = col("img_path");
  std::vector<Sample> out;
  int n = 1;
  while (std::getline(in, line)) {
    ++n;
    if (line.empty() || line == "\r") continue;
    std::string where = detail::concat(escape(path), ":", n);
    std::vector<std::string> f = csv_split(line, where);
    if (f.size() != head.size()) fail(where, ": ", f.size(), " fields, the header has ", head.size());
    Sample s;
    s.frame_file = f[c_frame];
    s.label_name = f[c_label];
    s.label = label_index(s.label_name);
    if (s.label < 0) fail(where, ": unknown group activity '", escape(s.label_name), "'");
    if (f[c_mapped] != std::to_string(s.label))
      fail(where, ": Mapped_Label ", escape(f[c_mapped]), " does not match '", escape(s.label_name), "' (", s.label, ")");
    if (!parse_video_id(f[c_video], s.video)) fail(where, ": video_names '", escape(f[c_video]), "' is not a video id");
    std::string stem = s.frame_file.size() > 4 ? s.frame_file.substr(0, s.frame_file.size() - 4) : "";
    auto r = std::from_chars(stem.data(), stem.data() + stem.size(), s.clip);
    if (stem.empty() || r.ec != std::errc() || r.ptr != stem.data() + stem.size())
      fail(where, ": FrameID '", escape(s.frame_file), "' is not <number>.jpg");
    s.split = video_split(s.video);
    s.path = f[c_path];
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace vb::data
