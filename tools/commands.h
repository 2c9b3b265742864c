// vbtrain's subcommands register themselves here: each tools/cmd_*.cpp defines one with VB_COMMAND, so
// commands are added without touching a central table. The main program builds a CLI11 app from them.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

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

}  // namespace vb::tools

#define VB_COMMAND_CAT2(a, b) a##b
#define VB_COMMAND_CAT(a, b) VB_COMMAND_CAT2(a, b)
// VB_COMMAND("name", "help", [](CLI::App& app) -> std::function<int()> { ... })
#define VB_COMMAND(name, help, setup) \
  static ::vb::tools::Registrar VB_COMMAND_CAT(vb_command_, __LINE__){::vb::tools::Command{name, help, setup}}
