// Pooling for the CPU backend's channels-last activations: the same results, bit for bit, as ops.h's
// maxpool_fwd / maxpool_bwd / avgpool_fwd / avgpool_bwd on the transposed (NCHW) data, for T = float and double,
// vectorised across the C contiguous channels of a pixel. Shapes are given as ops.h gives them (N, C, H, W);
// the layout is x [N, H, W, C] (and y [N, P, Q, C] for max pooling, [N, C] for the average).
// Thread-count independent: no value is reduced across threads. (Not nhwc.h's maxpool_nhwc_* / avgpool_nhwc_*:
// those are the float/bf16 twins of the CUDA kernels, with float sums.)
#pragma once

namespace vb::cpu {

// Max pool k x k, stride s, padding p (padding never wins), P = (H + 2p - k) / s + 1 (likewise Q). Per channel
// the window is scanned in rows then columns and a strictly greater value or a NaN is taken (NaN propagates:
// the last NaN of the window; ties keep the first maximum; an all -inf window gives its first element).
template <class T>
void maxpool_nhwc_fwd_fast(int N, int C, int H, int W, int k, int s, int p, const T* x, T* y);
// dx [N, H, W, C] from x and dy [N, P, Q, C]: each window's gradient goes to that window's maximum as the
// forward picks it; an element that is the maximum of several windows receives their sum, added in output
// scan order (as maxpool_bwd).
template <class T>
void maxpool_nhwc_bwd_fast(int N, int C, int H, int W, int k, int s, int p, const T* x, const T* dy, T* dx);

// Global average pool: y [N, C] = T(sum over hw in order, in double, / HW).
template <class T>
void avgpool_nhwc_fwd_fast(int N, int C, int HW, const T* x, T* y);
// dx [N, HW, C] = dy [N, C] / T(HW).
template <class T>
void avgpool_nhwc_bwd_fast(int N, int C, int HW, const T* dy, T* dx);

}  // namespace vb::cpu
