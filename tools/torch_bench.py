#!/usr/bin/env python3
"""The PyTorch side of the side-by-side GPU measurement (tools/gpu-check.sh runs it next to `vbtrain bench`).

ResNet-50 with the reference notebook's B1 head (fc = Sequential(Linear(2048, 8))), random data, AdamW and
weighted cross-entropy, as in the PyTorch anchors quoted in docs/STATUS.md: median of the timed steps after warm-up, each step
timed with CUDA events. Configurations:
  train_fp32_default  PyTorch's defaults (TF32 in cuDNN convolutions, not in matmuls), NCHW: what the
                      notebook runs
  train_fp32_strict   TF32 off everywhere
  train_bf16_cl       bf16 autocast + channels_last: what a tuned PyTorch run gets (the 4,174 img/s anchor)
  eval_fp32_default   evaluation forward under no_grad, defaults
Each configuration starts from a fresh model with the allocator's peak reset, so its peak memory
(torch.cuda.max_memory_allocated) covers weights, gradients, optimizer state and activations;
peak_reserved_gib is what the caching allocator held. Besides the median of per-step CUDA-event timings
(img_s), each configuration reports back_to_back_img_s: the same steps issued with no wait between them,
as `vbtrain bench`'s throughput pass measures. --max-seconds skips the configurations not yet started once
that long has passed (a caller with a deadline still gets the JSON).
Prints one JSON object (and writes it to --json when given).
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torchvision


def build_model():
    m = torchvision.models.resnet50(weights=None)
    m.fc = nn.Sequential(nn.Linear(m.fc.in_features, 8))
    return m.cuda()


def set_tf32(enabled):
    torch.backends.cudnn.allow_tf32 = enabled
    # PyTorch's default keeps TF32 out of matmuls; strict keeps it out too.
    torch.backends.cuda.matmul.allow_tf32 = False


def timed_steps(fn, warmup, steps):
    """(median ms of per-step event timings, mean ms of the same number of steps back to back)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))  # ms
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    stop.record()
    stop.synchronize()
    return statistics.median(times), start.elapsed_time(stop) / steps


def figures(batch, ms, b2b_ms):
    return {"ms": ms, "img_s": batch / (ms * 1e-3), "back_to_back_ms": b2b_ms,
            "back_to_back_img_s": batch / (b2b_ms * 1e-3),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def fresh():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def bench_train(tf32, batch, size, warmup, steps, bf16_cl=False):
    fresh()
    set_tf32(tf32)
    model = build_model().train()
    x = torch.randn(batch, 3, size, size, device="cuda")
    if bf16_cl:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    y = torch.arange(batch, device="cuda") % 8
    crit = nn.CrossEntropyLoss(weight=torch.ones(8, device="cuda"))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16_cl):
            loss = crit(model(x), y)
        loss.backward()
        opt.step()

    r = figures(batch, *timed_steps(step, warmup, steps))
    del model, opt, x, y
    return r


def bench_eval(batch, size, warmup, steps):
    fresh()
    set_tf32(True)
    model = build_model().eval()
    x = torch.randn(batch, 3, size, size, device="cuda")

    def step():
        with torch.no_grad():
            model(x)

    r = figures(batch, *timed_steps(step, warmup, steps))
    del model, x
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=150)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default="")
    ap.add_argument("--max-seconds", type=float, default=0, help="start no configuration after this long (0: no limit)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("torch_bench: no CUDA device", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    t0 = time.monotonic()
    configs = [
        ("train_fp32_default", lambda: bench_train(True, a.batch_size, a.image_size, a.warmup, a.steps)),
        ("eval_fp32_default", lambda: bench_eval(a.batch_size, a.image_size, a.warmup, a.steps)),
        ("train_fp32_strict", lambda: bench_train(False, a.batch_size, a.image_size, a.warmup, a.steps)),
        ("train_bf16_cl", lambda: bench_train(True, a.batch_size, a.image_size, a.warmup, a.steps, bf16_cl=True)),
    ]
    results, skipped = {}, []
    for name, fn in configs:  # the anchors that the targets come from first
        if a.max_seconds and time.monotonic() - t0 > a.max_seconds:
            skipped.append(name)
            continue
        results[name] = fn()
        print("torch_bench: {} {:.1f} img/s".format(name, results[name]["img_s"]), file=sys.stderr, flush=True)
    res = {
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "device": torch.cuda.get_device_name(0),
        "batch": a.batch_size,
        "image_size": a.image_size,
        "warmup": a.warmup,
        "steps": a.steps,
        "results": results,
        "skipped_for_time": skipped,
    }
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
