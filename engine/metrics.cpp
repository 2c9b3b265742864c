#include "engine/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>

namespace vb {
namespace {
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}
}  // namespace

Confusion Confusion::from_counts(int num_classes, const std::vector<int64_t>& counts) {
  Confusion c(num_classes);
  if (counts.size() == c.m_.size()) c.m_ = counts;
  return c;
}

int64_t Confusion::total() const {
  int64_t t = 0;
  for (int64_t v : m_) t += v;
  return t;
}
int64_t Confusion::correct() const {
  int64_t t = 0;
  for (int c = 0; c < k_; ++c) t += at(c, c);
  return t;
}
double Confusion::accuracy() const { return total() ? double(correct()) / double(total()) : 0.0; }
int64_t Confusion::support(int c) const {
  int64_t s = 0;
  for (int p = 0; p < k_; ++p) s += at(c, p);
  return s;
}
double Confusion::recall(int c) const {
  const int64_t s = support(c);
  return s ? double(at(c, c)) / double(s) : kNaN;
}
double Confusion::precision(int c) const {
  int64_t s = 0;
  for (int t = 0; t < k_; ++t) s += at(t, c);
  return s ? double(at(c, c)) / double(s) : kNaN;
}
double Confusion::f1(int c) const {
  const double p = precision(c), r = recall(c);
  if (std::isnan(p) || std::isnan(r)) return kNaN;
  return p + r > 0 ? 2 * p * r / (p + r) : 0.0;
}

std::string Confusion::to_text(const std::vector<std::string>& names) const {
  size_t w = 6;
  for (const auto& n : names) w = std::max(w, n.size());
  std::ostringstream os;
  os << std::string(w, ' ') << "  (rows: true, columns: predicted)\n" << std::string(w, ' ');
  for (int p = 0; p < k_; ++p) {
    const std::string n = names[size_t(p)].substr(0, 10);
    os << ' ' << std::string(10 - n.size(), ' ') << n;
  }
  os << "   total\n";
  for (int t = 0; t < k_; ++t) {
    os << names[size_t(t)] << std::string(w - names[size_t(t)].size(), ' ');
    for (int p = 0; p < k_; ++p) os << ' ' << fmt("%10.0f", double(at(t, p)));
    os << ' ' << fmt("%7.0f", double(support(t))) << "\n";
  }
  return os.str();
}

std::string Confusion::to_csv(const std::vector<std::string>& names) const {
  std::ostringstream os;
  os << "true\\pred";
  for (const auto& n : names) os << ',' << n;
  os << '\n';
  for (int t = 0; t < k_; ++t) {
    os << names[size_t(t)];
    for (int p = 0; p < k_; ++p) os << ',' << at(t, p);
    os << '\n';
  }
  return os.str();
}

std::string Confusion::report_text(const std::vector<std::string>& names) const {
  std::ostringstream os;
  os << "class         precision  recall     f1  support\n";
  auto pct = [](double v) { return std::isnan(v) ? std::string("     -") : fmt("%6.3f", v); };
  for (int c = 0; c < k_; ++c) {
    std::string n = names[size_t(c)];
    n.resize(12, ' ');
    os << n << "    " << pct(precision(c)) << "  " << pct(recall(c)) << "  " << pct(f1(c)) << "  "
       << fmt("%7.0f", double(support(c))) << "\n";
  }
  os << "accuracy " << fmt("%.4f", accuracy()) << " (" << correct() << " / " << total() << ")\n";
  return os.str();
}

std::string html_escape(const std::string& s) {
  std::string r;
  for (char c : s) {
    switch (c) {
      case '<': r += "&lt;"; break;
      case '>': r += "&gt;"; break;
      case '&': r += "&amp;"; break;
      case '"': r += "&quot;"; break;
      default: r += c;
    }
  }
  return r;
}

std::string Confusion::to_svg(const std::vector<std::string>& names, const std::string& title) const {
  const int cell = 64, left = 110, top = 60, size = cell * k_;
  std::ostringstream os;
  os << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << left + size + 20 << "\" height=\"" << top + size + 90
     << "\" font-family=\"sans-serif\" font-size=\"11\">\n";
  os << "<text x=\"" << left << "\" y=\"20\" font-size=\"14\" font-weight=\"bold\">" << html_escape(title) << "</text>\n";
  os << "<text x=\"" << left + size / 2 << "\" y=\"" << top - 28 << "\" text-anchor=\"middle\">predicted</text>\n";
  for (int t = 0; t < k_; ++t) {
    const int64_t s = support(t);
    for (int p = 0; p < k_; ++p) {
      const double frac = s ? double(at(t, p)) / double(s) : 0.0;
      const int shade = int(255 - 200 * frac);
      os << "<rect x=\"" << left + p * cell << "\" y=\"" << top + t * cell << "\" width=\"" << cell << "\" height=\""
         << cell << "\" fill=\"rgb(" << shade << "," << shade << ",255)\" stroke=\"#ccc\"/>";
      os << "<text x=\"" << left + p * cell + cell / 2 << "\" y=\"" << top + t * cell + cell / 2 + 4
         << "\" text-anchor=\"middle\" fill=\"" << (frac > 0.5 ? "white" : "black") << "\">" << at(t, p) << "</text>\n";
    }
    os << "<text x=\"" << left - 6 << "\" y=\"" << top + t * cell + cell / 2 + 4 << "\" text-anchor=\"end\">"
       << html_escape(names[size_t(t)]) << "</text>\n";
    os << "<text x=\"" << left + t * cell + cell / 2 << "\" y=\"" << top - 8 << "\" text-anchor=\"middle\">"
       << html_escape(names[size_t(t)]) << "</text>\n";
  }
  os << "<text x=\"" << left << "\" y=\"" << top + size + 24 << "\">rows: true class; accuracy "
     << fmt("%.4f", accuracy()) << " (" << correct() << " / " << total() << ")</text>\n</svg>\n";
  return os.str();
}

std::string svg_line_chart(const std::string& title, const std::string& y_label, const std::vector<Series>& series) {
  const int W = 560, H = 320, L = 60, R = 20, T = 36, B = 44;
  size_t n = 0;
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const auto& s : series) {
    n = std::max(n, s.values.size());
    for (double v : s.values)
      if (std::isfinite(v)) { lo = std::min(lo, v); hi = std::max(hi, v); }
  }
  if (!std::isfinite(lo)) { lo = 0; hi = 1; }
  if (hi - lo < 1e-12) { hi += 0.5; lo -= 0.5; }
  const double pad = 0.05 * (hi - lo);
  lo -= pad;
  hi += pad;
  auto X = [&](size_t i) { return L + (n > 1 ? double(i) / double(n - 1) : 0.5) * (W - L - R); };
  auto Y = [&](double v) { return T + (hi - v) / (hi - lo) * (H - T - B); };
  std::ostringstream os;
  os << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
     << "\" font-family=\"sans-serif\" font-size=\"11\">\n<text x=\"" << L << "\" y=\"20\" font-size=\"14\" "
     << "font-weight=\"bold\">" << html_escape(title) << "</text>\n";
  os << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << W - L - R << "\" height=\"" << H - T - B
     << "\" fill=\"none\" stroke=\"#888\"/>\n";
  for (int k = 0; k <= 4; ++k) {
    const double v = lo + (hi - lo) * k / 4.0;
    os << "<text x=\"" << L - 6 << "\" y=\"" << Y(v) + 4 << "\" text-anchor=\"end\">" << fmt("%.3g", v) << "</text>"
       << "<line x1=\"" << L << "\" x2=\"" << W - R << "\" y1=\"" << Y(v) << "\" y2=\"" << Y(v)
       << "\" stroke=\"#eee\"/>\n";
  }
  const size_t step = std::max<size_t>(1, (n + 9) / 10);
  for (size_t i = 0; i < n; i += step)
    os << "<text x=\"" << X(i) << "\" y=\"" << H - B + 16 << "\" text-anchor=\"middle\">" << i + 1 << "</text>\n";
  os << "<text x=\"" << (L + W - R) / 2 << "\" y=\"" << H - 8 << "\" text-anchor=\"middle\">epoch</text>\n";
  os << "<text x=\"14\" y=\"" << (T + H - B) / 2 << "\" transform=\"rotate(-90 14 " << (T + H - B) / 2
     << ")\" text-anchor=\"middle\">" << html_escape(y_label) << "</text>\n";
  int legend = 0;
  for (const auto& s : series) {
    std::string pts;
    for (size_t i = 0; i < s.values.size(); ++i)
      if (std::isfinite(s.values[i])) pts += fmt("%.1f", X(i)) + "," + fmt("%.1f", Y(s.values[i])) + " ";
    os << "<polyline fill=\"none\" stroke=\"" << s.color << "\" stroke-width=\"2\" points=\"" << pts << "\"/>\n";
    for (size_t i = 0; i < s.values.size(); ++i)
      if (std::isfinite(s.values[i]))
        os << "<circle cx=\"" << fmt("%.1f", X(i)) << "\" cy=\"" << fmt("%.1f", Y(s.values[i])) << "\" r=\"2.5\" fill=\""
           << s.color << "\"/>";
    os << "\n<rect x=\"" << W - R - 150 << "\" y=\"" << T + 8 + 16 * legend << "\" width=\"12\" height=\"3\" fill=\""
       << s.color << "\"/><text x=\"" << W - R - 132 << "\" y=\"" << T + 13 + 16 * legend << "\">"
       << html_escape(s.label) << "</text>\n";
    ++legend;
  }
  os << "</svg>\n";
  return os.str();
}

}  // namespace vb
