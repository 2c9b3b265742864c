// A state dict: named host tensors in insertion order (PyTorch's order is kept when a file is read).
#pragma once
#include <map>
#include <string>
#include <vector>

#include "engine/file_io.h"
#include "engine/tensor.h"

namespace vb {

struct StateDict {
  std::vector<std::string> order;        // names in insertion order
  std::map<std::string, HostTensor> map;  // name -> tensor
  std::map<std::string, std::string> metadata;  // free-form string metadata (safetensors "__metadata__")

  bool has(const std::string& k) const { return map.count(k) != 0; }
  size_t size() const { return order.size(); }
  // Inserts or replaces (a replaced name keeps its place).
  void set(const std::string& k, HostTensor t) {
    if (!has(k)) order.push_back(k);
    map[k] = std::move(t);
  }
  const HostTensor& at(const std::string& k) const {
    auto it = map.find(k);
    if (it == map.end()) fail("missing tensor '", k, "'");
    return it->second;
  }
  HostTensor& at(const std::string& k) {
    auto it = map.find(k);
    if (it == map.end()) fail("missing tensor '", k, "'");
    return it->second;
  }
  void erase(const std::string& k) {
    if (!map.erase(k)) return;
    for (size_t i = 0; i < order.size(); ++i)
      if (order[i] == k) { order.erase(order.begin() + long(i)); break; }
  }
};

// safetensors: 8-byte little-endian header size, JSON header {name: {dtype, shape, data_offsets}}, raw data.
// Errors name the file and the problem (truncated, bad header, offsets out of range).
StateDict load_safetensors(const std::string& path);
// The same from the file's bytes (`path` only names it in messages).
StateDict parse_safetensors(const std::string& bytes, const std::string& path);
// Writes atomically: a temporary file next to `path`, flushed, then renamed over it.
void save_safetensors(const std::string& path, const StateDict& sd);


}  // namespace vb
