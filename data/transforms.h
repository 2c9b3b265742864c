// The notebook's torchvision transforms on Pillow images, reproduced on 8-bit RGB images.
//
//   evaluation: Resize((R, R)) -> CenterCrop(S) -> ToTensor -> Normalize(ImageNet mean/std)
//   training:   Resize(R) (shorter side) -> RandomResizedCrop(S) -> RandomRotation(5) -> ToTensor -> Normalize
// with S = image_size (224 by default) and R = resize_size(S) = round(S * 8 / 7) (256 for 224).
// A non-square size S = (h, w) (`--image-size 224x400`): evaluation resizes to (R_h, R_w) = (round(8h/7),
// round(8w/7)) and centre-crops (h, w); training resizes the shorter side to round(8 min(h, w) / 7) as for a
// square size, and RandomResizedCrop's output is (h, w) (torchvision's RandomResizedCrop((h, w)): the crop box
// is drawn as for any size, then resized to h x w).
//
// Conventions (a GPU mirror must follow them exactly):
// - Images are (H, W, 3) uint8 RGB; tensors are (3, h, w) float32 CHW, channel order R, G, B.
// - Resizing is Pillow's BILINEAR with antialiasing (ImagingResample): separable, horizontal pass first into
//   an 8-bit intermediate, then vertical. For an axis of input length n resized to m: scale = n / m,
//   filterscale = max(scale, 1), support = filterscale (bilinear support 1). Output pixel i has centre
//   c = (i + 0.5) * scale (input pixel j covers [j, j + 1)); taps j from xmin = int(c - support + 0.5)
//   (clamped to >= 0) to xmax = int(c + support + 0.5) (clamped to <= n), exclusive; weight of tap j =
//   max(0, 1 - |t|) with t = ((j - c) + 0.5) * (1.0 / filterscale), all in double (no fused multiply-add),
//   divided by the sum of the tap weights, then to fixed point: k = int(w * 2^22 + 0.5).
//   A pixel = clamp((2^21 + sum v_j k_j) >> 22, 0, 255), in int32 (exact).
//   Only the input rows the vertical pass needs go through the horizontal pass (Pillow does the same).
// - A crop is a sub-rectangle (top, left, height, width) that must lie inside the image; resized_crop
//   resizes the crop as an image of its own (torchvision crops, then resizes), so taps never reach outside it.
// - CenterCrop(S) of an (H, W) image: top = round_half_even((H - S) / 2), left likewise (torchvision).
// - Resize(R) on the shorter side: the short side becomes R, the long one int(R * long / short) (truncated).
// - Rotation (Pillow's Image.rotate(angle), NEAREST, expand=False, black fill): about the centre
//   (w / 2, h / 2) in pixel-edge coordinates; output pixel (x, y) takes input pixel
//   (floor(xs), floor(ys)) with xs = a (x + 0.5) + b (y + 0.5) + c, ys = d (x + 0.5) + e (y + 0.5) + f,
//   a = e = cos(-angle), b = sin(-angle), d = -sin(-angle) (angle in radians = degrees * (pi / 180); each
//   rounded to 15 decimals, as Pillow does), c = a (-cx) + b (-cy) + cx, f = d (-cx) + e (-cy) + cy with
//   (cx, cy) = (w / 2, h / 2). Pillow evaluates this in 16.16 fixed point, and so does rotate_nearest:
//   fix(v) = floor(v * 65536 + 0.5); A0 = fix(a), A1 = fix(b), A3 = fix(d), A4 = fix(e),
//   A2 = fix((c + a * 0.5) + b * 0.5), A5 = fix((f + d * 0.5) + e * 0.5); output row y starts at
//   (X, Y) = (A2 + y A1, A5 + y A4) and each step in x adds (A0, A3); the source pixel is (X >> 16, Y >> 16)
//   (arithmetic shifts), black (0, 0, 0) when outside the input. A positive angle turns the picture
//   counter-clockwise.
// - ToTensor + Normalize: v = (float(u) / 255.f - mean_c) / std_c in float32, mean (0.485, 0.456, 0.406),
//   std (0.229, 0.224, 0.225) as float32: the same float operations as torchvision, bit for bit.
// - The random draws of RandomResizedCrop and RandomRotation follow torchvision's algorithm (below) on a
//   counter-based generator keyed by (seed, epoch, sample index), not on torch's generator.
#pragma once
#include <cstdint>

#include "data/image.h"
#include "data/rng.h"
#include "kernels/normalize.h"  // kImageNetMean, kImageNetStd, norm_table()

namespace vb::data {

// R for an image size S: round(S * 8 / 7); 224 -> 256 (the notebook's pair), 64 -> 73.
inline int resize_size(int image_size) { return (image_size * 8 + 3) / 7; }
// (R_h, R_w) for a size (h, w): evaluation's Resize((R_h, R_w)).
inline ImageSize resize_size(ImageSize s) { return ImageSize(resize_size(s.h), resize_size(s.w)); }
// The shorter side training's Resize(R) gives a frame: round(8 min(h, w) / 7).
inline int train_resize_side(ImageSize s) { return resize_size(s.min_side()); }

struct CropBox {
  int top = 0, left = 0, height = 0, width = 0;
};

// Pillow's antialiased bilinear resize of the whole image to (out_h, out_w).
Image resize_bilinear(const Image& src, int out_w, int out_h);
// The same resample of a crop box to (out_h, out_w) with the plain loops only (the other functions use
// bit-identical AVX2 / AVX-512 horizontal passes); for checking the vectorised paths.
Image resized_crop_reference(const Image& src, const CropBox& box, int out_w, int out_h);
// The widest instruction set the horizontal pass may use: 0 plain loops, 1 AVX2, 2 AVX-512 (VBMI + VNNI,
// when the CPU has them; the default). All give identical pixels; for tests and benchmarks.
void set_resample_simd_limit(int level);
// torchvision's Resize(short_side) on a Pillow image: the shorter side to `short_side`, aspect kept.
Image resize_shorter(const Image& src, int short_side);
// Crop (copy) of a box inside the image.
Image crop(const Image& src, const CropBox& box);
// torchvision's CenterCrop(size) (the image must be at least size x size).
Image center_crop(const Image& src, int size);
// torchvision's resized_crop(img, top, left, height, width, [size, size]): crop, then antialiased bilinear.
Image resized_crop(const Image& src, const CropBox& box, int size);
// Pillow's Image.rotate(angle_degrees) with NEAREST, expand=False, black fill.
Image rotate_nearest(const Image& src, double angle_degrees);

// ToTensor + Normalize into `out` (3, H, W) float32.
void to_normalized_chw(const Image& src, float* out);

// torchvision's RandomResizedCrop.get_params(scale = (0.08, 1), ratio = (3/4, 4/3)) for an image of
// (width, height): up to ten tries of area fraction ~ U(0.08, 1) and log-aspect ~ U(log 3/4, log 4/3),
// w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio)) (half to even, as Python's round), accepted
// when 0 < w <= width and 0 < h <= height, then top ~ U{0..height-h}, left ~ U{0..width-w}; if no try fits,
// the central crop of the whole image clamped to the ratio range. Draws come from `rng` in that order.
CropBox random_resized_crop_params(int width, int height, CounterRng& rng);
// The fallback of the above alone (the central crop), exposed for tests.
CropBox center_crop_fallback(int width, int height);

// All random draws of one training sample: a pure function of (seed, epoch, sample index) and the size of
// the resized frame it applies to.
struct TrainDraw {
  CropBox box;
  double angle = 0;  // degrees, U(-5, 5)
};
TrainDraw draw_train_params(uint64_t seed, int64_t epoch, int64_t sample, int width, int height);

// ---- the pipelines ----
// Evaluation, deterministic part only, uint8: Resize((R_h, R_w)) -> CenterCrop((h, w)). What the cache keeps.
Image eval_crop(const Image& decoded, ImageSize image_size);
// Evaluation, whole: eval_crop then ToTensor + Normalize into `out` (3, h, w).
void eval_transform(const Image& decoded, ImageSize image_size, float* out);
// Training, deterministic part: Resize(R) on the shorter side, R = train_resize_side. What the cache keeps.
Image train_resize(const Image& decoded, ImageSize image_size);
// The size train_resize gives a (width, height) frame: {width, height} of Resize(R) on the shorter side.
CropBox resize_shorter_size(int width, int height, int short_side);  // top = left = 0
// The part `box` of train_resize(decoded, S) computed alone: equal to crop(train_resize(decoded, S), box), at
// the cost of the box only (the uncached training path: the crop's window is all the random part reads).
Image train_resize_crop(const Image& decoded, ImageSize image_size, const CropBox& box);
// Training, random part on a train_resize'd frame: resized_crop(box, (h, w)) -> rotate(angle) -> ToTensor +
// Normalize into `out` (3, h, w). The rotation and normalisation are fused (same values as the two steps).
void train_random_part(const Image& resized, ImageSize image_size, const TrainDraw& draw, float* out);
// The same before ToTensor + Normalize: the (h, w, 3) uint8 pixels, which a backend normalises on upload
// (Backend::upload_images) to the values train_random_part writes.
void train_random_part_u8(const Image& resized, ImageSize image_size, const TrainDraw& draw, uint8_t* out);

}  // namespace vb::data
