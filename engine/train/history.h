// A run's history, one row per finished epoch: metrics.csv and metrics.jsonl (written whole, atomically,
// after every epoch; read back when a run resumes) and report.html (the notebook's plots, the confusion
// matrices, the epoch table and the configuration).
#pragma once
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/metrics.h"
#include "engine/train/options.h"

namespace vb {

struct EpochRow {
  int64_t epoch = 0;  // 1-based, as printed
  double train_loss = NAN, val_loss = NAN, val_accuracy = NAN, lr = NAN, images_per_s = 0, seconds = 0;
  std::vector<double> class_accuracy;  // per class, validation

  nlohmann::json to_json() const;  // a line of metrics.jsonl (NaN as null)
  static EpochRow from_json(const nlohmann::json& j);
};

// "%.9g", or "nan": how metrics.csv and the report write numbers.
std::string fmt_g(double v);

void write_metrics(const std::filesystem::path& dir, const std::vector<EpochRow>& rows);
// The rows of dir/metrics.jsonl (none when it is missing); throws naming the line of an unreadable one.
std::vector<EpochRow> read_metrics(const std::filesystem::path& dir);

// report.html: `val_best` (the best epoch's validation confusion) and `test` may be null.
void write_report(const std::filesystem::path& dir, const TrainOptions& opt, const std::string& model_desc,
                  const std::vector<EpochRow>& rows, const Confusion* val_best, int64_t best_epoch,
                  const Confusion* test);

}  // namespace vb
