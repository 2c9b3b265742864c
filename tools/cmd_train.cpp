// vbtrain train: the notebook's B1 training with its defaults; with no --data, the default run: a synthetic
// dataset in the real layout (generated once) and a preset that suits the machine.
#include <cstdio>
#include <filesystem>
#include <memory>

#include "data/synth.h"
#include "engine/backend.h"
#include "engine/model_config.h"
#include "engine/train/trainer.h"
#include "tools/commands.h"
#include "tools/image_size_option.h"

namespace {

struct TrainArgs {
  vb::TrainOptions o;
  std::string hidden, blocks, resume, synth_dir = "data-synth";
  CLI::Option* epochs_opt = nullptr;
  CLI::Option* blocks_opt = nullptr;
  CLI::Option* width_opt = nullptr;
  CLI::Option* size_opt = nullptr;
  CLI::Option* batch_opt = nullptr;
  CLI::Option* out_opt = nullptr;
};

// The default run: the synthetic dataset, a preset for the machine (announced), the test split at the end.
void apply_default_run(TrainArgs& a) {
  const bool gpu = a.o.device == "cuda" || (a.o.device == "auto" && vb::cuda_available());
  namespace fs = std::filesystem;
  vb::data::SynthOptions so;
  if (gpu) {
    so.scale = 0.5;
    so.clips_per_video = 40;
  } else {
    so.scale = 0.25;
    so.clips_per_video = 24;
  }
  if (!fs::exists(fs::path(a.synth_dir) / "videos")) {
    std::printf("no --data: generating the synthetic Volleyball dataset in %s/ (once)\n", a.synth_dir.c_str());
    std::fflush(stdout);
    vb::data::generate_synthetic(a.synth_dir, so);
  } else {
    std::printf("no --data: using the synthetic dataset in %s/\n", a.synth_dir.c_str());
  }
  a.o.data = a.synth_dir;
  if (gpu) {
    a.o.preset = "gpu-synthetic: full ResNet-50 at 224, 10 epochs";
    if (!a.epochs_opt->count()) a.o.epochs = 10;
  } else {
    a.o.preset = "cpu-synthetic: a reduced ResNet (blocks 1,1,1,1, width 16) at 64x64, batch 32, 30 epochs, lr 2e-3, StepLR(8, 0.6)";
    if (!a.blocks_opt->count()) a.o.blocks = {1, 1, 1, 1};
    if (!a.width_opt->count()) a.o.width = 16;
    if (!a.size_opt->count()) a.o.image_size = 64;
    if (!a.batch_opt->count()) a.o.batch_size = 32;
    if (!a.epochs_opt->count()) a.o.epochs = 30;
    a.o.lr = 2e-3;
    a.o.step_size = 8;
  }
  if (!a.out_opt->count()) {
    // A second default run goes next to the first (runs/default-2, ...), never over it.
    a.o.out = "runs/default";
    for (int i = 2; !a.o.overwrite && !vb::run_file_in(a.o.out).empty(); ++i) a.o.out = "runs/default-" + std::to_string(i);
    std::printf("run folder %s\n", a.o.out.c_str());
  }
  std::printf("preset %s\n", a.o.preset.c_str());
  std::fflush(stdout);
}

int run_train(TrainArgs& a) {
  if (!a.hidden.empty()) a.o.hidden = vb::parse_int_list(a.hidden, "--hidden-layers");
  if (!a.blocks.empty()) a.o.blocks = vb::parse_int_list(a.blocks, "--blocks");
  if (a.o.data.empty() && a.resume.empty()) apply_default_run(a);
  return vb::run_training(a.o, a.resume, a.epochs_opt->count() > 0);
}

}  // namespace

VB_COMMAND("train", "Train the B1 classifier (the notebook's defaults; no --data: the synthetic default run)",
           [](CLI::App& app) -> std::function<int()> {
             auto a = std::make_shared<TrainArgs>();
             auto& o = a->o;
             app.add_option("--data", o.data, "dataset folder: the Volleyball videos/ folder or its parent");
             app.add_option("--weights", o.weights, "initial engine weights (.safetensors or .pth, see vbconvert)");
             a->epochs_opt = app.add_option("--epochs", o.epochs, "epochs (default 50)")->check(vb::tools::integer_in(1, 1000000));
             a->batch_opt = app.add_option("--batch-size", o.batch_size, "batch size (default 150)")->check(vb::tools::integer_in(1, 65536));
             app.add_option("--lr", o.lr, "AdamW learning rate (default 1e-3)")->check(vb::tools::positive_number());
             app.add_option("--weight-decay", o.weight_decay, "AdamW weight decay (default 0.01)")->check(vb::tools::non_negative_number());
             app.add_option("--step-size", o.step_size, "StepLR step size in epochs (default 2)")->check(vb::tools::integer_in(1, 1000000));
             app.add_option("--gamma", o.gamma, "StepLR factor (default 0.6)")->check(vb::tools::positive_number());
             app.add_option("--hidden-layers", a->hidden, "hidden layers of the head, e.g. 512,256 (default none)");
             app.add_option("--freeze-backbone-epochs", o.freeze_backbone_epochs, "train only fc for the first K epochs")
                 ->check(vb::tools::integer_in(0, 1000000));
             app.add_option("--device", o.device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
             app.add_option("--precision", o.precision,
                            "tf32 (default) or fp32 on CUDA; bf16: on CUDA bf16 activations and convolutions (NHWC; "
                            "not yet run on a GPU), on the CPU an emulation of torch.autocast(bfloat16) (to see its "
                            "accuracy; slower than fp32)")
                 ->check(CLI::IsMember({"tf32", "fp32", "bf16"}));
             app.add_option("--threads", o.threads, "CPU threads for decoding and the CPU path (0 = all cores)")
                 ->check(vb::tools::thread_count());
             app.add_option("--seed", o.seed, "seed of the shuffles, augmentations and initialisation (default 42)")
                 ->check(vb::tools::seed_value());
             app.add_flag("--deterministic", o.deterministic, "bit-reproducible runs (always so on the CPU)");
             a->out_opt = app.add_option("--out", o.out, "run folder (default runs/b1)");
             app.add_option("--resume", a->resume, "continue a run folder, or the notebook's checkpoint-epochN.pth");
             app.add_flag("--overwrite", o.overwrite, "replace the run already in --out (its model, checkpoints and metrics)");
             a->blocks_opt = app.add_option("--blocks", a->blocks, "blocks per stage (default 3,4,6,3)");
             a->width_opt = app.add_option("--width", o.width, "base width (default 64)")->check(vb::tools::integer_in(1, 4096));
             a->size_opt = vb::tools::add_image_size_option(app, o.image_size, "input size S or HxW, e.g. 224x400 (default 224)");
             app.add_option("--on-bad-image", o.on_bad_image, "skip (default) or fail")->check(CLI::IsMember({"skip", "fail"}));
             app.add_option("--cache", o.cache, "decoded-frame cache: auto, on or off")->check(CLI::IsMember({"auto", "on", "off"}));
             app.add_flag("--dct-scaling", o.dct_scaling, "decode at a DCT-scaled size first (faster; not Pillow's exact pixels)");
             app.add_option("--synth-dir", a->synth_dir, "where the default run keeps its synthetic dataset");
             app.add_option("--stop-after-steps", o.stop_after_steps, "stop as Ctrl-C would after N steps (testing)")
                 ->check(vb::tools::integer_in(0, std::numeric_limits<int64_t>::max()));
             app.add_option("--step-delay-ms", o.step_delay_ms, "sleep after each step (testing interruptions)")
                 ->check(vb::tools::integer_in(0, 600000));
             return [a] { return run_train(*a); };
           });
