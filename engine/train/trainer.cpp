#include "engine/train/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <deque>
#include <thread>

#include "engine/backend_bf16.h"
#include "engine/file_io.h"
#include "engine/progress.h"
#include "engine/text.h"
#include "engine/weights.h"

namespace fs = std::filesystem;

namespace vb {

namespace {

// ------------------------------------------------------------------------------------------------ Ctrl-C

std::atomic<bool> g_interrupted{false};
extern "C" void on_sigint(int) {
  if (g_interrupted.exchange(true)) _exit(130);  // a second Ctrl-C: leave at once
  const char msg[] = "\nvbtrain: interrupted; finishing the current step and saving (Ctrl-C again to quit now)\n";
  ssize_t ignored = ::write(STDERR_FILENO, msg, sizeof msg - 1);
  (void)ignored;
}
struct SigintGuard {
  void (*previous)(int);
  SigintGuard() : previous(std::signal(SIGINT, on_sigint)) { g_interrupted = false; }
  ~SigintGuard() { std::signal(SIGINT, previous); }
};

data::LoaderOptions loader_options(const TrainOptions& o, bool train, Backend& be) {
  data::LoaderOptions lo;
  lo.batch_size = o.batch_size;
  lo.image_size = o.image_size;
  lo.threads = o.threads;
  lo.train = train;
  lo.shuffle = train;
  lo.seed = o.seed;
  lo.on_bad = data::parse_bad_image_policy(o.on_bad_image);
  lo.cache = data::parse_cache_policy(o.cache);
  lo.dct_scaling = o.dct_scaling;
  lo.format = data::PixelFormat::Uint8NHWC;  // normalised by the backend (Backend::upload_images)
  Backend* b = &be;  // outlives the loaders (declared before them in Trainer)
  lo.alloc = [b](size_t n) { return b->host_alloc(n); };
  lo.free = [b](void* p) { b->host_free(p); };
  return lo;
}

// The training losses come back without stalling the device (Backend::scalar_push/pop): read about one step
// late, in order, and summed in that order, so the sum is the same as reading each at once.
class LateLosses {
 public:
  LateLosses(Backend& be, Progress& progress, int64_t read, double sum, int64_t epoch, double lr)
      : be_(be), progress_(progress), read_(read), sum_(sum), epoch_(epoch), lr_(lr) {}
  void pushed(int batch_size) { unread_sizes_.push_back(batch_size); }
  // The losses that have arrived (all of them when `wait`), in order; a non-finite one is an error.
  void read(bool wait) {
    float loss = 0;
    while (!unread_sizes_.empty() && be_.scalar_pop(&loss, wait)) {
      if (!std::isfinite(loss)) fail("the training loss is ", loss, " at epoch ", epoch_ + 1, ", step ", read_ + 1, " (lr ", lr_, ")");
      sum_ += loss;
      ++read_;
      progress_.update(read_, unread_sizes_.front(), loss);
      unread_sizes_.pop_front();
    }
  }
  double sum() const { return sum_; }

 private:
  Backend& be_;
  Progress& progress_;
  int64_t read_;
  double sum_;
  int64_t epoch_;
  double lr_;
  std::deque<int> unread_sizes_;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

nlohmann::json RunTimes::to_json() const {
  const double accounted = setup + training + validation + checkpoints + test + final_files;
  return {{"total_s", total},
          {"setup_s", setup},
          {"training_s", training},
          {"training_data_wait_s", data_wait},
          {"validation_s", validation},
          {"checkpoints_s", checkpoints},
          {"test_s", test},
          {"final_files_s", final_files},
          {"other_s", std::max(0.0, total - accounted)},
          {"epochs", epochs},
          {"jpeg_decodes", decoded}};
}

std::string RunTimes::line() const {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "time: %.1f s: setup %.1f s, training %.1f s (%lld epochs; waiting for data %.1f s; %lld JPEG "
                "decodes), validation %.1f s, checkpoints and reports %.1f s, test %.1f s, final model %.1f s",
                total, setup, training, (long long)epochs, data_wait, (long long)decoded, validation, checkpoints,
                test, final_files);
  return buf;
}

int run_training(TrainOptions opt, const std::string& resume, bool epochs_given) {
  Trainer trainer(resolve_run(std::move(opt), resume, epochs_given));
  return trainer.run();
}

Trainer::Trainer(ResolvedRun run) : run_(std::move(run)), opt_(run_.opt), out_(run_.opt.out), names_(class_names()) {}
Trainer::~Trainer() = default;

int Trainer::run() {
  run_start_ = std::chrono::steady_clock::now();
  build_data();
  build_model();
  restore();
  open_run_folder();
  times_.setup = seconds_since(run_start_);
  SigintGuard sigint;
  for (int64_t epoch = pos_.epoch; epoch < opt_.epochs; ++epoch) {
    EpochRow row;
    if (!train_epoch(epoch, row)) return stopped();
    const std::unique_ptr<Confusion> val = validate(row);
    const bool best = checkpoint(epoch, row, val.get());
    report_epoch(row, val != nullptr, best);
    if (interrupted() && epoch + 1 < opt_.epochs) return stopped();
  }
  finish();
  return 0;
}

bool Trainer::interrupted() const {
  return g_interrupted.load() || (opt_.stop_after_steps > 0 && steps_this_run_ >= opt_.stop_after_steps);
}

int Trainer::stopped() {
  std::printf("stopped; resume with: vbtrain train --resume %s\n", out_.string().c_str());
  std::fflush(stdout);
  return 130;
}

void Trainer::save_last(const TrainPosition& p) {
  save_checkpoint((out_ / "checkpoint-last.safetensors").string(), *model_, *adamw_, *sched_, p, config_);
}

// ------------------------------------------------------------------------------------------------ set-up

void Trainer::build_data() {
  data::DatasetIndex index = data::build_index(opt_.data);
  for (const auto& s : index.skipped_entries) std::printf("note: %s\n", escape(s).c_str());
  train_ = data::select_split(index.samples, data::Split::Train);
  val_ = data::select_split(index.samples, data::Split::Val);
  test_ = data::select_split(index.samples, data::Split::Test);
  if (train_.empty()) fail(opt_.data, ": no training clips (videos of the train split with annotations)");
  class_weights_ = class_weights_for(train_);
}

void Trainer::build_model() {
  if (opt_.precision != "tf32" && opt_.precision != "fp32" && opt_.precision != "bf16")
    fail("--precision must be tf32, fp32 or bf16, got '", opt_.precision, "'");
  be_ = make_backend(opt_.device, opt_.threads);
  if (opt_.precision == "bf16") {
    // CUDA: the backend's bf16 mode, which needs NHWC; the CPU: the emulation of autocast (engine/backend_bf16.h).
    if (be_->device() == Device::CUDA) {
      if (be_->activation_layout() != Layout::NHWC) be_ = make_cuda_backend(0, Layout::NHWC);
      be_->set_precision(Precision::BF16);
    } else {
      be_ = make_bf16_emulation(std::move(be_));
    }
  } else {
    be_->set_precision(opt_.precision == "fp32" || be_->device() == Device::CPU ? Precision::FP32 : Precision::TF32);
  }
  be_->set_deterministic(opt_.deterministic);
  const bool fresh = run_.from == ResumeFrom::Nothing;  // else restore() loads the model
  StateDict init;
  if (!opt_.weights.empty() && fresh) init = load_initial_weights();
  cfg_ = opt_.model_config();
  model_ = std::make_unique<Model>(*be_, cfg_);
  if (!init.order.empty()) {
    model_->load_state_dict(init, opt_.weights);
  } else if (fresh) {
    model_->init_torchvision(opt_.seed);
    std::fprintf(stderr, "warning: no --weights: the model starts from torchvision's random initialisation, not "
                         "ImageNet weights (see weights/README.md)\n");
  }
  model_->plan(opt_.batch_size, opt_.image_size);
  adamw_ = std::make_unique<AdamW>(*model_, AdamWOptions{opt_.lr, 0.9, 0.999, 1e-8, opt_.weight_decay});
  sched_ = std::make_unique<StepLR>(opt_.lr, opt_.step_size, opt_.gamma);
}

// --weights: they decide the model's blocks, width and hidden layers.
StateDict Trainer::load_initial_weights() {
  StateDict init = load_state_dict_file(opt_.weights);
  ModelConfig wc = infer_model_config(init, opt_.weights);
  if (wc.num_classes != data::kNumClasses)
    fail(opt_.weights, ": the weights have a ", wc.num_classes, "-class head; B1 has ", data::kNumClasses,
         " classes: convert them first (vbconvert ", opt_.weights, " engine.safetensors)");
  opt_.blocks = wc.blocks;
  opt_.width = wc.width;
  opt_.hidden = wc.hidden;
  init.metadata.clear();
  return init;
}

void Trainer::restore() {
  if (run_.from == ResumeFrom::RunFolder) restore_run_checkpoint();
  else if (run_.from == ResumeFrom::Notebook) restore_notebook();
}

// The newest readable checkpoint (checkpoint-last, else checkpoint-best), and the metrics up to it.
void Trainer::restore_run_checkpoint() {
  std::string why;  // why the newer checkpoints were passed over
  for (size_t i = 0;; ++i) {
    if (i == run_.checkpoints.size()) fail(run_.resume, ": no readable checkpoint to continue from (", why, ")");
    try {
      pos_ = load_checkpoint(run_.checkpoints[i].string(), *model_, *adamw_, *sched_);
    } catch (const Error& e) {
      std::fprintf(stderr, "warning: %s\n", escape(e.what(), 1000).c_str());
      why += std::string(why.empty() ? "" : "; ") + e.what();
      continue;
    }
    if (run_.checkpoints[i].filename() != "checkpoint-last.safetensors")
      std::printf("note: %s: checkpoint-last.safetensors is %s; continuing from %s (the end of epoch %lld): "
                  "the epochs after it are trained again\n",
                  escape(opt_.out).c_str(), why.empty() ? "missing" : "unreadable",
                  run_.checkpoints[i].filename().string().c_str(), (long long)pos_.epoch);
    break;
  }
  rows_ = read_metrics(out_);
  while (!rows_.empty() && rows_.back().epoch > pos_.epoch) rows_.pop_back();  // epochs after the checkpoint
  if (!pos_.best_confusion.empty())
    best_confusion_ = std::make_unique<Confusion>(Confusion::from_counts(data::kNumClasses, pos_.best_confusion));
  if (pos_.epoch >= opt_.epochs)
    std::printf("%s: all %d epochs are done (pass a larger --epochs to train further)\n", out_.string().c_str(),
                opt_.epochs);
  else
    std::printf("resuming %s at epoch %lld%s with its saved settings (config.json; only --epochs is taken "
                "from the command line)\n",
                out_.string().c_str(), (long long)pos_.epoch + 1,
                pos_.step_in_epoch ? (", step " + std::to_string(pos_.step_in_epoch + 1)).c_str() : "");
}

void Trainer::restore_notebook() {
  const std::string& path = run_.resume;
  NotebookCheckpoint& nb = *run_.notebook;
  model_->load_state_dict(nb.model, path);
  std::vector<HostTensor> m, v;
  std::vector<int64_t> steps;
  for (const auto& [idx, st] : nb.optimizer_state) {
    if (idx != int64_t(m.size())) fail(path, ": optimizer state is missing parameter ", m.size());
    m.push_back(st.exp_avg);
    v.push_back(st.exp_avg_sq);
    steps.push_back(st.step);
  }
  adamw_->load_torch_state(m, v, steps, path);
  if (nb.scheduler && !nb.scheduler->last_lr.empty()) sched_->set_state(nb.scheduler->last_epoch, nb.scheduler->last_lr[0]);
  pos_.epoch = nb.epoch + 1;  // the notebook saves after finishing epoch `epoch` (0-based)
  std::printf("continuing the notebook's checkpoint %s: epoch %lld done, next epoch %lld, lr %g\n", path.c_str(),
              (long long)nb.epoch + 1, (long long)pos_.epoch + 1, sched_->lr());
}

void Trainer::open_run_folder() {
  if (run_.remove_old_run) {
    remove_run_files(out_);
    std::printf("--overwrite: removed the previous run's files from %s\n", escape(opt_.out).c_str());
  }
  config_ = opt_.to_json();
  config_["model"] = cfg_.describe();
  config_["backend"] = be_->description();
  config_["compute_precision"] = precision_name(be_->precision());  // the CPU: fp32 for tf32 and fp32; bf16 emulated
  config_["train_clips"] = train_.size();
  config_["val_clips"] = val_.size();
  config_["test_clips"] = test_.size();
  config_["class_weights"] = class_weights_;
  write_file_atomic((out_ / "config.json").string(), json_dump(config_, 2) + "\n");
  // An earlier process's timing (a resumed run) would not describe this one: finish writes it anew.
  std::error_code ignored;
  fs::remove(out_ / "timing.json", ignored);

  train_loader_ = std::make_unique<data::Loader>(train_, loader_options(opt_, true, *be_));
  if (!val_.empty()) val_loader_ = std::make_unique<data::Loader>(val_, loader_options(opt_, false, *be_));
  loss_ = std::make_unique<LossBuffers>(*be_, class_weights_, opt_.batch_size);
  const bool graph = cuda_graph_requested();
  if (graph && !be_->can_capture())
    std::fprintf(stderr, "note: VB_CUDA_GRAPH=1 has no effect on %s: the training step runs uncaptured\n",
                 be_->description().c_str());
  step_ = std::make_unique<TrainStep>(*model_, *adamw_, loss_->labels, loss_->class_weights, loss_->loss, graph);
  if (run_.from == ResumeFrom::RunFolder) skipped_.load(out_);
  if (val_.empty())
    std::fprintf(stderr, "warning: %s: no validation clips (no annotated videos of the val split): the validation "
                         "loss and accuracy stay empty and no checkpoint-best is written\n", escape(opt_.data).c_str());
  if (test_.empty() && opt_.evaluate_test)
    std::fprintf(stderr, "warning: %s: no test clips: the final model is not evaluated on a test split\n",
                 escape(opt_.data).c_str());
  std::printf("vbtrain: %s on %s (%s); %zu train / %zu val / %zu test clips; batch %d, image %s, %d epochs\n",
              cfg_.describe().c_str(), be_->description().c_str(), precision_name(be_->precision()), train_.size(),
              val_.size(), test_.size(), opt_.batch_size, opt_.image_size.str().c_str(), opt_.epochs);
  if (step_->capturing())
    std::printf("training step: captured as a CUDA graph once a full batch has run without allocating or searching "
                "(VB_CUDA_GRAPH=1)\n");
  std::fflush(stdout);
}

// ------------------------------------------------------------------------------------------------ an epoch

bool Trainer::train_epoch(int64_t epoch, EpochRow& row) {
  epoch_start_ = std::chrono::steady_clock::now();
  model_->set_backbone_frozen(epoch < opt_.freeze_backbone_epochs);
  const double lr = sched_->lr();
  train_loader_->start_epoch(int(epoch));
  const bool inside = pos_.epoch == epoch && pos_.step_in_epoch > 0;  // resuming inside this epoch
  int64_t step = inside ? replay_steps(pos_.step_in_epoch) : 0;
  const int64_t total = train_loader_->batches_per_epoch();
  Progress progress("epoch " + std::to_string(epoch + 1) + "/" + std::to_string(opt_.epochs), total, 10.0);
  LateLosses losses(*be_, progress, step, inside ? pos_.partial_loss_sum : 0.0, epoch, lr);
  int64_t images = 0;
  while (const data::Batch* b = train_loader_->next()) {
    if (b->size == 0) continue;
    train_step(*b, lr);
    losses.pushed(b->size);
    ++step;
    ++steps_this_run_;
    images += b->size;
    be_->wait_uploads();  // the loader reuses this batch's buffer at its next call
    losses.read(false);
    if (opt_.step_delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(opt_.step_delay_ms));
    if (interrupted() && step < total) {
      losses.read(true);
      progress.finish();
      save_mid_epoch(epoch, step, losses.sum());
      return false;
    }
  }
  losses.read(true);
  progress.finish();
  skipped_.merge(train_loader_->skipped("train"));
  if (step == 0) fail_all_skipped(opt_.data, "training", train_.size(), skipped_, out_);
  const double train_seconds = seconds_since(epoch_start_);
  const data::LoaderStats ls = train_loader_->stats();
  times_.training += train_seconds;
  times_.data_wait += ls.wait_seconds;
  times_.decoded += ls.decoded;
  ++times_.epochs;
  row.epoch = epoch + 1;
  row.train_loss = step ? losses.sum() / double(step) : NAN;
  row.lr = lr;
  row.images_per_s = train_seconds > 0 ? double(images) / train_seconds : 0;
  return true;
}

// Resuming inside an epoch: the loader replays the epoch's order up to the saved step, without training.
int64_t Trainer::replay_steps(int64_t steps) {
  int64_t step = 0;
  while (step < steps) {
    const data::Batch* b = train_loader_->next();
    if (!b) break;
    if (b->size) ++step;  // as training counts them: batches whose frames were all skipped do not count
  }
  return step;
}

// One AdamW step on a batch; its loss is pushed for reading later (LateLosses).
void Trainer::train_step(const data::Batch& b, double lr) {
  upload_batch(*model_, b, loss_->labels);
  step_->run(b.size, lr);
  be_->scalar_push(loss_->loss);
}

// Stopped inside an epoch: checkpoint-last holds the step reached and the partial loss sum.
void Trainer::save_mid_epoch(int64_t epoch, int64_t step, double loss_sum) {
  TrainPosition p = pos_;
  p.epoch = epoch;
  p.step_in_epoch = step;
  p.partial_loss_sum = loss_sum;
  save_last(p);
  skipped_.merge(train_loader_->skipped("train"));
  skipped_.save(out_);
}

std::unique_ptr<Confusion> Trainer::validate(EpochRow& row) {
  const auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<Confusion> conf;
  if (val_loader_) {
    EvalResult v = evaluate(*model_, *val_loader_, *loss_);
    skipped_.merge(val_loader_->skipped("val"));
    if (v.images == 0) fail_all_skipped(opt_.data, "validation", val_.size(), skipped_, out_);
    row.val_loss = v.loss;
    row.val_accuracy = v.confusion.accuracy();
    for (int c = 0; c < data::kNumClasses; ++c) row.class_accuracy.push_back(v.confusion.recall(c));
    conf = std::make_unique<Confusion>(v.confusion);
  } else {
    row.class_accuracy.assign(data::kNumClasses, NAN);
  }
  row.seconds = seconds_since(epoch_start_);
  times_.validation += seconds_since(t0);
  return conf;
}

bool Trainer::checkpoint(int64_t epoch, const EpochRow& row, const Confusion* val) {
  const auto t0 = std::chrono::steady_clock::now();
  sched_->step();
  pos_.epoch = epoch + 1;
  pos_.step_in_epoch = 0;
  pos_.partial_loss_sum = 0;
  const bool best = val && row.val_accuracy > pos_.best_val_accuracy;
  if (best) {
    pos_.best_val_accuracy = row.val_accuracy;
    pos_.best_epoch = epoch;
    best_confusion_ = std::make_unique<Confusion>(*val);
    pos_.best_confusion = val->counts();
    write_file_atomic((out_ / "val_confusion_best.csv").string(), val->to_csv(names_));
  }
  // checkpoint-last is the commit point of the epoch, so it is written last: a crash before it redoes the
  // epoch (identically), and the files written before it are then written again.
  if (best) save_checkpoint((out_ / "checkpoint-best.safetensors").string(), *model_, *adamw_, *sched_, pos_, config_);
  if (epoch % 10 == 0)
    save_model_file((out_ / ("model-epoch" + std::to_string(epoch) + ".safetensors")).string(), *model_, opt_.image_size);
  rows_.push_back(row);
  write_metrics(out_, rows_);
  write_report(out_, opt_, cfg_.describe(), rows_, best_confusion_.get(), pos_.best_epoch, nullptr);
  save_last(pos_);
  times_.checkpoints += seconds_since(t0);
  return best;
}

void Trainer::report_epoch(const EpochRow& row, bool validated, bool best) {
  skipped_.save(out_);
  const data::LoaderStats ls = train_loader_->stats();
  char val_text[64] = "no validation split";
  if (validated) std::snprintf(val_text, sizeof val_text, "val loss %.4f  val acc %.4f", row.val_loss, row.val_accuracy);
  std::printf("epoch %lld/%d  train loss %.4f  %s  lr %.3g  %.0f img/s  %.1f s  (waited %.1f s for data)%s\n",
              (long long)row.epoch, opt_.epochs, row.train_loss, val_text, row.lr, row.images_per_s, row.seconds,
              ls.wait_seconds, best ? "  (best)" : "");
  if (validated) {
    std::printf("  per class:");
    for (int c = 0; c < data::kNumClasses; ++c)
      std::printf(" %s %.2f", names_[size_t(c)].c_str(), row.class_accuracy[size_t(c)]);
    std::printf("\n");
  }
  std::fflush(stdout);
}

// ------------------------------------------------------------------------------------------------ the end

void Trainer::finish() {
  auto t0 = std::chrono::steady_clock::now();
  save_model_file((out_ / "final_model.safetensors").string(), *model_, opt_.image_size);
  times_.final_files += seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  const std::unique_ptr<Confusion> test = evaluate_test_split();
  times_.test = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  write_report(out_, opt_, cfg_.describe(), rows_, best_confusion_.get(), pos_.best_epoch, test.get());
  skipped_.announced = 0;  // the summary once more, at the end, where it is seen
  skipped_.save(out_);
  times_.final_files += seconds_since(t0);
  times_.total = seconds_since(run_start_);
  write_file_atomic((out_ / "timing.json").string(), json_dump(times_.to_json(), 2) + "\n");
  std::printf("%s\n", times_.line().c_str());
  std::printf("done: %s (final model, checkpoints, metrics.csv, report.html, timing.json)\n", escape(opt_.out).c_str());
}

// The final model on the test split (when asked and present): test_confusion.{csv,svg}, test_metrics.json.
std::unique_ptr<Confusion> Trainer::evaluate_test_split() {
  if (!opt_.evaluate_test || test_.empty()) return nullptr;
  data::Loader test_loader(test_, loader_options(opt_, false, *be_));
  EvalResult t = evaluate(*model_, test_loader, *loss_);
  skipped_.merge(test_loader.skipped("test"));
  if (t.images == 0) fail_all_skipped(opt_.data, "test", test_.size(), skipped_, out_);
  write_file_atomic((out_ / "test_confusion.csv").string(), t.confusion.to_csv(names_));
  write_file_atomic((out_ / "test_confusion.svg").string(), t.confusion.to_svg(names_, "test"));
  nlohmann::json tj = {{"loss", t.loss}, {"accuracy", t.confusion.accuracy()}, {"images", t.images},
                       {"skipped", skipped_.count("test")}};
  write_file_atomic((out_ / "test_metrics.json").string(), json_dump(tj, 2) + "\n");
  std::printf("test: loss %.4f  accuracy %.4f (%lld / %lld)\n%s", t.loss, t.confusion.accuracy(),
              (long long)t.confusion.correct(), (long long)t.confusion.total(),
              t.confusion.report_text(names_).c_str());
  return std::make_unique<Confusion>(t.confusion);
}

}  // namespace vb
