#include "engine/optimizer.h"

namespace vb {

template <class T>
AdamWT<T>::AdamWT(ModelT<T>& model, AdamWOptions opt) : model_(model), opt_(opt) {
  for (const TensorSlot& s : model.slots()) {
    if (s.spec.kind != TensorKind::Parameter) continue;
    offsets_.push_back(s.offset);
    sizes_.push_back(numel(s.spec.shape));
    head_.push_back(s.spec.head);
  }
  steps_.assign(offsets_.size(), 0);
  const size_t bytes = sizeof(T) * size_t(model.num_params());
  m_ = static_cast<T*>(model.backend().alloc(bytes));
  v_ = static_cast<T*>(model.backend().alloc(bytes));
}

template <class T>
AdamWT<T>::~AdamWT() {
  model_.backend().release(m_);
  model_.backend().release(v_);
}

template <class T>
void AdamWT<T>::step(double lr) {
  const bool frozen = model_.backbone_frozen();
  BackendT<T>& be = model_.backend();
  T *p = model_.params(), *g = model_.grads();
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

template <class T>
StateDict AdamWT<T>::state_dict() {
  const int64_t n = model_.num_params();
  std::vector<T> hm(static_cast<size_t>(n)), hv(hm.size());
  model_.backend().download(hm.data(), m_, sizeof(T) * hm.size());
  model_.backend().download(hv.data(), v_, sizeof(T) * hv.size());
  HostTensor m({n}, DType::F32), v({n}, DType::F32);
  std::copy(hm.begin(), hm.end(), m.template as<float>());
  std::copy(hv.begin(), hv.end(), v.template as<float>());
  StateDict sd;
  sd.set("exp_avg", std::move(m));
  sd.set("exp_avg_sq", std::move(v));
  sd.set("step", HostTensor::from_i64({int64_t(steps_.size())}, steps_.data()));
  return sd;
}

template <class T>
void AdamWT<T>::load_state_dict(const StateDict& sd, const std::string& source) {
  const int64_t n = model_.num_params();
  for (const char* k : {"exp_avg", "exp_avg_sq"}) {
    if (!sd.has(k)) fail(source, ": optimizer state has no '", k, "'");
    if (sd.at(k).numel() != n || sd.at(k).dtype != DType::F32)
      fail(source, ": optimizer state '", k, "' has ", sd.at(k).numel(), " values, the model has ", n, " parameters");
  }
  if (!sd.has("step") || sd.at("step").numel() != int64_t(steps_.size()))
    fail(source, ": optimizer state has no per-tensor 'step' for ", steps_.size(), " tensors");
  for (auto [key, dst] : {std::pair{"exp_avg", m_}, std::pair{"exp_avg_sq", v_}}) {
    std::vector<T> h(static_cast<size_t>(n));
    const float* src = sd.at(key).template as<float>();
    std::copy(src, src + n, h.begin());
    model_.backend().upload(dst, h.data(), sizeof(T) * h.size());
  }
  std::vector<double> st = sd.at("step").to_f64();
  for (size_t i = 0; i < steps_.size(); ++i) steps_[i] = int64_t(st[i]);
}

template <class T>
void AdamWT<T>::load_torch_state(const std::vector<HostTensor>& exp_avg, const std::vector<HostTensor>& exp_avg_sq,
                             const std::vector<int64_t>& steps, const std::string& source) {
  const size_t count = offsets_.size();
  if (exp_avg.size() != count || exp_avg_sq.size() != count || steps.size() != count)
    fail(source, ": optimizer state has ", exp_avg.size(), " parameters, the model has ", count);
  std::vector<T> m(static_cast<size_t>(model_.num_params())), v(m.size());
  for (size_t i = 0; i < count; ++i) {
    if (exp_avg[i].numel() != sizes_[i] || exp_avg_sq[i].numel() != sizes_[i])
      fail(source, ": optimizer state of parameter ", i, " has ", exp_avg[i].numel(), " values, expected ", sizes_[i]);
    std::vector<double> a = exp_avg[i].to_f64(), b = exp_avg_sq[i].to_f64();
    std::copy(a.begin(), a.end(), m.begin() + offsets_[i]);
    std::copy(b.begin(), b.end(), v.begin() + offsets_[i]);
    steps_[i] = steps[i];
  }
  model_.backend().upload(m_, m.data(), sizeof(T) * m.size());
  model_.backend().upload(v_, v.data(), sizeof(T) * v.size());
}

template class AdamWT<float>;
template class AdamWT<double>;

StepLR::StepLR(double base_lr, int step_size, double gamma)
    : base_lr_(base_lr), gamma_(gamma), lr_(base_lr), step_size_(step_size) {
  VB_CHECK(step_size > 0, "StepLR step size must be positive, got ", step_size);
}

void StepLR::step() {
  ++last_epoch_;
  if (last_epoch_ % step_size_ == 0) lr_ *= gamma_;  // PyTorch's chainable form: lr * gamma at each boundary
}

}  // namespace vb
