// libFuzzer target: a whole PyTorch file (zip or legacy torch.save) to a state dict, as `--weights`,
// `--model`, `--resume` and vbconvert read one. Every input must end in a state dict or a vb::Error.
#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/pth.h"
#include "engine/weights.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  try {
    vb::pickle::ValuePtr root = vb::parse_pth(bytes, "fuzz.pth");
    (void)vb::pickle::describe(*root);
    (void)vb::state_dict_from_value(root, "fuzz.pth");
  } catch (const vb::Error&) {
  }
  return 0;
}
