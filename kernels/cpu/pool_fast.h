// Max pooling for the CPU backend's hot path: the same results as maxpool_fwd / maxpool_bwd of ops.h (which
// stay the definition, checked against PyTorch), computed faster. A plane holding a NaN is handed to those
// definitions whole, so NaN semantics are theirs by construction.
//   forward: separable (the maximum over the window's rows, vectorised, then over its columns of that row
//            buffer). Equal values are equal bits except for zeros' signs: where a window's maximum is 0 and
//            it holds both +0 and -0, the sign may differ from maxpool_fwd's first-in-scan-order choice.
//   backward: maxpool_bwd's argmax (the first maximum in row-major scan order), branch-free, per window.
#pragma once

namespace vb::cpu {

template <class T>
void maxpool_fwd_fast(int N, int C, int H, int W, int k, int s, int p, const T* x, T* y);
template <class T>
void maxpool_bwd_fast(int N, int C, int H, int W, int k, int s, int p, const T* x, const T* dy, T* dx);

}  // namespace vb::cpu
