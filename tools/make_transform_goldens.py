#!/usr/bin/env python3
"""Reference transforms for non-square input sizes (--image-size HxW), made with torchvision on Pillow images.

Writes tests/fixtures/transforms_nonsquare.safetensors from tests/fixtures/frame_320x180.jpg (the frame of the
PyTorch fixtures). For each size (h, w) in SIZES, as vbtrain's data/transforms.h documents:
  eval_{h}x{w}_chw        Resize((round(8h/7), round(8w/7))) -> CenterCrop((h, w)) -> ToTensor -> Normalize
  train_resize_{h}x{w}_hwc  Resize(round(8 min(h, w) / 7)) on the shorter side (uint8)
  train_{h}x{w}_hwc       resized_crop(train_resize, 7, 11, 40, 52, [h, w]) -> rotate(-4 degrees, NEAREST) (uint8)
Needs torch, torchvision, Pillow, safetensors (PyPI); never needed by vbtrain or its CI.
usage: tools/make_transform_goldens.py [--out tests/fixtures/transforms_nonsquare.safetensors]
"""
import argparse, json, os
import numpy as np, torch, torchvision, PIL
from PIL import Image
from torchvision import transforms
import torchvision.transforms.functional as TF
from safetensors.torch import save_file

SIZES = [(48, 80), (80, 48), (64, 112)]
BOX = (7, 11, 40, 52)  # top, left, height, width inside the resized frame
ANGLE = -4.0

def rsz(s):  # round(8 s / 7), as resize_size in data/transforms.h
    return (s * 8 + 3) // 7

def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(root, "tests/fixtures/transforms_nonsquare.safetensors"))
    a = ap.parse_args()
    im = Image.open(os.path.join(root, "tests/fixtures/frame_320x180.jpg")).convert("RGB")
    norm = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    u8 = lambda x: torch.from_numpy(np.asarray(x).copy())
    out = {}
    for h, w in SIZES:
        ev = transforms.Compose([transforms.Resize((rsz(h), rsz(w))), transforms.CenterCrop((h, w)),
                                 transforms.ToTensor(), norm])
        out[f"eval_{h}x{w}_chw"] = ev(im)
        r = transforms.Resize(rsz(min(h, w)))(im)
        out[f"train_resize_{h}x{w}_hwc"] = u8(r)
        crop = TF.resized_crop(r, *BOX, [h, w])
        out[f"train_{h}x{w}_hwc"] = u8(TF.rotate(crop, ANGLE))
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "PIL": PIL.__version__,
            "box": json.dumps(BOX), "angle": str(ANGLE)}
    save_file({k: v.contiguous() for k, v in out.items()}, a.out, metadata=meta)
    print("wrote", a.out, sorted(out))

if __name__ == "__main__":
    main()
