// A safe unpickler for the pickles torch.save writes (protocol 2, plus the protocol 3-4 opcodes a newer
// writer may emit). It builds a small value tree and never executes anything: a GLOBAL must be on an
// allow-list, and calling one (REDUCE, NEWOBJ) goes through a callback the caller supplies, so the only
// "objects" that can come out of a file are the ones the caller chose to build.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "engine/tensor.h"

namespace vb::pickle {

struct Value;
using ValuePtr = std::shared_ptr<Value>;

enum class Type : uint8_t {
  None, Bool, Int, BigInt, Float, Str, Bytes, List, Tuple, Dict,
  Global,  // an allow-listed name not yet called: `str` holds "module.name"
  Object,  // what a callback built: `str` names it, `items` its arguments, `payload` anything it keeps
  Tensor   // a tensor leaf: `tensor` (the pth reader materialises these)
};
const char* type_name(Type t);

struct Value {
  Type type = Type::None;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string str;                                  // Str, Bytes, Global/Object name; BigInt: LE two's complement
  std::vector<ValuePtr> items;                      // List, Tuple, Object arguments
  std::vector<std::pair<ValuePtr, ValuePtr>> dict;  // Dict, in insertion order
  ValuePtr state;                                   // what BUILD attached (e.g. an OrderedDict's _metadata)
  std::shared_ptr<void> payload;                    // a callback's own data (storages, pending tensors)
  std::shared_ptr<HostTensor> tensor;               // Tensor

  Value() = default;
  Value(const Value&) = delete;
  Value& operator=(const Value&) = delete;
  // Iterative: a value nested a million levels deep is released without a million nested destructor calls.
  ~Value();

  static ValuePtr make(Type t) {
    auto v = std::make_shared<Value>();
    v->type = t;
    return v;
  }
  static ValuePtr make_int(int64_t x) { auto v = make(Type::Int); v->i = x; return v; }
  static ValuePtr make_str(std::string s) { auto v = make(Type::Str); v->str = std::move(s); return v; }

  bool is(Type t) const { return type == t; }
  bool is_number() const { return type == Type::Int || type == Type::Float || type == Type::Bool; }
  double as_double() const;  // Int, Float, Bool; errors otherwise
  int64_t as_int() const;    // Int, Bool; errors otherwise
  // Dict lookup by string or integer key; null when absent (or when this is not a Dict).
  ValuePtr get(std::string_view key) const;
  ValuePtr get_int(int64_t key) const;
  // Inserts or replaces (a replaced key keeps its place), as Python's dict does. Hashed: a dict of n keys
  // is built in O(n), not O(n^2) (a hostile 300,000-key dict must not take minutes).
  void set_item(ValuePtr key, ValuePtr value);

 private:
  // Dict: key hash -> position in `dict`, built once the dict is large enough for hashing to pay; rebuilt
  // when `dict` was changed behind set_item's back (its size no longer matches index_size_).
  mutable std::unique_ptr<std::unordered_multimap<uint64_t, size_t>> index_;
  mutable size_t index_size_ = 0;
  const std::unordered_multimap<uint64_t, size_t>* sync_index() const;  // null for a small dict
};

struct Options {
  // Globals the file may name, as "module.name" ("torch._utils._rebuild_tensor_v2"). collections.OrderedDict
  // is always allowed and builds an empty Dict.
  std::set<std::string> allowed_globals;
  // Called for REDUCE / NEWOBJ on an allowed global (other than OrderedDict): returns the built value.
  // When unset, such a call yields an Object holding the name and arguments.
  std::function<ValuePtr(const std::string& global, const std::vector<ValuePtr>& args)> call;
  // BINPERSID / PERSID: the persistent id (a tuple for torch) to the object it stands for. Unset: an error.
  std::function<ValuePtr(const ValuePtr& pid)> persistent_load;
  // Limits, each a clear error when exceeded: how deep containers may nest (a checkpoint nests about ten
  // levels), and how many values the opcodes may push (a ResNet-50 checkpoint with its AdamW state pushes
  // about 20,000; each value costs about 200 bytes, so the default bounds the tree near 200 MB).
  int max_depth = 1000;
  uint64_t max_values = uint64_t(1) << 20;
};

// Unpickles one pickle starting at `data[pos]`; on return `pos` is just past its STOP opcode. Errors
// (vb::Error) name `what` (usually the file and entry), the byte offset and the problem: truncated,
// unsupported opcode, a global not on the allow-list, a malformed stack, a container holding itself, nesting
// deeper than opt.max_depth, more than opt.max_values values. Nothing recurses on the nesting depth.
ValuePtr unpickle(std::string_view data, size_t& pos, const Options& opt, const std::string& what);

// A short description of a value for error messages: "dict (3 items)", "str 'abc'", "int 5".
std::string describe(const Value& v);

}  // namespace vb::pickle
