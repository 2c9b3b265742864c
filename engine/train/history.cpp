#include "engine/train/history.h"

#include <cstdio>
#include <fstream>
#include <sstream>

#include "engine/file_io.h"
#include "engine/text.h"

namespace fs = std::filesystem;

namespace vb {

std::string fmt_g(double v) {
  if (std::isnan(v)) return "nan";
  char b[40];
  std::snprintf(b, sizeof b, "%.9g", v);
  return b;
}

nlohmann::json EpochRow::to_json() const {
  nlohmann::json ca = nlohmann::json::array();
  for (double v : class_accuracy) ca.push_back(std::isnan(v) ? nlohmann::json(nullptr) : nlohmann::json(v));
  auto num = [](double v) { return std::isnan(v) ? nlohmann::json(nullptr) : nlohmann::json(v); };
  return {{"epoch", epoch},
          {"train_loss", num(train_loss)},
          {"val_loss", num(val_loss)},
          {"val_accuracy", num(val_accuracy)},
          {"val_class_accuracy", ca},
          {"lr", lr},
          {"images_per_s", images_per_s},
          {"seconds", seconds}};
}

EpochRow EpochRow::from_json(const nlohmann::json& j) {
  auto num = [](const nlohmann::json& v) { return v.is_null() ? double(NAN) : v.get<double>(); };
  EpochRow r;
  r.epoch = j.at("epoch");
  r.train_loss = num(j.at("train_loss"));
  r.val_loss = num(j.at("val_loss"));
  r.val_accuracy = num(j.at("val_accuracy"));
  for (const auto& v : j.at("val_class_accuracy")) r.class_accuracy.push_back(num(v));
  r.lr = j.at("lr");
  r.images_per_s = j.value("images_per_s", 0.0);
  r.seconds = j.value("seconds", 0.0);
  return r;
}

void write_metrics(const fs::path& dir, const std::vector<EpochRow>& rows) {
  std::ostringstream csv, jl;
  csv << "epoch,train_loss,val_loss,val_accuracy,lr,images_per_s,seconds";
  for (const auto& n : class_names()) csv << ",val_acc_" << n;
  csv << "\n";
  for (const EpochRow& r : rows) {
    csv << r.epoch << ',' << fmt_g(r.train_loss) << ',' << fmt_g(r.val_loss) << ',' << fmt_g(r.val_accuracy) << ','
        << fmt_g(r.lr) << ',' << fmt_g(r.images_per_s) << ',' << fmt_g(r.seconds);
    for (double v : r.class_accuracy) csv << ',' << fmt_g(v);
    csv << "\n";
    jl << r.to_json().dump() << "\n";
  }
  write_file_atomic((dir / "metrics.csv").string(), csv.str());
  write_file_atomic((dir / "metrics.jsonl").string(), jl.str());
}

std::vector<EpochRow> read_metrics(const fs::path& dir) {
  std::vector<EpochRow> rows;
  std::ifstream f(dir / "metrics.jsonl");
  std::string line;
  int n = 0;
  while (std::getline(f, line)) {
    ++n;
    if (line.empty()) continue;
    try {
      rows.push_back(EpochRow::from_json(nlohmann::json::parse(line)));
    } catch (const std::exception& e) {
      fail((dir / "metrics.jsonl").string(), ":", n, ": unreadable metrics line (", e.what(), ")");
    }
  }
  return rows;
}

void write_report(const fs::path& dir, const TrainOptions& opt, const std::string& model_desc,
                  const std::vector<EpochRow>& rows, const Confusion* val_best, int64_t best_epoch,
                  const Confusion* test) {
  std::vector<double> tl, vl, va;
  for (const auto& r : rows) {
    tl.push_back(r.train_loss);
    vl.push_back(r.val_loss);
    va.push_back(r.val_accuracy);
  }
  const auto names = class_names();
  std::ostringstream h;
  h << "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>vbtrain report</title>\n"
    << "<style>body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse}"
       "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}"
       "pre{background:#f8f8f8;padding:8px}</style></head><body>\n";
  h << "<h1>B1 training report</h1>\n<p>" << html_escape(model_desc) << "; data <code>" << html_escape(opt.data)
    << "</code>; " << rows.size() << " of " << opt.epochs << " epochs";
  if (!opt.preset.empty()) h << "; preset <b>" << html_escape(opt.preset) << "</b>";
  h << ".</p>\n";
  h << svg_line_chart("Training and Validation Loss", "loss",
                      {{"Training Loss", "#1f4fd0", tl}, {"Validation Loss", "#d0301f", vl}});
  h << svg_line_chart("Validation Accuracy", "accuracy", {{"Validation Accuracy", "#1f9d3a", va}});
  if (val_best) {
    h << "<h2>Validation confusion matrix (best epoch, " << best_epoch + 1 << ")</h2>\n";
    h << val_best->to_svg(names, "validation, epoch " + std::to_string(best_epoch + 1));
  }
  if (test) {
    h << "<h2>Test split (final model)</h2>\n" << test->to_svg(names, "test");
    h << "<pre>" << html_escape(test->report_text(names)) << "</pre>\n";
  }
  h << "<h2>Epochs</h2>\n<table><tr><th>epoch</th><th>train loss</th><th>val loss</th><th>val acc</th><th>lr</th>"
       "<th>img/s</th><th>s</th></tr>\n";
  for (const auto& r : rows)
    h << "<tr><td>" << r.epoch << "</td><td>" << fmt_g(r.train_loss) << "</td><td>" << fmt_g(r.val_loss)
      << "</td><td>" << fmt_g(r.val_accuracy) << "</td><td>" << fmt_g(r.lr) << "</td><td>"
      << int64_t(r.images_per_s) << "</td><td>" << fmt_g(r.seconds) << "</td></tr>\n";
  h << "</table>\n<h2>Configuration</h2>\n<pre>" << html_escape(json_dump(opt.to_json(), 2)) << "</pre>\n</body></html>\n";
  write_file_atomic((dir / "report.html").string(), h.str());
}

}  // namespace vb
