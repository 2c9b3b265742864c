// The B1 training program: the notebook's loop (train, validate, StepLR per epoch, checkpoint every epoch,
// model files every 10 epochs and at the end) with exact resume, progress, metrics files and a report.
//
// run_training = resolve_run (run_folder.h) + Trainer::run, whose steps are public so that each can be driven
// and tested on its own, in this order:
//   build_data       the dataset index, its splits, the criterion's class weights
//   build_model      the backend, the model (initial weights or torchvision's initialisation), AdamW, StepLR
//   restore          the run's checkpoint (falling back to checkpoint-best) or the notebook's checkpoint
//   open_run_folder  --overwrite's removal, config.json, the loaders, the skipped-frame list, the announcement
//   per epoch: train_epoch, validate, checkpoint (StepLR, best, metrics, report, checkpoint-last), report_epoch
//   finish           final_model, the test split, the final report
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/loader.h"
#include "engine/backend.h"
#include "engine/checkpoint.h"
#include "engine/metrics.h"
#include "engine/model.h"
#include "engine/optimizer.h"
#include "engine/train/evaluate.h"
#include "engine/train/history.h"
#include "engine/train/options.h"
#include "engine/train/run_folder.h"
#include "engine/train/skip_list.h"
#include "engine/train/step.h"

namespace vb {

// This process's wall time by phase: printed at the end of a run and kept in its timing.json (a resumed run
// counts from its resume, the replay of an interrupted epoch's first steps as training; a run stopped before
// its end writes none, and a resumed one removes the earlier process's).
struct RunTimes {
  double setup = 0;        // dataset index, backend, model, restore, run folder, loaders
  double training = 0;     // the epochs' training passes, of which:
  double data_wait = 0;    //   waiting for the loader (decoding, augmenting) rather than computing
  double validation = 0;   // the validation passes
  double checkpoints = 0;  // after each epoch: StepLR, checkpoints, model files, metrics, report
  double test = 0;         // the final model on the test split
  double final_files = 0;  // final_model and the final report
  int64_t decoded = 0;     // training JPEG decodes (decoded-frame cache misses)
  int64_t epochs = 0;      // epochs trained by this process
  double total = 0;        // from the start of Trainer::run to the end of finish
  nlohmann::json to_json() const;
  std::string line() const;  // "time: ..." for the terminal
};

// Runs (or resumes) a training run; returns the process exit code (130 when interrupted by Ctrl-C).
// resume: a run folder to continue, or a notebook checkpoint (.pth) to continue from; "" for a new run.
int run_training(TrainOptions opt, const std::string& resume, bool epochs_given);

class Trainer {
 public:
  explicit Trainer(ResolvedRun run);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  int run();  // every step below; returns the exit code (130 when stopped)

  void build_data();
  void build_model();
  void restore();
  void open_run_folder();
  // Trains `epoch` (from its saved step when resuming inside it) and fills row's training columns; false when
  // stopped inside the epoch (checkpoint-last then holds the step reached).
  bool train_epoch(int64_t epoch, EpochRow& row);
  // Fills row's validation columns and its time; the confusion matrix, or null without a validation split.
  std::unique_ptr<Confusion> validate(EpochRow& row);
  // Ends the epoch: StepLR, the position, the best epoch's files, model-epochN, metrics, report and, last (the
  // epoch's commit point), checkpoint-last. Returns whether this epoch is the best so far.
  bool checkpoint(int64_t epoch, const EpochRow& row, const Confusion* val);
  void report_epoch(const EpochRow& row, bool validated, bool best);
  void finish();
  int stopped();  // prints the resume command; 130

  const TrainOptions& options() const { return opt_; }
  const TrainPosition& position() const { return pos_; }
  const std::vector<EpochRow>& rows() const { return rows_; }
  const std::vector<float>& class_weights() const { return class_weights_; }
  const RunTimes& times() const { return times_; }
  Model* model() { return model_.get(); }

 private:
  bool interrupted() const;
  void save_last(const TrainPosition& p);
  StateDict load_initial_weights();
  void restore_run_checkpoint();
  void restore_notebook();
  int64_t replay_steps(int64_t steps);
  void train_step(const data::Batch& b, double lr);
  void save_mid_epoch(int64_t epoch, int64_t step, double loss_sum);
  std::unique_ptr<Confusion> evaluate_test_split();

  ResolvedRun run_;
  TrainOptions& opt_;  // run_.opt
  std::filesystem::path out_;
  std::vector<std::string> names_;
  std::vector<data::Sample> train_, val_, test_;
  std::vector<float> class_weights_;
  // Declared in the order they are built: the loaders and buffers go before the backend they use.
  std::unique_ptr<Backend> be_;
  ModelConfig cfg_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<AdamW> adamw_;
  std::unique_ptr<StepLR> sched_;
  TrainPosition pos_;
  std::vector<EpochRow> rows_;
  std::unique_ptr<Confusion> best_confusion_;
  nlohmann::json config_;
  std::unique_ptr<data::Loader> train_loader_, val_loader_;
  std::unique_ptr<LossBuffers> loss_;
  std::unique_ptr<TrainStep> step_;  // after loss_ and adamw_, whose memory it uses: destroyed before them
  SkipList skipped_;
  int64_t steps_this_run_ = 0;
  std::chrono::steady_clock::time_point epoch_start_;
  std::chrono::steady_clock::time_point run_start_ = std::chrono::steady_clock::now();
  RunTimes times_;
};

}  // namespace vb
