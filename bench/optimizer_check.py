"""layerlab's Adam and AdamW against PyTorch's: the same fully connected network trained full-batch
(one batch of every training example, so the examples' order does not matter) from layerlab's
epoch-0 checkpoint, five epochs each side, and every tensor compared after every epoch.

Runs layerlab's `train` binary itself, in a temporary folder, then torch.optim.Adam / AdamW with
the same settings. Prints one JSON line per optimizer and epoch: "relative_gap", the largest over
tensors of ‖layerlab − torch‖ / ‖torch‖, and its tensor; and "largest_value_gap", the largest
max |layerlab − torch| / max |torch|. Exits 1 when a relative gap exceeds --tolerance.

The two sides' gradients differ by float rounding (another summation order in the matrix
products), and Adam's first steps move each weight by about lr · g / (|g| + ε): for the few weights
whose gradient is of the order of ε that ratio is sensitive to the gradient's last bits, so single
values part by more than the tensors do.

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

# The benchmark's network and its naming (this script's folder is on the path when it runs).
from pytorch_bench import fcn, remap

SETTINGS = {
    # optimizer: (lr, weight_decay, betas, eps). Adam at PyTorch's betas and eps, with L2 weight
    # decay; AdamW with other betas and eps, so that each setting is read. AdamW's eps is not its
    # default 1e-8: without an L2 term in the gradient some first-layer weights get gradients of
    # the order of 1e-8 (pixels that are rarely lit), and lr · g / (|g| + eps) then turns the
    # gradients' rounding differences into gaps that grow (1.5e-4 after five epochs, measured,
    # where the largest single gaps sat on weights whose gradient was 1e-9 to 3e-8).
    "adam": (2e-3, 1e-3, (0.9, 0.999), 1e-8),
    "adamw": (2e-3, 5e-2, (0.85, 0.995), 1e-7),
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


def remap_arrays(state):
    """layerlab's checkpoint arrays as the Sequential's state_dict (`pytorch_bench.remap`)."""
    return remap({k: torch.from_numpy(v.copy()) for k, v in state.items()})


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
        model.load_state_dict(remap_arrays(ours[0]))
        kind = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
        opt = kind(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        loss_fn = nn.CrossEntropyLoss()
        for epoch in range(1, args.epochs + 1):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            theirs = model.state_dict()
            gaps, largest = [], []
            for name, ours_values in remap_arrays(ours[epoch]).items():
                t = theirs[name].detach().numpy().astype(np.float64)
                d = ours_values.numpy().astype(np.float64) - t
                gaps.append((np.linalg.norm(d) / max(np.linalg.norm(t), 1e-30), name))
                largest.append((np.abs(d).max() / max(np.abs(t).max(), 1e-30), name))
            gap, name = max(gaps)
            worst_gap = max(worst_gap, gap)
            print(json.dumps({"optimizer": optimizer, "epoch": epoch, "relative_gap": gap, "tensor": name,
                              "largest_value_gap": max(largest)[0], "largest_value_gap_tensor": max(largest)[1]}),
                  flush=True)
    if worst_gap > args.tolerance:
        print(f"a gap of {worst_gap:.2e} exceeds the tolerance {args.tolerance:.0e}", file=sys.stderr)
        sys.exit(1)
    print(f"every tensor within {args.tolerance:.0e} of PyTorch's (worst {worst_gap:.2e})", file=sys.stderr)


if __name__ == "__main__":
    main()
