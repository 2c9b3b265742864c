// vbtrain: one executable, one subcommand per job (train, eval, predict, verify, index, synth, bench, ...).
// Every failure is one line "vbtrain: error: <message>" on stderr: errors thrown anywhere (and anything else
// thrown, and running out of memory) exit with code 1, bad flags with code 2.
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
  return vb::tools::run_guarded("vbtrain", "starting", [&]() -> int {
    CLI::App app{"vbtrain: group-activity recognition on the Volleyball dataset (B1), in C++ and CUDA"};
    app.require_subcommand(1);
    auto& cmds = vb::tools::registry();
    std::sort(cmds.begin(), cmds.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
    std::vector<std::pair<CLI::App*, std::function<int()>>> runs;
    for (auto& c : cmds) {
      CLI::App* sub = app.add_subcommand(c.name, c.help);
      runs.emplace_back(sub, c.setup(*sub));
    }
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      return vb::tools::parse_error(app, e, "vbtrain");
    }
    for (auto& [sub, run] : runs)
      if (sub->parsed())
        return vb::tools::run_guarded("vbtrain", "running 'vbtrain " + sub->get_name() + "'", run);
    return 0;
  });
}
