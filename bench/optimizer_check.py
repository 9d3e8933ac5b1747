"""layerlab's Adam and AdamW against PyTorch's: the same fully connected network trained full-batch
(one batch of every training example, so the examples' order does not matter) from layerlab's
epoch-0 checkpoint, five epochs each side, and every tensor compared after every epoch.

Runs layerlab's `train` binary itself, in a temporary folder, then torch.optim.Adam / AdamW with
the same settings. Prints one JSON line per optimizer and epoch, {"optimizer", "epoch",
"max_relative_gap", "tensor"} (max |layerlab − torch| / max |torch| over a tensor, the worst
tensor), and exits 1 when a gap exceeds --tolerance.

In `cargo xtask bench`'s environment (bench/.venv, made by the first `cargo xtask bench`):
  cargo build --release -p train
  bench/.venv/bin/python bench/optimizer_check.py --train target/release/train --datasets data/datasets
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from torch import nn

SETTINGS = {
    # optimizer: (lr, weight_decay, betas, eps), chosen away from the defaults so that each is used.
    "adam": (2e-3, 1e-3, (0.85, 0.995), 1e-7),
    "adamw": (2e-3, 5e-2, (0.9, 0.999), 1e-8),
}


def config(data_dir, datasets, optimizer, examples, epochs, depth, width):
    lr, weight_decay, betas, eps = SETTINGS[optimizer]
    return f"""data_dir = "{data_dir}"
datasets_dir = "{datasets}"
[[experiment]]
name = "check"
dataset = "mnist"
seeds = [0]
[experiment.model]
arch = "fcn"
depth = {depth}
width = {width}
[experiment.train]
optimizer = "{optimizer}"
lr = {lr}
weight_decay = {weight_decay}
betas = [{betas[0]}, {betas[1]}]
eps = {eps}
epochs = {epochs}
batch_size = {examples}
train_examples = {examples}
test_examples = 1000
checkpoints = {list(range(epochs + 1))}
"""


def fcn(depth, width, inputs=784, classes=10):
    layers, fan_in = [nn.Flatten()], inputs
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, classes))
    return nn.Sequential(*layers)


def remap(state):
    """layerlab's names (fc1, fc2, …) to nn.Sequential's indices (1, 3, …)."""
    out = {}
    for k, v in state.items():
        unit, field = k.split(".")
        out[f"{2 * (int(unit[2:]) - 1) + 1}.{field}"] = torch.from_numpy(v.copy())
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train", required=True, help="layerlab's train binary")
    p.add_argument("--datasets", default="data/datasets")
    p.add_argument("--examples", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--tolerance", type=float, default=1e-5)
    args = p.parse_args()
    torch.set_num_threads(2)
    datasets = Path(args.datasets).resolve()
    split = load_file(f"{datasets}/mnist/train.safetensors")
    x = torch.from_numpy(split["images"][: args.examples].astype(np.float32) / 255.0)
    y = torch.from_numpy(split["labels"][: args.examples].astype(np.int64))
    worst_gap = 0.0
    print(f"torch {torch.__version__}", file=sys.stderr)
    for optimizer in SETTINGS:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            cfg = tmp / "pipeline.toml"
            cfg.write_text(config(tmp / "data", datasets, optimizer, args.examples, args.epochs, args.depth, args.width))
            subprocess.run([args.train, "--config", str(cfg), "-e", "check", "-s", "0"], check=True,
                           stdout=subprocess.DEVNULL)
            ckpts = tmp / "data/runs/check/seed-0/train/checkpoints"
            ours = [load_file(str(ckpts / f"epoch-{e:04}.safetensors")) for e in range(args.epochs + 1)]
        lr, weight_decay, betas, eps = SETTINGS[optimizer]
        model = fcn(args.depth, args.width)
        model.load_state_dict(remap(ours[0]))
        kind = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
        opt = kind(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        loss_fn = nn.CrossEntropyLoss()
        for epoch in range(1, args.epochs + 1):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            theirs = model.state_dict()
            gaps = []
            for name, ours_values in remap(ours[epoch]).items():
                t = theirs[name].detach().numpy().astype(np.float64)
                gap = np.abs(ours_values.numpy().astype(np.float64) - t).max() / max(np.abs(t).max(), 1e-12)
                gaps.append((gap, name))
            gap, name = max(gaps)
            worst_gap = max(worst_gap, gap)
            print(json.dumps({"optimizer": optimizer, "epoch": epoch, "max_relative_gap": gap, "tensor": name}),
                  flush=True)
    if worst_gap > args.tolerance:
        print(f"a gap of {worst_gap:.2e} exceeds the tolerance {args.tolerance:.0e}", file=sys.stderr)
        sys.exit(1)
    print(f"every tensor within {args.tolerance:.0e} of PyTorch's (worst {worst_gap:.2e})", file=sys.stderr)


if __name__ == "__main__":
    main()
