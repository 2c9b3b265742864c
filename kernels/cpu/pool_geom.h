// Max pooling's window geometry on the CPU, shared by pool.cpp, pool_fast.cpp and pool_nhwc.cpp: output size
// P x Q of an H x W plane for kernel k, stride s, padding p (PyTorch's floor mode), and each window's rows and
// columns clipped to the plane.
#pragma once
#include <algorithm>
#include <cstdint>

#include "kernels/check.h"

namespace vb::cpu {

struct PoolGeom {
  int H, W, k, s, p, P, Q;
  // `what` names the op in messages.
  PoolGeom(int H_, int W_, int k_, int s_, int p_, const char* what = "max pool") : H(H_), W(W_), k(k_), s(s_), p(p_) {
    VB_CHECK(k > 0 && s > 0 && p >= 0 && 2 * p <= k, what, ": bad kernel ", k, " stride ", s, " padding ", p);
    P = (H + 2 * p - k) / s + 1;
    Q = (W + 2 * p - k) / s + 1;
    VB_CHECK(P > 0 && Q > 0, what, ": ", H, "x", W, " input too small for kernel ", k);
  }
  // The window's clipped rows [h0, h1) and columns [w0, w1).
  void rows(int op, int& h0, int& h1) const {
    h0 = std::max(op * s - p, 0);
    h1 = std::min(op * s - p + k, H);
  }
  void cols(int oq, int& w0, int& w1) const {
    w0 = std::max(oq * s - p, 0);
    w1 = std::min(oq * s - p + k, W);
  }
};

// parallel_for's grain for work over planes: about 16k elements a chunk.
inline int64_t plane_grain(int64_t per_plane) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(per_plane, 1)); }

}  // namespace vb::cpu
