#!/usr/bin/env python3
"""The project's generator of golden-run fixtures, in PyTorch. Never a dependency of vbtrain or CI: the files it
writes are committed under tests/fixtures/.

The golden protocol (the one engine/golden.cpp replays; first written in ../shared/fixtures/pytorch/make_goldens.py,
which made tests/fixtures/mini_train_golden.safetensors): load the notebook's model (`ResnetEvolution`: a
torchvision-style ResNet under `model.`, head `model.fc` = Sequential(Linear, ReLU, ..., Linear(->8))), class
weights N/count from `train_labels_for_weights`; eval mode, forward x0 -> `eval_logits_init.x0`; train mode, for
t = 0..T-1: zero grads, forward x{t} -> `logits{t}`, weighted cross-entropy with y{t} -> `loss{t}`, backward
(`grad0.<name>` after t = 0), AdamW (PyTorch defaults, lr `lr{t}`), StepLR(2, 0.6) stepped after every step;
then every state-dict entry -> `after{T}.<key>` and, in eval mode, forward x0 -> `eval_logits_after{T}.x0`.

Here all math is float64 on the CPU from float32-representable inputs; results are stored as float32 (integers
as int64). `golden_run()` is also what tools/torch_distances.py replays at float32 / TF32 / bf16.

  make_goldens.py --size 48x80 --out tests/fixtures/mini_train_golden_48x80.safetensors
  make_goldens.py --inputs-from tests/fixtures/mini_train_golden.safetensors --out /tmp/g.safetensors
      (re-derives the committed square golden from its own inputs: a check of this script)
"""
import argparse
import contextlib
import os
import re
import sys
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")

# The original golden's labels (class 6 absent from the weights' labels, so its weight is 0).
TRAIN_LABELS = [0, 1, 1, 2, 3, 3, 3, 4, 5, 5, 7, 7, 7, 7, 0, 2, 4, 1]
STEP_LABELS = [[0, 3, 7, 7, 2, 5], [1, 1, 4, 0, 7, 3], [5, 2, 2, 0, 4, 7]]


class Bottleneck(nn.Module):
    # torchvision's v1.5 bottleneck: the stride sits on the 3x3 convolution.
    def __init__(self, inp, planes, stride, downsample):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inp, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        o = F.relu(self.bn1(self.conv1(x)))
        o = F.relu(self.bn2(self.conv2(o)))
        return F.relu(self.bn3(self.conv3(o)) + idt)


class ResNet(nn.Module):
    def __init__(self, blocks, width, head):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inp = width
        for i, nb in enumerate(blocks):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            ds = None
            if stride != 1 or inp != planes * 4:
                ds = nn.Sequential(nn.Conv2d(inp, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
            layers = [Bottleneck(inp, planes, stride, ds)] + [Bottleneck(planes * 4, planes, 1, None) for _ in range(nb - 1)]
            inp = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = head
        self.n_layers = len(blocks)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResnetEvolution(nn.Module):
    # The notebook's wrapper: the backbone under `model.`, so state-dict keys read `model.layer1.0.conv1.weight`.
    def __init__(self, backbone):
        super().__init__()
        self.model = backbone

    def forward(self, x):
        return self.model(x)


def build_model(sd):
    """The notebook's model with the shape of the state dict `sd` (keys `model.*`), its tensors loaded."""
    keys = [k[len("model."):] for k in sd if k.startswith("model.")]
    if not keys:
        sys.exit("make_goldens: error: the weights have no `model.` keys (not the notebook's ResnetEvolution)")
    blocks = []
    while any(k.startswith(f"layer{len(blocks) + 1}.") for k in keys):
        n = 1 + max(int(re.match(rf"layer{len(blocks) + 1}\.(\d+)\.", k).group(1))
                    for k in keys if k.startswith(f"layer{len(blocks) + 1}."))
        blocks.append(n)
    width = sd["model.conv1.weight"].shape[0]
    fc = sorted({int(k.split(".")[1]) for k in keys if k.startswith("fc.")})
    layers = []
    for j, i in enumerate(fc):
        w = sd[f"model.fc.{i}.weight"]
        layers.append(nn.Linear(w.shape[1], w.shape[0]))
        if j + 1 < len(fc):
            layers.append(nn.ReLU())
    m = ResnetEvolution(ResNet(blocks, width, nn.Sequential(*layers)))
    m.load_state_dict(sd)
    return m


def class_weights(labels, num_classes):
    cnt = torch.bincount(labels, minlength=num_classes).double()
    return torch.where(cnt > 0, len(labels) / cnt.clamp(min=1), torch.zeros(num_classes, dtype=torch.float64))


def golden_run(model, xs, ys, cw, lr=1e-3, step_size=2, gamma=0.6, dtype=torch.float64, device="cpu", autocast=None):
    """The golden protocol on `model` (moved to `device`/`dtype`); `autocast`: None or a torch dtype for
    torch.autocast around forward and loss, as a user trains in mixed precision. Returns {name: tensor} on the
    CPU in float64 (int64 for integer state), with the golden file's names, plus `init.<key>` (the state dict
    before the steps, for updates)."""
    model = model.to(device=device, dtype=dtype)
    out = OrderedDict()
    out["class_weights"] = cw.double()
    ctx = (lambda: torch.autocast(device_type=torch.device(device).type, dtype=autocast)) if autocast else contextlib.nullcontext
    init = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    crit = nn.CrossEntropyLoss(weight=cw.to(device=device, dtype=dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sch = torch.optim.lr_scheduler.StepLR(opt, step_size, gamma)
    host = lambda t: t.detach().to("cpu", torch.float64)
    x0 = xs[0].to(device=device, dtype=dtype)
    model.eval()
    with torch.no_grad(), ctx():
        out["eval_logits_init.x0"] = host(model(x0))
    model.train()
    for t, (x, y) in enumerate(zip(xs, ys)):
        out[f"lr{t}"] = torch.tensor([opt.param_groups[0]["lr"]], dtype=torch.float64)
        opt.zero_grad()
        with ctx():
            logits = model(x.to(device=device, dtype=dtype))
            loss = crit(logits, y.to(device))
        loss.backward()
        out[f"logits{t}"] = host(logits)
        out[f"loss{t}"] = host(loss).reshape(1)
        if t == 0:
            for n, q in model.named_parameters():
                out[f"grad0.{n}"] = host(q.grad)
        opt.step()
        sch.step()
    T = len(xs)
    for k, v in model.state_dict().items():
        out[f"after{T}.{k}"] = v.detach().cpu().clone() if not v.is_floating_point() else host(v)
    model.eval()
    with torch.no_grad(), ctx():
        out[f"eval_logits_after{T}.x0"] = host(model(x0))
    for k, v in init.items():
        out[f"init.{k}"] = v if not v.is_floating_point() else v.to(torch.float64)
    return out


def parse_size(s):
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", s)
    if not m:
        sys.exit(f"make_goldens: error: --size must be S or HxW, got '{s}'")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=os.path.join(FIXTURES, "mini_seed_b1_init.pth"))
    ap.add_argument("--size", default="64x64", help="input size, S or HxW (height x width)")
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--seed", type=int, default=20261205, help="seed of the random inputs x0..x2")
    ap.add_argument("--inputs-from", help="take x{t}, y{t} and the weights' labels from this golden file instead")
    ap.add_argument("--autocast", choices=["bf16"],
                    help="PyTorch's own float32 run under torch.autocast(bfloat16) on the CPU instead of float64: the "
                         "reference a bf16 engine is compared with tensor by tensor (vbtrain verify --precision bf16)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from safetensors.torch import load_file, save_file

    sd = torch.load(a.weights, map_location="cpu", weights_only=True)
    model = build_model(sd)
    if a.inputs_from:
        ref = load_file(a.inputs_from)
        T = 0
        while f"x{T}" in ref:
            T += 1
        xs, ys = [ref[f"x{t}"] for t in range(T)], [ref[f"y{t}"] for t in range(T)]
        labels = ref["train_labels_for_weights"]
    else:
        h, w = parse_size(a.size)
        if a.batch != len(STEP_LABELS[0]):
            sys.exit(f"make_goldens: error: the step labels are fixed for a batch of {len(STEP_LABELS[0])}")
        g = torch.Generator().manual_seed(a.seed)
        xs = [torch.randn(a.batch, 3, h, w, generator=g, dtype=torch.float32) for _ in STEP_LABELS]
        ys = [torch.tensor(v, dtype=torch.int64) for v in STEP_LABELS]
        labels = torch.tensor(TRAIN_LABELS, dtype=torch.int64)
    num_classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    cw = class_weights(labels, num_classes)
    if a.autocast:
        res = golden_run(model, xs, ys, cw.to(torch.float32), dtype=torch.float32, autocast=torch.bfloat16)
    else:
        res = golden_run(model, xs, ys, cw)

    gold = OrderedDict(train_labels_for_weights=labels)
    for t, (x, y) in enumerate(zip(xs, ys)):
        gold[f"x{t}"], gold[f"y{t}"] = x, y
    for k, v in res.items():
        if not k.startswith("init."):
            gold[k] = v
    f32 = {k: (v.to(torch.float32) if v.is_floating_point() else v).contiguous() for k, v in gold.items()}
    meta = {"generator": "tools/make_goldens.py", "torch": torch.__version__, "weights": os.path.basename(a.weights),
            "x0_shape": "x".join(str(d) for d in xs[0].shape), "math": ("float32 under torch.autocast(bfloat16) on the CPU" if a.autocast else "float64 on the CPU") +
            ", stored as float32",
            "seed": "from " + os.path.basename(a.inputs_from) if a.inputs_from else str(a.seed)}
    save_file(f32, a.out, metadata=meta)
    print(f"make_goldens: wrote {a.out}: {len(f32)} tensors, x0 {list(xs[0].shape)}, loss0 {res['loss0'].item():.6f}")


if __name__ == "__main__":
    main()
