#!/usr/bin/env python3
"""The PyTorch side of the CPU comparison (tools/cpu-vs-torch.sh runs it next to `vbtrain bench --device cpu`).

The same model as vbtrain's `--blocks B --width W`: a stem conv 7x7/2 (3 -> W) + BN + ReLU + max pool 3x3/2,
then per stage i torchvision's Bottleneck blocks with W * 2^i planes (4x that out, stride 2 on the 3x3 of each
stage's first block but the first stage's, a 1x1 conv + BN downsample on every stage's first block), global
average pooling and the notebook's head (Sequential(Linear(features, 8))). [3,4,6,3] width 64 is torchvision's
ResNet-50. Random data, AdamW (lr 1e-3) and weighted cross-entropy, as `vbtrain bench`; the median of the timed
steps after warm-up. Activations and weights in channels_last (PyTorch's faster CPU layout, oneDNN) unless
--channels-first. Evaluation is the forward pass in eval mode under torch.no_grad().

Prints one line of figures and, with --json, writes them as JSON.
"""
import argparse
import json
import statistics
import sys
import time

try:
    import torch
    import torch.nn as nn
except ImportError:  # the caller says so and carries on without PyTorch's figures
    print("torch_cpu_bench: PyTorch is not installed", file=sys.stderr)
    sys.exit(3)


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (v1.5: the stride on the 3x3), written out so that no torchvision
    is needed."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + idt)


class ResNet(nn.Module):
    def __init__(self, blocks, width, num_classes=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers, inp = [], width
        for i, nb in enumerate(blocks):
            planes = width << i
            for b in range(nb):
                layers.append(Bottleneck(inp, planes, 2 if (b == 0 and i > 0) else 1))
                inp = planes * 4
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(inp, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layers(x))
        return self.fc(torch.flatten(x, 1))


def timed_median(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="3,4,6,3")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: PyTorch's default)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--channels-first", action="store_true", help="NCHW instead of channels_last")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    blocks = [int(b) for b in a.blocks.split(",") if b]
    N, S = a.batch_size, a.image_size
    fmt = torch.contiguous_format if a.channels_first else torch.channels_last
    model = ResNet(blocks, a.width).to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(N, 3, S, S).to(memory_format=fmt)
    y = torch.arange(N) % 8
    crit = nn.CrossEntropyLoss(weight=torch.ones(8))

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = crit(model(x), y)
        loss.backward()
        opt.step()

    def eval_step():
        with torch.no_grad():
            model(x)

    model.train()
    train_s = timed_median(train_step, a.warmup, a.steps)
    model.eval()
    eval_s = timed_median(eval_step, a.warmup, a.steps)
    res = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "layout": "channels_first" if a.channels_first else "channels_last",
        "model": f"ResNet [{','.join(map(str, blocks))}] width {a.width}",
        "batch": N,
        "image_size": S,
        "train_ms": train_s * 1e3,
        "train_img_s": N / train_s,
        "eval_ms": eval_s * 1e3,
        "eval_img_s": N / eval_s,
    }
    print(f"torch {res['torch']} cpu ({res['threads']} threads, {res['layout']}): {res['model']}, batch {N}, "
          f"{S}x{S}: training step {res['train_ms']:.1f} ms ({res['train_img_s']:.1f} img/s)  "
          f"evaluation {res['eval_ms']:.1f} ms ({res['eval_img_s']:.1f} img/s)")
    if a.json:
        with open(a.json, "w") as f:
            f.write(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
