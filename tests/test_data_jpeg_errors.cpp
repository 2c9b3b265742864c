// A decode error must not poison the thread's TurboJPEG handle: the next good frame on the same thread decodes
// (a regression: a truncated header left the handle mid-stream, and the following frame failed with
// "tjDecompress2(): Invalid argument", so one bad file cost two).
#include "data/jpeg.h"
#include "kernels/check.h"
#include "tests/test_util.h"

TEST_CASE("after a bad JPEG, the next good one decodes on the same thread") {
  vb::data::Image img(96, 54);
  for (size_t i = 0; i < img.pixels.size(); ++i) img.pixels[i] = uint8_t((i * 37) % 251);
  const std::vector<uint8_t> good = vb::data::encode_jpeg(img, 95);
  const vb::data::Image ref = vb::data::decode_jpeg(good, "good.jpg");
  for (size_t cut : {size_t(300), size_t(40), good.size() / 2}) {
    std::vector<uint8_t> bad(good.begin(), good.begin() + long(cut));
    INFO("cut at " << cut);
    CHECK_THROWS_AS(vb::data::decode_jpeg(bad, "bad.jpg"), vb::Error);
    const vb::data::Image again = vb::data::decode_jpeg(good, "good.jpg");
    CHECK(again.width == 96);
    CHECK(again.pixels == ref.pixels);
  }
  CHECK(vb::data::read_jpeg_header(good, "good.jpg").width == 96);
  CHECK(vb::data::decode_jpeg(good, "good.jpg").pixels == ref.pixels);
}
