// libFuzzer target: an annotations.txt, line by line as read_annotations splits it. Every line must parse
// or give a vb::Error naming file:line.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "data/annotations.h"
#include "kernels/check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  int n = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos) nl = text.size();
    const std::string_view line = text.substr(pos, nl - pos);
    pos = nl + 1;
    ++n;
    if (line.find_first_not_of(" \t\r\v\f") == std::string_view::npos) continue;
    try {
      (void)vb::data::parse_annotation_line(line, "annotations.txt", n);
    } catch (const vb::Error&) {
    }
  }
  return 0;
}
