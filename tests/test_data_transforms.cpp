// JPEG decoding and the transforms against Pillow/torchvision (fixtures/transforms_golden.safetensors, made
// from fixtures/frame_320x180.jpg; see the fixtures README), plus the random draws' properties.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <set>

#include <nlohmann/json.hpp>

#include "data/jpeg.h"
#include "data/rng.h"
#include "data/transforms.h"
#include "engine/state_dict.h"
#include "tests/test_util.h"

using namespace vb;
using namespace vb::data;

namespace {

const StateDict& golden() {
  static StateDict sd = load_safetensors(vbtest::fixture("transforms_golden.safetensors"));
  return sd;
}

Image golden_image(const std::string& key) {
  const HostTensor& t = golden().at(key);
  REQUIRE(t.dtype == DType::U8);
  REQUIRE(t.shape.size() == 3);
  REQUIRE(t.shape[2] == 3);
  Image img(int(t.shape[1]), int(t.shape[0]));
  std::copy(t.bytes.begin(), t.bytes.end(), img.pixels.begin());
  return img;
}

// Max |a - b| over the pixels and how many differ; requires equal sizes.
struct Diff {
  int max = 0;
  size_t differing = 0, total = 0;
};
Diff diff(const Image& a, const Image& b) {
  REQUIRE(a.width == b.width);
  REQUIRE(a.height == b.height);
  Diff d;
  d.total = a.pixels.size();
  for (size_t i = 0; i < a.pixels.size(); ++i) {
    int e = std::abs(int(a.pixels[i]) - int(b.pixels[i]));
    d.max = std::max(d.max, e);
    d.differing += e != 0;
  }
  return d;
}

Image decoded_fixture() { return decode_jpeg_file(vbtest::fixture("frame_320x180.jpg")); }

}  // namespace

TEST_CASE("decode matches Pillow's decode of the fixture frame") {
  Image img = decoded_fixture();
  CHECK(img.width == 320);
  CHECK(img.height == 180);
  Diff d = diff(img, golden_image("decoded_rgb_hwc"));
  INFO("max diff " << d.max << ", " << d.differing << " of " << d.total << " values differ");
  // Same libjpeg-turbo algorithms (ISLOW IDCT, fancy upsampling): the bound is 1, exact expected.
  CHECK(d.max <= 1);
  CHECK(d.differing * 1000 <= d.total);
}

TEST_CASE("Resize((256,256)) matches Pillow's antialiased bilinear") {
  Image r = resize_bilinear(golden_image("decoded_rgb_hwc"), 256, 256);
  Diff d = diff(r, golden_image("resize_256x256_hwc"));
  INFO("max diff " << d.max << ", " << d.differing << " differ");
  CHECK(d.max == 0);  // same fixed-point arithmetic as Pillow: exact
}

TEST_CASE("Resize(256) on the shorter side matches torchvision") {
  Image r = resize_shorter(golden_image("decoded_rgb_hwc"), 256);
  CHECK(r.width == 455);
  CHECK(r.height == 256);
  Diff d = diff(r, golden_image("resize_short256_hwc"));
  INFO("max diff " << d.max << ", " << d.differing << " differ");
  CHECK(d.max == 0);
  CHECK(train_resize(golden_image("decoded_rgb_hwc"), 224).pixels == r.pixels);
}

TEST_CASE("resized_crop(10, 30, 150, 200, 224) matches torchvision") {
  Image r = resized_crop(golden_image("resize_short256_hwc"), CropBox{10, 30, 150, 200}, 224);
  Diff d = diff(r, golden_image("resized_crop_t10_l30_h150_w200_to224_hwc"));
  INFO("max diff " << d.max << ", " << d.differing << " differ");
  CHECK(d.max == 0);
}

TEST_CASE("rotate(3 degrees), nearest, black fill, matches Pillow") {
  Image src = golden_image("resized_crop_t10_l30_h150_w200_to224_hwc");
  Image r = rotate_nearest(src, 3.0);
  Image want = golden_image("rotate_3deg_nearest_hwc");
  Diff d = diff(r, want);
  INFO("max diff " << d.max << ", " << d.differing << " differ");
  CHECK(d.differing == 0);
  // The corners are filled with black, and a rotation by 0 is the identity.
  CHECK(int(r.row(0)[0]) + r.row(0)[1] + r.row(0)[2] == 0);
  CHECK(rotate_nearest(src, 0.0).pixels == src.pixels);
  // The sign convention: +3 and -3 differ.
  CHECK(rotate_nearest(src, -3.0).pixels != r.pixels);
}

TEST_CASE("evaluation transform matches torchvision's eval_chw") {
  const HostTensor& t = golden().at("eval_chw");
  REQUIRE(t.shape == Shape{3, 224, 224});
  std::vector<float> want = t.to_f32();
  std::vector<float> got(want.size());
  vbtest::poison(got);
  eval_transform(decoded_fixture(), 224, got.data());
  // From the exact uint8 crop, normalisation uses torchvision's float32 operations: equal to float rounding
  // (the golden went through float32 too); a decode off by one would show as 1/255/0.225 = 0.0174.
  vbtest::check_close("eval_chw", got, want, 1e-6, 1e-6);
  CHECK(resize_size(224) == 256);
  CHECK(resize_size(64) == 73);
}

TEST_CASE("train_random_part equals resized_crop then rotate then normalise") {
  Image resized = golden_image("resize_short256_hwc");
  TrainDraw d;
  d.box = CropBox{10, 30, 150, 200};
  d.angle = 3.0;
  std::vector<float> got(3 * 224 * 224), want(3 * 224 * 224);
  vbtest::poison(got);
  train_random_part(resized, 224, d, got.data());
  to_normalized_chw(golden_image("rotate_3deg_nearest_hwc"), want.data());
  vbtest::check_close("train_random_part", got, want, 0, 0);
}

TEST_CASE("RandomResizedCrop draws: inside the image, reproducible, torchvision's fallback") {
  std::set<std::pair<int, int>> sizes;
  for (int i = 0; i < 2000; ++i) {
    TrainDraw d = draw_train_params(7, 3, i, 455, 256);
    REQUIRE(d.box.top >= 0);
    REQUIRE(d.box.left >= 0);
    REQUIRE(d.box.top + d.box.height <= 256);
    REQUIRE(d.box.left + d.box.width <= 455);
    double area = double(d.box.width) * d.box.height / (455.0 * 256.0);
    double ratio = double(d.box.width) / d.box.height;
    CHECK(area >= 0.08 * 0.95);
    CHECK(ratio >= 0.75 * 0.9);
    CHECK(ratio <= 4.0 / 3.0 * 1.1);
    CHECK(std::fabs(d.angle) <= 5.0);
    sizes.insert({d.box.width, d.box.height});
    TrainDraw again = draw_train_params(7, 3, i, 455, 256);
    CHECK(again.box.top == d.box.top);
    CHECK(again.box.left == d.box.left);
    CHECK(again.angle == d.angle);
  }
  CHECK(sizes.size() > 500);  // genuinely random
  TrainDraw other = draw_train_params(7, 4, 0, 455, 256);
  TrainDraw first = draw_train_params(7, 3, 0, 455, 256);
  CHECK((other.angle != first.angle || other.box.top != first.box.top));
  // Fallback: a very wide image (ratio > 4/3) gets the central crop at ratio 4/3, a tall one at 3/4.
  CropBox f = center_crop_fallback(1000, 100);
  CHECK(f.height == 100);
  CHECK(f.width == 133);
  CHECK(f.left == (1000 - 133) / 2);
  CHECK(f.top == 0);
  CropBox t = center_crop_fallback(100, 1000);
  CHECK(t.width == 100);
  CHECK(t.height == 133);
  CHECK(t.top == (1000 - 133) / 2);
  CropBox s = center_crop_fallback(300, 256);
  CHECK((s.width == 300 && s.height == 256 && s.top == 0 && s.left == 0));
  // An extreme image where no try can fit (1 pixel tall) always falls back.
  CounterRng rng(1, RngStream::Augment, 0, 0);
  CropBox e = random_resized_crop_params(5000, 1, rng);
  CHECK(e.height == 1);
  CHECK(e.width == 1);
}

TEST_CASE("decoding greyscale, CMYK, and DCT-scaled files") {
  // Greyscale: replicated to three equal channels.
  std::vector<uint8_t> gray(64 * 48);
  for (int y = 0; y < 48; ++y)
    for (int x = 0; x < 64; ++x) gray[size_t(y * 64 + x)] = uint8_t(x * 4);
  Image g = decode_jpeg(encode_jpeg_gray(gray.data(), 64, 48, 100), "gray");
  REQUIRE(g.width == 64);
  int worst = 0;
  for (int i = 0; i < 64 * 48; ++i) {
    CHECK(g.pixels[size_t(3 * i)] == g.pixels[size_t(3 * i + 1)]);
    CHECK(g.pixels[size_t(3 * i)] == g.pixels[size_t(3 * i + 2)]);
    worst = std::max(worst, std::abs(int(g.pixels[size_t(3 * i)]) - int(gray[size_t(i)])));
  }
  CHECK(worst <= 3);
  // CMYK (Adobe-inverted samples, as stored): pure magenta+yellow ink is red; 50% black darkens to ~128.
  std::vector<uint8_t> cmyk(32 * 32 * 4);
  for (int i = 0; i < 32 * 32; ++i) {
    uint8_t* p = &cmyk[size_t(4 * i)];
    bool top = i < 16 * 32;
    p[0] = 255, p[1] = 0, p[2] = 0, p[3] = top ? 255 : 127;  // inverted: c = 0, m = y = 255, k = 0 or 128
  }
  Image c = decode_jpeg(encode_jpeg_cmyk(cmyk.data(), 32, 32, 100), "cmyk");
  const uint8_t* red = c.row(4) + 4 * 3;
  CHECK(red[0] >= 250);
  CHECK(red[1] <= 5);
  CHECK(red[2] <= 5);
  const uint8_t* dark = c.row(28) + 4 * 3;
  CHECK(std::abs(int(dark[0]) - 127) <= 5);
  CHECK(dark[1] <= 5);
  // DCT scaling: 320x180 with minimum 150x80 decodes at 1/2 (160x90); without a minimum, full size.
  std::vector<uint8_t> bytes = read_file_bytes(vbtest::fixture("frame_320x180.jpg"));
  Image half = decode_jpeg(bytes, "frame", 150, 80);
  CHECK(half.width == 160);
  CHECK(half.height == 90);
  Image small = decode_jpeg(bytes, "frame", 40, 20);
  CHECK(small.width == 40);
  CHECK(small.height == 23);
  CHECK(read_jpeg_header(bytes, "frame").width == 320);
}

TEST_CASE("bad JPEG data is an error naming the file") {
  std::vector<uint8_t> bytes = read_file_bytes(vbtest::fixture("frame_320x180.jpg"));
  auto message = [](const std::vector<uint8_t>& b) {
    try {
      decode_jpeg(b, "/some/where/frame.jpg");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  std::vector<uint8_t> truncated(bytes.begin(), bytes.begin() + long(bytes.size() / 2));
  std::string m = message(truncated);
  CHECK(m.find("/some/where/frame.jpg") != std::string::npos);
  CHECK(m != "no error");
  CHECK(message({}).find("empty") != std::string::npos);
  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13};
  CHECK(message(png).find("not a JPEG") != std::string::npos);
  CHECK_THROWS_WITH_AS(decode_jpeg_file("/no/such/file.jpg"), doctest::Contains("/no/such/file.jpg"), Error);
}

TEST_CASE("the vectorised resamples (AVX2, AVX-512) equal the plain loops on random images, boxes and sizes") {
  int level = 2;
  SUBCASE("AVX-512 where the CPU has it") { level = 2; }
  SUBCASE("AVX2") { level = 1; }
  set_resample_simd_limit(level);
  CounterRng rng(99, RngStream::Augment, 1, uint64_t(level));
  int cases = 0;
  for (int it = 0; it < 300; ++it) {
    const int w = 1 + int(rng.below(1400)), h = 1 + int(rng.below(120));
    Image img(w, h);
    for (auto& p : img.pixels) p = uint8_t(rng.below(256));
    CropBox b;
    b.width = 1 + int(rng.below(uint64_t(w)));
    b.height = 1 + int(rng.below(uint64_t(h)));
    b.left = int(rng.below(uint64_t(w - b.width + 1)));
    b.top = int(rng.below(uint64_t(h - b.height + 1)));
    const int ow = 1 + int(rng.below(260)), oh = 1 + int(rng.below(100));
    // Whole images (downscales and upscales on each axis), then square crops of random boxes.
    Image whole = resize_bilinear(img, ow, oh);
    Image whole_ref = resized_crop_reference(img, CropBox{0, 0, h, w}, ow, oh);
    REQUIRE(whole.pixels == whole_ref.pixels);
    const int S = 1 + int(rng.below(240));
    Image sq = resized_crop(img, b, S);
    Image sq_ref = resized_crop_reference(img, b, S, S);
    REQUIRE(sq.pixels == sq_ref.pixels);
    // The training geometry: 2.8x horizontal reduction of wide frames (the AVX-512 window path).
    Image wide(w * 4 + 16, h);
    for (auto& p : wide.pixels) p = uint8_t(rng.below(256));
    Image fast = resize_shorter(wide, std::max(1, h / 3));
    INFO("wide " << wide.width << "x" << wide.height << " -> " << fast.width << "x" << fast.height);
    REQUIRE(fast.pixels == resized_crop_reference(wide, CropBox{0, 0, h, wide.width}, fast.width, fast.height).pixels);
    ++cases;
  }
  set_resample_simd_limit(2);
  CHECK(cases == 300);
}

TEST_CASE("eval_crop (only the central window computed) equals CenterCrop of the full Resize((R,R))") {
  CounterRng rng(5, RngStream::Augment, 9, 9);
  for (int it = 0; it < 60; ++it) {
    const int S = 32 + int(rng.below(200)), R = resize_size(S);
    // Random sizes, plus the identity cases: already R wide, R tall, or R x R.
    int w = 1 + int(rng.below(700)), h = 1 + int(rng.below(400));
    if (it % 6 == 1) w = R;
    if (it % 6 == 2) h = R;
    if (it % 6 == 3) w = h = R;
    Image img(w, h);
    for (auto& p : img.pixels) p = uint8_t(rng.below(256));
    Image want = center_crop(resize_bilinear(img, R, R), S);
    Image got = eval_crop(img, S);
    REQUIRE(got.width == S);
    REQUIRE(got.height == S);
    CHECK(got.pixels == want.pixels);
  }
}

TEST_CASE("train_resize_crop equals the crop of the full train_resize") {
  CounterRng rng(8, RngStream::Augment, 3, 3);
  for (int it = 0; it < 60; ++it) {
    const int S = 32 + int(rng.below(200));
    const int w = 1 + int(rng.below(700)), h = 1 + int(rng.below(400));
    Image img(w, h);
    for (auto& p : img.pixels) p = uint8_t(rng.below(256));
    Image full = train_resize(img, S);
    const CropBox rs = resize_shorter_size(w, h, resize_size(S));
    REQUIRE(full.width == rs.width);
    REQUIRE(full.height == rs.height);
    TrainDraw d = draw_train_params(1, it, 0, full.width, full.height);
    CHECK(train_resize_crop(img, S, d.box).pixels == crop(full, d.box).pixels);
  }
}

// ---- non-square input sizes (--image-size HxW), against torchvision (tools/make_transform_goldens.py) ----

namespace {
const StateDict& nonsquare() {
  static StateDict sd = load_safetensors(vbtest::fixture("transforms_nonsquare.safetensors"));
  return sd;
}
Image nonsquare_image(const std::string& key) {
  const HostTensor& t = nonsquare().at(key);
  REQUIRE(t.dtype == DType::U8);
  REQUIRE(t.shape.size() == 3);
  Image img(int(t.shape[1]), int(t.shape[0]));
  std::copy(t.bytes.begin(), t.bytes.end(), img.pixels.begin());
  return img;
}
}  // namespace

TEST_CASE("image sizes: S and HxW parse, anything else is refused naming the text") {
  CHECK(parse_image_size("224") == ImageSize(224));
  CHECK(parse_image_size("224x400") == ImageSize(224, 400));
  CHECK(parse_image_size("48X80").w == 80);
  CHECK(ImageSize(224, 400).str() == "224x400");
  CHECK(ImageSize(224).str() == "224");
  CHECK(resize_size(ImageSize(224, 400)) == ImageSize(256, 457));
  CHECK(train_resize_side(ImageSize(400, 224)) == 256);
  for (const char* bad : {"", "0", "224x", "x400", "abc", "99999", "224x400x3", "-5", "2 24", "224x0"}) {
    CAPTURE(bad);
    try {
      parse_image_size(bad);
      FAIL("accepted");
    } catch (const vb::Error& e) {
      CHECK(std::string(e.what()).find("image size '" + std::string(bad) + "'") != std::string::npos);
    }
  }
  nlohmann::json j = ImageSize(48, 80);
  CHECK(j == "48x80");
  CHECK(j.get<ImageSize>() == ImageSize(48, 80));
  nlohmann::json k = ImageSize(224);
  CHECK(k == 224);  // square sizes stay numbers, as in config.json files written before
  CHECK(nlohmann::json::parse("[48, 80]").get<ImageSize>() == ImageSize(48, 80));
}

TEST_CASE("non-square evaluation: Resize((R_h, R_w)) then CenterCrop((h, w)) matches torchvision") {
  const Image decoded = decoded_fixture();
  for (ImageSize s : {ImageSize(48, 80), ImageSize(80, 48), ImageSize(64, 112)}) {
    CAPTURE(s.str());
    const HostTensor& t = nonsquare().at("eval_" + s.str() + "_chw");
    REQUIRE(t.shape == Shape{3, s.h, s.w});
    std::vector<float> want = t.to_f32(), got(want.size());
    vbtest::poison(got);
    eval_transform(decoded, s, got.data());
    vbtest::check_close("eval " + s.str(), got, want, 1e-6, 1e-6);
  }
}

TEST_CASE("non-square training: shorter-side resize, then resized_crop to (h, w) and rotation, match torchvision") {
  const Image decoded = decoded_fixture();
  for (ImageSize s : {ImageSize(48, 80), ImageSize(80, 48), ImageSize(64, 112)}) {
    CAPTURE(s.str());
    const Image want_resized = nonsquare_image("train_resize_" + s.str() + "_hwc");
    Diff d = diff(train_resize(decoded, s), want_resized);
    CHECK(d.max == 0);
    TrainDraw draw;
    draw.box = CropBox{7, 11, 40, 52};
    draw.angle = -4.0;
    const Image want_img = nonsquare_image("train_" + s.str() + "_hwc");
    REQUIRE(want_img.width == s.w);
    REQUIRE(want_img.height == s.h);
    std::vector<float> got(3 * size_t(s.pixels())), want(got.size());
    vbtest::poison(got);
    train_random_part(want_resized, s, draw, got.data());
    to_normalized_chw(want_img, want.data());
    vbtest::check_close("train " + s.str(), got, want, 0, 0);
    // The uncached path (only the crop's window resized) gives the same pixels.
    Image part = train_resize_crop(decoded, s, draw.box);
    CHECK(diff(part, crop(want_resized, draw.box)).max == 0);
  }
}
