// What a run folder holds, and the first step of a run: resolving its settings and its folder before
// anything is built. A new run refuses a folder that holds another run (unless --overwrite); --resume of a run
// folder takes its config.json (only --epochs from the command line) and its checkpoints, and restarts from
// epoch 1 when it stopped before its first checkpoint; --resume of a file is the notebook's checkpoint.
#pragma once
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "engine/train/options.h"
#include "engine/weights.h"

namespace vb {

// The first file of a vbtrain run found in `dir` (config.json, metrics, checkpoints, model files), or ""
// when there is none (or no such folder): what `train --out` will not replace without --overwrite.
std::string run_file_in(const std::string& dir);
// Removes the files a run writes (those run_file_in looks for) from `dir`; other files stay.
void remove_run_files(const std::filesystem::path& dir);

// The settings of the run folder `dir` (its config.json, checked again), with --epochs (when given) and the
// testing options from `cmdline`. Refuses --overwrite, which would replace the run being continued.
TrainOptions options_of_run_folder(const std::string& dir, const TrainOptions& cmdline, bool epochs_given);

enum class ResumeFrom { Nothing, RunFolder, Notebook };

struct ResolvedRun {
  TrainOptions opt;      // the settings the run uses
  std::string resume;    // --resume as given ("" for a new run)
  ResumeFrom from = ResumeFrom::Nothing;
  std::vector<std::filesystem::path> checkpoints;  // RunFolder: checkpoint-last, then checkpoint-best (those present)
  std::unique_ptr<NotebookCheckpoint> notebook;    // Notebook: the checkpoint, read
  bool remove_old_run = false;  // --overwrite of a folder holding a run: its files go once the setup succeeded
};

// Decides what the run continues from, checks the settings, and prepares opt.out: refuses a folder holding
// another run (without --overwrite), creates it, removes the temporary files of interrupted saves, and turns
// a run folder without a checkpoint into a new run when at most its first epoch is lost (else refuses).
ResolvedRun resolve_run(TrainOptions opt, const std::string& resume, bool epochs_given);

}  // namespace vb
