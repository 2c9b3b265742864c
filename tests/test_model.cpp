// The model's tensor table against torchvision's own files, initialisation, state-dict round trips, the
// frozen backbone, and AdamW/StepLR through the Backend against PyTorch's numbers.
#include <cmath>
#include <cstring>
#include <random>

#include "engine/backend_forwarding.h"
#include "engine/model.h"
#include "engine/optimizer.h"
#include "data/transforms.h"
#include "engine/weights.h"
#include "tests/graph_twin.h"
#include "tests/steady_state.h"
#include "tests/step_capture.h"
#include "tests/test_util.h"

namespace {
vb::ModelConfig mini(std::vector<int> hidden = {16}) {
  vb::ModelConfig c;
  c.width = 8;
  c.hidden = std::move(hidden);
  return c;
}

// A [1,1,1,1] ResNet of the given width and a batch for it: B normal images of H x W, labels (label_step * i) % 8,
// class weights 1.
template <class T>
struct SmallRun {
  vb::ModelConfig cfg;
  std::vector<T> x;
  std::vector<int64_t> y;
  std::vector<T> cw = std::vector<T>(8, T(1));
};
template <class T>
SmallRun<T> small_run(int width, int B, int H, int W, uint32_t seed, int label_step) {
  SmallRun<T> r;
  r.cfg.blocks = {1, 1, 1, 1};
  r.cfg.width = width;
  std::mt19937 rng(seed);
  std::normal_distribution<T> nd;
  r.x.resize(size_t(B) * 3 * H * W);
  for (T& v : r.x) v = nd(rng);
  for (int i = 0; i < B; ++i) r.y.push_back((label_step * i) % 8);
  return r;
}
}  // namespace

TEST_CASE("tensor table: torchvision's names, shapes and state_dict order") {
  // mini_imagenet_style.pth is a torchvision ResNet-50 state dict (width 8) as torch.save wrote it, in
  // state_dict order (the .safetensors copy has its keys sorted by the safetensors library).
  vb::StateDict sd = vb::load_state_dict_file(vbtest::fixture("mini_imagenet_style.pth"));
  vb::ModelConfig cfg = vb::infer_model_config(sd);
  CHECK(cfg.blocks == std::vector<int>{3, 4, 6, 3});
  CHECK(cfg.width == 8);
  CHECK(cfg.num_classes == 10);
  CHECK(cfg.hidden.empty());
  // torchvision's head is a plain `fc`; ours is the notebook's Sequential: compare everything else in order.
  std::vector<std::string> ours;
  for (const auto& s : vb::model_tensor_specs(mini({}))) {
    if (s.name.rfind("fc.", 0) == 0) continue;
    ours.push_back(s.name);
    REQUIRE_MESSAGE(sd.has(s.name), s.name);
    CHECK_MESSAGE(sd.at(s.name).shape == s.shape, s.name);
  }
  std::vector<std::string> theirs;
  for (const auto& k : sd.order)
    if (k.rfind("fc.", 0) != 0) theirs.push_back(k);
  CHECK(ours == theirs);
  CHECK(vb::model_tensor_specs(mini({})).size() == sd.size());
  // The notebook's model: fc.0 (256->16), fc.2 (16->8).
  vb::StateDict nb = vb::load_state_dict_file(vbtest::fixture("mini_seed_b1_init.pth"));
  vb::ModelConfig nc = vb::infer_model_config(nb);
  CHECK(nc.hidden == std::vector<int>{16});
  CHECK(nc.num_classes == 8);
  CHECK(nc == mini());
}

TEST_CASE("full-width ResNet-50: 25.5M backbone parameters, torchvision's count") {
  vb::ModelConfig c;  // [3,4,6,3], width 64, 8 classes
  int64_t params = 0, head = 0;
  for (const auto& s : vb::model_tensor_specs(c))
    if (s.kind == vb::TensorKind::Parameter) (s.head ? head : params) += vb::numel(s.shape);
  CHECK(params == 23508032);  // torchvision resnet50 without fc: 25557032 - 2049000
  CHECK(head == 2048 * 8 + 8);
}

TEST_CASE("load and save the state dict: exact round trip, num_batches_tracked kept") {
  auto be = vb::make_cpu_backend(1);
  vb::StateDict nb = vb::load_state_dict_file(vbtest::fixture("mini_seed_b1_init.pth"));
  vb::Model m(*be, vb::infer_model_config(nb));
  m.load_state_dict(nb, "mini_seed_b1_init.pth");
  vb::StateDict back = m.state_dict();
  REQUIRE(back.order == nb.order);
  for (const auto& k : nb.order) {
    CHECK_MESSAGE(back.at(k).bytes == nb.at(k).bytes, k);
    CHECK(back.at(k).dtype == nb.at(k).dtype);
  }
  CHECK(back.at("layer3.5.bn2.num_batches_tracked").as<int64_t>()[0] == 5);
  // A wrong shape is named.
  nb.set("layer1.0.conv1.weight", vb::HostTensor({8, 8, 3, 3}, vb::DType::F32));
  CHECK_THROWS_WITH_AS(m.load_state_dict(nb, "x.pth"), doctest::Contains("layer1.0.conv1.weight"), vb::Error);
}

TEST_CASE("torchvision initialisation: kaiming_normal(fan_out) convolutions, BN 1/0, nn.Linear bounds") {
  auto be = vb::make_cpu_backend(1);
  vb::ModelConfig cfg = mini({16});
  vb::Model m(*be, cfg);
  m.init_torchvision(3);
  vb::StateDict sd = m.state_dict();
  auto stats = [](const vb::HostTensor& t) {
    std::vector<double> v = t.to_f64();
    double s = 0, s2 = 0, mx = 0;
    for (double x : v) { s += x; s2 += x * x; mx = std::max(mx, std::fabs(x)); }
    return std::array<double, 3>{s / double(v.size()), std::sqrt(s2 / double(v.size())), mx};
  };
  auto c = stats(sd.at("layer4.0.conv2.weight"));  // 64 x 64 x 3 x 3: fan_out 576
  CHECK(std::fabs(c[0]) < 0.01);
  CHECK(c[1] == doctest::Approx(std::sqrt(2.0 / 576)).epsilon(0.05));
  CHECK(stats(sd.at("layer2.1.bn3.weight"))[0] == 1.0);
  CHECK(stats(sd.at("layer2.1.bn3.bias"))[2] == 0.0);
  CHECK(stats(sd.at("layer2.1.bn3.running_var"))[0] == 1.0);
  auto f = stats(sd.at("fc.0.weight"));  // in 256: bound 1/16
  CHECK(f[2] <= 1.0 / 16);
  CHECK(f[1] == doctest::Approx(1.0 / 16 / std::sqrt(3.0)).epsilon(0.1));
  // Seeded: the same seed gives the same weights, another seed others.
  vb::Model m2(*be, cfg);
  m2.init_torchvision(3);
  CHECK(m2.state_dict().at("conv1.weight").bytes == sd.at("conv1.weight").bytes);
  m2.init_torchvision(4);
  CHECK(m2.state_dict().at("conv1.weight").bytes != sd.at("conv1.weight").bytes);
}

TEST_CASE("frozen backbone: only fc gets gradients and updates; step counts as PyTorch's") {
  auto be = vb::make_cpu_backend(1);
  vb::Model m(*be, mini({16}));
  m.init_torchvision(1);
  m.plan(4, 32);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  std::vector<float> x(4 * 3 * 32 * 32);
  for (float& v : x) v = nd(rng);
  be->upload_activation(m.input(), x.data(), 4, 3, 32, 32);
  std::vector<int64_t> y = {0, 3, 5, 7};
  std::vector<float> cw(8, 1.f);
  float loss = 0;
  vb::AdamW opt(m, {});
  const vb::StateDict before = m.state_dict();
  std::fill(m.grads(), m.grads() + m.num_params(), 0.f);
  m.set_backbone_frozen(true);
  m.forward(4, true);
  be->softmax_wce(4, 8, m.logits(), y.data(), cw.data(), nullptr, m.dlogits(), &loss);
  m.backward(4);
  for (int64_t i = 0; i < m.head_offset(); ++i) REQUIRE(m.grads()[i] == 0.f);
  double head_norm = 0;
  for (int64_t i = m.head_offset(); i < m.num_params(); ++i) head_norm += std::fabs(m.grads()[i]);
  CHECK(head_norm > 0);
  opt.step(1e-3);
  vb::StateDict after = m.state_dict();
  CHECK(after.at("conv1.weight").bytes == before.at("conv1.weight").bytes);
  CHECK(after.at("layer4.2.bn3.bias").bytes == before.at("layer4.2.bn3.bias").bytes);
  CHECK(after.at("fc.2.weight").bytes != before.at("fc.2.weight").bytes);
  // Running statistics still move in training mode (PyTorch's frozen parameters do not freeze BN buffers).
  CHECK(after.at("bn1.running_mean").bytes != before.at("bn1.running_mean").bytes);
  const auto& steps = opt.steps();
  CHECK(steps.front() == 0);
  CHECK(steps.back() == 1);
  // Unfrozen: everything moves; the backbone's step count starts at 1.
  m.set_backbone_frozen(false);
  m.forward(4, true);
  be->softmax_wce(4, 8, m.logits(), y.data(), cw.data(), nullptr, m.dlogits(), &loss);
  m.backward(4);
  opt.step(1e-3);
  CHECK(opt.steps().front() == 1);
  CHECK(opt.steps().back() == 2);
  CHECK(m.state_dict().at("conv1.weight").bytes != before.at("conv1.weight").bytes);
}

TEST_CASE("bn_apply reproduces the training forward's output bit for bit (backward recomputes it)") {
  for (int threads : {1, 2}) {
    auto be = vb::make_cpu_backend(threads);
    std::mt19937 rng(9);
    std::uniform_real_distribution<float> u(-3.f, 5.f);
    const int N = 3, C = 7, H = 5, W = 6;
    const size_t n = size_t(N) * C * H * W;
    std::vector<float> x(n), gamma(C), beta(C), y(n), a(n), mean(C), invstd(C);
    for (float& v : x) v = u(rng);
    for (int c = 0; c < C; ++c) { gamma[size_t(c)] = 0.5f + 0.1f * float(c); beta[size_t(c)] = 0.2f * float(c) - 0.5f; }
    for (bool relu : {false, true}) {
      be->bn_train_fwd(N, C, H, W, x.data(), gamma.data(), beta.data(), nullptr, relu, y.data(), mean.data(),
                       invstd.data(), nullptr, nullptr, 0.1, 1e-5);
      vbtest::poison(a);
      be->bn_apply(N, C, H, W, x.data(), gamma.data(), beta.data(), mean.data(), invstd.data(), relu, a.data());
      CHECK(std::memcmp(a.data(), y.data(), n * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("AdamW and StepLR through the engine match PyTorch (ops.safetensors)") {
  vb::StateDict ops = vb::load_safetensors(vbtest::fixture("ops.safetensors"));
  std::vector<float> lr50 = ops.at("steplr.lr_per_epoch_50").to_f32();
  vb::StepLR s(1e-3, 2, 0.6);
  for (size_t e = 0; e < lr50.size(); ++e) {
    INFO("epoch " << e);
    CHECK(float(s.lr()) == lr50[e]);  // exact in float32: the same chain of multiplications
    s.step();
  }
  // AdamW on the Backend interface (the path the trainer uses), driven by StepLR stepped every step.
  auto be = vb::make_cpu_backend(1);
  std::vector<float> p = ops.at("adamw.p0").to_f32(), m(p.size()), v(p.size());
  vb::StepLR sched(1e-3, 2, 0.6);
  std::vector<float> lr_used = ops.at("adamw.lr_used").to_f32();
  for (int t = 1; t <= 5; ++t) {
    std::vector<float> g = ops.at("adamw.g" + std::to_string(t)).to_f32();
    CHECK(float(sched.lr()) == lr_used[size_t(t - 1)]);
    be->adamw(int64_t(p.size()), p.data(), g.data(), m.data(), v.data(), sched.lr(), 0.9, 0.999, 1e-8, 0.01, t);
    sched.step();
    std::vector<float> want = ops.at("adamw.p" + std::to_string(t)).to_f32();
    std::vector<float> p0 = ops.at("adamw.p0").to_f32();
    std::vector<double> du, dw;
    for (size_t i = 0; i < p.size(); ++i) { du.push_back(double(p[i]) - p0[i]); dw.push_back(double(want[i]) - p0[i]); }
    CHECK(vbtest::rel_err(p, want) < 1e-6);
    CHECK(vbtest::rel_err(du, dw) < 1e-3);
  }
}

TEST_CASE("the CPU backend's NHWC and NCHW layouts give the same training step and evaluation (double)") {
  // A [1,1,1,1] ResNet of width 32 at a non-square size, a full and a partial batch: every gradient, the running
  // statistics and the evaluation logits agree up to the order of the sums and Winograd's transforms (the first
  // stage's 3x3 layer, 16x14, goes through Winograd in NHWC; the golden runs check NHWC against PyTorch on maps
  // too small for it).
  const int B = 12, H = 64, W = 56;
  const SmallRun<double> in = small_run<double>(32, B, H, W, 3, 1);
  const auto& [cfg, x, y, cw] = in;
  struct Result {
    std::vector<double> grads, buffers, logits_train, logits_eval;
  };
  auto run = [&](vb::Layout layout) {
    auto be = vb::make_cpu_backend_f64(2, layout);
    vb::ModelT<double> m(*be, cfg);
    m.init_torchvision(7);
    m.plan(B, vb::data::ImageSize{H, W});
    Result r;
    for (int n : {B, 7}) {  // a partial batch too
      be->upload_activation(m.input(), x.data(), n, 3, H, W);
      std::fill(m.grads(), m.grads() + m.num_params(), 0.0);
      m.forward(n, true);
      double loss = 0;
      be->softmax_wce(n, 8, m.logits(), y.data(), cw.data(), nullptr, m.dlogits(), &loss);
      m.backward(n);
      r.grads.insert(r.grads.end(), m.grads(), m.grads() + m.num_params());
      r.logits_train.insert(r.logits_train.end(), m.logits(), m.logits() + n * 8);
    }
    m.forward(B, false);
    r.logits_eval.assign(m.logits(), m.logits() + B * 8);
    const vb::StateDict sd = m.state_dict();
    for (const auto& name : sd.order)
      if (name.find("running") != std::string::npos) {
        auto v = sd.at(name).to_f64();
        r.buffers.insert(r.buffers.end(), v.begin(), v.end());
      }
    return r;
  };
  const Result a = run(vb::Layout::NHWC), b = run(vb::Layout::NCHW);
  REQUIRE(a.grads.size() == b.grads.size());
  CHECK(a.grads.size() > 100000);
  vbtest::check_close("training logits", a.logits_train.data(), b.logits_train.data(), b.logits_train.size(), 1e-13, 1e-11);
  vbtest::check_close("gradients", a.grads.data(), b.grads.data(), b.grads.size(), 1e-13, 1e-8);
  CHECK(vbtest::rel_err(a.grads, b.grads) < 1e-12);
  vbtest::check_close("running statistics", a.buffers.data(), b.buffers.data(), b.buffers.size(), 1e-13, 1e-11);
  vbtest::check_close("evaluation logits", a.logits_eval.data(), b.logits_eval.data(), b.logits_eval.size(), 1e-13, 1e-11);
}

namespace {
// upload_images against upload_activation of the loader's own normalisation (data::to_normalized_chw): the
// same activations bit for bit, in the backend's layout.
template <class T, class B>
void check_upload_images(B& be, int N, int H, int W) {
  std::mt19937 rng(uint32_t(N * 1000 + H));
  std::vector<uint8_t> px(size_t(N) * H * W * 3);
  for (uint8_t& v : px) v = uint8_t(rng());
  px[0] = 0, px[1] = 255, px[2] = 128;
  std::vector<float> planes(px.size());
  for (int n = 0; n < N; ++n) {
    vb::data::Image im(W, H);
    std::memcpy(im.pixels.data(), px.data() + size_t(n) * H * W * 3, im.pixels.size());
    vb::data::to_normalized_chw(im, planes.data() + size_t(n) * 3 * H * W);
  }
  const std::vector<T> planes_t(planes.begin(), planes.end());
  std::vector<T> want(px.size()), got(px.size(), T(NAN));
  be.upload_activation(want.data(), planes_t.data(), N, 3, H, W);
  be.upload_images(got.data(), px.data(), N, H, W);
  CHECK(std::memcmp(got.data(), want.data(), got.size() * sizeof(T)) == 0);
}
}  // namespace

TEST_CASE("upload_images: the loader's uint8 frames normalised into either layout, as the loader's floats") {
  for (vb::Layout layout : {vb::Layout::NHWC, vb::Layout::NCHW}) {
    CAPTURE(int(layout));
    auto be = vb::make_cpu_backend(2, layout);
    check_upload_images<float>(*be, 3, 7, 13);
    check_upload_images<float>(*be, 2, 96, 160);  // several chunks per thread
    auto be64 = vb::make_cpu_backend_f64(2, layout);
    check_upload_images<double>(*be64, 3, 7, 13);
  }
}

TEST_CASE("a steady-state training step or evaluation allocates no backend memory (CPU, NHWC and NCHW)") {
  for (vb::Layout layout : {vb::Layout::NHWC, vb::Layout::NCHW}) {
    auto be = vb::make_cpu_backend(2, layout);
    const size_t warm = be->allocations();
    CHECK(vbtest::steady_state_allocations(*be) == 0);
    CHECK(be->allocations() > warm);  // the counter counts: the model's buffers were allocated
  }
}

TEST_CASE("an evaluation pass keeps each layer's folded weights: the same logits, the next pass sees new weights") {
  // Width 32 at 40x48: the first stage's 3x3 layer (10x12 maps, 32 channels) runs by Winograd, the stem by its
  // padded copy, the rest by the packed direct convolution: every kind of prepared weights.
  const int B = 8, Bp = 5, H = 40, W = 48;
  const SmallRun<float> in = small_run<float>(32, B, H, W, 6, 3);
  auto be = vb::make_cpu_backend(2, vb::Layout::NHWC);
  vb::Model m(*be, in.cfg);
  m.init_torchvision(8);
  m.plan(B, vb::data::ImageSize{H, W});
  vb::AdamW opt(m, {});
  auto logits_of = [&](vb::Backend& b, vb::Model& model, int n) {
    b.upload_activation(model.input(), in.x.data(), n, 3, H, W);
    model.forward(n, false);
    return std::vector<float>(model.logits(), model.logits() + n * 8);
  };
  auto logits = [&](int n) { return logits_of(*be, m, n); };
  const std::vector<float> full = logits(B), part = logits(Bp);  // outside a pass: folded on every call
  {
    vb::EvalPass pass(*be);
    CHECK(logits(B) == full);
    CHECK(logits(Bp) == part);  // a smaller batch reuses what the first made
    CHECK(logits(B) == full);
    CHECK_THROWS_WITH_AS(be->begin_eval_pass(), doctest::Contains("already open"), vb::Error);
    // Writing a weight inside a pass breaks its rule; the pass then still sees the weights it started with,
    // which shows that it keeps them.
    std::vector<float> p(m.params(), m.params() + m.num_params());
    for (int64_t i = 0; i < m.head_offset(); ++i) p[size_t(i)] *= 1.25f;
    be->upload(m.params(), p.data(), sizeof(float) * p.size());
    CHECK(logits(B) == full);
  }
  const std::vector<float> scaled = logits(B);  // outside a pass again: the scaled weights
  CHECK(scaled != full);
  // A training step changes weights and running statistics; the next pass folds them afresh.
  be->upload_activation(m.input(), in.x.data(), B, 3, H, W);
  m.forward(B, true);
  float loss = 0;
  be->softmax_wce(B, 8, m.logits(), in.y.data(), in.cw.data(), nullptr, m.dlogits(), &loss);
  m.backward(B);
  opt.step(1e-3);
  const std::vector<float> trained = logits(B), trained_part = logits(Bp);
  CHECK(trained != scaled);
  {
    vb::EvalPass pass(*be);
    CHECK(logits(Bp) == trained_part);  // this pass's first batch is the partial one
    CHECK(logits(B) == trained);
  }
  // The kept weights count as the backend's memory; under a limit that leaves them no room each layer folds on
  // every call instead, with the same logits.
  auto be2 = vb::make_cpu_backend(2, vb::Layout::NHWC);
  vb::Model m2(*be2, in.cfg);
  m2.init_torchvision(8);
  m2.plan(B, vb::data::ImageSize{H, W});
  CHECK(logits_of(*be2, m2, B) == full);
  const size_t held = be2->memory_in_use();
  be2->set_memory_limit(held);
  for (int limited = 1; limited >= 0; --limited) {
    vb::EvalPass pass(*be2);
    CHECK(logits_of(*be2, m2, B) == full);
    if (limited) {
      CHECK(be2->memory_in_use() == held);
      be2->set_memory_limit(0);
    } else {
      CHECK(be2->memory_in_use() > held + sizeof(float) * size_t(m2.num_params()) / 2);
    }
  }
}

TEST_CASE("a CPU training step and evaluation give the same bits on 1 and 2 threads (float, NHWC and NCHW)") {
  // Exact resume rests on this: the CPU kernels split work over threads, never a sum.
  const int B = 16, H = 40, W = 48;
  const SmallRun<float> in = small_run<float>(16, B, H, W, 4, 3);
  const auto& [cfg, x, y, cw] = in;
  for (vb::Layout layout : {vb::Layout::NHWC, vb::Layout::NCHW}) {
    auto run = [&](int threads) {
      auto be = vb::make_cpu_backend(threads, layout);
      vb::Model m(*be, cfg);
      m.init_torchvision(5);
      m.plan(B, vb::data::ImageSize{H, W});
      vb::AdamW opt(m, {});
      std::vector<float> out;
      for (int step = 0; step < 2; ++step) {
        be->upload_activation(m.input(), x.data(), B, 3, H, W);
        m.forward(B, true);
        float loss = 0;
        be->softmax_wce(B, 8, m.logits(), y.data(), cw.data(), nullptr, m.dlogits(), &loss);
        m.backward(B);
        opt.step(1e-3);
        out.push_back(loss);
      }
      out.insert(out.end(), m.grads(), m.grads() + m.num_params());
      m.forward(B, false);
      out.insert(out.end(), m.logits(), m.logits() + B * 8);
      const vb::StateDict sd = m.state_dict();
      for (const auto& name : sd.order) {
        const auto v = sd.at(name).to_f64();
        out.insert(out.end(), v.begin(), v.end());
      }
      return out;
    };
    const std::vector<float> one = run(1), two = run(2);
    REQUIRE(one.size() == two.size());
    CHECK(std::memcmp(one.data(), two.data(), one.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("a training forward counts one batch in every batch norm, as count_training_forward alone") {
  vb::ModelConfig cfg;
  cfg.blocks = {1, 2, 1, 1};
  cfg.width = 8;
  auto be = vb::make_cpu_backend(1);
  vb::Model a(*be, cfg), b(*be, cfg);
  a.plan(2, 32);
  b.plan(2, 32);
  a.forward(2, true);
  a.forward(2, true);
  b.count_training_forward();
  b.count_training_forward();
  const vb::StateDict sa = a.state_dict(), sb = b.state_dict();
  int counters = 0;
  for (const std::string& k : sa.order)
    if (k.find("num_batches_tracked") != std::string::npos) {
      ++counters;
      CHECK(sa.at(k).to_f64()[0] == 2.0);
      CHECK(sb.at(k).to_f64()[0] == 2.0);
    }
  CHECK(counters == 1 + 3 * 5 + 4);  // the stem, three per block (five blocks), each stage's downsampling path
}

TEST_CASE("a captured step (TrainStep on the CPU twin of a CUDA graph) gives the uncaptured steps' bits") {
  for (vb::Layout layout : {vb::Layout::NHWC, vb::Layout::NCHW}) {
    CAPTURE(int(layout));
    auto cpu = vb::make_cpu_backend(2, layout);
    const vbtest::CaptureRun want = vbtest::run_capture_scenario(*cpu, false);
    vbtest::GraphTwin twin(*cpu);
    const vbtest::CaptureRun got = vbtest::run_capture_scenario(twin, true);
    CHECK(got.captures == 4);
    CHECK(got.replays == 5);
    CHECK(got.held_before_release);
    CHECK_FALSE(got.held_after_release);
    CHECK(want.captures == 0);
    REQUIRE(got.losses.size() == want.losses.size());
    CHECK(std::memcmp(got.losses.data(), want.losses.data(), got.losses.size() * sizeof(float)) == 0);
    CHECK(vbtest::differing_tensors(got.model, want.model) == 0);
    CHECK(vbtest::differing_tensors(got.opt, want.opt) == 0);
    CHECK(want.losses.front() != want.losses.back());  // the steps did train
  }
  // Capture asked of a backend that cannot: the step runs uncaptured.
  auto cpu = vb::make_cpu_backend(1);
  CHECK(vbtest::run_capture_scenario(*cpu, true).captures == 0);
}

TEST_CASE("the CPU twin of a graph refuses what a captured step may not do") {
  auto cpu = vb::make_cpu_backend(1);
  vbtest::GraphTwin twin(*cpu);
  CHECK_THROWS_WITH_AS(twin.capture([&] { twin.release(twin.alloc(16)); }), doctest::Contains("alloc inside a captured step"),
                       vb::Error);
  CHECK_THROWS_WITH_AS(twin.capture([&] { twin.wait_uploads(); }), doctest::Contains("wait_uploads inside"), vb::Error);
  CHECK_THROWS_WITH_AS(twin.capture([&] { twin.host_free(twin.host_alloc(16)); }), doctest::Contains("host_alloc inside"),
                       vb::Error);
  float q[4] = {}, qg[4] = {}, qm[4] = {}, qv[4] = {};
  CHECK_THROWS_WITH_AS(twin.capture([&] {
                         twin.adamw(4, q, qg, qm, qv, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1);
                         twin.adamw(4, q, qg, qm, qv, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1);
                       }),
                       doctest::Contains("two AdamW launches"), vb::Error);
  float x = 1.f, y = 0.f;
  twin.capture([&] { twin.relu_fwd(1, &x, &y); });
  CHECK(y == 1.f);  // run once at the end of the capture
  x = 3.f;
  CHECK_THROWS_WITH_AS(twin.replay([&] { twin.relu_fwd(1, &x, &y); }), doctest::Contains("only adamw"), vb::Error);
  twin.replay([] {});  // the recording again: it reads x as it is now
  CHECK(y == 3.f);
  float p = 0.f, g = 0.f, m = 0.f, v = 0.f;
  CHECK_THROWS_WITH_AS(twin.replay([&] { twin.adamw(1, &p, &g, &m, &v, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1); }),
                       doctest::Contains("did not launch"), vb::Error);
}

TEST_CASE("download_async on the CPU: the copy is made at once, and only the last tickets can be waited for") {
  auto be = vb::make_cpu_backend(1);
  float src[3] = {1.f, 2.f, 3.f}, dst[3] = {};
  const uint64_t t0 = be->download_async(dst, src, sizeof src);
  CHECK(dst[2] == 3.f);
  be->wait_download(t0);
  for (uint64_t i = 0; i < vb::Backend::kDownloadTickets; ++i) be->download_async(dst, src, sizeof src);
  CHECK_THROWS_WITH_AS(be->wait_download(t0), doctest::Contains("not among the last"), vb::Error);
  be->wait_download(t0 + 1);  // the oldest of the last eight
  be->wait_download(t0 + vb::Backend::kDownloadTickets);  // the newest
  CHECK_THROWS_WITH_AS(be->wait_download(t0 + 100), doctest::Contains("not among the last"), vb::Error);
}

TEST_CASE("plan() sizes activations by the backend's element size (bf16: half the bytes); the rest stays T") {
  // A backend that says its activations are 2 bytes (as the CUDA backend in bf16): the model's activation memory
  // halves, its parameters, statistics and head do not; forward refuses once the element size changed.
  struct Half final : vb::ForwardingBackend {
    using ForwardingBackend::ForwardingBackend;
    size_t bytes = 2;
    size_t activation_element_bytes() const override { return bytes; }
  };
  vb::ModelConfig cfg;
  cfg.blocks = {1, 1, 1, 1};
  cfg.width = 16;
  auto cpu = vb::make_cpu_backend(1);
  size_t full = 0, halved = 0;
  {
    vb::Model m(*cpu, cfg);
    const size_t before = cpu->memory_in_use();
    m.plan(8, 64);
    full = cpu->memory_in_use() - before;
  }
  Half half(*cpu);
  vb::Model m(half, cfg);
  const size_t before = cpu->memory_in_use();
  m.plan(8, 64);
  halved = cpu->memory_in_use() - before;
  CHECK(halved < full * 55 / 100);  // activations are nearly all of it at this size
  CHECK(halved > full * 45 / 100);
  half.bytes = 4;
  CHECK_THROWS_WITH_AS(m.forward(8, false), doctest::Contains("activation type changed since plan()"), vb::Error);
}
