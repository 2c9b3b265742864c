#!/usr/bin/env python3
"""PyTorch's own distance to a float64 golden run, at the precision a GPU run computes in. PyTorch only; never a
dependency of vbtrain or CI (the files it writes are committed, or made beside the engine in tools/gpu-check.sh).

A float32 run leaves the float64 golden chaotically after a few steps (a ReLU input near zero flips; AdamW's
first step amplifies it), and PyTorch at float32 lands as far. So `vbtrain verify --against FILE.json` judges the
engine side by side with this: PyTorch replaying the same golden protocol (tools/make_goldens.py's golden_run)
from the same initial weights at --precision, and its relative distance ||torch - golden|| / ||golden|| for every
entry `vbtrain verify` checks, defined as engine/golden.cpp defines it (updates: after{T} - init, both minus the
same float32 initial weights).

  --precision fp32   strict float32: cuDNN and cuBLAS TF32 off
  --precision tf32   PyTorch's defaults on a GPU: TF32 convolutions (cudnn.allow_tf32 = True), float32 matmul
                     (cuda.matmul.allow_tf32 = False), which is what the engine's tf32 does
  --precision bf16   float32 weights with torch.autocast(bfloat16) around forward and loss, as a user trains
On --device cpu fp32 and bf16 are accepted (TF32 does not exist there); the engine's bf16 on the CPU is its
emulation of autocast (engine/backend.h, Precision::BF16).

  torch_distances.py --device cuda --precision tf32 --out tf32.json
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_goldens  # noqa: E402  (the protocol, in one place)

FORMAT = "vbtrain-torch-distances/1"


def rel(a, b):
    """engine/golden.cpp's rel_err: sqrt(sum (a-b)^2 / sum b^2), sqrt(sum (a-b)^2) when b is zero, inf when any
    element is not finite or the sizes differ."""
    a, b = a.to(torch.float64).flatten(), b.to(torch.float64).flatten()
    if a.numel() != b.numel() or not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
        return math.inf
    num, den = float(((a - b) ** 2).sum()), float((b ** 2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--precision", choices=["fp32", "tf32", "bf16"], required=True)
    ap.add_argument("--weights", default=os.path.join(make_goldens.FIXTURES, "mini_seed_b1_init.pth"))
    ap.add_argument("--reference", default=os.path.join(make_goldens.FIXTURES, "mini_train_golden.safetensors"))
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (0: its default)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from safetensors.torch import load_file

    def die(msg):
        print(f"torch_distances: error: {msg}", file=sys.stderr)
        sys.exit(2)

    if a.device == "cpu" and a.precision == "tf32":
        die("--precision tf32 needs --device cuda (TF32 does not exist on the CPU)")
    if a.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda: PyTorch sees no GPU")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    tf32 = a.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default; the engine's cuBLAS head is float32 too

    ref = load_file(a.reference)
    T = 0
    while f"x{T}" in ref:
        T += 1
    if T == 0 or "eval_logits_init.x0" not in ref:
        die(f"{a.reference}: not a golden-run file (no x0 / eval_logits_init.x0)")
    sd = torch.load(a.weights, map_location="cpu", weights_only=True)
    model = make_goldens.build_model(sd)
    num_classes = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
    # The engine computes the class weights in float32 from the labels; so does this replay.
    cw = make_goldens.class_weights(ref["train_labels_for_weights"], num_classes).to(torch.float32)
    res = make_goldens.golden_run(model, [ref[f"x{t}"] for t in range(T)], [ref[f"y{t}"] for t in range(T)], cw,
                                  dtype=torch.float32, device=a.device,
                                  autocast=torch.bfloat16 if a.precision == "bf16" else None)

    # The entries in engine/golden.cpp's order and with its names.
    d = {}
    d["class_weights"] = rel(res["class_weights"], ref["class_weights"])
    d["eval_logits_init.x0"] = rel(res["eval_logits_init.x0"], ref["eval_logits_init.x0"])
    for t in range(T):
        for k in (f"logits{t}", f"loss{t}", f"lr{t}"):
            if k in ref:
                d[k] = rel(res[k], ref[k])
        for k in ref:
            if k.startswith(f"grad{t}."):
                if k not in res:
                    die(f"{a.reference}: '{k}' names no parameter of the model")
                d[k] = rel(res[k], ref[k])
    ap_ = f"after{T}."
    for k in ref:
        if not k.startswith(ap_):
            continue
        key = k[len(ap_):]
        if k not in res:
            die(f"{a.reference}: '{k}' names no tensor of the model")
        d[k] = rel(res[k], ref[k])
        init = res["init." + key].to(torch.float64)
        d["update." + key] = rel(res[k].to(torch.float64) - init, ref[k].to(torch.float64) - init)
    final = f"eval_logits_after{T}.x0"
    if final in ref:
        d[final] = rel(res[final], ref[final])

    dev_name = torch.cuda.get_device_name() if a.device == "cuda" else cpu_name()
    meta = {
        "format": FORMAT,
        "precision": a.precision,
        "device": a.device,
        "device_name": dev_name,
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if a.device == "cuda" else None,
        "threads": torch.get_num_threads(),
        "settings": {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                     "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "autocast": "bfloat16" if a.precision == "bf16" else None},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "weights": os.path.basename(a.weights),
        "reference": os.path.basename(a.reference),
        "x0_shape": list(ref["x0"].shape),
        "definition": "relative: ||torch - golden|| / ||golden|| per tensor; update.<key>: (after - init) vs "
                      "(golden after - init), init = the float32 initial weights",
        "distances": {k: (v if math.isfinite(v) else None) for k, v in d.items()},
    }
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    os.replace(tmp, a.out)
    worst = max(d, key=lambda k: d[k])
    print(f"torch_distances: {len(d)} entries, {a.precision} on {a.device} ({dev_name}), largest {worst} {d[worst]:.3e}"
          f" -> {a.out}")


if __name__ == "__main__":
    main()
