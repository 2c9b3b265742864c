#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "engine/state_dict.h"

namespace vb {

StateDict load_safetensors(const std::string& path) { return parse_safetensors(read_file(path), path); }

StateDict parse_safetensors(const std::string& buf, const std::string& path) {
  if (buf.size() < 8) fail(path, ": truncated safetensors file (", buf.size(), " bytes)");
  uint64_t hlen = 0;
  std::memcpy(&hlen, buf.data(), 8);
  if (hlen > buf.size() - 8) fail(path, ": not a safetensors file, or truncated (header of ", hlen, " bytes in a file of ", buf.size(), ")");
  nlohmann::ordered_json h;
  try {
    h = nlohmann::ordered_json::parse(buf.begin() + 8, buf.begin() + 8 + long(hlen));
  } catch (const std::exception& e) {
    fail(path, ": not a safetensors file (header is not JSON: ", e.what(), ")");
  }
  if (!h.is_object()) fail(path, ": not a safetensors file (header is not a JSON object)");
  const size_t base = 8 + hlen, data_size = buf.size() - base;
  StateDict sd;
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (it.value().is_object())
        for (auto m = it.value().begin(); m != it.value().end(); ++m)
          if (m.value().is_string()) sd.metadata[m.key()] = m.value().get<std::string>();
      continue;
    }
    const auto& e = it.value();
    try {
      HostTensor t(e.at("shape").get<Shape>(), dtype_from_name(e.at("dtype").get<std::string>()));
      auto off = e.at("data_offsets").get<std::vector<uint64_t>>();
      if (off.size() != 2 || off[0] > off[1] || off[1] > data_size)
        fail("data offsets out of range (file truncated?)");
      if (off[1] - off[0] != t.bytes.size())
        fail("data size ", off[1] - off[0], " does not match shape ", shape_str(t.shape), " of ", dtype_name(t.dtype));
      std::memcpy(t.bytes.data(), buf.data() + base + off[0], t.bytes.size());
      sd.set(it.key(), std::move(t));
    } catch (const Error& err) {
      fail(path, ": tensor '", it.key(), "': ", err.what());
    } catch (const std::exception& err) {
      fail(path, ": tensor '", it.key(), "': malformed header entry (", err.what(), ")");
    }
  }
  return sd;
}

void save_safetensors(const std::string& path, const StateDict& sd) {
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!sd.metadata.empty()) h["__metadata__"] = sd.metadata;
  uint64_t off = 0;
  for (const auto& k : sd.order) {
    const HostTensor& t = sd.map.at(k);
    h[k] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes.size()}}};
    off += t.bytes.size();
  }
  std::string header = h.dump();
  while ((8 + header.size()) % 8) header.push_back(' ');  // the data starts 8-byte aligned
  std::string out(8, '\0');
  uint64_t hlen = header.size();
  std::memcpy(out.data(), &hlen, 8);
  out += header;
  out.reserve(out.size() + off);
  for (const auto& k : sd.order) {
    const HostTensor& t = sd.map.at(k);
    out.append(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  }
  write_file_atomic(path, out);
}

}  // namespace vb
