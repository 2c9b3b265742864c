// Classification metrics: the confusion matrix and what is read off it (accuracy, per-class accuracy =
// recall, precision, F1), printed as text, CSV or SVG.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace vb {

class Confusion {
 public:
  explicit Confusion(int num_classes) : k_(num_classes), m_(size_t(num_classes) * num_classes, 0) {}
  void add(int truth, int predicted) { ++m_[size_t(truth) * k_ + predicted]; }
  int num_classes() const { return k_; }
  int64_t at(int truth, int predicted) const { return m_[size_t(truth) * k_ + predicted]; }
  int64_t total() const;
  int64_t correct() const;
  double accuracy() const;           // correct / total (0 when empty)
  double recall(int c) const;        // = per-class accuracy; NaN when the class has no sample
  double precision(int c) const;     // NaN when nothing was predicted as c
  double f1(int c) const;            // NaN when precision or recall is
  int64_t support(int c) const;      // samples whose truth is c
  const std::vector<int64_t>& counts() const { return m_; }  // row-major [truth][predicted]
  static Confusion from_counts(int num_classes, const std::vector<int64_t>& counts);

  std::string to_text(const std::vector<std::string>& names) const;  // aligned table with totals
  std::string to_csv(const std::vector<std::string>& names) const;   // header "true\\pred,<names>"
  std::string to_svg(const std::vector<std::string>& names, const std::string& title) const;
  std::string report_text(const std::vector<std::string>& names) const;  // precision/recall/F1 per class

 private:
  int k_;
  std::vector<int64_t> m_;
};

// A line chart as inline SVG: one or more series over epochs 1..n (NaN points are skipped).
struct Series {
  std::string label, color;
  std::vector<double> values;
};
std::string svg_line_chart(const std::string& title, const std::string& y_label, const std::vector<Series>& series);

std::string html_escape(const std::string& s);

}  // namespace vb
