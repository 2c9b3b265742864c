// Running the project's executables from a test: the exit code (128 + signal when killed) and the combined
// stdout + stderr.
#pragma once
#include <sys/wait.h>

#include <cstdio>
#include <string>

#include "tests/test_util.h"

namespace vbtest {

struct RunResult {
  int code = -1;
  std::string out;
};

// `tool` is a path under the build folder (e.g. "tools/vbtrain"); `args` go to the shell as written.
inline RunResult run_tool(const std::string& tool, const std::string& args) {
  RunResult r;
  const std::string cmd = binary_dir() + "/" + tool + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int st = pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

inline RunResult run_vbtrain(const std::string& args) { return run_tool("tools/vbtrain", args); }

}  // namespace vbtest
