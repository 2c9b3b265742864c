#include "engine/train/skip_list.h"

#include <algorithm>
#include <cstdio>

#include "engine/file_io.h"
#include "kernels/check.h"

namespace fs = std::filesystem;

namespace vb {

namespace {
int rank(const std::string& split) { return split == "train" ? 0 : split == "val" ? 1 : 2; }
}  // namespace

void SkipList::merge(const std::vector<data::SkippedFrame>& more) {
  for (const auto& f : more) {
    bool known = false;
    for (const auto& g : frames) known = known || (g.split == f.split && g.path == f.path);
    if (!known) frames.push_back(f);
  }
}

size_t SkipList::count(const std::string& split) const {
  return size_t(std::count_if(frames.begin(), frames.end(), [&](const auto& f) { return f.split == split; }));
}

void SkipList::save(const fs::path& dir) {
  if (frames.empty()) return;
  std::stable_sort(frames.begin(), frames.end(), [](const auto& a, const auto& b) { return rank(a.split) < rank(b.split); });
  write_file_atomic((dir / "skipped.csv").string(), data::skipped_csv(frames));
  if (frames.size() != announced) {
    std::printf("%s; all listed in %s\n", data::skipped_summary(frames).c_str(),
                escape((dir / "skipped.csv").string()).c_str());
    std::fflush(stdout);
    announced = frames.size();
  }
}

void SkipList::load(const fs::path& dir) {
  const fs::path p = dir / "skipped.csv";
  if (!fs::exists(p)) return;
  merge(data::parse_skipped_csv(read_file(p.string()), p.string()));
  announced = frames.size();
}

void fail_all_skipped(const std::string& data, const char* split, size_t clips, SkipList& skipped, const fs::path& out) {
  skipped.save(out);
  fail(data, ": every frame of the ", split, " split (", clips, " clips) is unreadable; see ",
       (out / "skipped.csv").string());
}

}  // namespace vb
