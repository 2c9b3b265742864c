#include "engine/optimizer.h"

namespace vb {

AdamW::AdamW(Model& model, AdamWOptions opt) : model_(model), opt_(opt) {
  for (const TensorSlot& s : model.slots()) {
    if (s.spec.kind != TensorKind::Parameter) continue;
    offsets_.push_back(s.offset);
    sizes_.push_back(numel(s.spec.shape));
    head_.push_back(s.spec.head);
  }
  steps_.assign(offsets_.size(), 0);
  const size_t bytes = sizeof(float) * size_t(model.num_params());
  m_ = static_cast<float*>(model.backend().alloc(bytes));
  v_ = static_cast<float*>(model.backend().alloc(bytes));
}

AdamW::~AdamW() {
  model_.backend().release(m_);
  model_.backend().release(v_);
}

void AdamW::step(double lr) {
  const bool frozen = model_.backbone_frozen();
  Backend& be = model_.backend();
  float *p = model_.params(), *g = model_.grads();
  // Runs of consecutive tensors with the same step count are one launch (usually the whole buffer).
  size_t i = 0;
  while (i < offsets_.size()) {
    if (frozen && !head_[i]) { ++i; continue; }
    const int64_t step = ++steps_[i];
    size_t j = i + 1;
    while (j < offsets_.size() && (!frozen || head_[j]) && steps_[j] + 1 == step) ++steps_[j++];
    const int64_t begin = offsets_[i], end = offsets_[j - 1] + sizes_[j - 1];
    be.adamw(end - begin, p + begin, g + begin, m_ + begin, v_ + begin, lr, opt_.beta1, opt_.beta2, opt_.eps,
             opt_.weight_decay, step);
    i = j;
  }
}

StateDict AdamW::state_dict() {
  const int64_t n = model_.num_params();
  HostTensor m({n}, DType::F32), v({n}, DType::F32);
  model_.backend().download(m.bytes.data(), m_, m.bytes.size());
  model_.backend().download(v.bytes.data(), v_, v.bytes.size());
  StateDict sd;
  sd.set("exp_avg", std::move(m));
  sd.set("exp_avg_sq", std::move(v));
  sd.set("step", HostTensor::from_i64({int64_t(steps_.size())}, steps_.data()));
  return sd;
}

void AdamW::load_state_dict(const StateDict& sd, const std::string& source) {
  const int64_t n = model_.num_params();
  for (const char* k : {"exp_avg", "exp_avg_sq"}) {
    if (!sd.has(k)) fail(source, ": optimizer state has no '", k, "'");
    if (sd.at(k).numel() != n || sd.at(k).dtype != DType::F32)
      fail(source, ": optimizer state '", k, "' has ", sd.at(k).numel(), " values, the model has ", n, " parameters");
  }
  if (!sd.has("step") || sd.at("step").numel() != int64_t(steps_.size()))
    fail(source, ": optimizer state has no per-tensor 'step' for ", steps_.size(), " tensors");
  model_.backend().upload(m_, sd.at("exp_avg").bytes.data(), sizeof(float) * size_t(n));
  model_.backend().upload(v_, sd.at("exp_avg_sq").bytes.data(), sizeof(float) * size_t(n));
  std::vector<double> st = sd.at("step").to_f64();
  for (size_t i = 0; i < steps_.size(); ++i) steps_[i] = int64_t(st[i]);
}

void AdamW::load_torch_state(const std::vector<HostTensor>& exp_avg, const std::vector<HostTensor>& exp_avg_sq,
                             const std::vector<int64_t>& steps, const std::string& source) {
  const size_t T = offsets_.size();
  if (exp_avg.size() != T || exp_avg_sq.size() != T || steps.size() != T)
    fail(source, ": optimizer state has ", exp_avg.size(), " parameters, the model has ", T);
  std::vector<float> m(static_cast<size_t>(model_.num_params())), v(m.size());
  for (size_t i = 0; i < T; ++i) {
    if (exp_avg[i].numel() != sizes_[i] || exp_avg_sq[i].numel() != sizes_[i])
      fail(source, ": optimizer state of parameter ", i, " has ", exp_avg[i].numel(), " values, expected ", sizes_[i]);
    std::vector<float> a = exp_avg[i].to_f32(), b = exp_avg_sq[i].to_f32();
    std::copy(a.begin(), a.end(), m.begin() + offsets_[i]);
    std::copy(b.begin(), b.end(), v.begin() + offsets_[i]);
    steps_[i] = steps[i];
  }
  model_.backend().upload(m_, m.data(), sizeof(float) * m.size());
  model_.backend().upload(v_, v.data(), sizeof(float) * v.size());
}

StepLR::StepLR(double base_lr, int step_size, double gamma)
    : base_lr_(base_lr), gamma_(gamma), lr_(base_lr), step_size_(step_size) {
  VB_CHECK(step_size > 0, "StepLR step size must be positive, got ", step_size);
}

void StepLR::step() {
  ++last_epoch_;
  if (last_epoch_ % step_size_ == 0) lr_ *= gamma_;  // PyTorch's chainable form: lr * gamma at each boundary
}

}  // namespace vb
