// PyTorch files (torch.save) read without PyTorch: the zip format (torch >= 1.6: `<archive>/data.pkl` plus
// one stored entry per storage, `<archive>/data/<key>`) and the legacy format (magic number, protocol and
// system-info pickles, the main pickle, the list of storage keys, then each storage as an 8-byte element
// count and its raw bytes). Tensors come back as contiguous host copies (views honour storage offset, size
// and stride; tensors sharing a storage each get their own copy).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/pickle.h"

namespace vb {

// Reads `path` and returns the unpickled object with Tensor leaves. Errors name the file and the problem:
// truncated, not a PyTorch file, a compressed zip entry, an unsupported opcode, global or dtype.
pickle::ValuePtr load_pth(const std::string& path);
// The same from the file's bytes (`path` only names it in messages).
pickle::ValuePtr parse_pth(std::string_view bytes, const std::string& path);

// The first bytes of each format, for telling files apart.
bool looks_like_zip(std::string_view bytes);         // "PK\3\4"
bool looks_like_legacy_pth(std::string_view bytes);  // PROTO 2, LONG1 and torch's magic number

// The entries of a zip archive, read from its central directory (zip64 included). Only the directory and
// local headers are parsed: data_offset is where an entry's (stored) bytes begin.
struct ZipEntry {
  std::string name;
  uint16_t method = 0;  // 0 = stored
  uint64_t data_offset = 0;
  uint64_t size = 0;  // compressed size (= the size for stored entries)
};
std::vector<ZipEntry> read_zip_directory(std::string_view bytes, const std::string& path);

}  // namespace vb
