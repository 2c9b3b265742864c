#include "engine/model.h"

#include "engine/weights.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <random>

namespace vb {

// State dicts carry float32, whatever the model computes in (a double model's values are float32 values).
template <class T>
HostTensor to_host_f32(const Shape& shape, const T* src) {
  HostTensor t(shape, DType::F32);
  float* d = t.as<float>();
  for (int64_t i = 0; i < t.numel(); ++i) d[i] = float(src[i]);
  return t;
}

// PyTorch's BatchNorm2d defaults, which the notebook uses.
constexpr double kBnMomentum = 0.1;
constexpr double kBnEps = 1e-5;

template <class T>
struct ModelT<T>::Conv {
  ConvShape s{};  // N is set per call
  T* w = nullptr;   // (K, C, R, S)
  T* dw = nullptr;  // (K, C, R, S)
};

template <class T>
struct ModelT<T>::Bn {
  int C = 0, index = 0;
  T *gamma = nullptr, *beta = nullptr, *dgamma = nullptr, *dbeta = nullptr;  // (C)
  T *running_mean = nullptr, *running_var = nullptr;                          // (C)
  T *save_mean = nullptr, *save_invstd = nullptr;                             // (C), from the last forward
};

template <class T>
struct ModelT<T>::Block {
  Conv *c1, *c2, *c3, *ds = nullptr;
  Bn *b1, *b2, *b3, *bds = nullptr;
  int stage, in_c, in_h, in_w, planes, out_c, out_h, out_w;
  T* x = nullptr;                                     // (N, in_c, in_h, in_w): the previous output
  T* o1 = nullptr;  // (N, planes, in_h, in_w): conv1
  T* o2 = nullptr;  // (N, planes, out_h, out_w): conv2
  // bn1+relu (N, planes, in_h, in_w), then bn2+relu (N, planes, out_h, out_w): one transient buffer of the
  // stage. The forward pass needs each only for the next convolution; backward recomputes them (bn_apply,
  // bit-identical) when the weight gradients and ReLU masks need them, instead of keeping them all.
  T *a1 = nullptr, *a2 = nullptr;
  T *o3 = nullptr, *y = nullptr;                      // (N, out_c, out_h, out_w): conv3, bn3+res+relu
  T* dso = nullptr;  // (N, out_c, out_h, out_w): downsample conv output
  T* dsa = nullptr;  // (N, out_c, out_h, out_w): downsample BN output, a transient (backward never reads it)
};

template <class T>
struct ModelT<T>::Linear {
  int in = 0, out = 0;
  T *w = nullptr, *b = nullptr, *dw = nullptr, *db = nullptr;  // (out, in), (out)
};

template <class T>
ModelT<T>::ModelT(BackendT<T>& backend, const ModelConfig& cfg) : be_(backend), cfg_(cfg) {
  VB_CHECK(!cfg.blocks.empty() && cfg.width > 0 && cfg.num_classes > 0, "invalid model configuration");
  int n_bn = 0;
  for (const TensorSpec& s : model_tensor_specs(cfg)) {
    TensorSlot slot{s};
    if (s.role == TensorRole::BnNumBatches) {
      slot.bn_index = n_bn++;
    } else if (s.kind == TensorKind::Parameter) {
      if (s.head && head_offset_ == 0) head_offset_ = n_params_;
      slot.offset = n_params_;
      n_params_ += numel(s.shape);
    } else {
      slot.offset = n_buffers_;
      n_buffers_ += numel(s.shape);
    }
    slots_.push_back(slot);
  }
  num_batches_.assign(size_t(n_bn), 0);
  params_ = static_cast<T*>(be_.alloc(sizeof(T) * size_t(n_params_)));
  grads_ = static_cast<T*>(be_.alloc(sizeof(T) * size_t(n_params_)));
  buffers_ = static_cast<T*>(be_.alloc(sizeof(T) * size_t(n_buffers_)));

  std::map<std::string, const TensorSlot*> by_name;
  for (const TensorSlot& s : slots_) by_name[s.spec.name] = &s;
  auto param = [&](const std::string& n) { return params_ + by_name.at(n)->offset; };
  auto grad = [&](const std::string& n) { return grads_ + by_name.at(n)->offset; };
  auto buffer = [&](const std::string& n) { return buffers_ + by_name.at(n)->offset; };
  auto conv = [&](const std::string& name, int C, int H, int W, int K, int k, int stride, int pad) {
    auto c = std::make_unique<Conv>();
    c->s = ConvShape{0, C, H, W, K, k, k, stride, pad};
    c->w = param(name + ".weight");
    c->dw = grad(name + ".weight");
    convs_.push_back(std::move(c));
    return convs_.back().get();
  };
  auto bn = [&](const std::string& name, int C) {
    auto b = std::make_unique<Bn>();
    b->C = C;
    b->index = by_name.at(name + ".num_batches_tracked")->bn_index;
    b->gamma = param(name + ".weight");
    b->beta = param(name + ".bias");
    b->dgamma = grad(name + ".weight");
    b->dbeta = grad(name + ".bias");
    b->running_mean = buffer(name + ".running_mean");
    b->running_var = buffer(name + ".running_var");
    bns_.push_back(std::move(b));
    return bns_.back().get();
  };

  // Spatial sizes are filled in by plan(); the structure is fixed here.
  stem_conv_ = conv("conv1", 3, 0, 0, cfg.width, 7, 2, 3);
  stem_bn_ = bn("bn1", cfg.width);
  int inp = cfg.width;
  for (size_t st = 0; st < cfg.blocks.size(); ++st) {
    const int planes = cfg.width << st, out = planes * 4;
    for (int bi = 0; bi < cfg.blocks[st]; ++bi) {
      const std::string p = "layer" + std::to_string(st + 1) + "." + std::to_string(bi);
      const int stride = (bi == 0 && st > 0) ? 2 : 1;
      Block b{};
      b.stage = int(st);
      b.in_c = inp;
      b.planes = planes;
      b.out_c = out;
      b.c1 = conv(p + ".conv1", inp, 0, 0, planes, 1, 1, 0);
      b.b1 = bn(p + ".bn1", planes);
      b.c2 = conv(p + ".conv2", planes, 0, 0, planes, 3, stride, 1);
      b.b2 = bn(p + ".bn2", planes);
      b.c3 = conv(p + ".conv3", planes, 0, 0, out, 1, 1, 0);
      b.b3 = bn(p + ".bn3", out);
      if (bi == 0) {
        b.ds = conv(p + ".downsample.0", inp, 0, 0, out, 1, stride, 0);
        b.bds = bn(p + ".downsample.1", out);
      }
      blocks_.push_back(b);
      inp = out;
    }
  }
  int in = cfg.features(), idx = 0;
  auto add_fc = [&](int out) {
    const std::string p = "fc." + std::to_string(idx);
    fcs_.push_back(Linear{in, out, param(p + ".weight"), param(p + ".bias"), grad(p + ".weight"), grad(p + ".bias")});
    in = out;
    idx += 2;
  };
  for (int h : cfg.hidden) add_fc(h);
  add_fc(cfg.num_classes);

  // Running variances start at 1, as in PyTorch.
  std::vector<T> buf(size_t(n_buffers_), 0.f);
  for (const TensorSlot& s : slots_)
    if (s.spec.role == TensorRole::BnRunningVar) std::fill_n(buf.begin() + s.offset, numel(s.spec.shape), 1.f);
  be_.upload(buffers_, buf.data(), sizeof(T) * buf.size());
}

template <class T>
ModelT<T>::~ModelT() {
  release_activations();
  be_.release(params_);
  be_.release(grads_);
  be_.release(buffers_);
}

template <class T>
void ModelT<T>::init_torchvision(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<T> p(static_cast<size_t>(n_params_));
  std::vector<T> buf(size_t(n_buffers_), 0.f);
  for (const TensorSlot& s : slots_) {
    const int64_t n = numel(s.spec.shape);
    switch (s.spec.role) {
      case TensorRole::ConvWeight: {  // kaiming_normal_(mode="fan_out", nonlinearity="relu")
        const int64_t fan_out = s.spec.shape[0] * s.spec.shape[2] * s.spec.shape[3];
        std::normal_distribution<double> d(0.0, std::sqrt(2.0 / double(fan_out)));
        for (int64_t i = 0; i < n; ++i) p[size_t(s.offset + i)] = T(float(d(rng)));
        break;
      }
      case TensorRole::BnWeight: std::fill_n(p.begin() + s.offset, n, 1.f); break;
      case TensorRole::BnBias: std::fill_n(p.begin() + s.offset, n, 0.f); break;
      case TensorRole::FcWeight:
      case TensorRole::FcBias: {  // nn.Linear: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in))
        const double bound = 1.0 / std::sqrt(double(s.spec.fan_in));
        std::uniform_real_distribution<double> d(-bound, bound);
        for (int64_t i = 0; i < n; ++i) p[size_t(s.offset + i)] = T(float(d(rng)));
        break;
      }
      case TensorRole::BnRunningVar: std::fill_n(buf.begin() + s.offset, n, 1.f); break;
      case TensorRole::BnRunningMean: break;
      case TensorRole::BnNumBatches: num_batches_[size_t(s.bn_index)] = 0; break;
    }
  }
  be_.upload(params_, p.data(), sizeof(T) * p.size());
  be_.upload(buffers_, buf.data(), sizeof(T) * buf.size());
}

template <class T>
void ModelT<T>::load_state_dict(const StateDict& sd, const std::string& source) {
  std::vector<TensorSpec> specs;
  for (const TensorSlot& s : slots_) specs.push_back(s.spec);
  check_against_specs(sd, specs, source);
  std::vector<T> p(static_cast<size_t>(n_params_)), buf(static_cast<size_t>(n_buffers_));
  for (const TensorSlot& s : slots_) {
    const HostTensor& t = sd.at(s.spec.name);
    if (s.spec.role == TensorRole::BnNumBatches) {
      num_batches_[size_t(s.bn_index)] = int64_t(t.to_f64()[0]);
      continue;
    }
    std::vector<double> v = t.to_f64();
    T* dst = (s.spec.kind == TensorKind::Parameter ? p.data() : buf.data()) + s.offset;
    std::copy(v.begin(), v.end(), dst);
  }
  be_.upload(params_, p.data(), sizeof(T) * p.size());
  be_.upload(buffers_, buf.data(), sizeof(T) * buf.size());
}

template <class T>
StateDict ModelT<T>::state_dict() {
  std::vector<T> p(static_cast<size_t>(n_params_)), buf(static_cast<size_t>(n_buffers_));
  be_.download(p.data(), params_, sizeof(T) * p.size());
  be_.download(buf.data(), buffers_, sizeof(T) * buf.size());
  StateDict sd;
  for (const TensorSlot& s : slots_) {
    if (s.spec.role == TensorRole::BnNumBatches) {
      int64_t v = num_batches_[size_t(s.bn_index)];
      sd.set(s.spec.name, HostTensor::from_i64(s.spec.shape, &v));
      continue;
    }
    const T* src = (s.spec.kind == TensorKind::Parameter ? p.data() : buf.data()) + s.offset;
    sd.set(s.spec.name, to_host_f32(s.spec.shape, src));
  }
  return sd;
}

template <class T>
void ModelT<T>::release_activations() {
  for (void* p : act_allocs_) be_.release(p);
  act_allocs_.clear();
}

template <class T>
T* ModelT<T>::act_alloc(int64_t n, bool activation) {
  void* p = be_.alloc((activation ? act_bytes_ : sizeof(T)) * size_t(std::max<int64_t>(n, 1)));
  act_allocs_.push_back(p);
  return static_cast<T*>(p);
}

template <class T>
void ModelT<T>::check_plan() const {
  VB_CHECK(be_.activation_element_bytes() == act_bytes_, "the backend's activation type changed since plan() (",
           be_.activation_element_bytes(), " bytes an element now, ", act_bytes_, " then): plan again");
}

template <class T>
void ModelT<T>::plan(int max_batch, data::ImageSize image_size) {
  VB_CHECK(max_batch > 0 && image_size.h >= 32 && image_size.w >= 32, "bad plan: batch ", max_batch, ", image size ",
           image_size.str());
  release_activations();
  act_bytes_ = be_.activation_element_bytes();
  VB_CHECK(act_bytes_ == sizeof(T) || act_bytes_ == 2, "activation elements of ", act_bytes_, " bytes");
  max_batch_ = max_batch;
  image_size_ = image_size;
  const int64_t N = max_batch;
  // Two passes: shapes and sizes first, then memory. Activations of the deep stages (3 and 4 of ResNet-50)
  // live in one arena, which also holds the shallow stages' gradient scratch: by the time the backward pass
  // reaches stage 2, everything in the deep stages has been consumed. The deep stages' own (smaller) scratch
  // is separate. So a layer1-sized gradient never coexists with layer3-4 activations, as in PyTorch.
  deep_from_ = int(cfg_.blocks.size()) >= 3 ? 2 : int(cfg_.blocks.size());
  struct Want {
    T** slot;
    int64_t n;
    bool deep;
  };
  std::vector<Want> wants;
  int64_t shallow_max = 0, deep_max = 0;  // the largest tensor a gradient scratch buffer must hold
  int64_t shallow_a = 0, deep_a = 0;      // the largest BN+ReLU output of a bottleneck (the transient a1/a2)
  auto scratch_needs = [&](int64_t n, bool deep) {
    int64_t& m = deep ? deep_max : shallow_max;
    m = std::max(m, n);
  };
  auto want = [&](T** slot, int C, int H, int W, bool deep) {
    wants.push_back({slot, N * C * H * W, deep});
    scratch_needs(N * C * H * W, deep);
  };

  want(&input_, 3, image_size.h, image_size.w, false);
  Conv& c = *stem_conv_;
  c.s.H = image_size.h;
  c.s.W = image_size.w;
  const int sh = c.s.P(), sw = c.s.Q();
  want(&stem_c_, cfg_.width, sh, sw, false);
  want(&stem_a_, cfg_.width, sh, sw, false);
  const int ph = (sh + 2 - 3) / 2 + 1, pw = (sw + 2 - 3) / 2 + 1;
  want(&pool_, cfg_.width, ph, pw, false);
  int h = ph, w = pw;
  for (Block& b : blocks_) {
    const bool deep = b.stage >= deep_from_;
    b.in_h = h;
    b.in_w = w;
    b.c1->s.H = h; b.c1->s.W = w;
    b.c2->s.H = h; b.c2->s.W = w;
    b.out_h = b.c2->s.P();
    b.out_w = b.c2->s.Q();
    b.c3->s.H = b.out_h; b.c3->s.W = b.out_w;
    want(&b.o1, b.planes, h, w, deep);
    want(&b.o2, b.planes, b.out_h, b.out_w, deep);
    int64_t& amax = deep ? deep_a : shallow_a;
    amax = std::max({amax, N * b.planes * h * w, N * b.planes * b.out_h * b.out_w});
    want(&b.o3, b.out_c, b.out_h, b.out_w, deep);
    want(&b.y, b.out_c, b.out_h, b.out_w, deep);
    scratch_needs(N * b.in_c * h * w, deep);  // the gradient of the block's input
    if (b.ds) {
      b.ds->s.H = h; b.ds->s.W = w;
      want(&b.dso, b.out_c, b.out_h, b.out_w, deep);
    }
    h = b.out_h;
    w = b.out_w;
  }
  VB_CHECK(h >= 1 && w >= 1, "image size ", image_size.str(), " is too small for this network");

  // Inside the arena, offsets in activation elements, rounded to 256 bytes; `at` turns one into a T* (a bf16
  // activation's address is handed through T* like the others: only the backend reads it).
  const int64_t per256 = int64_t(256 / act_bytes_);
  auto round = [per256](int64_t n) { return (n + per256 - 1) / per256 * per256; };
  int64_t deep_total = 0;
  for (const Want& x : wants)
    if (x.deep) deep_total += round(x.n);
  const bool split = deep_from_ < int(cfg_.blocks.size());
  T* arena = nullptr;
  auto at = [&](int64_t off) { return reinterpret_cast<T*>(reinterpret_cast<char*>(arena) + off * int64_t(act_bytes_)); };
  if (split) {
    arena = act_alloc(std::max(deep_total, 4 * round(shallow_max) + round(shallow_a)), true);
    int64_t off = 0;
    for (const Want& x : wants)
      if (x.deep) { *x.slot = at(off); off += round(x.n); }
  }
  for (const Want& x : wants)
    if (!x.deep) *x.slot = act_alloc(x.n, true);
  T* previous = pool_;
  for (Block& b : blocks_) {
    b.x = previous;
    previous = b.y;
  }
  for (int i = 0; i < 4; ++i) {
    g_[i] = split ? at(i * round(shallow_max)) : act_alloc(shallow_max, true);
    gdeep_[i] = split ? act_alloc(deep_max, true) : g_[i];
  }
  T* a_shallow = split ? at(4 * round(shallow_max)) : act_alloc(shallow_a, true);
  T* a_deep = split ? act_alloc(deep_a, true) : a_shallow;
  for (Block& b : blocks_) {
    const bool deep = b.stage >= deep_from_;
    // The downsample branch's BN output is only the residual of its block's last BN in the forward pass, and
    // the gradient scratch of its stage is idle then (the shallow one overlaps the deep activations, which
    // the forward pass has not written yet when the shallow blocks run): it lives there.
    if (b.ds) b.dsa = deep ? gdeep_[3] : g_[3];
    b.a1 = b.a2 = deep ? a_deep : a_shallow;
  }

  for (auto& bn : bns_) {
    bn->save_mean = act_alloc(bn->C);
    bn->save_invstd = act_alloc(bn->C);
  }
  feat_ = act_alloc(N * cfg_.features());
  int widest = cfg_.features();
  fc_out_.clear();
  for (const Linear& l : fcs_) {
    fc_out_.push_back(act_alloc(N * l.out));
    widest = std::max(widest, l.out);
  }
  logits_ = fc_out_.back();
  dlogits_ = act_alloc(N * cfg_.num_classes);
  for (T*& g : gfc_) g = act_alloc(N * widest);
}

namespace {
ConvShape with_batch(ConvShape s, int n) {
  s.N = n;
  return s;
}
}  // namespace

template <class T>
void ModelT<T>::count_training_forward() {
  for (int64_t& c : num_batches_) ++c;
}

template <class T>
void ModelT<T>::forward(int n, bool train) {
  VB_CHECK(n > 0 && n <= max_batch_, "batch of ", n, " images; the model is planned for ", max_batch_);
  check_plan();
  BackendT<T>& be = be_;
  auto bn_fwd = [&](Bn& b, int H, int W, const T* x, const T* residual, bool relu, T* y) {
    if (train) {
      be.bn_train_fwd(n, b.C, H, W, x, b.gamma, b.beta, residual, relu, y, b.save_mean, b.save_invstd,
                      b.running_mean, b.running_var, kBnMomentum, kBnEps);
      ++num_batches_[size_t(b.index)];
    } else {
      be.bn_eval_fwd(n, b.C, H, W, x, b.gamma, b.beta, b.running_mean, b.running_var, kBnEps, residual, relu, y);
    }
  };
  const ConvShape s0 = with_batch(stem_conv_->s, n);
  if (!train) {
    // Evaluation: each convolution with its batch norm in one op (which a backend may fold); c2 writes o2, not
    // a2, which shares a1's memory.
    auto conv_bn = [&](const Conv& c, const ConvShape& cs, const Bn& b, const T* x, const T* residual, bool relu,
                       T* y) {
      be.conv_bn_eval(cs, x, c.w, b.gamma, b.beta, b.running_mean, b.running_var, kBnEps, residual, relu, y);
    };
    conv_bn(*stem_conv_, s0, *stem_bn_, input_, nullptr, true, stem_a_);
    be.maxpool_fwd(n, cfg_.width, s0.P(), s0.Q(), 3, 2, 1, stem_a_, pool_);
    for (Block& b : blocks_) {
      conv_bn(*b.c1, with_batch(b.c1->s, n), *b.b1, b.x, nullptr, true, b.a1);
      conv_bn(*b.c2, with_batch(b.c2->s, n), *b.b2, b.a1, nullptr, true, b.o2);
      const T* residual = b.x;
      if (b.ds) {
        conv_bn(*b.ds, with_batch(b.ds->s, n), *b.bds, b.x, nullptr, false, b.dsa);
        residual = b.dsa;
      }
      conv_bn(*b.c3, with_batch(b.c3->s, n), *b.b3, b.o2, residual, true, b.y);
    }
    head_forward(n);
    return;
  }
  be.conv_fwd(s0, input_, stem_conv_->w, stem_c_);
  bn_fwd(*stem_bn_, s0.P(), s0.Q(), stem_c_, nullptr, true, stem_a_);
  be.maxpool_fwd(n, cfg_.width, s0.P(), s0.Q(), 3, 2, 1, stem_a_, pool_);
  for (Block& b : blocks_) {
    be.conv_fwd(with_batch(b.c1->s, n), b.x, b.c1->w, b.o1);
    bn_fwd(*b.b1, b.in_h, b.in_w, b.o1, nullptr, true, b.a1);
    be.conv_fwd(with_batch(b.c2->s, n), b.a1, b.c2->w, b.o2);
    bn_fwd(*b.b2, b.out_h, b.out_w, b.o2, nullptr, true, b.a2);
    be.conv_fwd(with_batch(b.c3->s, n), b.a2, b.c3->w, b.o3);
    const T* residual = b.x;
    if (b.ds) {
      be.conv_fwd(with_batch(b.ds->s, n), b.x, b.ds->w, b.dso);
      bn_fwd(*b.bds, b.out_h, b.out_w, b.dso, nullptr, false, b.dsa);
      residual = b.dsa;
    }
    bn_fwd(*b.b3, b.out_h, b.out_w, b.o3, residual, true, b.y);
  }
  head_forward(n);
}

template <class T>
void ModelT<T>::head_forward(int n) {
  BackendT<T>& be = be_;
  const Block& last = blocks_.back();
  be.avgpool_fwd(n, last.out_c, last.out_h, last.out_w, last.y, feat_);
  const T* h = feat_;
  for (size_t i = 0; i < fcs_.size(); ++i) {
    const Linear& l = fcs_[i];
    be.linear_fwd(n, l.in, l.out, h, l.w, l.b, fc_out_[i]);
    if (i + 1 < fcs_.size()) be.relu_fwd(int64_t(n) * l.out, fc_out_[i], fc_out_[i]);
    h = fc_out_[i];
  }
}

template <class T>
void ModelT<T>::backward(int n) {
  VB_CHECK(n > 0 && n <= max_batch_, "batch of ", n, " images; the model is planned for ", max_batch_);
  check_plan();
  BackendT<T>& be = be_;
  // The head, last layer first. dx of the first linear is the gradient of the pooled features.
  const T* dy = dlogits_;
  int k = 0;
  for (size_t i = fcs_.size(); i-- > 0;) {
    const Linear& l = fcs_[i];
    const T* x = i == 0 ? feat_ : fc_out_[i - 1];
    T* dx = (i == 0 && frozen_) ? nullptr : gfc_[k];
    be.linear_bwd(n, l.in, l.out, x, l.w, dy, dx, l.dw, l.db);
    if (i > 0) be.relu_bwd(int64_t(n) * l.in, fc_out_[i - 1], dx, dx);
    dy = dx;
    k ^= 1;
  }
  if (frozen_) return;

  // Four scratch buffers, each the largest activation. A: the gradient of the current block's output (free
  // once bn3's backward has read it, then the masked-gradient scratch, then the block input's gradient);
  // B: the residual's gradient; C: convolution output gradients; D: convolution input gradients.
  T *A = gdeep_[0], *B = gdeep_[1], *C = gdeep_[2], *D = gdeep_[3];
  const Block& last = blocks_.back();
  be.avgpool_bwd(n, last.out_c, last.out_h, last.out_w, dy, A);
  // Back through `conv` (whose output gradient is in C) and the BN+ReLU `bn` before it, whose output `a` is
  // recomputed from its input `o`: C ends up holding the gradient of `o`.
  auto through = [&](const Conv& conv, const ConvShape& cs, const Bn& bn, int H, int W, const T* o, T* a) {
    be.bn_apply(n, bn.C, H, W, o, bn.gamma, bn.beta, bn.save_mean, bn.save_invstd, true, a);
    be.conv_bwd_filter(cs, a, C, conv.dw);
    be.conv_bwd_data(cs, C, conv.w, D);
    be.bn_bwd(n, bn.C, H, W, o, a, D, bn.gamma, bn.save_mean, bn.save_invstd, true, C, nullptr, bn.dgamma,
              bn.dbeta, A);
  };
  // A holds the gradient of the current block's output throughout.
  for (size_t bi = blocks_.size(); bi-- > 0;) {
    const Block& b = blocks_[bi];
    if (b.stage < deep_from_ && A != g_[0]) {
      // Leaving the deep stages: their activations are dead, so the shallow scratch (which overlaps them)
      // takes over; the gradient of this block's output moves with it.
      be.copy(g_[0], A, act_bytes_ * size_t(n) * b.out_c * b.out_h * b.out_w);
      A = g_[0], B = g_[1], C = g_[2], D = g_[3];
    }
    const ConvShape s1 = with_batch(b.c1->s, n), s2 = with_batch(b.c2->s, n), s3 = with_batch(b.c3->s, n);
    // y = relu(bn3(o3) + residual): B gets the gradient of the residual (= of bn3's output).
    be.bn_bwd(n, b.out_c, b.out_h, b.out_w, b.o3, b.y, A, b.b3->gamma, b.b3->save_mean, b.b3->save_invstd, true,
              C, B, b.b3->dgamma, b.b3->dbeta, B);
    through(*b.c3, s3, *b.b2, b.out_h, b.out_w, b.o2, b.a2);
    through(*b.c2, s2, *b.b1, b.in_h, b.in_w, b.o1, b.a1);
    be.conv_bwd_filter(s1, b.x, C, b.c1->dw);
    be.conv_bwd_data(s1, C, b.c1->w, A);
    const int64_t in_elems = int64_t(n) * b.in_c * b.in_h * b.in_w;
    if (b.ds) {
      const ConvShape sd = with_batch(b.ds->s, n);
      be.bn_bwd(n, b.out_c, b.out_h, b.out_w, b.dso, nullptr, B, b.bds->gamma, b.bds->save_mean,
                b.bds->save_invstd, false, C, nullptr, b.bds->dgamma, b.bds->dbeta, D);
      be.conv_bwd_filter(sd, b.x, C, b.ds->dw);
      be.conv_bwd_data(sd, C, b.ds->w, D);
      be.add(in_elems, A, D, A);
    } else {
      be.add(in_elems, A, B, A);
    }
  }
  // The stem: maxpool, bn1 + relu, conv1 (no gradient for the input images).
  const ConvShape s0 = with_batch(stem_conv_->s, n);
  be.maxpool_bwd(n, cfg_.width, s0.P(), s0.Q(), 3, 2, 1, stem_a_, pool_, A, B);
  be.bn_bwd(n, cfg_.width, s0.P(), s0.Q(), stem_c_, stem_a_, B, stem_bn_->gamma, stem_bn_->save_mean,
            stem_bn_->save_invstd, true, D, nullptr, stem_bn_->dgamma, stem_bn_->dbeta, C);
  be.conv_bwd_filter(s0, input_, D, stem_conv_->dw);
}

template class ModelT<float>;
template class ModelT<double>;

}  // namespace vb
