// The Volleyball dataset's annotations.txt, read exactly (the layout is summarised in data/README.md).
//
// One clip per line: `<frame>.jpg <group_activity> [<x> <y> <w> <h> <player_action>]...`, fields separated
// by any whitespace. Blank lines are skipped (the notebook's pandas reading drops them). A malformed line or
// an unknown group activity is an error naming file:line.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace vb::data {

inline constexpr int kNumClasses = 8;
// The notebook's label mapping, in index order: l-spike 0, l_set 1, r_set 2, r-pass 3, r_spike 4, l-pass 5,
// r_winpoint 6, l_winpoint 7. The mix of '_' and '-' is the dataset's own spelling.
inline constexpr std::array<const char*, kNumClasses> kClassNames = {
    "l-spike", "l_set", "r_set", "r-pass", "r_spike", "l-pass", "r_winpoint", "l_winpoint"};
// The player actions the dataset uses (B1 ignores them; the synthetic generator writes them).
inline constexpr std::array<const char*, 9> kPlayerActions = {
    "waiting", "setting", "digging", "falling", "spiking", "blocking", "jumping", "moving", "standing"};

// Index of a group-activity name in kClassNames, or -1 when it is not one of them.
int label_index(std::string_view name);

// The notebook's video splits (B1Dataset.VIDEO_SPLITS, identical to the dataset's README).
enum class Split : uint8_t { Train, Val, Test, None };
const char* split_name(Split s);
Split parse_split(const std::string& name);  // "train" | "val" | "test"; anything else is an error
Split video_split(int video);                // None for an id outside the three lists
const std::vector<int>& split_videos(Split s);

struct PlayerBox {
  int x = 0, y = 0, w = 0, h = 0;  // pixels of the original frame
  std::string action;
};

struct ClipAnnotation {
  std::string frame_file;  // "29885.jpg", as written (the notebook's FrameID)
  int64_t frame_id = 0;    // 29885: the clip folder and the target frame
  std::string label;       // "r_spike"
  int label_index = -1;    // in kClassNames order
  std::vector<PlayerBox> players;
};

// Parses one non-blank line; `file` and `line_no` only name the place in error messages.
ClipAnnotation parse_annotation_line(std::string_view line, const std::string& file, int line_no);
// All clips of one annotations.txt, in file order. A missing or unreadable file is an error.
std::vector<ClipAnnotation> read_annotations(const std::string& path);

}  // namespace vb::data
