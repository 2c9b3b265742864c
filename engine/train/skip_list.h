// Every frame a run's loaders skipped (train, val, test), kept in skipped.csv. A resumed run starts from the
// list its earlier processes wrote, so frames that this process has not read again stay listed.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include "data/loader.h"

namespace vb {

struct SkipList {
  std::vector<data::SkippedFrame> frames;
  size_t announced = 0;  // how many the last printed summary covered

  // Adds the frames not listed yet (by split and path).
  void merge(const std::vector<data::SkippedFrame>& more);
  size_t count(const std::string& split) const;
  // Writes skipped.csv (when there is something to list) and prints a line when the list has grown.
  void save(const std::filesystem::path& dir);
  // Reads dir/skipped.csv when it exists, as already announced (a resumed run's earlier list).
  void load(const std::filesystem::path& dir);
};

// A split whose every frame was unreadable: an error (a loss or an accuracy over no images means nothing).
// Saves skipped.csv first, then throws naming it.
[[noreturn]] void fail_all_skipped(const std::string& data, const char* split, size_t clips, SkipList& skipped,
                                   const std::filesystem::path& out);

}  // namespace vb
