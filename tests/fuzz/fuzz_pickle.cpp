// libFuzzer target: the unpickler on raw bytes, with the .pth reader's allow-list but no callbacks (calls
// build plain Objects). Every input must end in a value or a vb::Error: no crash, leak, sanitizer report,
// runaway memory or time. Built and run by tools/fuzz.sh.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "engine/pickle.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const vb::pickle::Options opt = [] {
    vb::pickle::Options o;
    o.allowed_globals = {"torch._utils._rebuild_tensor_v2", "torch.FloatStorage", "torch.LongStorage",
                         "torch._utils._rebuild_parameter", "torch.device"};
    o.persistent_load = [](const vb::pickle::ValuePtr& pid) { return pid; };  // any id stands for itself
    return o;
  }();
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  try {
    size_t pos = 0;
    vb::pickle::ValuePtr v = vb::pickle::unpickle(bytes, pos, opt, "fuzz");
    (void)vb::pickle::describe(*v);
    (void)v->get("state_dict");
    (void)v->get_int(0);
  } catch (const vb::Error&) {
  }
  return 0;
}
