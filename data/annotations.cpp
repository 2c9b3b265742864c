#include "data/annotations.h"

#include <charconv>

#include "engine/file_io.h"
#include "kernels/check.h"

namespace vb::data {

int label_index(std::string_view name) {
  for (int i = 0; i < kNumClasses; ++i)
    if (name == kClassNames[size_t(i)]) return i;
  return -1;
}

const char* split_name(Split s) {
  switch (s) {
    case Split::Train: return "train";
    case Split::Val: return "val";
    case Split::Test: return "test";
    case Split::None: return "none";
  }
  return "?";
}

Split parse_split(const std::string& name) {
  if (name == "train") return Split::Train;
  if (name == "val") return Split::Val;
  if (name == "test") return Split::Test;
  fail("unknown split '", name, "' (expected train, val or test)");
}

const std::vector<int>& split_videos(Split s) {
  static const std::vector<int> train = {1, 3, 6, 7, 10, 13, 15, 16, 18, 22, 23, 31,
                                         32, 36, 38, 39, 40, 41, 42, 48, 50, 52, 53, 54};
  static const std::vector<int> val = {0, 2, 8, 12, 17, 19, 24, 26, 27, 28, 30, 33, 46, 49, 51};
  static const std::vector<int> test = {4, 5, 9, 11, 14, 20, 21, 25, 29, 34, 35, 37, 43, 44, 45, 47};
  static const std::vector<int> none;
  switch (s) {
    case Split::Train: return train;
    case Split::Val: return val;
    case Split::Test: return test;
    case Split::None: return none;
  }
  return none;
}

Split video_split(int video) {
  for (Split s : {Split::Train, Split::Val, Split::Test})
    for (int v : split_videos(s))
      if (v == video) return s;
  return Split::None;
}

namespace {

std::vector<std::string_view> split_ws(std::string_view s) {
  std::vector<std::string_view> out;
  size_t i = 0;
  auto ws = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f'; };
  while (i < s.size()) {
    while (i < s.size() && ws(s[i])) ++i;
    size_t j = i;
    while (j < s.size() && !ws(s[j])) ++j;
    if (j > i) out.push_back(s.substr(i, j - i));
    i = j;
  }
  return out;
}

bool parse_int(std::string_view s, int64_t& v) {
  auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

}  // namespace

ClipAnnotation parse_annotation_line(std::string_view line, const std::string& file, int line_no) {
  auto where = [&] { return detail::concat(escape(file), ":", line_no); };
  std::vector<std::string_view> f = split_ws(line);
  if (f.size() < 2) fail(where(), ": expected '<frame>.jpg <group_activity> [boxes...]', got '", escape(line, 80), "'");
  ClipAnnotation a;
  a.frame_file = std::string(f[0]);
  std::string_view stem = f[0];
  if (stem.size() <= 4 || stem.substr(stem.size() - 4) != ".jpg")
    fail(where(), ": frame '", escape(f[0]), "' does not end in .jpg");
  stem.remove_suffix(4);
  if (!parse_int(stem, a.frame_id) || a.frame_id < 0) fail(where(), ": frame '", escape(f[0]), "' is not <number>.jpg");
  a.label = std::string(f[1]);
  a.label_index = label_index(f[1]);
  if (a.label_index < 0) fail(where(), ": unknown group activity '", escape(f[1]), "'");
  if ((f.size() - 2) % 5 != 0)
    fail(where(), ": player boxes come in fives (x y w h action); ", f.size() - 2, " fields follow the label");
  for (size_t i = 2; i < f.size(); i += 5) {
    PlayerBox b;
    int64_t v[4];
    for (int k = 0; k < 4; ++k)
      if (!parse_int(f[i + size_t(k)], v[k]))
        fail(where(), ": player box ", (i - 2) / 5, " field ", k, " '", escape(f[i + size_t(k)]), "' is not an integer");
    if (v[2] < 0 || v[3] < 0) fail(where(), ": player box ", (i - 2) / 5, " has a negative size");
    b.x = int(v[0]), b.y = int(v[1]), b.w = int(v[2]), b.h = int(v[3]);
    int64_t dummy;
    if (parse_int(f[i + 4], dummy)) fail(where(), ": player box ", (i - 2) / 5, " has no action (found '", escape(f[i + 4]), "')");
    b.action = std::string(f[i + 4]);
    a.players.push_back(std::move(b));
  }
  return a;
}

std::vector<ClipAnnotation> read_annotations(const std::string& path) {
  // A regular file of at most 64 MiB (the real ones are a few KB): a directory or a FIFO named
  // annotations.txt is an error naming it, not a library exception or a hang.
  const std::string text = read_file(path, uint64_t(64) << 20);
  std::vector<ClipAnnotation> out;
  int n = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    const std::string_view line(text.data() + pos, nl - pos);
    pos = nl + 1;
    ++n;
    if (split_ws(line).empty()) continue;
    out.push_back(parse_annotation_line(line, path, n));
  }
  return out;
}

}  // namespace vb::data
