// vbtrain index: the dataset index over videos/ written as the notebook's dataset.csv, with the per-split,
// per-class counts.
#include <cstdio>
#include <memory>

#include "data/dataset.h"
#include "kernels/check.h"
#include "tools/commands.h"

namespace {

struct IndexArgs {
  std::string data, out = "dataset.csv";
};

int run_index(const IndexArgs& a) {
  using namespace vb::data;
  DatasetIndex idx = build_index(a.data);
  std::printf("index: %s: %zu clips\n", idx.videos_dir.c_str(), idx.samples.size());
  for (const std::string& s : idx.skipped_entries) std::printf("  skipped: %s\n", vb::escape(s).c_str());
  write_dataset_csv(a.out, idx.samples);
  std::printf("wrote %s (FrameID,Label,video_names,Mapped_Label,img_path)\n\n", a.out.c_str());
  std::printf("%-12s %7s %7s %7s %7s\n", "class", "train", "val", "test", "other");
  std::array<std::array<int64_t, kNumClasses>, 4> c{};
  for (Split s : {Split::Train, Split::Val, Split::Test, Split::None})
    c[size_t(s)] = class_counts(select_split(idx.samples, s));
  std::array<int64_t, 4> tot{};
  for (int k = 0; k < kNumClasses; ++k) {
    std::printf("%-12s", kClassNames[size_t(k)]);
    for (size_t s = 0; s < 4; ++s) std::printf(" %7lld", (long long)c[s][size_t(k)]), tot[s] += c[s][size_t(k)];
    std::printf("\n");
  }
  std::printf("%-12s", "total");
  for (size_t s = 0; s < 4; ++s) std::printf(" %7lld", (long long)tot[s]);
  std::printf("\n");
  if (tot[3]) std::printf("note: %lld clips belong to videos outside the notebook's splits\n", (long long)tot[3]);
  return 0;
}

}  // namespace

VB_COMMAND("index", "Index a Volleyball videos/ folder into the notebook's dataset.csv and print the class counts",
           [](CLI::App& app) -> std::function<int()> {
             auto a = std::make_shared<IndexArgs>();
             app.add_option("--data", a->data, "the videos/ folder or its parent")->required();
             app.add_option("--out", a->out, "output csv (default dataset.csv)");
             return [a] { return run_index(*a); };
           });
