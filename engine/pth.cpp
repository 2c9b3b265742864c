#include "engine/pth.h"

#include <algorithm>
#include <map>
#include <memory>
#include <unordered_set>

#include "engine/state_dict.h"

namespace vb {

using pickle::Type;
using pickle::Value;
using pickle::ValuePtr;

namespace {

// The legacy format's magic number, 0x1950a86a20f9469cfc6c, as LONG1 stores it (little-endian).
const std::string kLegacyMagic("\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19", 10);

uint64_t le(std::string_view b, size_t at, int n) {
  uint64_t v = 0;
  for (int k = n - 1; k >= 0; --k) v = (v << 8) | uint8_t(b[at + size_t(k)]);
  return v;
}

// A storage as the file holds it. Legacy views (torch < 0.4) point into a root storage.
struct Storage {
  std::string key;
  DType dtype = DType::F32;
  int64_t numel = 0;
  const uint8_t* data = nullptr;  // into the file's bytes, once located
  std::shared_ptr<Storage> root;  // for a legacy view: the storage it is a window of
  int64_t root_offset = 0;        // in elements
  const uint8_t* bytes() const { return root ? root->bytes() + root_offset * int64_t(dtype_size(dtype)) : data; }
};

// What _rebuild_tensor_v2 was asked for; copied out once the storages' bytes are known.
struct PendingTensor {
  std::shared_ptr<Storage> storage;
  int64_t offset = 0;
  Shape size, stride;
};

struct StorageType {
  const char* global;
  DType dtype;
};
const StorageType kStorageTypes[] = {
    {"torch.FloatStorage", DType::F32},    {"torch.DoubleStorage", DType::F64}, {"torch.HalfStorage", DType::F16},
    {"torch.BFloat16Storage", DType::BF16}, {"torch.LongStorage", DType::I64},   {"torch.IntStorage", DType::I32},
    {"torch.ByteStorage", DType::U8},       {"torch.BoolStorage", DType::BOOL},  {"torch.UntypedStorage", DType::U8},
};
// Allowed so that the error names the dtype instead of calling the file unsafe.
const char* kUnsupportedStorages[] = {"torch.ShortStorage", "torch.CharStorage", "torch.ComplexFloatStorage",
                                      "torch.ComplexDoubleStorage", "torch.QInt8Storage", "torch.QUInt8Storage"};

const char* kRebuildTensor[] = {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"};
const char* kRebuildParameter[] = {"torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"};

std::set<std::string> allowed_globals() {
  std::set<std::string> s;
  for (const auto& t : kStorageTypes) s.insert(t.global);
  for (const char* n : kUnsupportedStorages) s.insert(n);
  for (const char* n : kRebuildTensor) s.insert(n);
  for (const char* n : kRebuildParameter) s.insert(n);
  s.insert("torch.device");  // kept as an Object naming the device
  for (const char* d : {"float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool"})
    s.insert(std::string("torch.") + d);  // dtypes pickle as globals
  return s;
}

std::vector<int64_t> int_tuple(const ValuePtr& v, const char* what) {
  if (!v || !(v->is(Type::Tuple) || v->is(Type::List))) fail(what, " is not a tuple");
  std::vector<int64_t> r;
  for (const auto& x : v->items) {
    if (!x->is(Type::Int)) fail(what, " holds ", pickle::describe(*x), ", not an integer");
    r.push_back(x->i);
  }
  return r;
}

// The loader of one file: the unpickler's callbacks, the storages seen, and the final copy-out.
class PthReader {
 public:
  PthReader(std::string_view bytes, const std::string& path) : buf_(bytes), raw_path_(path), path_(escape(path)) {}

  ValuePtr read() {
    if (looks_like_zip(buf_)) return read_zip();
    if (looks_like_legacy_pth(buf_)) return read_legacy();
    if (buf_.size() > 262 && buf_.substr(257, 5) == "ustar")
      fail(path_, ": a tar-format PyTorch file (torch < 0.1.10) is not supported; re-save it with a recent torch.save");
    fail(path_, ": not a PyTorch checkpoint (neither the zip nor the legacy torch.save format)");
  }

 private:
  std::string_view buf_;
  const std::string& raw_path_;
  const std::string path_;  // escaped: a path may hold any byte, and messages are one line
  bool legacy_ = false;
  bool big_endian_ = false;
  std::map<std::string, std::shared_ptr<Storage>> storages_;  // by key: shared storages are one object
  std::map<std::string, std::shared_ptr<Storage>> views_;     // legacy views, by view key
  std::map<std::string, ZipEntry> zip_entries_;
  std::string archive_;  // zip: the folder holding data.pkl, with its trailing '/'

  pickle::Options options() {
    pickle::Options o;
    o.allowed_globals = allowed_globals();
    o.persistent_load = [this](const ValuePtr& pid) { return persistent_load(pid); };
    o.call = [this](const std::string& g, const std::vector<ValuePtr>& args) { return call(g, args); };
    return o;
  }

  // ('storage', storage_type, key, location, numel) in the zip format; the legacy format adds view_metadata.
  ValuePtr persistent_load(const ValuePtr& pid) {
    if (!pid->is(Type::Tuple) || pid->items.empty() || !pid->items[0]->is(Type::Str))
      fail("expected a ('storage', ...) tuple, found ", pickle::describe(*pid));
    const auto& it = pid->items;
    if (it[0]->str == "module")
      fail("the file holds a pickled module (", it.size() > 1 ? pickle::describe(*it[1]) : std::string("?"),
           "); save a state_dict instead");
    if (it[0]->str != "storage" || it.size() < 5) fail("unknown persistent id ", pickle::describe(*pid));
    if (!it[1]->is(Type::Global)) fail("storage type is ", pickle::describe(*it[1]));
    DType dt = storage_dtype(it[1]->str);
    if (!it[2]->is(Type::Str)) fail("storage key is ", pickle::describe(*it[2]));
    const std::string& key = it[2]->str;
    if (!it[4]->is(Type::Int) || it[4]->i < 0)
      fail("storage '", escape(key), "' has element count ", pickle::describe(*it[4]));
    auto& st = storages_[key];
    if (!st) {
      st = std::make_shared<Storage>();
      st->key = key;
      st->dtype = dt;
      st->numel = it[4]->i;
      if (!legacy_) locate_zip_storage(*st);
    } else if (st->dtype != dt) {
      fail("storage '", escape(key), "' is read as both ", dtype_name(st->dtype), " and ", dtype_name(dt));
    }
    std::shared_ptr<Storage> result = st;
    if (legacy_ && it.size() >= 6 && !it[5]->is(Type::None)) {  // (view_key, offset, view_size)
      const auto& vm = it[5]->items;
      if (!it[5]->is(Type::Tuple) || vm.size() != 3 || !vm[0]->is(Type::Str) || !vm[1]->is(Type::Int) || !vm[2]->is(Type::Int))
        fail("malformed storage view of '", escape(key), "': ", pickle::describe(*it[5]));
      auto& view = views_[vm[0]->str];
      if (!view) {
        const int64_t off = vm[1]->i, n = vm[2]->i;
        // Compared without adding: off + n could overflow.
        if (off < 0 || n < 0 || off > st->numel || n > st->numel - off)
          fail("storage view of '", escape(key), "' (", n, " elements at ", off, ") is out of range of its ", st->numel);
        view = std::make_shared<Storage>();
        view->key = vm[0]->str;
        view->dtype = dt;
        view->numel = n;
        view->root = st;
        view->root_offset = off;
      }
      result = view;
    }
    auto v = Value::make(Type::Object);
    v->str = "storage";
    v->payload = result;
    return v;
  }

  static DType storage_dtype(const std::string& global) {
    for (const auto& t : kStorageTypes)
      if (global == t.global) return t.dtype;
    fail("tensors of type ", escape(global), " are not supported (only float32/64, float16, bfloat16, int64, int32, uint8, bool)");
  }

  ValuePtr call(const std::string& g, const std::vector<ValuePtr>& args) {
    if (std::find(std::begin(kRebuildTensor), std::end(kRebuildTensor), g) != std::end(kRebuildTensor)) {
      // (storage, storage_offset, size, stride, [requires_grad, backward_hooks, [metadata]])
      if (args.size() < 4) fail("expected at least 4 arguments, got ", args.size());
      if (!args[0]->is(Type::Object) || args[0]->str != "storage") fail("first argument is ", pickle::describe(*args[0]));
      auto p = std::make_shared<PendingTensor>();
      p->storage = std::static_pointer_cast<Storage>(args[0]->payload);
      if (!args[1]->is(Type::Int)) fail("storage offset is ", pickle::describe(*args[1]));
      p->offset = args[1]->i;
      p->size = int_tuple(args[2], "size");
      p->stride = int_tuple(args[3], "stride");
      check_geometry(*p);
      auto v = Value::make(Type::Tensor);
      v->payload = p;
      return v;
    }
    if (std::find(std::begin(kRebuildParameter), std::end(kRebuildParameter), g) != std::end(kRebuildParameter)) {
      if (args.empty() || !args[0]->is(Type::Tensor)) fail("expected a tensor as first argument");
      return args[0];  // a Parameter is its data here
    }
    for (const auto& t : kStorageTypes)
      if (g == t.global) fail("storages cannot be built by a call");
    auto o = Value::make(Type::Object);  // torch.device('cpu') and the like: kept for inspection
    o->str = g;
    o->items = args;
    return o;
  }

  static void check_geometry(const PendingTensor& p) {
    if (p.size.size() != p.stride.size())
      fail("size ", shape_str(p.size), " and stride ", shape_str(p.stride), " differ in rank");
    if (p.offset < 0) fail("negative storage offset ", p.offset);
    // 128-bit arithmetic: a hostile file must not overflow its way past the bounds check.
    __int128 last = p.offset, n = 1;
    for (size_t d = 0; d < p.size.size(); ++d) {
      if (p.size[d] < 0 || p.stride[d] < 0) fail("negative size or stride: ", shape_str(p.size), " / ", shape_str(p.stride));
      if (p.size[d] > (int64_t(1) << 40) || p.stride[d] > (int64_t(1) << 40)) fail("size or stride out of range");
      last += __int128(p.size[d] - 1) * p.stride[d];
      n *= p.size[d];
      if (n > (__int128(1) << 40)) fail("tensor of size ", shape_str(p.size), " is too large");
    }
    if (n > 0 && last >= p.storage->numel)
      fail("tensor of size ", shape_str(p.size), ", stride ", shape_str(p.stride), " at offset ", p.offset,
           " reaches element ", int64_t(last), " of storage '", escape(p.storage->key), "' which has ", p.storage->numel);
  }

  // ---- zip ----
  ValuePtr read_zip() {
    for (auto& e : read_zip_directory(buf_, raw_path_)) zip_entries_[e.name] = e;
    const ZipEntry* pkl = nullptr;
    for (const auto& [name, e] : zip_entries_) {
      size_t slash = name.find('/');
      if (slash != std::string::npos && name.compare(slash, std::string::npos, "/data.pkl") == 0) {
        pkl = &e;
        archive_ = name.substr(0, slash + 1);
        break;
      }
    }
    if (!pkl) fail(path_, ": not a PyTorch checkpoint (a zip file without <archive>/data.pkl)");
    auto bo = zip_entries_.find(archive_ + "byteorder");
    if (bo != zip_entries_.end()) {
      std::string order(entry_bytes(bo->second));
      if (order == "big") big_endian_ = true;
      else if (order != "little") fail(path_, ": unknown byteorder '", escape(order), "'");
    }
    std::string_view pickle_bytes = entry_bytes(*pkl);
    size_t pos = 0;
    ValuePtr root = pickle::unpickle(pickle_bytes, pos, options(), path_ + " (" + escape(pkl->name) + ")");
    materialise(root);
    return root;
  }

  std::string_view entry_bytes(const ZipEntry& e) const {
    if (e.method != 0)
      fail(path_, ": zip entry '", escape(e.name), "' is compressed (method ", e.method,
           "); torch.save stores entries uncompressed, re-save the file with torch.save");
    return buf_.substr(size_t(e.data_offset), size_t(e.size));
  }

  void locate_zip_storage(Storage& st) {
    auto it = zip_entries_.find(archive_ + "data/" + st.key);
    if (it == zip_entries_.end())
      fail("storage '", escape(st.key), "' has no entry ", escape(archive_ + "data/" + st.key), " in the zip");
    std::string_view b = entry_bytes(it->second);
    // Divided, not multiplied: a hostile element count times the element size could wrap past the check.
    if (uint64_t(st.numel) > b.size() / dtype_size(st.dtype))
      fail("storage '", escape(st.key), "' holds ", b.size(), " bytes, too few for the ", st.numel, " elements of ",
           dtype_name(st.dtype), " it declares");
    st.data = reinterpret_cast<const uint8_t*>(b.data());
  }

  // ---- legacy ----
  ValuePtr read_legacy() {
    legacy_ = true;
    size_t pos = 0;
    pickle::Options plain;  // the header pickles hold only numbers, strings and dicts
    ValuePtr magic = pickle::unpickle(buf_, pos, plain, path_);
    if (!magic->is(Type::BigInt) || magic->str != kLegacyMagic) fail(path_, ": not a PyTorch checkpoint (bad magic number)");
    ValuePtr proto = pickle::unpickle(buf_, pos, plain, path_);
    if (!proto->is(Type::Int) || proto->i != 1001) fail(path_, ": unsupported legacy protocol ", pickle::describe(*proto));
    ValuePtr info = pickle::unpickle(buf_, pos, plain, path_);
    if (info->is(Type::Dict)) {
      ValuePtr lit = info->get("little_endian");
      if (lit && lit->is(Type::Bool)) big_endian_ = !lit->b;
    }
    ValuePtr root = pickle::unpickle(buf_, pos, options(), path_);
    ValuePtr keys = pickle::unpickle(buf_, pos, plain, path_ + " (storage keys)");
    if (!keys->is(Type::List)) fail(path_, ": storage key list is ", pickle::describe(*keys));
    for (const auto& k : keys->items) {
      if (!k->is(Type::Str)) fail(path_, ": storage key is ", pickle::describe(*k));
      auto it = storages_.find(k->str);
      if (it == storages_.end()) fail(path_, ": storage '", escape(k->str), "' is listed but no tensor uses it");
      Storage& st = *it->second;
      if (st.data) fail(path_, ": storage '", escape(st.key), "' is listed twice");
      if (buf_.size() - pos < 8) fail(path_, ": truncated (storage '", escape(st.key), "' is missing)");
      const uint64_t n = le(buf_, pos, 8);
      pos += 8;
      if (n != uint64_t(st.numel))
        fail(path_, ": storage '", escape(st.key), "' has ", n, " elements in the data but ", st.numel, " in the pickle");
      // Divided, not multiplied: a hostile element count times the element size could wrap past the check.
      if (n > (buf_.size() - pos) / dtype_size(st.dtype))
        fail(path_, ": truncated (storage '", escape(st.key), "' declares ", n, " elements of ", dtype_name(st.dtype),
             ", ", buf_.size() - pos, " bytes are left)");
      const uint64_t nbytes = n * dtype_size(st.dtype);
      st.data = reinterpret_cast<const uint8_t*>(buf_.data() + pos);
      pos += size_t(nbytes);
    }
    for (const auto& [key, st] : storages_)
      if (!st->root && !st->data) fail(path_, ": storage '", escape(key), "' is used but its data is missing");
    materialise(root);
    return root;
  }

  // ---- copy-out: every Tensor leaf becomes a contiguous HostTensor ----
  void materialise(const ValuePtr& root) {
    std::vector<Value*> todo{root.get()};
    std::unordered_set<Value*> seen;
    uint64_t total = 0;
    while (!todo.empty()) {
      Value* v = todo.back();
      todo.pop_back();
      if (!v || !seen.insert(v).second) continue;
      if (v->is(Type::Tensor) && !v->tensor) {
        // Views may repeat elements (stride 0, or tensors sharing a storage each copied out), but not enough
        // to turn a small file into a huge allocation: checked before anything is allocated.
        const auto& p = *std::static_pointer_cast<PendingTensor>(v->payload);
        total += uint64_t(numel(p.size)) * dtype_size(p.storage->dtype);
        const uint64_t limit = 2 * uint64_t(buf_.size()) + (uint64_t(64) << 20);
        if (total > limit)
          fail(path_, ": malformed or hostile (its tensors would expand to ", total, " bytes, more than twice the ",
               buf_.size(), " bytes of the file; a view with stride 0 or overlapping views repeat elements)");
        v->tensor = std::make_shared<HostTensor>(copy_out(*std::static_pointer_cast<PendingTensor>(v->payload)));
        v->payload.reset();
      }
      for (const auto& x : v->items) todo.push_back(x.get());
      for (const auto& [k, x] : v->dict) {
        todo.push_back(k.get());
        todo.push_back(x.get());
      }
      todo.push_back(v->state.get());
    }
  }

  HostTensor copy_out(const PendingTensor& p) const {
    const Storage& st = *p.storage;
    HostTensor t(p.size, st.dtype);
    const size_t es = dtype_size(st.dtype);
    const int64_t n = t.numel();
    if (n == 0) return t;
    const uint8_t* src = st.bytes();
    if (!src) fail(path_, ": storage '", escape(st.key), "' has no data");
    // Row-major contiguous views copy in one go; anything else walks the index.
    bool contiguous = true;
    int64_t expect = 1;
    for (size_t d = p.size.size(); d-- > 0;) {
      if (p.size[d] != 1 && p.stride[d] != expect) contiguous = false;
      expect *= p.size[d];
    }
    if (contiguous) {
      std::memcpy(t.bytes.data(), src + size_t(p.offset) * es, t.bytes.size());
    } else {
      const size_t rank = p.size.size();
      std::vector<int64_t> idx(rank, 0);
      int64_t off = p.offset;
      for (int64_t i = 0; i < n; ++i) {
        std::memcpy(t.bytes.data() + size_t(i) * es, src + size_t(off) * es, es);
        for (size_t d = rank; d-- > 0;) {  // odometer increment, last dimension fastest
          if (++idx[d] < p.size[d]) { off += p.stride[d]; break; }
          off -= (p.size[d] - 1) * p.stride[d];
          idx[d] = 0;
        }
      }
    }
    if (big_endian_ && es > 1)
      for (int64_t i = 0; i < n; ++i) std::reverse(t.bytes.begin() + long(size_t(i) * es), t.bytes.begin() + long(size_t(i + 1) * es));
    return t;
  }
};

}  // namespace

bool looks_like_zip(std::string_view b) { return b.size() >= 4 && b.substr(0, 4) == std::string_view("PK\x03\x04", 4); }

bool looks_like_legacy_pth(std::string_view b) {
  return b.size() >= 14 && b.substr(0, 4) == std::string_view("\x80\x02\x8a\x0a", 4) && b.substr(4, 10) == kLegacyMagic;
}

std::vector<ZipEntry> read_zip_directory(std::string_view b, const std::string& path_raw) {
  const std::string path = escape(path_raw);
  // The end-of-central-directory record sits in the last 22 + 65535 bytes (its comment may be that long).
  if (b.size() < 22) fail(path, ": truncated (", b.size(), " bytes: too short for a zip file)");
  size_t eocd = std::string_view::npos;
  const size_t lowest = b.size() >= 22 + 65535 ? b.size() - 22 - 65535 : 0;
  for (size_t p = b.size() - 22 + 1; p-- > lowest;)
    if (b.substr(p, 4) == std::string_view("PK\x05\x06", 4)) { eocd = p; break; }
  if (eocd == std::string_view::npos)
    fail(path, ": truncated (no zip end-of-central-directory record; the file was cut short or is not a zip)");
  uint64_t count = le(b, eocd + 10, 2), cd_size = le(b, eocd + 12, 4), cd_off = le(b, eocd + 16, 4);
  if (count == 0xffff || cd_size == 0xffffffff || cd_off == 0xffffffff) {  // zip64
    if (eocd < 20 || b.substr(eocd - 20, 4) != std::string_view("PK\x06\x07", 4))
      fail(path, ": zip64 archive without its end-of-central-directory locator");
    const uint64_t z = le(b, eocd - 20 + 8, 8);
    // The record is 56 bytes: a file shorter than that cannot hold it wherever the locator points.
    if (b.size() < 56 || z > b.size() - 56 || b.substr(size_t(z), 4) != std::string_view("PK\x06\x06", 4))
      fail(path, ": truncated or corrupt zip64 end-of-central-directory record (the locator points at byte ", z,
           " of a ", b.size(), "-byte file)");
    count = le(b, size_t(z) + 32, 8);
    cd_size = le(b, size_t(z) + 40, 8);
    cd_off = le(b, size_t(z) + 48, 8);
  }
  if (cd_off > b.size() || cd_size > b.size() - cd_off) fail(path, ": truncated (the zip central directory lies past the end)");
  std::vector<ZipEntry> out;
  size_t p = size_t(cd_off);
  const size_t end = size_t(cd_off + cd_size);
  for (uint64_t k = 0; k < count; ++k) {
    if (end - p < 46 || b.substr(p, 4) != std::string_view("PK\x01\x02", 4))
      fail(path, ": corrupt zip central directory (entry ", k, ")");
    ZipEntry e;
    e.method = uint16_t(le(b, p + 10, 2));
    uint64_t csize = le(b, p + 20, 4), usize = le(b, p + 24, 4);
    const size_t nlen = size_t(le(b, p + 28, 2)), xlen = size_t(le(b, p + 30, 2)), clen = size_t(le(b, p + 32, 2));
    uint64_t local = le(b, p + 42, 4);
    if (end - p - 46 < nlen + xlen + clen) fail(path, ": corrupt zip central directory (entry ", k, ")");
    e.name = std::string(b.substr(p + 46, nlen));
    // zip64 extra field: the 64-bit values of those fields that hold 0xffffffff, in this order.
    for (size_t x = p + 46 + nlen, xe = x + xlen; x + 4 <= xe;) {
      const uint64_t id = le(b, x, 2), sz = le(b, x + 2, 2);
      if (x + 4 + sz > xe) break;
      if (id == 1) {
        size_t q = x + 4;
        auto next = [&](uint64_t& field) {
          if (field == 0xffffffff && q + 8 <= x + 4 + sz) { field = le(b, q, 8); q += 8; }
        };
        next(usize);
        next(csize);
        next(local);
      }
      x += 4 + size_t(sz);
    }
    p += 46 + nlen + xlen + clen;
    if (b.size() < 30 || local > b.size() - 30 || b.substr(size_t(local), 4) != std::string_view("PK\x03\x04", 4))
      fail(path, ": truncated or corrupt zip (no local header for '", escape(e.name), "')");
    const uint64_t data = local + 30 + le(b, size_t(local) + 26, 2) + le(b, size_t(local) + 28, 2);
    if (data > b.size() || csize > b.size() - data)
      fail(path, ": truncated (zip entry '", escape(e.name), "' runs past the end of the file)");
    e.data_offset = data;
    e.size = csize;
    out.push_back(std::move(e));
  }
  return out;
}

pickle::ValuePtr parse_pth(std::string_view bytes, const std::string& path) { return PthReader(bytes, path).read(); }

pickle::ValuePtr load_pth(const std::string& path) {
  const std::string bytes = read_file(path);
  return parse_pth(bytes, path);
}

}  // namespace vb
