// libFuzzer target: safetensors bytes to a state dict, through the format detection `--weights` uses.
// Every input must end in a state dict or a vb::Error, without allocating what the header merely declares.
#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/state_dict.h"
#include "engine/weights.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  try {
    (void)vb::parse_safetensors(bytes, "fuzz.safetensors");
  } catch (const vb::Error&) {
  }
  try {
    (void)vb::load_state_dict_bytes(bytes, "fuzz.safetensors");
  } catch (const vb::Error&) {
  }
  return 0;
}
