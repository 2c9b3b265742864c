#include "engine/pickle.h"

#include <algorithm>
#include <cstring>
#include <unordered_map>
#include <unordered_set>

namespace vb::pickle {

const char* type_name(Type t) {
  switch (t) {
    case Type::None: return "None";
    case Type::Bool: return "bool";
    case Type::Int: return "int";
    case Type::BigInt: return "int";
    case Type::Float: return "float";
    case Type::Str: return "str";
    case Type::Bytes: return "bytes";
    case Type::List: return "list";
    case Type::Tuple: return "tuple";
    case Type::Dict: return "dict";
    case Type::Global: return "global";
    case Type::Object: return "object";
    case Type::Tensor: return "tensor";
  }
  return "?";
}

double Value::as_double() const {
  switch (type) {
    case Type::Int: return double(i);
    case Type::Float: return f;
    case Type::Bool: return b ? 1.0 : 0.0;
    default: fail("expected a number, found ", describe(*this));
  }
}

int64_t Value::as_int() const {
  switch (type) {
    case Type::Int: return i;
    case Type::Bool: return b ? 1 : 0;
    default: fail("expected an integer, found ", describe(*this));
  }
}

namespace {

constexpr size_t kIndexFrom = 16;  // below this many keys a scan is as fast as a hash

uint64_t mix(uint64_t h) {  // splitmix64's finaliser
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ULL;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebULL;
  return h ^ (h >> 31);
}
uint64_t hash_int(int64_t x) { return mix(uint64_t(x) ^ 0x1000); }
uint64_t hash_text(Type t, std::string_view s) { return mix(std::hash<std::string_view>{}(s) + uint64_t(t)); }

// A hash consistent with same_key below: equal keys hash alike. Not recursive: a tuple hashes its size and
// its scalar members only (nested containers add their type), so no key can make this walk deep.
uint64_t hash_key(const Value& v) {
  auto shallow = [](const Value& x) -> uint64_t {
    switch (x.type) {
      case Type::Int: return hash_int(x.i);
      case Type::Bool: return hash_int(x.b ? 1 : 0);  // True == 1, as in Python
      case Type::None: return 0x2000;
      case Type::Float: {
        if (x.f == 0) return 0x3000;  // 0.0 == -0.0
        uint64_t u;
        std::memcpy(&u, &x.f, 8);
        return mix(u);
      }
      case Type::Str: case Type::Bytes: case Type::BigInt: return hash_text(x.type, x.str);
      default: return 0x4000 + uint64_t(x.type);
    }
  };
  switch (v.type) {
    case Type::Int: case Type::Bool: case Type::None: case Type::Float: case Type::Str: case Type::Bytes:
    case Type::BigInt:
      return shallow(v);
    case Type::Tuple: {
      uint64_t h = mix(v.items.size() + 0x5000);
      for (const auto& x : v.items) h = mix(h ^ shallow(*x));
      return h;
    }
    default: return mix(uint64_t(reinterpret_cast<uintptr_t>(&v)));  // compared by identity
  }
}

// Python's key equality for the key types a checkpoint uses; anything else compares by identity. Tuples
// are compared with an explicit work list, not by recursion.
bool same_key(const Value& a0, const Value& b0) {
  std::vector<std::pair<const Value*, const Value*>> todo{{&a0, &b0}};
  while (!todo.empty()) {
    const auto [pa, pb] = todo.back();
    todo.pop_back();
    const Value &a = *pa, &b = *pb;
    if (&a == &b) continue;
    const bool an = a.type == Type::Int || a.type == Type::Bool, bn = b.type == Type::Int || b.type == Type::Bool;
    if (an && bn) {
      if (a.as_int() != b.as_int()) return false;
      continue;
    }
    if (a.type != b.type) return false;
    switch (a.type) {
      case Type::None: break;
      case Type::Float:
        if (!(a.f == b.f)) return false;
        break;
      case Type::Str: case Type::Bytes: case Type::BigInt:
        if (a.str != b.str) return false;
        break;
      case Type::Tuple:
        if (a.items.size() != b.items.size()) return false;
        for (size_t k = 0; k < a.items.size(); ++k) todo.emplace_back(a.items[k].get(), b.items[k].get());
        break;
      default: return false;
    }
  }
  return true;
}

}  // namespace

Value::~Value() {
  // Take the children of every value that dies with this one, so that each destructor runs on a value
  // with no children left: the depth of the tree never reaches the call stack.
  std::vector<ValuePtr> todo;
  auto take = [&todo](Value& v) {
    for (auto& x : v.items) todo.push_back(std::move(x));
    for (auto& [k, x] : v.dict) {
      todo.push_back(std::move(k));
      todo.push_back(std::move(x));
    }
    if (v.state) todo.push_back(std::move(v.state));
    v.items.clear();
    v.dict.clear();
  };
  take(*this);
  while (!todo.empty()) {
    ValuePtr v = std::move(todo.back());
    todo.pop_back();
    if (v && v.use_count() == 1) take(*v);
    // v is released here: when this was the last reference, its (now childless) destructor runs.
  }
}

const std::unordered_multimap<uint64_t, size_t>* Value::sync_index() const {
  if (dict.size() < kIndexFrom) {
    index_.reset();
    return nullptr;
  }
  if (!index_ || index_size_ > dict.size()) {
    index_ = std::make_unique<std::unordered_multimap<uint64_t, size_t>>();
    index_size_ = 0;
  }
  for (; index_size_ < dict.size(); ++index_size_) index_->emplace(hash_key(*dict[index_size_].first), index_size_);
  return index_.get();
}

ValuePtr Value::get(std::string_view key) const {
  if (const auto* idx = sync_index()) {
    auto [lo, hi] = idx->equal_range(hash_text(Type::Str, key));
    for (auto it = lo; it != hi; ++it)
      if (const auto& [k, v] = dict[it->second]; k->type == Type::Str && k->str == key) return v;
    return nullptr;
  }
  for (const auto& [k, v] : dict)
    if (k->type == Type::Str && k->str == key) return v;
  return nullptr;
}

ValuePtr Value::get_int(int64_t key) const {
  if (const auto* idx = sync_index()) {
    auto [lo, hi] = idx->equal_range(hash_int(key));
    for (auto it = lo; it != hi; ++it)
      if (const auto& [k, v] = dict[it->second]; (k->type == Type::Int || k->type == Type::Bool) && k->as_int() == key)
        return v;
    return nullptr;
  }
  for (const auto& [k, v] : dict)
    if ((k->type == Type::Int || k->type == Type::Bool) && k->as_int() == key) return v;
  return nullptr;
}

void Value::set_item(ValuePtr key, ValuePtr value) {
  if (const auto* idx = sync_index()) {
    auto [lo, hi] = idx->equal_range(hash_key(*key));
    for (auto it = lo; it != hi; ++it)
      if (same_key(*dict[it->second].first, *key)) {
        dict[it->second].second = std::move(value);
        return;
      }
  } else {
    for (auto& kv : dict)
      if (same_key(*kv.first, *key)) { kv.second = std::move(value); return; }
  }
  dict.emplace_back(std::move(key), std::move(value));
}

std::string describe(const Value& v) {
  switch (v.type) {
    case Type::None: return "None";
    case Type::Bool: return v.b ? "True" : "False";
    case Type::Int: return "int " + std::to_string(v.i);
    case Type::BigInt: return "int (" + std::to_string(v.str.size()) + " bytes)";
    case Type::Float: return "float " + std::to_string(v.f);
    case Type::Str: return "str '" + escape(v.str, 40) + "'";
    case Type::Bytes: return "bytes (" + std::to_string(v.str.size()) + ")";
    case Type::List: return "list (" + std::to_string(v.items.size()) + " items)";
    case Type::Tuple: return "tuple (" + std::to_string(v.items.size()) + " items)";
    case Type::Dict: return "dict (" + std::to_string(v.dict.size()) + " items)";
    case Type::Global: return "global " + escape(v.str);
    case Type::Object: return "object " + escape(v.str);
    case Type::Tensor: return v.tensor ? "tensor " + shape_str(v.tensor->shape) : "tensor";
  }
  return "?";
}

namespace {

class Unpickler {
 public:
  Unpickler(std::string_view d, size_t pos, const Options& o, const std::string& w)
      : data_(d), pos_(pos), opt_(o), what_(w) {}

  ValuePtr run();
  size_t pos() const { return pos_; }
  // After STOP: "" when every value the pickle made is a tree (or a DAG) nested at most max_depth deep,
  // else what is wrong. A hostile pickle can make a container hold itself (DUP or a memo GET, then
  // APPEND); shared pointers would leak such a cycle. Every value that passed through the stack is known
  // here, so the cycle can be found and broken (break_all).
  std::string check_structure() const;
  void break_all();

 private:
  std::string_view data_;
  size_t pos_;
  size_t op_pos_ = 0;  // where the current opcode started, for messages
  const Options& opt_;
  const std::string& what_;
  std::vector<ValuePtr> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, ValuePtr> memo_;
  std::vector<std::weak_ptr<Value>> seen_;  // everything pushed, for break_all

  template <class... A>
  [[noreturn]] void bad(const A&... a) const {
    fail(what_, ": pickle offset ", op_pos_, ": ", a...);
  }
  [[noreturn]] void truncated() const {
    fail(what_, ": truncated (the pickle ends at byte ", data_.size(), " before its STOP opcode)");
  }

  std::string_view take(uint64_t n) {
    if (n > data_.size() - pos_) truncated();
    std::string_view s = data_.substr(pos_, size_t(n));
    pos_ += size_t(n);
    return s;
  }
  uint64_t uint_le(int bytes) {
    std::string_view s = take(uint64_t(bytes));
    uint64_t v = 0;
    for (int k = bytes - 1; k >= 0; --k) v = (v << 8) | uint8_t(s[size_t(k)]);
    return v;
  }
  std::string_view line() {  // text opcodes: up to and including '\n'
    size_t nl = data_.find('\n', pos_);
    if (nl == std::string_view::npos) truncated();
    std::string_view s = data_.substr(pos_, nl - pos_);
    pos_ = nl + 1;
    return s;
  }

  void push(ValuePtr v) {
    if (seen_.size() >= opt_.max_values)
      bad("more than ", opt_.max_values, " values (no checkpoint holds that many; the pickle is malformed or hostile)");
    seen_.push_back(v);
    stack_.push_back(std::move(v));
  }
  ValuePtr pop() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back())) bad("stack underflow (malformed pickle)");
    ValuePtr v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  ValuePtr& top() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back())) bad("stack underflow (malformed pickle)");
    return stack_.back();
  }
  std::vector<ValuePtr> pop_mark() {
    if (marks_.empty()) bad("no MARK on the stack (malformed pickle)");
    size_t m = marks_.back();
    marks_.pop_back();
    std::vector<ValuePtr> items(std::make_move_iterator(stack_.begin() + long(m)),
                                std::make_move_iterator(stack_.end()));
    stack_.resize(m);
    return items;
  }

  void memo_put(uint64_t idx) { memo_[idx] = top(); }
  void memo_get(uint64_t idx) {
    auto it = memo_.find(idx);
    if (it == memo_.end()) bad("memo entry ", idx, " read before it was written (malformed pickle)");
    push(it->second);
  }

  ValuePtr make_global(const std::string& module, const std::string& name) {
    const std::string full = module + "." + name;
    if (full != "collections.OrderedDict" && !opt_.allowed_globals.count(full))
      bad("global '", escape(full), "' is not allowed (only tensors, storages and plain containers are read; no code runs)");
    auto v = Value::make(Type::Global);
    v->str = full;
    return v;
  }

  ValuePtr call(const ValuePtr& callable, const ValuePtr& args) {
    if (!callable->is(Type::Global)) bad("call of a ", type_name(callable->type), ", not of an allowed global");
    if (!args->is(Type::Tuple)) bad("call of ", escape(callable->str), " with ", describe(*args), " instead of an argument tuple");
    if (callable->str == "collections.OrderedDict") {
      auto d = Value::make(Type::Dict);
      if (!args->items.empty()) {  // OrderedDict([(k, v), ...])
        const ValuePtr& pairs = args->items[0];
        if (args->items.size() != 1 || !(pairs->is(Type::List) || pairs->is(Type::Tuple)))
          bad("OrderedDict called with ", describe(*args));
        for (const auto& kv : pairs->items) {
          if (!(kv->is(Type::List) || kv->is(Type::Tuple)) || kv->items.size() != 2)
            bad("OrderedDict item is ", describe(*kv), ", not a pair");
          d->set_item(kv->items[0], kv->items[1]);
        }
      }
      return d;
    }
    if (opt_.call) {
      ValuePtr r;
      try {
        r = opt_.call(callable->str, args->items);
      } catch (const Error& e) {
        bad(callable->str, ": ", e.what());
      }
      if (!r) bad(callable->str, " built nothing");
      return r;
    }
    auto o = Value::make(Type::Object);
    o->str = callable->str;
    o->items = args->items;
    return o;
  }

  ValuePtr persistent(const ValuePtr& pid) {
    if (!opt_.persistent_load) bad("persistent id ", describe(*pid), " in a pickle that should have none");
    try {
      return opt_.persistent_load(pid);
    } catch (const Error& e) {
      bad("persistent id: ", e.what());
    }
  }

  ValuePtr make_long(std::string_view bytes) {
    if (bytes.empty()) return Value::make_int(0);
    if (bytes.size() <= 8) {
      uint64_t u = 0;
      for (size_t k = bytes.size(); k-- > 0;) u = (u << 8) | uint8_t(bytes[k]);
      if (bytes.size() < 8 && (uint8_t(bytes.back()) & 0x80)) u |= ~uint64_t(0) << (8 * bytes.size());  // sign
      return Value::make_int(int64_t(u));
    }
    auto v = Value::make(Type::BigInt);
    v->str = std::string(bytes);
    return v;
  }

  ValuePtr text_int(std::string_view s) {
    std::string t(s);
    if (!t.empty() && t.back() == 'L') t.pop_back();  // protocol 0 LONG
    if (t == "00") { auto v = Value::make(Type::Bool); v->b = false; return v; }
    if (t == "01") { auto v = Value::make(Type::Bool); v->b = true; return v; }
    try {
      size_t used = 0;
      long long x = std::stoll(t, &used);
      if (used != t.size()) throw std::invalid_argument(t);
      return Value::make_int(x);
    } catch (const std::exception&) {
      bad("bad integer literal '", escape(t), "'");
    }
  }
};

ValuePtr Unpickler::run() {
  for (;;) {
    op_pos_ = pos_;
    if (pos_ >= data_.size()) truncated();
    const uint8_t op = uint8_t(data_[pos_++]);
    switch (op) {
      case 0x80: {  // PROTO
        uint64_t p = uint_le(1);
        if (p > 5) bad("pickle protocol ", p, " is newer than 5");
        break;
      }
      case 0x95: uint_le(8); break;  // FRAME: a length hint only
      case '.': {                             // STOP
        if (stack_.size() != 1 || !marks_.empty()) bad("STOP with ", stack_.size(), " values on the stack (malformed pickle)");
        return stack_.back();
      }
      case '(': marks_.push_back(stack_.size()); break;  // MARK
      case '0': pop(); break;                            // POP
      case '1': pop_mark(); break;                       // POP_MARK
      case '2': push(top()); break;                      // DUP
      case 'N': push(Value::make(Type::None)); break;
      case 0x88: case 0x89: {  // NEWTRUE, NEWFALSE
        auto v = Value::make(Type::Bool);
        v->b = op == 0x88;
        push(v);
        break;
      }
      case 'K': push(Value::make_int(int64_t(uint_le(1)))); break;                    // BININT1
      case 'M': push(Value::make_int(int64_t(uint_le(2)))); break;                    // BININT2
      case 'J': push(Value::make_int(int64_t(int32_t(uint32_t(uint_le(4)))))); break;  // BININT
      case 0x8a: push(make_long(take(uint_le(1)))); break;                            // LONG1
      case 0x8b: push(make_long(take(uint_le(4)))); break;                            // LONG4
      case 'I': case 'L': push(text_int(line())); break;                              // INT, LONG (text)
      case 'G': {  // BINFLOAT: big-endian IEEE double
        std::string_view s = take(8);
        uint64_t u = 0;
        for (int k = 0; k < 8; ++k) u = (u << 8) | uint8_t(s[size_t(k)]);
        auto v = Value::make(Type::Float);
        std::memcpy(&v->f, &u, 8);
        push(v);
        break;
      }
      case 'F': {  // FLOAT (text)
        std::string t(line());
        auto v = Value::make(Type::Float);
        try {
          v->f = std::stod(t);
        } catch (const std::exception&) {
          bad("bad float literal '", escape(t), "'");
        }
        push(v);
        break;
      }
      // Strings. Python 2's byte strings (BINSTRING) load as str, as torch.load's default encoding does.
      case 'X': push(Value::make_str(std::string(take(uint_le(4))))); break;     // BINUNICODE
      case 0x8c: push(Value::make_str(std::string(take(uint_le(1))))); break;    // SHORT_BINUNICODE
      case 0x8d: push(Value::make_str(std::string(take(uint_le(8))))); break;    // BINUNICODE8
      case 'T': push(Value::make_str(std::string(take(uint_le(4))))); break;     // BINSTRING
      case 'U': push(Value::make_str(std::string(take(uint_le(1))))); break;     // SHORT_BINSTRING
      case 'B': case 'C': case 0x8e: {                                             // BINBYTES, SHORT_, 8
        auto v = Value::make(Type::Bytes);
        v->str = std::string(take(uint_le(op == 'B' ? 4 : op == 'C' ? 1 : 8)));
        push(v);
        break;
      }
      // Containers. Sets load as lists: a checkpoint only needs their members.
      case ']': push(Value::make(Type::List)); break;  // EMPTY_LIST
      case 0x8f: push(Value::make(Type::List)); break;  // EMPTY_SET
      case ')': push(Value::make(Type::Tuple)); break;  // EMPTY_TUPLE
      case '}': push(Value::make(Type::Dict)); break;   // EMPTY_DICT
      case 'l': case 't': case 0x91: {                  // LIST, TUPLE, FROZENSET
        auto v = Value::make(op == 't' ? Type::Tuple : Type::List);
        v->items = pop_mark();
        push(v);
        break;
      }
      case 0x85: case 0x86: case 0x87: {  // TUPLE1..3
        auto v = Value::make(Type::Tuple);
        v->items.resize(size_t(op - 0x84));
        for (size_t k = v->items.size(); k-- > 0;) v->items[k] = pop();
        push(v);
        break;
      }
      case 'd': {  // DICT
        auto items = pop_mark();
        if (items.size() % 2) bad("DICT with an odd number of items");
        auto v = Value::make(Type::Dict);
        for (size_t k = 0; k < items.size(); k += 2) v->set_item(items[k], items[k + 1]);
        push(v);
        break;
      }
      case 'a': {  // APPEND
        ValuePtr x = pop();
        ValuePtr& l = top();
        if (!l->is(Type::List)) bad("APPEND to a ", type_name(l->type));
        l->items.push_back(std::move(x));
        break;
      }
      case 'e': case 0x90: {  // APPENDS, ADDITEMS
        auto items = pop_mark();
        ValuePtr& l = top();
        if (!l->is(Type::List)) bad("APPENDS to a ", type_name(l->type));
        for (auto& x : items) l->items.push_back(std::move(x));
        break;
      }
      case 's': {  // SETITEM
        ValuePtr v = pop(), k = pop();
        ValuePtr& d = top();
        if (!d->is(Type::Dict)) bad("SETITEM on a ", type_name(d->type));
        d->set_item(std::move(k), std::move(v));
        break;
      }
      case 'u': {  // SETITEMS
        auto items = pop_mark();
        if (items.size() % 2) bad("SETITEMS with an odd number of items");
        ValuePtr& d = top();
        if (!d->is(Type::Dict)) bad("SETITEMS on a ", type_name(d->type));
        for (size_t k = 0; k < items.size(); k += 2) d->set_item(items[k], items[k + 1]);
        break;
      }
      // Memo.
      case 'q': memo_put(uint_le(1)); break;  // BINPUT
      case 'r': memo_put(uint_le(4)); break;  // LONG_BINPUT
      case 0x94: memo_put(memo_.size()); break;  // MEMOIZE
      case 'h': memo_get(uint_le(1)); break;  // BINGET
      case 'j': memo_get(uint_le(4)); break;  // LONG_BINGET
      case 'p': case 'g': {                   // PUT, GET (text)
        ValuePtr idx = text_int(line());
        if (!idx->is(Type::Int) || idx->i < 0) bad("bad memo index");
        if (op == 'p') memo_put(uint64_t(idx->i)); else memo_get(uint64_t(idx->i));
        break;
      }
      // Globals and calls: only allow-listed names, built by the caller's callback.
      case 'c': {  // GLOBAL
        std::string module(line()), name(line());
        push(make_global(module, name));
        break;
      }
      case 0x93: {  // STACK_GLOBAL
        ValuePtr name = pop(), module = pop();
        if (!module->is(Type::Str) || !name->is(Type::Str)) bad("STACK_GLOBAL with non-string names");
        push(make_global(module->str, name->str));
        break;
      }
      case 'R': case 0x81: {  // REDUCE, NEWOBJ
        ValuePtr args = pop(), callable = pop();
        push(call(callable, args));
        break;
      }
      case 'b': {  // BUILD: keep the state; nothing is "set" on anything
        ValuePtr st = pop();
        top()->state = std::move(st);
        break;
      }
      case 'Q': {  // BINPERSID
        ValuePtr pid = pop();
        push(persistent(pid));
        break;
      }
      case 'P': push(persistent(Value::make_str(std::string(line())))); break;  // PERSID
      default: {
        static const char* hex = "0123456789abcdef";
        std::string code = {'0', 'x', hex[op >> 4], hex[op & 15]};
        bad("unsupported pickle opcode ", code, (op >= 32 && op < 127) ? std::string(" '") + char(op) + "'" : "",
            " (not one torch.save writes)");
      }
    }
  }
}

std::string Unpickler::check_structure() const {
  // Depth-first from every value made (the result and anything left in the memo), without recursion.
  // Reaching a value still on the path closes a cycle. A finished value keeps its height (1 + its highest
  // child's), so a DAG is walked once and its nesting depth is known whatever the order of the walk.
  std::unordered_map<const Value*, int> state;  // absent: unseen; -1: on the path; h > 0: done, of height h
  struct Frame {
    const Value* v;
    size_t next = 0;  // children visited so far: items, then dict keys and values, then state
    int height = 1;
  };
  auto child = [](const Value* v, size_t k) -> const Value* {
    if (k < v->items.size()) return v->items[k].get();
    k -= v->items.size();
    if (k < 2 * v->dict.size()) return (k % 2 ? v->dict[k / 2].second : v->dict[k / 2].first).get();
    return v->state.get();
  };
  auto n_children = [](const Value* v) { return v->items.size() + 2 * v->dict.size() + (v->state ? 1 : 0); };
  const std::string too_deep = detail::concat("containers nested more than ", opt_.max_depth,
                                              " levels deep (no checkpoint nests so deep; the pickle is malformed or hostile)");
  std::vector<Frame> path;
  for (const auto& w : seen_) {
    const ValuePtr root = w.lock();
    if (!root || state.count(root.get())) continue;
    state[root.get()] = -1;
    path.push_back({root.get()});
    while (!path.empty()) {
      Frame& f = path.back();
      if (f.next == n_children(f.v)) {
        if (f.height > opt_.max_depth) return too_deep;
        state[f.v] = f.height;
        const int h = f.height;
        path.pop_back();
        if (!path.empty()) path.back().height = std::max(path.back().height, h + 1);
        continue;
      }
      const Value* c = child(f.v, f.next++);
      auto [it, fresh] = state.try_emplace(c, -1);
      if (!fresh) {
        if (it->second < 0) return "the pickle holds a container that contains itself (no checkpoint does)";
        f.height = std::max(f.height, it->second + 1);
        continue;
      }
      if (path.size() >= size_t(opt_.max_depth)) return too_deep;
      path.push_back({c});
    }
  }
  return "";
}

void Unpickler::break_all() {
  for (const auto& w : seen_)
    if (ValuePtr v = w.lock()) {
      v->items.clear();
      v->dict.clear();
      v->state.reset();
    }
}

}  // namespace

ValuePtr unpickle(std::string_view data, size_t& pos, const Options& opt, const std::string& what) {
  if (pos > data.size()) fail(what, ": pickle start ", pos, " is past the end (", data.size(), " bytes)");
  Unpickler u(data, pos, opt, what);
  ValuePtr v;
  try {
    v = u.run();
  } catch (...) {
    u.break_all();
    throw;
  }
  if (const std::string problem = u.check_structure(); !problem.empty()) {
    u.break_all();
    fail(what, ": ", problem);
  }
  pos = u.pos();
  return v;
}

}  // namespace vb::pickle
