// vbtrain: one executable, one subcommand per job (train, eval, predict, verify, index, synth, bench, ...).
// Errors thrown anywhere become one line on stderr and exit code 1; bad flags exit with code 2.
#include <algorithm>
#include <cstdio>
#include <iostream>

#include "kernels/check.h"
#include "tools/commands.h"

namespace vb::tools {
std::vector<Command>& registry() {
  static std::vector<Command> r;
  return r;
}
}  // namespace vb::tools

int main(int argc, char** argv) {
  CLI::App app{"vbtrain: group-activity recognition on the Volleyball dataset (B1), in C++ and CUDA"};
  app.require_subcommand(1);
  auto& cmds = vb::tools::registry();
  std::sort(cmds.begin(), cmds.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  std::vector<std::pair<CLI::App*, std::function<int()>>> runs;
  try {
    for (auto& c : cmds) {
      CLI::App* sub = app.add_subcommand(c.name, c.help);
      runs.emplace_back(sub, c.setup(*sub));
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vbtrain: internal error setting up commands: %s\n", e.what());
    return 1;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (auto& [sub, run] : runs)
      if (sub->parsed()) return run();
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "vbtrain: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
