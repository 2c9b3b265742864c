#include <climits>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "engine/state_dict.h"

namespace vb {

StateDict load_safetensors(const std::string& path) { return parse_safetensors(read_file(path), path); }

namespace {

// A JSON value that must be a non-negative integer (a dimension or an offset); nlohmann would otherwise
// convert a float, a negative number or a huge unsigned one silently.
uint64_t json_count(const nlohmann::ordered_json& v, const char* what) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer()) fail(what, " ", v.get<int64_t>(), " is negative");
  fail(what, " is ", escape(v.dump(), 40), ", not a non-negative integer");
}

}  // namespace

StateDict parse_safetensors(const std::string& buf, const std::string& path_raw) {
  const std::string path = escape(path_raw);
  if (buf.size() < 8) fail(path, ": truncated safetensors file (", buf.size(), " bytes)");
  uint64_t hlen = 0;
  std::memcpy(&hlen, buf.data(), 8);
  if (hlen > buf.size() - 8) fail(path, ": not a safetensors file, or truncated (header of ", hlen, " bytes in a file of ", buf.size(), ")");
  nlohmann::ordered_json h;
  try {
    h = nlohmann::ordered_json::parse(buf.begin() + 8, buf.begin() + 8 + long(hlen));
  } catch (const std::exception& e) {
    fail(path, ": not a safetensors file (header is not JSON: ", escape(e.what()), ")");
  }
  if (!h.is_object()) fail(path, ": not a safetensors file (header is not a JSON object)");
  const uint64_t base = 8 + hlen, data_size = buf.size() - base;
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
      if (!e.is_object()) fail("entry is ", escape(e.dump(), 40), ", not an object");
      if (!e.contains("dtype") || !e["dtype"].is_string()) fail("no dtype string");
      const std::string dname = e["dtype"].get<std::string>();
      DType dt;
      try {
        dt = dtype_from_name(dname);
      } catch (const Error&) {
        fail("unsupported dtype '", escape(dname, 40), "'");
      }
      if (!e.contains("shape") || !e["shape"].is_array()) fail("no shape list");
      if (!e.contains("data_offsets") || !e["data_offsets"].is_array() || e["data_offsets"].size() != 2)
        fail("data_offsets is not a pair of integers");
      // Everything from the header is checked in 64-bit arithmetic that cannot wrap, against the bytes the
      // file really holds, before anything is allocated: 82 bytes cannot declare 2^34 elements.
      Shape shape;
      uint64_t count = 1;
      for (const auto& d : e["shape"]) {
        const uint64_t n = json_count(d, "dimension");
        if (n > uint64_t(INT64_MAX) || (n != 0 && count > uint64_t(INT64_MAX) / n))
          fail("shape ", escape(e["shape"].dump(), 80), " has more elements than 64 bits can count");
        count *= n;
        shape.push_back(int64_t(n));
      }
      const uint64_t b0 = json_count(e["data_offsets"][0], "data offset"), b1 = json_count(e["data_offsets"][1], "data offset");
      if (b0 > b1 || b1 > data_size)
        fail("data offsets [", b0, ", ", b1, "] lie outside the ", data_size, " data bytes of the file (truncated?)");
      if (count > (b1 - b0) / dtype_size(dt) || count * dtype_size(dt) != b1 - b0)
        fail("shape ", shape_str(shape), " of ", dtype_name(dt), " does not match its ", b1 - b0, " data bytes");
      HostTensor t(std::move(shape), dt);
      if (!t.bytes.empty()) std::memcpy(t.bytes.data(), buf.data() + base + b0, t.bytes.size());
      if (sd.has(it.key())) fail("appears twice");
      sd.set(it.key(), std::move(t));
    } catch (const Error& err) {
      fail(path, ": tensor '", escape(it.key()), "': ", err.what());
    } catch (const std::exception& err) {
      fail(path, ": tensor '", escape(it.key()), "': malformed header entry (", escape(err.what()), ")");
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
