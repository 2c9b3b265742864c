// Which convolution algorithm a layer runs, searched once per layer and reused for smaller batches: the CUDA
// backend's policy (engine/backend_cuda.cu), kept here as plain C++ so that it is tested without a GPU
// (tests/test_ops_cpu.cpp).
//
// cuDNN's algorithm search times every candidate on the real buffers and waits for the device: done for each
// new batch size, it ran mid-epoch for the last partial batch of every split and for every batch that lost
// skipped images. The policy: a choice searched at batch B serves any batch n <= B of the same layer and
// direction (the smallest such B, the closest shape); only a batch larger than every search so far searches
// again. A reused choice is a candidate, not a promise: the caller checks it for the actual shape (cuDNN's
// workspace size for that algorithm and shape, within the limit) and, when cuDNN refuses it, searches at n,
// which is then recorded for n exactly.
#pragma once
#include <array>
#include <cstddef>
#include <map>
#include <optional>

namespace vb {

// A layer and direction: the convolution's shape without its batch size, and everything the choice depends on.
struct ConvLayerKey {
  int C, H, W, K, R, S, stride, pad;
  int precision;      // vb::Precision
  int deterministic;  // 1: only bit-reproducible algorithms were candidates
  int direction;      // 0 forward, 1 backward data, 2 backward filter
  auto tie() const { return std::array<int, 11>{C, H, W, K, R, S, stride, pad, precision, deterministic, direction}; }
  bool operator<(const ConvLayerKey& o) const { return tie() < o.tie(); }
};

struct ConvAlgoChoice {
  int algo = 0;          // cudnnConvolution{Fwd,BwdData,BwdFilter}Algo_t
  int math = 0;          // cudnnMathType_t
  size_t workspace = 0;  // bytes, at the batch it was searched for
};

class ConvAlgoCache {
 public:
  struct Hit {
    int batch;  // the batch the choice was searched for (>= the batch asked about)
    ConvAlgoChoice choice;
  };
  // The choice to try for batch n: the one searched at the smallest batch >= n; none when n is larger than
  // every search of this layer (search, then record).
  std::optional<Hit> find(const ConvLayerKey& k, int n) const {
    auto it = by_layer_.find(k);
    if (it == by_layer_.end()) return std::nullopt;
    auto c = it->second.lower_bound(n);
    if (c == it->second.end()) return std::nullopt;
    return Hit{c->first, c->second};
  }
  // A search's result for batch n (counted: tests and the bench report how many searches a run made).
  void record(const ConvLayerKey& k, int n, const ConvAlgoChoice& c) {
    by_layer_[k][n] = c;
    ++searches_;
  }
  size_t searches() const { return searches_; }
  void clear() { by_layer_.clear(); }

 private:
  std::map<ConvLayerKey, std::map<int, ConvAlgoChoice>> by_layer_;
  size_t searches_ = 0;
};

}  // namespace vb
