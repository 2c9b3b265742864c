// Whole-file reads and atomic writes, shared by every folder (header-only, so data/ can use it without
// linking the engine): a write goes to <path>.tmp.<pid> in the same folder, is flushed to disk, then renamed
// over <path>, so a crash leaves either the old file or the new one, never a torn one.
#pragma once
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>

#include "kernels/check.h"

namespace vb {

// The default limit of read_file: far above any file vbtrain reads whole (a ResNet-50 checkpoint with its
// AdamW state is about 0.3 GB), low enough that a wrong path cannot exhaust memory.
inline constexpr uint64_t kMaxReadBytes = uint64_t(8) << 30;

// Reads a whole regular file of at most `max_bytes`. Anything else is refused by name before a byte is read:
// a directory, a FIFO (opened without blocking, so a FIFO with no writer cannot hang the reader), a device
// such as /dev/zero (which would otherwise be read without end), a file over the limit.
template <class Bytes = std::string>  // std::string or std::vector<uint8_t>
Bytes read_whole_file(const std::string& path, uint64_t max_bytes = kMaxReadBytes) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) fail(escape(path), ": cannot open (", std::strerror(errno), ")");
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail(escape(path), ": cannot read its size (", std::strerror(errno), ")");
  if (S_ISDIR(st.st_mode)) fail(escape(path), ": is a directory, not a file");
  if (!S_ISREG(st.st_mode)) {
    const char* kind = S_ISFIFO(st.st_mode)   ? "a FIFO"
                       : S_ISCHR(st.st_mode)  ? "a character device"
                       : S_ISBLK(st.st_mode)  ? "a block device"
                       : S_ISSOCK(st.st_mode) ? "a socket"
                                              : "a special file";
    fail(escape(path), ": not a regular file (", kind, "); only regular files are read");
  }
  if (uint64_t(st.st_size) > max_bytes)
    fail(escape(path), ": too large (", uint64_t(st.st_size), " bytes; the limit is ", max_bytes, ")");
  Bytes s(size_t(st.st_size), 0);
  size_t done = 0;
  for (;;) {
    if (done == s.size()) {  // the file may have grown since fstat: read on, within the limit
      char probe[4096];
      const ssize_t r = ::read(fd, probe, sizeof probe);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) fail(escape(path), ": read error (", std::strerror(errno), ")");
      if (r == 0) break;
      if (s.size() + size_t(r) > max_bytes) fail(escape(path), ": too large (over the limit of ", max_bytes, " bytes)");
      s.insert(s.end(), probe, probe + r);
      done = s.size();
      continue;
    }
    const ssize_t r = ::read(fd, reinterpret_cast<char*>(s.data()) + done, s.size() - done);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) fail(escape(path), ": read error (", std::strerror(errno), ")");
    if (r == 0) {  // shrank since fstat
      s.resize(done);
      break;
    }
    done += size_t(r);
  }
  return s;
}
inline std::string read_file(const std::string& path, uint64_t max_bytes = kMaxReadBytes) {
  return read_whole_file<std::string>(path, max_bytes);
}

inline void write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) fail(tmp, ": cannot create (", std::strerror(errno), ")");
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      fail(tmp, ": write failed (", std::strerror(e), ")");
    }
    done += size_t(w);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    fail(tmp, ": flush failed (", std::strerror(errno), ")");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    fail(path, ": cannot rename the temporary file into place (", std::strerror(e), ")");
  }
}

}  // namespace vb
