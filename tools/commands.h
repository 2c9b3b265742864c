// vbtrain's subcommands register themselves here: each tools/cmd_*.cpp defines one with VB_COMMAND, so
// commands are added without touching a central table. The main program builds a CLI11 app from them.
// Also the pieces every top-level program shares: option validators that refuse nonsense (NaN, infinities,
// negative counts, absurd thread counts) with the option's name, and the one error style (run_guarded).
#pragma once
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <new>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "engine/text.h"

namespace vb::tools {

struct Command {
  std::string name;
  std::string help;
  // Declares the subcommand's options on `app` and returns the function to run after parsing (its return
  // value is the exit code). The options' storage must outlive the call, e.g. a shared_ptr captured by it.
  std::function<std::function<int()>(CLI::App& app)> setup;
};

std::vector<Command>& registry();

struct Registrar {
  explicit Registrar(Command c) { registry().push_back(std::move(c)); }
};

// More threads than this is a typo, not a machine: refused before any thread is started (thread creation
// would otherwise fail with the system's "Resource temporarily unavailable").
constexpr int kMaxThreads = 1024;

// A real number in [lo, hi] (bounds included unless the *_open flags say otherwise); NaN and infinities are
// refused (CLI11's own PositiveNumber and Range let NaN through, since every comparison with NaN is false).
inline CLI::Validator finite_number(double lo, double hi, bool lo_open = false, bool hi_open = false) {
  auto describe = [=] {
    std::string s = "a finite number";
    auto num = [](double v) {
      std::ostringstream o;
      o << v;
      return o.str();
    };
    if (lo > -std::numeric_limits<double>::max()) s += std::string(lo_open ? " > " : " >= ") + num(lo);
    if (hi < std::numeric_limits<double>::max()) s += std::string(lo > -std::numeric_limits<double>::max() ? " and" : "") +
                                                      (hi_open ? " < " : " <= ") + num(hi);
    return s;
  };
  return CLI::Validator(
      [=](std::string& in) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(in, v)) return "'" + in + "' is not a number";
        const bool ok = std::isfinite(v) && (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
        return ok ? std::string() : "must be " + describe() + ", got '" + in + "'";
      },
      "(" + describe() + ")", "finite_number");
}
inline CLI::Validator positive_number() { return finite_number(0, std::numeric_limits<double>::max(), true); }
inline CLI::Validator non_negative_number() { return finite_number(0, std::numeric_limits<double>::max()); }
// An integer in [lo, hi], written as one: "-1", "1e3", "2.5" and "0x10" are refused with the option's name
// (CLI11 would read "-1" into an unsigned option as 2^64-1).
inline CLI::Validator integer_in(long long lo, long long hi) {
  return CLI::Validator(
      [=](std::string& in) -> std::string {
        std::string_view s = in;
        size_t i = (!s.empty() && (s[0] == '-' || s[0] == '+')) ? 1 : 0;
        bool digits = i < s.size();
        for (size_t k = i; k < s.size(); ++k) digits = digits && s[k] >= '0' && s[k] <= '9';
        long double v = digits ? std::strtold(in.c_str(), nullptr) : 0;
        if (!digits || v < (long double)lo || v > (long double)hi)
          return "must be an integer from " + std::to_string(lo) + " to " + std::to_string(hi) + ", got '" + in + "'";
        return std::string();
      },
      "(" + std::to_string(lo) + ".." + std::to_string(hi) + ")", "integer_in");
}
inline CLI::Validator thread_count() { return integer_in(0, kMaxThreads); }
inline CLI::Validator seed_value() { return integer_in(0, std::numeric_limits<long long>::max()); }

// A message made safe for one line of a terminal: valid UTF-8 stays (so do backslashes, which inner
// messages already use for their own escapes), control characters and invalid bytes become \xHH; at most
// `max` bytes, then "...".
inline std::string one_line(std::string_view s, size_t max = 4000) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  auto esc = [&](unsigned char c) {
    out += "\\x";
    out += hex[c >> 4];
    out += hex[c & 15];
  };
  size_t i = 0;
  while (i < s.size()) {
    if (out.size() >= max) {
      out += "...";
      break;
    }
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      if (c < 0x20 || c == 0x7f)
        esc(c);
      else
        out += char(c);
      ++i;
      continue;
    }
    const size_t n = utf8_sequence_length(s, i);
    // C1 controls (U+0080..U+009F) are valid UTF-8 but terminal escapes (U+009B is CSI): escaped too.
    const bool ok = n > 0 && !(n == 2 && c == 0xc2 && static_cast<unsigned char>(s[i + 1]) < 0xa0);
    if (ok) {
      out.append(s.substr(i, n));
      i += n;
    } else {
      esc(c);
      ++i;
    }
  }
  return out;
}

// The one error style of every top-level program: runs `fn` and turns whatever it throws into one line
// "<program>: error: <message>" on stderr and exit code 1. Nothing reaches std::terminate: std::bad_alloc
// becomes "out of memory while <activity>", anything not derived from std::exception is reported too.
inline int run_guarded(const char* program, const std::string& activity, const std::function<int()>& fn) {
  auto report = [&](const std::string& msg) {
    std::fflush(stdout);
    std::fprintf(stderr, "%s: error: %s\n", program, one_line(msg).c_str());
    std::fflush(stderr);
  };
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    report("out of memory while " + activity);
  } catch (const std::exception& e) {
    report(e.what());
  } catch (...) {
    report("unexpected failure (a non-standard exception) while " + activity);
  }
  return 1;
}

// Parse errors in the same style: one line, exit code 2 (help and --version still print as CLI11 does).
inline int parse_error(CLI::App& app, const CLI::ParseError& e, const char* program) {
  if (e.get_exit_code() == 0) return app.exit(e);
  std::fflush(stdout);
  std::fprintf(stderr, "%s: error: %s (see %s --help)\n", program, one_line(e.what()).c_str(), program);
  return 2;
}

}  // namespace vb::tools

#define VB_COMMAND_CAT2(a, b) a##b
#define VB_COMMAND_CAT(a, b) VB_COMMAND_CAT2(a, b)
// VB_COMMAND("name", "help", [](CLI::App& app) -> std::function<int()> { ... })
#define VB_COMMAND(name, help, setup) \
  static ::vb::tools::Registrar VB_COMMAND_CAT(vb_command_, __LINE__){::vb::tools::Command{name, help, setup}}
