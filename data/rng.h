// Counter-based random numbers: every draw is a pure function of (key, counter), so the draws for a given
// (seed, epoch, sample) are reproduced by any thread, in any order, after any restart, with no saved state.
#pragma once
#include <cstdint>

namespace vb::data {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Purposes, so that the shuffle of an epoch and the augmentation of its samples never share a stream.
enum class RngStream : uint64_t { Shuffle = 1, Augment = 2, Synth = 3 };

// A stream keyed by (seed, stream, a, b): e.g. (seed, Augment, epoch, sample index).
class CounterRng {
 public:
  CounterRng(uint64_t seed, RngStream stream, uint64_t a, uint64_t b = 0)
      : key_(splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ uint64_t(stream)) ^ a) ^ b)) {}
  uint64_t next() { return splitmix64(key_ ^ splitmix64(++counter_)); }
  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  // Uniform integer in [0, n) (n > 0), by the multiply-shift map (bias below 2^-40 for our n).
  uint64_t below(uint64_t n) { return uint64_t((unsigned __int128)next() * n >> 64); }

 private:
  uint64_t key_;
  uint64_t counter_ = 0;
};

}  // namespace vb::data
