// Running the project's executables from a test (exit code, 128 + signal when killed, and stdout + stderr
// together), a private scratch folder per test process, and the files a run leaves, read back.
#pragma once
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "tests/test_util.h"

namespace vbtest {

struct Result {
  int code = -1;
  std::string out;  // stdout and stderr together
  size_t lines() const { return size_t(std::count(out.begin(), out.end(), '\n')); }
  bool has(const std::string& s) const { return out.find(s) != std::string::npos; }
};
using RunResult = Result;

// `tool` is an executable of the build's tools/ folder ("vbtrain", "vbconvert"); `args` go through sh as written.
inline Result run_tool(const std::string& tool, const std::string& args) {
  Result r;
  const std::string cmd = binary_dir() + "/tools/" + tool + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int st = pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}
inline Result run_vbtrain(const std::string& args) { return run_tool("vbtrain", args); }

// A fresh folder under the system's temporary folder, one per test process: <tmp>/<prefix>_<pid>.
inline std::filesystem::path scratch_dir(const std::string& prefix) {
  std::filesystem::path d = std::filesystem::temp_directory_path() / (prefix + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

// A scratch folder of the test process, removed with everything in it at exit: <tmp>/<prefix>_<pid>.
struct TempDir {
  std::filesystem::path dir;
  explicit TempDir(const std::string& prefix)
      : dir(std::filesystem::temp_directory_path() / (prefix + "_" + std::to_string(::getpid()))) {
    std::filesystem::create_directories(dir);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  std::string file(const std::string& name) const { return (dir / name).string(); }
};

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), long(bytes.size()));
  REQUIRE(f.good());
}

inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// The learning columns of a run's metrics.jsonl (timings left out), as text: equal means bit-for-bit equal.
inline std::vector<std::string> learning_rows(const std::filesystem::path& run_dir) {
  std::vector<std::string> rows;
  std::ifstream f(run_dir / "metrics.jsonl");
  std::string line;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line);
    j.erase("images_per_s");
    j.erase("seconds");
    rows.push_back(j.dump());
  }
  return rows;
}

}  // namespace vbtest
