// Convolution with channels-last (NHWC) activations: what the CPU backend runs. The weights keep PyTorch's
// layout [K, C, R, S]; x is [N, H, W, C], y and dy [N, P, Q, K].
//
// The forward and data-gradient passes need no im2col matrix: a register tile of 6 output pixels x 16
// output channels (8 in double) sums, tap by tap, runs of contiguous input channels read in place through one
// pointer per pixel (a pointer to zeros where the tap falls in the padding), against the weights packed once
// per call. The data gradient is the same gather written the other way round: each input pixel sums the output
// pixels its taps reach (for stride 2, pixels of one column parity at a time, so every tap in a tile is live for
// all or none of them). The filter gradient is a GEMM over pixels of dy^T and an im2col built a block of pixels
// at a time (a 1x1 stride-1 convolution uses x itself); the stem, and layers with at most 32 input or output
// channels and at most 16K weights, sum dy times each pixel's input values in a register tile of 16 output
// channels (8 in double; K a multiple of it) instead, reading x in place (zero-bordered when padded), unless
// Winograd takes the layer.
//
// 3x3 stride-1 layers with at least 32 channels on maps of 8x8 or more run all three passes by Winograd
// F(2x2, 3x3); the forward and data gradient also on 6x6 and 7x7 maps from 48 tiles a call, the filter gradient
// from 4x4 up (conv2d_nhwc_winograd): 2.25x fewer multiply-adds, with the transforms' rounding besides.
//
// Every output element is one sum in an order fixed by the shape: over taps in (r, s) order, channels in order
// (forward and data gradient); over pixels in blocks fixed by the shape (filter gradient). Threads split the
// tiles, never a sum, so the bits do not depend on the thread count. They differ from the NCHW kernels'
// (conv.cpp) in the summation order (and Winograd's transforms) only.
#pragma once

#include <vector>

#include "kernels/cpu/ops.h"

namespace vb::cpu {

// y [N, P, Q, K] = conv(x [N, H, W, C], w [K, C, R, S]).
template <class T>
void conv2d_nhwc_fwd(const ConvShape& s, const T* x, const T* w, T* y);
// Evaluation's convolution with its batch norm folded in: y = act(conv(x, w * scale) + bias + residual), the
// weights of output channel k scaled by scale[k] as they are packed, then bias, the residual (may be null,
// same layout as y) and a ReLU (v < 0 ? 0 : v) applied to each output tile as it is stored. y must not alias
// x or residual.
template <class T>
void conv2d_nhwc_fwd_affine(const ConvShape& s, const T* x, const T* w, const T* scale, const T* bias,
                            const T* residual, bool relu, T* y);

// The same with the scaled weights made once and kept: an evaluation over many batches of an unchanging model
// (the CPU backend's evaluation pass) packs, or Winograd-transforms, each layer's weights once instead of once
// per batch. conv2d_nhwc_prepare makes them for a shape (N > 0); conv2d_nhwc_fwd_prepared runs any shape that
// differs from it in N alone. Prepared weights take Winograd wherever the shape fits it (6x6 maps and up) at any
// batch, their transform being paid once; otherwise the same algorithm as conv2d_nhwc_fwd_affine, and then the
// same bits on the same weights and scale.
template <class T>
struct PreparedConv {
  ConvShape shape{};
  bool winograd = false;  // the values are Winograd's transformed weights, not the packed slivers
  std::vector<T> values;
  // Whether these weights serve shape s: any shape that differs from theirs in N alone (packing depends on C, K,
  // R and S, whether Winograd runs on the map's size too).
  bool serves(const ConvShape& s) const {
    return !values.empty() && s.C == shape.C && s.H == shape.H && s.W == shape.W && s.K == shape.K &&
           s.R == shape.R && s.S == shape.S && s.stride == shape.stride && s.pad == shape.pad;
  }
};
template <class T>
void conv2d_nhwc_prepare(const ConvShape& s, const T* w, const T* scale, PreparedConv<T>& out);
template <class T>
void conv2d_nhwc_fwd_prepared(const ConvShape& s, const T* x, const PreparedConv<T>& w, const T* bias,
                              const T* residual, bool relu, T* y);
// dx [N, H, W, C] from dy [N, P, Q, K] and w.
template <class T>
void conv2d_nhwc_bwd_data(const ConvShape& s, const T* dy, const T* w, T* dx);
// dw [K, C, R, S] from x [N, H, W, C] and dy [N, P, Q, K].
template <class T>
void conv2d_nhwc_bwd_filter(const ConvShape& s, const T* x, const T* dy, T* dw);

// Whether a pass runs this shape by Winograd F(2x2, 3x3) (3x3 stride 1, at least 32 channels, output maps of
// 8x8 or more, or 6x6 with 48 tiles of 2x2 or more; 4x4 for the filter gradient; not turned off by
// VB_CPU_WINOGRAD=0): its results then carry the transforms' rounding too.
enum class ConvPass { Forward, DataGradient, FilterGradient };
template <class T>
bool conv2d_nhwc_winograd(const ConvShape& s, ConvPass pass);

// NCHW <-> NHWC copies ([N, C, HW] <-> [N, HW, C]).
template <class T>
void nchw_to_nhwc(int N, int C, int HW, const T* src, T* dst);
template <class T>
void nhwc_to_nchw(int N, int C, int HW, const T* src, T* dst);

}  // namespace vb::cpu
