// Hostile input (issue 9): files crafted to crash the readers, exhaust memory or time, or smuggle raw bytes
// into messages. Each case must end in one clear vb::Error naming the file, quickly and without a large
// allocation (the limits are checked before anything the file declares is allocated). The files are made
// here, byte by byte, next to what they attack. An input a fuzzer (tools/fuzz.sh) finds goes to
// tests/fixtures/hostile/ with a case here; none has been found since these fixes.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "data/annotations.h"
#include "data/jpeg.h"
#include "engine/file_io.h"
#include "engine/pickle.h"
#include "engine/pth.h"
#include "engine/state_dict.h"
#include "engine/weights.h"
#include "tests/pth_writer.h"
#include "tests/test_process.h"
#include "tests/test_util.h"

using namespace vb;
namespace fs = std::filesystem;

namespace {

using vbtest::TempDir;
using vbtest::write_bytes;
const TempDir& tmp() {
  static TempDir t("vb_test_hostile");
  return t;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// The message of the vb::Error `fn` throws ("" when it throws none), and how long it took.
template <class F>
std::string error_of(F fn, double* seconds = nullptr) {
  const auto t0 = std::chrono::steady_clock::now();
  std::string msg;
  try {
    fn();
  } catch (const Error& e) {
    msg = e.what();
  }
  if (seconds) *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return msg;
}

// A one-line message: no newline, NUL or other control byte.
bool one_clean_line(const std::string& s) {
  for (char c : s)
    if (uint8_t(c) < 0x20 || uint8_t(c) == 0x7f) return false;
  return true;
}

using vbtest::make_zip;
using vbtest::PickleWriter;
using vbtest::put16;
using vbtest::put32;
using vbtest::put64;

std::string pth_zip(const std::string& pickle, const std::vector<std::pair<std::string, std::string>>& storages = {}) {
  std::vector<std::pair<std::string, std::string>> e = {{"arch/data.pkl", pickle}, {"arch/byteorder", "little"}};
  for (const auto& [k, b] : storages) e.push_back({"arch/data/" + k, b});
  return make_zip(e);
}

// The legacy format's first three pickles (magic number, protocol 1001, system info), from the fixture.
std::string legacy_header() { return read_file(vbtest::fixture("mini_imagenet_style_legacy.pth")).substr(0, 137); }

std::string save_file(const std::string& name, const std::string& bytes) {
  const std::string p = tmp().file(name);
  write_bytes(p, bytes);
  return p;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// .pth: sizes that wrap, records that do not fit, depth, breadth, expansion.

TEST_CASE("pth zip: a storage whose element count times element size wraps is refused") {
  // 2^62 float32 elements: 2^64 bytes, which wraps to 0 in 64 bits and once passed a "holds >= need" check.
  PickleWriter p;
  p.op('}').str("w").tensor("FloatStorage", "0", int64_t(1) << 62, 0, {4}, {1}).op('s').op('.');
  const std::string path = save_file("wrap_zip.pth", pth_zip(p.s, {{"0", std::string(16, '\0')}}));
  double sec = 0;
  const std::string e = error_of([&] { load_state_dict_file(path); }, &sec);
  INFO(e);
  CHECK(contains(e, path));
  CHECK(contains(e, "storage '0' holds 16 bytes, too few for the 4611686018427387904 elements of F32"));
  CHECK(sec < 5);
}

TEST_CASE("pth legacy: a storage whose element count times element size wraps is refused") {
  PickleWriter main, keys;
  main.op('}').str("w").tensor("FloatStorage", "0", int64_t(1) << 62, 0, {4}, {1}).op('s').op('.');
  keys.op(']').op('(').str("0").op('e').op('.');
  std::string file = legacy_header() + main.s + keys.s;
  put64(file, uint64_t(1) << 62);    // the element count before the storage's bytes, as the pickle says
  file += std::string(16, '\0');     // and 16 bytes of data
  const std::string path = save_file("wrap_legacy.pth", file);
  const std::string e = error_of([&] { load_state_dict_file(path); });
  INFO(e);
  CHECK(contains(e, path + ": truncated (storage '0' declares 4611686018427387904 elements of F32, 16 bytes are left)"));

  // A legacy storage view whose offset + size overflows int64.
  PickleWriter view;
  view.op('}').str("w").global("torch._utils", "_rebuild_tensor_v2").op('(');
  view.op('(').str("storage").global("torch", "FloatStorage").str("0").str("cpu").integer(4);
  view.str("v").integer(INT64_MAX).integer(INT64_MAX).op('\x87').op('t').op('Q');  // (view_key, offset, size)
  view.integer(0).ints({1}).ints({1}).op('t').op('R').op('s').op('.');
  const std::string e2 = error_of([&] { parse_pth(legacy_header() + view.s, "view.pth"); });
  INFO(e2);
  CHECK(contains(e2, "view.pth"));
  CHECK(contains(e2, "storage view of '0' (9223372036854775807 elements at 9223372036854775807) is out of range of its 4"));
}

TEST_CASE("pth zip: a zip64 record in a file too short to hold it") {
  // "PK\3\4", a zip64 end record's signature at byte 4 (the 56-byte record would need 60 bytes), the zip64
  // locator pointing at it, and an end record whose 0xffff count asks for zip64: 50 bytes in all.
  std::string z = "PK\x03\x04";
  z += "PK\x06\x06";
  z += "PK\x06\x07";
  put32(z, 0);
  put64(z, 4);
  put32(z, 1);
  z += "PK\x05\x06";
  put16(z, 0); put16(z, 0); put16(z, 0xffff); put16(z, 0xffff);
  put32(z, 0xffffffff); put32(z, 0xffffffff); put16(z, 0);
  REQUIRE(z.size() == 50);
  const std::string path = save_file("short_zip64.pth", z);
  const std::string e = error_of([&] { load_state_dict_file(path); });
  INFO(e);
  CHECK(contains(e, path + ": truncated or corrupt zip64 end-of-central-directory record (the locator points at byte 4 of a 50-byte file)"));

  // A local header offset in a file shorter than a local header.
  std::string t = "PK\x03\x04";
  t += "PK\x01\x02" + std::string(38, '\0');
  put32(t, 8);  // local header offset
  const size_t cd_size = t.size() - 4;
  t += "PK\x05\x06";
  put16(t, 0); put16(t, 0); put16(t, 1); put16(t, 1); put32(t, uint32_t(cd_size)); put32(t, 4); put16(t, 0);
  const std::string e2 = error_of([&] { parse_pth(t, "local.pth"); });
  INFO(e2);
  CHECK(contains(e2, "local.pth: truncated or corrupt zip (no local header for ''"));
}

TEST_CASE("pickle: a million levels of nesting give a clear error, built and released without recursion") {
  // TUPLE1 applied a million times: ((((...),),),). Recursive destruction overflowed the stack here.
  PickleWriter deep;
  deep.op(')').raw(std::string(1000000, '\x85')).op('.');
  double sec = 0;
  std::string e = error_of([&] { parse_pth(pth_zip(deep.s), "deep.pth"); }, &sec);
  INFO(e);
  CHECK(contains(e, "deep.pth (arch/data.pkl): containers nested more than 1000 levels deep"));
  CHECK(sec < 10);

  // The same depth through lists (APPEND of each onto the one below), straight through unpickle.
  PickleWriter lists;
  lists.raw(std::string(1000001, ']')).raw(std::string(1000000, 'a')).op('.');
  size_t pos = 0;
  e = error_of([&] { pickle::unpickle(lists.s, pos, {}, "lists"); });
  CHECK(contains(e, "lists: containers nested more than 1000 levels deep"));

  // Within the limits, a deep (but not too deep) pickle is read, and released without recursion.
  PickleWriter ok;
  ok.op(')').raw(std::string(900, '\x85')).op('.');
  pos = 0;
  pickle::ValuePtr v = pickle::unpickle(ok.s, pos, {}, "ok");
  int depth = 0;
  for (const pickle::Value* x = v.get(); !x->items.empty(); x = x->items[0].get()) ++depth;
  CHECK(depth == 900);

  // A value limit: each opcode may push a value, so a small file could otherwise build a huge tree.
  pickle::Options few;
  few.max_values = 1000;
  PickleWriter many;
  many.op('(').raw(std::string(5000, 'N')).op('l').op('.');
  pos = 0;
  e = error_of([&] { pickle::unpickle(many.s, pos, few, "many"); });
  CHECK(contains(e, "many: pickle offset 1003: more than 1000 values"));

  // A Value released a million levels deep without going through the unpickler.
  pickle::ValuePtr chain = pickle::Value::make(pickle::Type::List);
  for (int i = 0; i < 1000000; ++i) {
    auto up = pickle::Value::make(pickle::Type::List);
    up->items.push_back(std::move(chain));
    chain = std::move(up);
  }
  chain.reset();  // must not overflow the stack
}

TEST_CASE("pickle: a dict of 300,000 keys is built in linear time, with Python's key semantics") {
  // {0: None, 1: None, ..., 299999: None} as SETITEMS of BININT keys: 1.8 MB, which took 335 s when every
  // insertion scanned the keys before it.
  PickleWriter p;
  p.op('}').op('(');
  for (int k = 0; k < 300000; ++k) {
    p.op('J');
    for (int i = 0; i < 4; ++i) p.s += char((uint32_t(k) >> (8 * i)) & 0xff);
    p.op('N');
  }
  // Re-set a key, through a bool (True == 1) and a string that must stay distinct.
  p.op('\x88').str("one").str("1").str("str").op('u').op('.');
  size_t pos = 0;
  double sec = 0;
  pickle::ValuePtr d;
  error_of([&] { d = pickle::unpickle(p.s, pos, {}, "big"); }, &sec);
  REQUIRE(d);
  CHECK(sec < 10);  // about 0.2 s at -O3; well under 10 s under sanitizers
  CHECK(d->dict.size() == 300001);
  REQUIRE(d->get_int(1));
  CHECK(d->get_int(1)->str == "one");
  CHECK(d->dict[1].second->str == "one");  // the replaced key keeps its place
  CHECK(d->get("1")->str == "str");
  CHECK(d->get_int(299999)->is(pickle::Type::None));
  CHECK(!d->get_int(300000));
}

TEST_CASE("pth: a stride-0 view that would expand a tiny file into gigabytes is refused before allocating") {
  // One float, viewed as a 2^20 x 512 tensor with strides (0, 0): 2 GiB out of 4 bytes.
  PickleWriter p;
  p.op('}').str("w").tensor("FloatStorage", "0", 1, 0, {int64_t(1) << 20, 512}, {0, 0}).op('s').op('.');
  const std::string path = save_file("stride0.pth", pth_zip(p.s, {{"0", std::string(4, '\0')}}));
  double sec = 0;
  const std::string e = error_of([&] { load_state_dict_file(path); }, &sec);
  INFO(e);
  CHECK(contains(e, path + ": malformed or hostile (its tensors would expand to 2147483648 bytes"));
  CHECK(sec < 5);

  // A modest repeat (a 1 KB broadcast of one value, as an expanded buffer) is still read.
  PickleWriter ok;
  ok.op('}').str("w").tensor("FloatStorage", "0", 1, 0, {256}, {0}).op('s').op('.');
  const StateDict sd = load_state_dict_bytes(pth_zip(ok.s, {{"0", std::string("\0\0\x80\x3f", 4)}}), "ok.pth");
  CHECK(sd.at("w").numel() == 256);
  CHECK(sd.at("w").to_f64()[255] == 1.0);
}

TEST_CASE("pickle: bytes from the file are escaped in messages") {
  PickleWriter p;
  p.str("os\nINJECTED").str("sys\x01tem").op('\x93').op('.');  // STACK_GLOBAL: names may hold any byte
  size_t pos = 0;
  const std::string e = error_of([&] { pickle::unpickle(p.s, pos, {}, "evil"); });
  INFO(e);
  CHECK(one_clean_line(e));
  CHECK(contains(e, "global 'os\\x0aINJECTED.sys\\x01tem' is not allowed"));
  // And a GLOBAL line with a control byte.
  PickleWriter q;
  q.global("o\x1bs", "system").op('.');
  pos = 0;
  const std::string e2 = error_of([&] { pickle::unpickle(q.s, pos, {}, "evil2"); });
  CHECK(one_clean_line(e2));
  CHECK(contains(e2, "global 'o\\x1bs.system' is not allowed"));
}

// ---------------------------------------------------------------------------------------------------------
// safetensors: shapes checked against the file before allocating.

namespace {
std::string safetensors_file(const std::string& header_json, const std::string& data) {
  std::string f;
  put64(f, header_json.size());
  return f + header_json + data;
}
}  // namespace

TEST_CASE("safetensors: the 82-byte file declaring 2^34 elements is refused at once") {
  const std::string bytes =
      safetensors_file(R"({"w":{"dtype":"F32","shape":[17179869184],"data_offsets":[0,16]}})", std::string(8, '\0'));
  const std::string path = save_file("bomb.safetensors", bytes);
  double sec = 0;
  const std::string e = error_of([&] { load_state_dict_file(path); }, &sec);
  INFO(e);
  CHECK(contains(e, path + ": tensor 'w': data offsets [0, 16] lie outside the 8 data bytes"));
  CHECK(sec < 2);

  struct Case {
    std::string shape, offsets, want;
  };
  const Case cases[] = {
      {"[17179869184]", "[0,8]", "shape [17179869184] of F32 does not match its 8 data bytes"},
      {"[-1,2]", "[0,8]", "dimension -1 is negative"},
      {"[2.5]", "[0,8]", "dimension is 2.5, not a non-negative integer"},
      {"[\"2\"]", "[0,8]", "dimension is \"2\", not a non-negative integer"},
      {"[4294967296,4294967296]", "[0,8]", "shape [4294967296,4294967296] has more elements than 64 bits can count"},
      {"[18446744073709551615]", "[0,8]", "shape [18446744073709551615] has more elements than 64 bits can count"},
      {"[4611686018427387904]", "[0,8]", "shape [4611686018427387904] of F32 does not match its 8 data bytes"},
      {"[2]", "[8,0]", "data offsets [8, 0] lie outside"},
      {"[2]", "[0,-8]", "data offset -8 is negative"},
      {"[2]", "[0]", "data_offsets is not a pair of integers"},
  };
  for (const auto& c : cases) {
    const std::string h = R"({"w":{"dtype":"F32","shape":)" + c.shape + R"(,"data_offsets":)" + c.offsets + "}}";
    const std::string err = error_of([&] { parse_safetensors(safetensors_file(h, std::string(8, '\0')), "t.st"); });
    INFO(h << " -> " << err);
    CHECK(contains(err, "t.st: tensor 'w': " + c.want));
  }
  // And the right declaration is read.
  const StateDict ok = parse_safetensors(
      safetensors_file(R"({"w":{"dtype":"F32","shape":[2,1],"data_offsets":[0,8]}})", std::string(8, '\0')), "ok.st");
  CHECK(ok.at("w").shape == Shape{2, 1});
  // Names and dtypes from the file are escaped.
  const std::string e3 = error_of([&] {
    parse_safetensors(safetensors_file("{\"w\\n\\u0001\":{\"dtype\":\"F\\n32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                                       std::string(8, '\0')),
                      "esc.st");
  });
  INFO(e3);
  CHECK(one_clean_line(e3));
  CHECK(contains(e3, "esc.st: tensor 'w\\x0a\\x01': unsupported dtype 'F\\x0a32'"));
}

// ---------------------------------------------------------------------------------------------------------
// JPEG: dimensions from the header, checked against the documented limits before decoding.

namespace {
// A real JPEG of (w, h) with its SOF0 dimensions rewritten to (fw, fh): the header says what a hostile
// file says, the data stays small.
std::vector<uint8_t> jpeg_declaring(int fw, int fh, int w = 32, int h = 16) {
  data::Image img(w, h);
  for (size_t i = 0; i < img.pixels.size(); ++i) img.pixels[i] = uint8_t(i * 7);
  std::vector<uint8_t> j = data::encode_jpeg(img, 90);
  for (size_t i = 2; i + 9 < j.size(); ++i)
    if (j[i] == 0xFF && j[i + 1] == 0xC0) {
      j[i + 5] = uint8_t(fh >> 8), j[i + 6] = uint8_t(fh & 0xff);
      j[i + 7] = uint8_t(fw >> 8), j[i + 8] = uint8_t(fw & 0xff);
      return j;
    }
  FAIL("no SOF0 marker");
  return j;
}
}  // namespace

TEST_CASE("jpeg: frames declaring too many pixels or no usable shape are refused from the header") {
  struct Case {
    int w, h;
    std::string want;
  };
  const Case cases[] = {
      {65500, 65500, "frame of 65500x65500 is too large (the limit is 16384 pixels per side)"},
      {16385, 1024, "frame of 16385x1024 is too large (the limit is 16384 pixels per side)"},
      {8193, 8193, "frame of 8193x8193 is too large (67125249 pixels; the limit is 67108864)"},
      {65500, 1, "frame of 65500x1 is too large"},
      {16384, 1, "frame of 16384x1 is too elongated (the long side may be at most 16 times the short one"},
      {17, 340, "frame of 17x340 is too elongated"},
  };
  for (const auto& c : cases) {
    const std::vector<uint8_t> j = jpeg_declaring(c.w, c.h);
    const std::string path = save_file("big_" + std::to_string(c.w) + "x" + std::to_string(c.h) + ".jpg",
                                       std::string(j.begin(), j.end()));
    double sec = 0;
    const std::string e = error_of([&] { data::decode_jpeg_file(path); }, &sec);
    INFO(e);
    CHECK(contains(e, path + ": " + c.want));
    CHECK(sec < 2);
    CHECK(contains(error_of([&] { data::read_jpeg_header(j, "h.jpg"); }), "h.jpg: " + c.want));
  }
  // At the limits, frames decode: 16:1 and 1:16 (real pixels, small sizes).
  CHECK(data::decode_jpeg(jpeg_declaring(320, 20, 320, 20), "wide.jpg").width == 320);
  CHECK(data::decode_jpeg(jpeg_declaring(20, 320, 20, 320), "tall.jpg").height == 320);
  CHECK(contains(error_of([&] { data::decode_jpeg(jpeg_declaring(340, 20, 340, 20), "x.jpg"); }), "x.jpg: frame of 340x20 is too elongated"));
}

// ---------------------------------------------------------------------------------------------------------
// Special files: only regular files are read, within a size limit.

TEST_CASE("special files as frames, models and checkpoints give a clear error, never a hang") {
  const std::string dir = tmp().file("a_folder.jpg");
  fs::create_directories(dir);
  const std::string fifo = tmp().file("pipe.jpg");
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);  // nobody ever writes to it: a blocking open would hang

  std::string e = error_of([&] { data::decode_jpeg_file(dir); });
  CHECK(contains(e, dir + ": is a directory, not a file"));
  e = error_of([&] { data::decode_jpeg_file(fifo); });
  CHECK(contains(e, fifo + ": not a regular file (a FIFO); only regular files are read"));
  if (fs::exists("/dev/zero")) {
    e = error_of([&] { data::decode_jpeg_file("/dev/zero"); });
    CHECK(contains(e, "/dev/zero: not a regular file (a character device)"));
    e = error_of([&] { load_state_dict_file("/dev/zero"); });
    CHECK(contains(e, "/dev/zero: not a regular file (a character device)"));
    e = error_of([&] { read_notebook_checkpoint("/dev/zero"); });
    CHECK(contains(e, "/dev/zero: not a regular file"));
  }
  e = error_of([&] { load_state_dict_file(fifo); });
  CHECK(contains(e, fifo + ": not a regular file (a FIFO)"));
  e = error_of([&] { load_state_dict_file(dir); });
  CHECK(contains(e, dir + ": is a directory, not a file"));
  e = error_of([&] { load_pth(dir); });
  CHECK(contains(e, dir + ": is a directory"));
  e = error_of([&] { load_safetensors(fifo); });
  CHECK(contains(e, fifo + ": not a regular file"));
  e = error_of([&] { data::read_annotations(dir); });
  CHECK(contains(e, dir));

  // The size limit, checked before reading.
  const std::string big = save_file("big.bin", std::string(5000, 'x'));
  e = error_of([&] { read_file(big, 4096); });
  CHECK(contains(e, big + ": too large (5000 bytes; the limit is 4096)"));
  CHECK(read_file(big, 5000).size() == 5000);

  // A path with control bytes is escaped in the message.
  e = error_of([&] { load_state_dict_file(tmp().file("no\nsuch\x01.pth")); });
  CHECK(one_clean_line(e));
  CHECK(contains(e, "no\\x0asuch\\x01.pth: cannot open"));
  // Escaped once, whichever reader fails: the zip directory, the pickle, safetensors, a checkpoint.
  const std::string odd = save_file("odd\nname.pth", pth_zip("\x80\x02}.").substr(0, 60));
  e = error_of([&] { load_state_dict_file(odd); });
  INFO(e);
  CHECK(one_clean_line(e));
  CHECK(contains(e, "odd\\x0aname.pth: truncated"));
  PickleWriter list;
  list.op(']').op('.');
  const std::string odd2 = save_file("odd\\2.pth", pth_zip(list.s));
  e = error_of([&] { read_notebook_checkpoint(odd2); });
  CHECK(contains(e, "odd\\x5c2.pth: not a training checkpoint"));
  e = error_of([&] { load_state_dict_file(odd2); });
  CHECK(contains(e, "odd\\x5c2.pth: no state dict found (the file holds list (0 items))"));
}

// ---------------------------------------------------------------------------------------------------------
// The fuzzers' seeds (tests/fuzz/seeds, written by torch.save) are valid files: the zip and legacy writers'
// copies of one state dict, with a strided view, an offset view and a shared storage, read the same.

TEST_CASE("fuzz seeds: torch.save's zip and legacy files of one state dict read alike") {
  const std::string seeds = std::string(VB_FIXTURES) + "/../fuzz/seeds/pth/";
  const StateDict z = load_state_dict_file(seeds + "state_dict_zip.pth");
  const StateDict l = load_state_dict_file(seeds + "state_dict_legacy.pth");
  REQUIRE(z.order == l.order);
  REQUIRE(z.order.size() == 7);
  for (const auto& k : z.order) {
    INFO(k);
    CHECK(z.at(k).shape == l.at(k).shape);
    CHECK(z.at(k).dtype == l.at(k).dtype);
    CHECK(z.at(k).bytes == l.at(k).bytes);
  }
  // view = arange(6)[1:5:2] = [1, 3]; share = arange(6); fc.weight is a (2, 4) transpose.
  CHECK(z.at("view").to_f64() == std::vector<double>{1, 3});
  CHECK(z.at("share").to_f64() == std::vector<double>{0, 1, 2, 3, 4, 5});
  CHECK(z.at("fc.weight").shape == Shape{2, 4});
  CHECK(z.at("bn1.num_batches_tracked").to_f64() == std::vector<double>{3});
  const NotebookCheckpoint ck = read_notebook_checkpoint(seeds + "checkpoint_zip.pth");
  const NotebookCheckpoint cl = read_notebook_checkpoint(seeds + "checkpoint_legacy.pth");
  CHECK(ck.epoch == 2);
  CHECK(cl.epoch == 2);
  CHECK(ck.optimizer_state.size() == 2);
  CHECK(ck.optimizer_state.at(0).step == 1);
  CHECK(ck.optimizer_state.at(0).exp_avg.bytes == cl.optimizer_state.at(0).exp_avg.bytes);
}
