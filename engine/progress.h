// Progress of long work: on a terminal, one line redrawn in place (step/total, img/s, loss, ETA); otherwise
// (a log file, CI) a plain line every `interval` seconds, so logs stay readable.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace vb {

class Progress {
 public:
  Progress(std::string label, int64_t total, double interval_s = 10.0);
  // After each step: images in the step and its loss (NaN when none).
  void update(int64_t done, int64_t images, double loss);
  void finish();  // clears the in-place line
  static bool is_terminal();
  static std::string format_duration(double seconds);  // "1:02:03" / "2:03"

 private:
  std::string label_;
  int64_t total_;
  double interval_;
  bool tty_;
  int64_t images_ = 0;
  double loss_sum_ = 0;
  int64_t loss_n_ = 0;
  std::chrono::steady_clock::time_point start_, last_;
  size_t last_len_ = 0;
};

}  // namespace vb
