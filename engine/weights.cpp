#include "engine/weights.h"

#include <cmath>
#include <set>

#include "engine/pth.h"

namespace vb {

using pickle::Type;
using pickle::ValuePtr;

const char* weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::PthZip: return "PyTorch zip";
    case WeightFormat::PthLegacy: return "PyTorch legacy";
    case WeightFormat::Safetensors: return "safetensors";
  }
  return "?";
}

WeightFormat detect_weight_format(const std::string& b, const std::string& path) {
  if (looks_like_zip(b)) return WeightFormat::PthZip;
  if (looks_like_legacy_pth(b)) return WeightFormat::PthLegacy;
  // safetensors: a little-endian header length, then a JSON object. A truncated file still starts so.
  if (b.size() >= 9 && b[8] == '{') {
    uint64_t n = 0;
    std::memcpy(&n, b.data(), 8);
    if (n >= 2 && n < (uint64_t(1) << 32)) return WeightFormat::Safetensors;
  }
  if (b.empty()) fail(escape(path), ": not a checkpoint (the file is empty)");
  fail(escape(path), ": not a checkpoint (neither a PyTorch .pth, zip or legacy, nor a safetensors file)");
}

namespace {

bool is_tensor_dict(const ValuePtr& v) {
  if (!v || !v->is(Type::Dict) || v->dict.empty()) return false;
  for (const auto& [k, x] : v->dict)
    if (!k->is(Type::Str) || !x->is(Type::Tensor)) return false;
  return true;
}

std::vector<std::string> dict_keys(const ValuePtr& v) {
  std::vector<std::string> r;
  for (const auto& [k, x] : v->dict) r.push_back(k->is(Type::Str) ? escape(k->str, 60) : pickle::describe(*k));
  return r;
}

std::string join(const std::vector<std::string>& v, size_t limit = 8) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < limit; ++i) s += (i ? ", " : "") + v[i];
  if (v.size() > limit) s += ", ... (" + std::to_string(v.size()) + " in all)";
  return s;
}

}  // namespace

std::string strip_key_prefixes(StateDict& sd) {
  std::string stripped;
  for (;;) {
    std::string found;
    for (const char* p : {"module.", "model."}) {
      bool all = !sd.order.empty();
      for (const auto& k : sd.order)
        if (k.rfind(p, 0) != 0) { all = false; break; }
      if (all) { found = p; break; }
    }
    if (found.empty()) return stripped;
    StateDict out;
    out.metadata = std::move(sd.metadata);
    for (const auto& k : sd.order) out.set(k.substr(found.size()), std::move(sd.map.at(k)));
    sd = std::move(out);
    stripped += found;
  }
}

StateDict state_dict_from_value(const ValuePtr& root, const std::string& path) {
  ValuePtr d = root;
  // A checkpoint may wrap the state dict (several levels: {"model": {"state_dict": ...}} is seen in the wild).
  for (int depth = 0; depth < 4 && !is_tensor_dict(d); ++depth) {
    if (!d || !d->is(Type::Dict)) break;
    ValuePtr next;
    for (const char* key : {"state_dict", "model_state_dict", "model"}) {
      ValuePtr c = d->get(key);
      if (c && c->is(Type::Dict)) { next = c; break; }
    }
    if (!next) break;
    d = next;
  }
  if (!is_tensor_dict(d)) {
    if (root && root->is(Type::Dict))
      fail(escape(path), ": no state dict found (top-level keys: ", join(dict_keys(root)),
           "; expected tensors, or a dict under state_dict / model_state_dict / model)");
    fail(escape(path), ": no state dict found (the file holds ", root ? pickle::describe(*root) : "nothing", ")");
  }
  StateDict sd;
  for (const auto& [k, v] : d->dict) {
    if (sd.has(k->str)) fail(escape(path), ": key '", escape(k->str), "' appears twice");
    sd.set(k->str, *v->tensor);
  }
  strip_key_prefixes(sd);
  return sd;
}

StateDict load_state_dict_bytes(const std::string& bytes, const std::string& path, WeightFormat* format) {
  const WeightFormat f = detect_weight_format(bytes, path);
  if (format) *format = f;
  StateDict sd = f == WeightFormat::Safetensors ? parse_safetensors(bytes, path)
                                                : state_dict_from_value(parse_pth(bytes, path), path);
  if (f == WeightFormat::Safetensors) {
    if (sd.order.empty()) fail(escape(path), ": no tensors in the safetensors file");
    strip_key_prefixes(sd);
  }
  return sd;
}

StateDict load_state_dict_file(const std::string& path) { return load_state_dict_bytes(read_file(path), path); }

void check_against_specs(const StateDict& sd, const std::vector<TensorSpec>& specs, const std::string& path) {
  std::vector<std::string> missing, unexpected, shapes;
  std::set<std::string> known;
  for (const auto& s : specs) {
    known.insert(s.name);
    auto it = sd.map.find(s.name);
    if (it == sd.map.end()) missing.push_back(s.name);
    else if (it->second.shape != s.shape)
      shapes.push_back(s.name + " is " + shape_str(it->second.shape) + ", expected " + shape_str(s.shape));
  }
  for (const auto& k : sd.order)
    if (!known.count(k)) unexpected.push_back(escape(k, 80));
  if (missing.empty() && unexpected.empty() && shapes.empty()) return;
  std::string msg = escape(path) + ": does not fit the model:";
  if (!missing.empty()) msg += " missing keys: " + join(missing) + ";";
  if (!unexpected.empty()) msg += " unexpected keys: " + join(unexpected) + ";";
  if (!shapes.empty()) msg += " wrong shapes: " + join(shapes, 4) + ";";
  msg.pop_back();
  fail(msg);
}

namespace {

// Small accessors that say which field of the checkpoint was wrong.
struct Reader {
  const std::string& path;
  ValuePtr need(const ValuePtr& d, const char* key, const std::string& where) const {
    ValuePtr v = d && d->is(Type::Dict) ? d->get(key) : nullptr;
    if (!v) fail(path, ": ", where, " has no '", key, "'");
    return v;
  }
  double num(const ValuePtr& v, const std::string& what) const {
    if (v->is(Type::Tensor) && v->tensor->numel() == 1) return v->tensor->to_f64()[0];
    if (!v->is_number()) fail(path, ": ", what, " is ", pickle::describe(*v), ", not a number");
    return v->as_double();
  }
  int64_t integer(const ValuePtr& v, const std::string& what) const {
    const double x = num(v, what);
    // In range before the cast: converting 1e300 or inf to int64 is undefined.
    if (x != std::floor(x) || std::fabs(x) >= 9.2e18) fail(path, ": ", what, " is ", x, ", not an integer");
    return int64_t(x);
  }
  std::vector<double> nums(const ValuePtr& v, const std::string& what) const {
    if (!v->is(Type::List) && !v->is(Type::Tuple)) fail(path, ": ", what, " is ", pickle::describe(*v), ", not a list");
    std::vector<double> r;
    for (const auto& x : v->items) r.push_back(num(x, what));
    return r;
  }
  HostTensor tensor(const ValuePtr& v, const std::string& what) const {
    if (!v->is(Type::Tensor)) fail(path, ": ", what, " is ", pickle::describe(*v), ", not a tensor");
    return *v->tensor;
  }
};

}  // namespace

NotebookCheckpoint read_notebook_checkpoint(const std::string& path) {
  const std::string bytes = read_file(path);
  const WeightFormat f = detect_weight_format(bytes, path);
  const std::string file = escape(path);  // for messages
  if (f == WeightFormat::Safetensors) fail(file, ": a safetensors file holds weights only, not a training checkpoint");
  const ValuePtr root = parse_pth(bytes, path);
  const Reader r{file};
  if (!root->is(Type::Dict) || !root->get("model_state_dict"))
    fail(file, ": not a training checkpoint (expected a dict with epoch, model_state_dict, optimizer_state_dict)");
  NotebookCheckpoint ck;
  ck.epoch = r.integer(r.need(root, "epoch", "the checkpoint"), "epoch");
  ValuePtr msd = root->get("model_state_dict");
  if (!is_tensor_dict(msd)) fail(file, ": model_state_dict is ", pickle::describe(*msd), ", not a dict of tensors");
  ck.model = state_dict_from_value(msd, path);

  ValuePtr opt = r.need(root, "optimizer_state_dict", "the checkpoint");
  ValuePtr state = r.need(opt, "state", "optimizer_state_dict");
  if (!state->is(Type::Dict)) fail(file, ": optimizer_state_dict.state is ", pickle::describe(*state));
  for (const auto& [k, v] : state->dict) {
    if (!k->is(Type::Int)) fail(file, ": optimizer state key ", pickle::describe(*k), " is not a parameter index");
    const std::string where = "optimizer state of parameter " + std::to_string(k->i);
    AdamWParamState s;
    s.step = r.integer(r.need(v, "step", where), where + ": step");
    s.exp_avg = r.tensor(r.need(v, "exp_avg", where), where + ": exp_avg");
    s.exp_avg_sq = r.tensor(r.need(v, "exp_avg_sq", where), where + ": exp_avg_sq");
    ck.optimizer_state[k->i] = std::move(s);
  }
  ValuePtr groups = r.need(opt, "param_groups", "optimizer_state_dict");
  if (!groups->is(Type::List)) fail(file, ": param_groups is ", pickle::describe(*groups));
  for (size_t gi = 0; gi < groups->items.size(); ++gi) {
    const ValuePtr& g = groups->items[gi];
    const std::string where = "param_groups[" + std::to_string(gi) + "]";
    AdamWParamGroup pg;
    pg.lr = r.num(r.need(g, "lr", where), where + ".lr");
    auto betas = r.nums(r.need(g, "betas", where), where + ".betas");
    if (betas.size() != 2) fail(file, ": ", where, ".betas has ", betas.size(), " values");
    pg.beta1 = betas[0];
    pg.beta2 = betas[1];
    pg.eps = r.num(r.need(g, "eps", where), where + ".eps");
    pg.weight_decay = r.num(r.need(g, "weight_decay", where), where + ".weight_decay");
    if (ValuePtr il = g->get("initial_lr")) pg.initial_lr = r.num(il, where + ".initial_lr");
    if (ValuePtr a = g->get("amsgrad"); a && a->is(Type::Bool)) pg.amsgrad = a->b;
    if (ValuePtr m = g->get("maximize"); m && m->is(Type::Bool)) pg.maximize = m->b;
    const ValuePtr params = r.need(g, "params", where);
    if (!params->is(Type::List) && !params->is(Type::Tuple))
      fail(file, ": ", where, ".params is ", pickle::describe(*params), ", not a list");
    for (const auto& p : params->items) pg.params.push_back(r.integer(p, where + ".params"));
    ck.param_groups.push_back(std::move(pg));
  }

  ValuePtr sch = root->get("scheduler_state_dict");
  if (sch && !sch->is(Type::None)) {
    const std::string where = "scheduler_state_dict";
    StepLRState s;
    s.step_size = r.integer(r.need(sch, "step_size", where), where + ".step_size");
    s.gamma = r.num(r.need(sch, "gamma", where), where + ".gamma");
    s.base_lrs = r.nums(r.need(sch, "base_lrs", where), where + ".base_lrs");
    s.last_epoch = r.integer(r.need(sch, "last_epoch", where), where + ".last_epoch");
    if (ValuePtr l = sch->get("_last_lr")) s.last_lr = r.nums(l, where + "._last_lr");
    if (ValuePtr c = sch->get("_step_count")) s.step_count = r.integer(c, where + "._step_count");
    ck.scheduler = std::move(s);
  }
  return ck;
}

}  // namespace vb
