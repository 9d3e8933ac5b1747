#!/usr/bin/env python3
"""Load a layerlab checkpoint into PyTorch modules shaped like torchvision's, and evaluate it.

layerlab writes checkpoints with PyTorch state_dict names and layouts (Linear [out, in], Conv
[out, in, kh, kw], BatchNorm weight/bias/running_mean/running_var). This example shows what that
means in practice: it builds ordinary torch modules, renames the few tensors whose names differ
from torchvision's, loads them with `load_state_dict(strict=True)`, and measures the test error on
the same test examples layerlab used.

    bench/.venv/bin/python examples/load_in_pytorch.py \\
        data/runs/EXP/seed-0/train/checkpoints/epoch-0040.safetensors --datasets-dir data/datasets

What the networks are (crates/layerlab/src/model.rs), and where they differ from torchvision:

- fcn-DxW: Flatten, then D × (Linear, ReLU), then Linear; tensors `fc1` … `fc{D+1}`. Inputs are
  never padded, whatever `model.pad_to` says.
- vgg*: torchvision's `features` exactly (3×3 convs with padding 1 and a bias, BatchNorm when
  `-bn`, ReLU, 2×2 max-pools, numbered as torchvision numbers them), but no adaptive average pool
  and a single Linear `classifier` instead of torchvision's three-layer one (the CIFAR-style VGG
  of the paper). Inputs are zero-padded to `model.pad_to` first.
- resnet18/34: torchvision's BasicBlock (conv1 3×3 with the stride, bn1, ReLU, conv2, bn2, plus a
  1×1 strided projection when the shape changes, then ReLU of the sum), but a CIFAR-style stem:
  one 3×3 conv at stride 1 with no max-pool, where torchvision has a 7×7 stride-2 conv and a
  max-pool. layerlab names the projection `shortcut.0`/`shortcut.1`; torchvision `downsample`.
- resnet50/101: torchvision's Bottleneck (conv1 1×1, bn1, ReLU, conv2 3×3 with the stride, bn2,
  ReLU, conv3 1×1 to four times the width, bn3, plus the projection), with the same stem.

The architecture comes from the checkpoint's metadata (`architecture`, e.g. `vgg11-bn-w0.25`);
the padding, the dataset and the number of test examples from the training stage's settings in
`train/stamp.json` next to the checkpoints folder (override with --pad-to, --dataset, --examples).
Needs torch, numpy and safetensors (bench/requirements.txt; `cargo xtask bench` installs them into
bench/.venv).
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

VGG_CFGS = {  # torchvision's cfgs "A", "B", "D", "E", with channels scaled by width_mult below
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
# Blocks per stage, and the block: BasicBlock for 18/34, Bottleneck for 50/101.
RESNET_LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def scaled(channels, width_mult):
    # layerlab rounds half away from zero (Rust's f64::round); Python's round() rounds half to even.
    return max(int(channels * width_mult + 0.5), 1)


class VGG(nn.Module):
    """torchvision.models.VGG's `features`, then a single Linear named `classifier`."""

    def __init__(self, depth, batch_norm, width_mult, in_channels, size, classes):
        super().__init__()
        layers, c = [], in_channels
        for v in VGG_CFGS[depth]:  # torchvision's make_layers, module for module
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
            else:
                out = scaled(v, width_mult)
                layers.append(nn.Conv2d(c, out, kernel_size=3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out))  # eps 1e-5, as layerlab's
                layers.append(nn.ReLU(inplace=True))
                c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * size * size, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (v1.5: the stride on the 3×3), its output width given
    (four times `planes`, each scaled and rounded as layerlab does)."""

    def __init__(self, inplanes, planes, out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet, but the CIFAR stem (3×3, stride 1, no max-pool)."""

    def __init__(self, depth, width_mult, in_channels, classes):
        super().__init__()
        planes = [scaled(64 << s, width_mult) for s in range(4)]
        outs = [scaled(256 << s, width_mult) for s in range(4)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()  # torchvision: MaxPool2d(3, 2, 1); layerlab has none
        c = planes[0]
        for s, count in enumerate(RESNET_LAYERS[depth]):
            blocks = []
            for b in range(count):
                stride = 2 if s > 0 and b == 0 else 1
                if depth >= 50:
                    blocks.append(Bottleneck(c, planes[s], outs[s], stride))
                    c = outs[s]
                else:
                    blocks.append(BasicBlock(c, planes[s], stride))
                    c = planes[s]
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Padded(nn.Module):
    """Zero padding on every side before the network (layerlab's `model.pad_to`), kept outside
    the network so that the network's own state_dict names stay torchvision's."""

    def __init__(self, pad, net):
        super().__init__()
        self.pad = nn.ZeroPad2d(pad)
        self.net = net

    def forward(self, x):
        return self.net(self.pad(x))


def build(architecture, in_chw, pad_to, classes):
    """The torch module for a layerlab architecture name, and a function renaming our tensors
    to its state_dict names."""
    c, h, w = in_chw
    # model.rs: pad = pad_to.saturating_sub(max(h, w)) / 2 on every side (integer division).
    pad = max(pad_to - max(h, w), 0) // 2
    if m := re.fullmatch(r"fcn-(\d+)x(\d+)", architecture):
        depth, width = int(m[1]), int(m[2])
        layers, fan_in = [nn.Flatten()], c * h * w
        for i in range(depth + 1):
            out = width if i < depth else classes
            layers.append(nn.Linear(fan_in, out))
            if i < depth:
                layers.append(nn.ReLU())
            fan_in = out
        # fc{i} is the i-th Linear: module 1, 3, 5, … of the Sequential (Flatten is module 0).
        rename = lambda k: re.sub(r"^fc(\d+)\.", lambda g: f"{2 * int(g[1]) - 1}.", k)  # noqa: E731
        return nn.Sequential(*layers), rename
    if m := re.fullmatch(r"vgg(\d+)(-bn)?-w([0-9.e+-]+)", architecture):
        net = VGG(int(m[1]), bool(m[2]), float(m[3]), c, max(h, w) + 2 * pad, classes)
        return Padded(pad, net), lambda k: "net." + k  # names are torchvision's already
    if m := re.fullmatch(r"resnet(\d+)-w([0-9.e+-]+)", architecture):
        net = ResNet(int(m[1]), float(m[2]), c, classes)
        return Padded(pad, net), lambda k: "net." + k.replace(".shortcut.", ".downsample.")
    sys.exit(f"unknown architecture {architecture!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="data/runs/EXP/seed-S/train/checkpoints/epoch-NNNN.safetensors")
    ap.add_argument("--datasets-dir", type=Path, default=Path("data/datasets"))
    ap.add_argument("--pad-to", type=int, help="model.pad_to (default: from train/stamp.json)")
    ap.add_argument("--dataset", help="mnist, fashion-mnist, cifar10 (default: from train/stamp.json)")
    ap.add_argument("--examples", type=int, help="first N test examples (default: train.test_examples)")
    args = ap.parse_args()

    with safe_open(str(args.checkpoint), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "layerlab-checkpoint-1":
        sys.exit(f"{args.checkpoint}: not a layerlab checkpoint (metadata {meta})")
    # train/stamp.json holds the settings the training stage read: the model (pad_to), the dataset
    # and train.test_examples, with every default already applied.
    stamp_path = args.checkpoint.resolve().parent.parent / "stamp.json"
    settings = json.loads(stamp_path.read_text())["config"] if stamp_path.exists() else {}
    pad_to = args.pad_to if args.pad_to is not None else settings.get("model", {}).get("pad_to", 0)
    dataset = args.dataset or settings.get("dataset")
    if dataset is None:
        sys.exit(f"no {stamp_path}: give --dataset (and --pad-to)")

    test = load_file(str(args.datasets_dir / dataset / "test.safetensors"))
    images, labels = test["images"], test["labels"].long()
    n = args.examples or settings.get("train", {}).get("test_examples") or len(labels)
    images, labels = images[:n], labels[:n]

    model, rename = build(meta["architecture"], tuple(images.shape[1:]), pad_to, 10)
    ours = load_file(str(args.checkpoint))
    state = {rename(k): v for k, v in ours.items()}
    # strict: every tensor of the module must come from the checkpoint and vice versa. BatchNorm's
    # `num_batches_tracked` (absent from our files) is filled in by torch itself for a state_dict
    # without version metadata; it does not affect evaluation.
    model.load_state_dict(state, strict=True)
    model.eval()

    errors, loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, n, 500):
            x = images[start : start + 500].float() / 255.0  # pixels / 255, no normalisation
            y = labels[start : start + 500]
            logits = model(x)
            errors += int((logits.argmax(1) != y).sum())
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    print(
        f"{meta['experiment']} seed {meta['seed']} epoch {meta['epoch']} ({meta['architecture']}): "
        f"test error {errors / n:.4f} ({errors}/{n}), loss {loss / n:.6f} (PyTorch {torch.__version__})"
    )


if __name__ == "__main__":
    main()
