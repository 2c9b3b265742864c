// Hand-made PyTorch files for the reader tests: a pickle writer (protocol 2) that can describe tensors as
// torch.save does, and a stored (uncompressed) zip laid out as torch writes one: local headers, central
// directory, end record.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace vbtest {

struct PickleWriter {
  std::string s = "\x80\x02";
  PickleWriter& op(char c) { s += c; return *this; }
  PickleWriter& raw(const std::string& x) { s += x; return *this; }
  PickleWriter& str(const std::string& x) {
    s += 'X';
    for (int i = 0; i < 4; ++i) s += char((x.size() >> (8 * i)) & 0xff);
    s += x;
    return *this;
  }
  PickleWriter& integer(int64_t v) {  // LONG1 with 8 bytes: any int64
    s += '\x8a';
    s += char(8);
    for (int i = 0; i < 8; ++i) s += char((uint64_t(v) >> (8 * i)) & 0xff);
    return *this;
  }
  PickleWriter& num(int64_t v) {  // as pickle writes an int: BININT1, BININT, else LONG1
    if (v >= 0 && v < 256) {
      s += 'K';
      s += char(v);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
      s += 'J';
      for (int i = 0; i < 4; ++i) s += char((uint32_t(v) >> (8 * i)) & 0xff);
    } else {
      integer(v);
    }
    return *this;
  }
  PickleWriter& global(const std::string& m, const std::string& n) { s += 'c' + m + "\n" + n + "\n"; return *this; }
  PickleWriter& ints(std::initializer_list<int64_t> v) {  // a tuple
    op('(');
    for (int64_t x : v) num(x);
    return op('t');
  }
  // _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict()).
  PickleWriter& tensor(const std::string& storage_type, const std::string& key, int64_t numel, int64_t offset,
                       std::initializer_list<int64_t> size, std::initializer_list<int64_t> stride) {
    global("torch._utils", "_rebuild_tensor_v2").op('(');
    op('(').str("storage").global("torch", storage_type).str(key).str("cpu").num(numel).op('t').op('Q');
    num(offset).ints(size).ints(stride).op('\x89').global("collections", "OrderedDict").op(')').op('R');
    return op('t').op('R');
  }
};

inline void put16(std::string& s, uint32_t v) { for (int i = 0; i < 2; ++i) s += char((v >> (8 * i)) & 0xff); }
inline void put32(std::string& s, uint32_t v) { for (int i = 0; i < 4; ++i) s += char((v >> (8 * i)) & 0xff); }
inline void put64(std::string& s, uint64_t v) { for (int i = 0; i < 8; ++i) s += char((v >> (8 * i)) & 0xff); }

inline std::string make_zip(const std::vector<std::pair<std::string, std::string>>& entries) {
  std::string z, cd;
  for (const auto& [name, data] : entries) {
    const uint32_t off = uint32_t(z.size());
    z += "PK\x03\x04";
    put16(z, 20); put16(z, 0); put16(z, 0); put16(z, 0); put16(z, 0);
    put32(z, 0); put32(z, uint32_t(data.size())); put32(z, uint32_t(data.size()));
    put16(z, uint32_t(name.size())); put16(z, 0);
    z += name + data;
    cd += "PK\x01\x02";
    put16(cd, 20); put16(cd, 20); put16(cd, 0); put16(cd, 0); put16(cd, 0); put16(cd, 0);
    put32(cd, 0); put32(cd, uint32_t(data.size())); put32(cd, uint32_t(data.size()));
    put16(cd, uint32_t(name.size())); put16(cd, 0); put16(cd, 0); put16(cd, 0); put16(cd, 0); put32(cd, 0);
    put32(cd, off);
    cd += name;
  }
  const uint32_t cd_off = uint32_t(z.size());
  z += cd + "PK\x05\x06";
  put16(z, 0); put16(z, 0); put16(z, uint32_t(entries.size())); put16(z, uint32_t(entries.size()));
  put32(z, uint32_t(cd.size())); put32(z, cd_off); put16(z, 0);
  return z;
}

}  // namespace vbtest
