// `--image-size S` or `--image-size HxW` (height x width) for every subcommand, read by data::parse_image_size
// so that every command accepts and refuses the same texts.
#pragma once
#include <CLI/CLI.hpp>
#include <string>

#include "data/image.h"
#include "kernels/check.h"

namespace vb::tools {

inline CLI::Option* add_image_size_option(CLI::App& app, data::ImageSize& target, const std::string& help) {
  return app
      .add_option_function<std::string>(
          "--image-size",
          [&target](const std::string& s) {
            try {
              const data::ImageSize v = data::parse_image_size(s);
              if (v.h < 32 || v.w < 32 || v.h > 4096 || v.w > 4096)
                fail("image size '", escape(s), "': each side must be from 32 to 4096");
              target = v;
            } catch (const std::exception& e) {  // a parse error, reported by CLI11 with exit code 2
              throw CLI::ValidationError("--image-size", e.what());
            }
          },
          help)
      ->type_name("S|HxW");
}

}  // namespace vb::tools
