// The float image transforms on the GPU, so that frames cached as uint8 in device memory can be augmented
// there. CPU twins (data/transforms.h, which states the exact arithmetic): train_random_part (resized_crop ->
// rotate_nearest -> ToTensor + Normalize) and to_normalized_chw. Results are bit-identical to the CPU path:
// the same Pillow fixed-point resampling (an 8-bit horizontal pass, then vertical), the same 16.16 rotation
// stepping, the same float32 normalisation.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/bf16.h"

namespace vb::cuda {

// One training sample: where its frame lies and what the random draws chose. Built on the host by
// make_aug_sample, uploaded as an array (one entry per sample of the batch).
struct AugSample {
  int64_t src_offset = 0;                              // byte offset of the (H, W, 3) uint8 frame in the arena
  int src_w = 0, src_h = 0;                            // frame size (the train_resize'd frame)
  int top = 0, left = 0, height = 0, width = 0;        // crop box inside the frame
  int r0 = 0, r1 = 0, r2 = 0, r3 = 0, r4 = 0, r5 = 0;  // Pillow's 16.16 rotation coefficients (a0..a5)
};

// The sample for crop box (top, left, height, width) of a src_w x src_h frame, resized to size x size and
// rotated by angle_degrees (Pillow's rotate, counter-clockwise for positive angles). Checks the box.
AugSample make_aug_sample(int64_t src_offset, int src_w, int src_h, int top, int left, int height, int width,
                          double angle_degrees, int size);

// out (N, 3, size, size) float32 = Normalize(ToTensor(rotate(resized_crop(frame_i, box_i, size), angle_i))).
// frames: the uint8 arena (device); samples: N AugSample (device).
void augment_frames(cudaStream_t st, int N, int size, const uint8_t* frames, const AugSample* samples, float* out);

// The same per-pixel code run on the host (frames and samples in host memory): checks the kernel's arithmetic
// against data/transforms where there is no GPU. Slow; for tests.
void augment_frames_host(int N, int size, const uint8_t* frames, const AugSample* samples, float* out);

// out (N, 3, H, W) float32 = Normalize(ToTensor(src (N, H, W, 3) uint8)): the evaluation frames, which the
// cache keeps already resized and centre-cropped.
void normalize_frames(cudaStream_t st, int N, int H, int W, const uint8_t* src, float* out);
// The same values channels-last: out (N, H, W, 3), for an NHWC backend's input.
void normalize_frames_nhwc(cudaStream_t st, int N, int H, int W, const uint8_t* src, float* out);
// The same rounded to bf16 (the CUDA backend's bf16 input: autocast casts the float input at the first
// convolution, so the normalised value rounded once).
void normalize_frames_nhwc_bf16(cudaStream_t st, int N, int H, int W, const uint8_t* src, vb::bf16* out);

}  // namespace vb::cuda
