"""Writes the small seed inputs of the fuzz targets into tests/fuzz/seeds/<target>/ (committed; CI does not
run this). Needs PyTorch, Pillow and the fixtures: /opt/torchcpu/bin/python tests/fuzz/make_seeds.py

Seeds are small on purpose (libFuzzer mutates small inputs far faster): tiny torch.save files in both
formats, the pickles of the fixtures' zip files, tiny safetensors files, a cut of the fixture frame.
"""
import io
import json
import os
import struct
import zipfile
from collections import OrderedDict

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(ROOT, "..", "fixtures")


def out(target, name, data):
    d = os.path.join(ROOT, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def saved(obj, legacy=False):
    b = io.BytesIO()
    torch.save(obj, b, _use_new_zipfile_serialization=not legacy)
    return b.getvalue()


torch.manual_seed(0)
sd = OrderedDict()
sd["conv1.weight"] = torch.randn(2, 3, 1, 1)
sd["bn1.running_mean"] = torch.zeros(2)
sd["bn1.num_batches_tracked"] = torch.tensor(3)
sd["fc.weight"] = torch.randn(4, 2).t()  # a transposed (strided) view
sd["fc.bias"] = torch.randn(4).half()
base = torch.arange(6.0)
sd["view"] = base[1:5:2]  # offset and stride into a shared storage
sd["share"] = base
out("pth", "state_dict_zip.pth", saved(sd))
out("pth", "state_dict_legacy.pth", saved(sd, legacy=True))
model = torch.nn.Linear(2, 3)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model(torch.randn(1, 2)).sum().backward()
opt.step()
sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.6)
ck = {"epoch": 2, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
      "scheduler_state_dict": sched.state_dict()}
out("pth", "checkpoint_zip.pth", saved(ck))
out("pth", "checkpoint_legacy.pth", saved(ck, legacy=True))

# The unpickler alone: data.pkl of the fixtures and of the tiny files, plus a few plain pickles.
for name in ["mini_imagenet_style.pth"]:  # 38 KB: a whole ResNet state dict's pickle
    with zipfile.ZipFile(os.path.join(FIX, name)) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
        out("pickle", name.replace(".pth", ".pkl"), z.read(pkl))
for name, data in [("state_dict", saved(sd)), ("checkpoint", saved(ck))]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        out("pickle", name + ".pkl", z.read([n for n in z.namelist() if n.endswith("/data.pkl")][0]))
import pickle
for proto in (0, 2, 4):
    out("pickle", "plain_p%d.pkl" % proto, pickle.dumps(
        {"a": [1, 2.5, None, True, (3, "x")], 7: b"bytes", "n": -(2 ** 70), "t": ((1,), {"k": []})}, protocol=proto))


def safetensors_bytes(tensors, meta=None):
    header, data, off = {}, b"", 0
    if meta:
        header["__metadata__"] = meta
    for k, (dtype, shape, raw) in tensors.items():
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


out("safetensors", "small.safetensors", safetensors_bytes({
    "conv1.weight": ("F32", [2, 3, 1, 1], struct.pack("<6f", *range(6))),
    "bn1.num_batches_tracked": ("I64", [], struct.pack("<q", 3)),
    "fc.bias": ("F16", [2], struct.pack("<2e", 0.5, -1.0)),
}, meta={"vbtrain.config": "{\"hidden\": []}"}))
out("safetensors", "empty_shape.safetensors", safetensors_bytes({"e": ("BF16", [0, 4], b"")}))

# JPEG: a 48x32 cut of the fixture frame (baseline 4:2:0), a greyscale and a progressive one.
img = Image.open(os.path.join(FIX, "frame_320x180.jpg")).convert("RGB").crop((100, 60, 148, 92))
for name, im, kw in [("rgb420.jpg", img, {"quality": 90}), ("gray.jpg", img.convert("L"), {"quality": 80}),
                     ("progressive.jpg", img, {"quality": 75, "progressive": True})]:
    b = io.BytesIO()
    im.save(b, "JPEG", **kw)
    out("jpeg", name, b.getvalue())

out("annotations", "annotations.txt",
    b"29885.jpg r_spike 1002 436 85 179 spiking 1146 387 57 135 blocking\n"
    b"\n"
    b"38025.jpg l_set 571 493 69 141 setting 820 381 57 145 standing\n"
    b"48075.jpg l-pass\r\n")
print("seeds written under", os.path.join(ROOT, "seeds"))
