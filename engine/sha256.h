// SHA-256 (FIPS 180-4), for checking downloaded weights against the hash prefix in their file name
// without an OpenSSL dependency.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace vb {

std::array<uint8_t, 32> sha256(std::string_view data);
std::string sha256_hex(std::string_view data);  // 64 lowercase hex digits

}  // namespace vb
