// Errors: every failure in the engine throws vb::Error with a message that names what failed and where.
// Tools catch it at the top and print one line with a non-zero exit code.
// This header sits below every layer (kernels/, data/, engine/, tools/ all include it).
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace vb {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... A>
std::string concat(const A&... a) {
  std::ostringstream os;
  (os << ... << a);
  return os.str();
}
[[noreturn]] inline void fail_at(const char* file, int line, const std::string& msg) {
  throw Error(concat(msg, " (", file, ":", line, ")"));
}
}  // namespace detail

// Untrusted bytes (names, keys and strings read from a file, paths given by a user) made safe to print in a
// one-line message: printable ASCII stays, and every other byte (newlines, NULs, control characters, bytes of
// non-ASCII or invalid UTF-8) is written as \xHH; at most `max` input bytes are shown, then "...".
inline std::string escape(std::string_view s, std::size_t max = 200) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  out.reserve(s.size() < max ? s.size() : max);
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i == max) {
      out += "...";
      break;
    }
    auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

// Builds a message from any streamable pieces: vb::fail("bad shape ", n).
template <class... A>
[[noreturn]] void fail(const A&... a) {
  throw Error(detail::concat(a...));
}

}  // namespace vb

// VB_CHECK(cond, pieces...): throws with the condition's text, the message and file:line when cond is false.
// The condition is evaluated once; no trailing semicolon is carried.
#define VB_CHECK(cond, ...)                                                                              \
  do {                                                                                                   \
    if (!(cond)) ::vb::detail::fail_at(__FILE__, __LINE__, ::vb::detail::concat("check failed: " #cond " ", \
                                                                                 ##__VA_ARGS__));         \
  } while (0)

#ifdef VB_WITH_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#define VB_CUDA_CHECK(expr)                                                                           \
  do {                                                                                                \
    cudaError_t vb_err_ = (expr);                                                                     \
    if (vb_err_ != cudaSuccess)                                                                       \
      ::vb::detail::fail_at(__FILE__, __LINE__, ::vb::detail::concat("CUDA error ", cudaGetErrorName(vb_err_), \
                                                                     " (", cudaGetErrorString(vb_err_), ") in " #expr)); \
  } while (0)

#define VB_CUDNN_CHECK(expr)                                                                          \
  do {                                                                                                \
    cudnnStatus_t vb_st_ = (expr);                                                                    \
    if (vb_st_ != CUDNN_STATUS_SUCCESS)                                                               \
      ::vb::detail::fail_at(__FILE__, __LINE__,                                                       \
                            ::vb::detail::concat("cuDNN error ", cudnnGetErrorString(vb_st_), " in " #expr)); \
  } while (0)

#define VB_CUBLAS_CHECK(expr)                                                                         \
  do {                                                                                                \
    cublasStatus_t vb_st_ = (expr);                                                                   \
    if (vb_st_ != CUBLAS_STATUS_SUCCESS)                                                              \
      ::vb::detail::fail_at(__FILE__, __LINE__, ::vb::detail::concat("cuBLAS error ", cublasGetStatusString(vb_st_), \
                                                                     " in " #expr));                  \
  } while (0)

// After a kernel launch: catches bad launch configurations at once.
#define VB_CUDA_LAUNCH_CHECK() VB_CUDA_CHECK(cudaGetLastError())
#endif
