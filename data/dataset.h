// The dataset index: one sample per annotated clip (B1 uses only the clip's target frame), with its split,
// and the notebook's dataset.csv.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "data/annotations.h"

namespace vb::data {

struct Sample {
  int video = 0;           // video id (folder name under videos/)
  int64_t clip = 0;        // clip folder = target frame id
  std::string frame_file;  // "<clip>.jpg" as annotations.txt writes it (the notebook's FrameID)
  std::string label_name;  // "r_spike"
  int label = 0;           // index in kClassNames
  Split split = Split::None;
  std::string path;        // <videos>/<video>/<clip>/<clip>.jpg
};

struct DatasetIndex {
  std::string videos_dir;  // the resolved videos/ folder
  std::vector<Sample> samples;               // ordered by video id, then annotations.txt line order
  std::vector<std::string> skipped_entries;  // entries of videos/ that are not video folders, with the reason
};

// `data_dir` may be the videos/ folder itself or its parent (a folder holding videos/). Every sub-folder
// named by a non-negative integer is a video and must hold annotations.txt; other entries are reported in
// skipped_entries and otherwise ignored. The image files are not opened here (the loader reports bad ones).
DatasetIndex build_index(const std::string& data_dir);
// The videos/ folder that `data_dir` designates (see build_index).
std::string resolve_videos_dir(const std::string& data_dir);

std::vector<Sample> select_split(const std::vector<Sample>& samples, Split s);
std::array<int64_t, kNumClasses> class_counts(const std::vector<Sample>& samples);

// The notebook's dataset.csv: header `FrameID,Label,video_names,Mapped_Label,img_path`, one row per sample
// (fields holding a comma or a quote are quoted, CSV style). Written atomically.
void write_dataset_csv(const std::string& path, const std::vector<Sample>& samples);
// Reads a dataset.csv written by write_dataset_csv or by the notebook (columns found by header name);
// split from video_names. Errors name file:line.
std::vector<Sample> read_dataset_csv(const std::string& path);

}  // namespace vb::data
