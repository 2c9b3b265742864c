#include "engine/progress.h"

#include <unistd.h>

#include <cmath>

namespace vb {

Progress::Progress(std::string label, int64_t total, double interval_s)
    : label_(std::move(label)), total_(total), interval_(interval_s), tty_(is_terminal()) {
  start_ = last_ = std::chrono::steady_clock::now();
}

bool Progress::is_terminal() { return ::isatty(STDERR_FILENO) == 1; }

std::string Progress::format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = int64_t(s + 0.5), h = t / 3600, m = (t / 60) % 60, sec = t % 60;
  char b[32];
  if (h) std::snprintf(b, sizeof b, "%lld:%02lld:%02lld", (long long)h, (long long)m, (long long)sec);
  else std::snprintf(b, sizeof b, "%lld:%02lld", (long long)m, (long long)sec);
  return b;
}

void Progress::update(int64_t done, int64_t images, double loss) {
  images_ += images;
  if (std::isfinite(loss)) { loss_sum_ += loss; ++loss_n_; }
  const auto now = std::chrono::steady_clock::now();
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  const double since = std::chrono::duration<double>(now - last_).count();
  if (!tty_ && since < interval_ && done < total_) return;
  if (tty_ && since < 0.1 && done < total_) return;
  last_ = now;
  const double rate = elapsed > 0 ? double(images_) / elapsed : 0.0;
  const double eta = done > 0 ? elapsed / double(done) * double(total_ - done) : NAN;
  const double mean_loss = loss_n_ ? loss_sum_ / double(loss_n_) : NAN;
  char line[256];
  if (tty_) {
    const int width = 24, filled = total_ ? int(double(width) * double(done) / double(total_)) : width;
    std::string bar = std::string(size_t(filled), '#') + std::string(size_t(width - filled), '.');
    int len = std::snprintf(line, sizeof line, "\r%s [%s] %lld/%lld  %.0f img/s  loss %.4f  ETA %s", label_.c_str(),
                            bar.c_str(), (long long)done, (long long)total_, rate, mean_loss,
                            format_duration(eta).c_str());
    std::string pad = size_t(len) < last_len_ ? std::string(last_len_ - size_t(len), ' ') : "";
    std::fprintf(stderr, "%s%s", line, pad.c_str());
    last_len_ = size_t(len);
  } else {
    std::fprintf(stderr, "%s %lld/%lld  %.0f img/s  loss %.4f  ETA %s\n", label_.c_str(), (long long)done,
                 (long long)total_, rate, mean_loss, format_duration(eta).c_str());
  }
  std::fflush(stderr);
}

void Progress::finish() {
  if (tty_ && last_len_) {
    std::fprintf(stderr, "\r%s\r", std::string(last_len_, ' ').c_str());
    std::fflush(stderr);
  }
}

}  // namespace vb
