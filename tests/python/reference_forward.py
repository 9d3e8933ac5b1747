#!/usr/bin/env python3
"""An independent numpy reference of layerlab's forward passes (issue 12).

layerlab computes every test error with its own kernels (im2col + gemm convolution, fused
BatchNorm, its own ReLU and max-pool, a separate fully connected fast path). The Rust unit tests
compare those kernels with candle's; this script checks them against nothing of ours at all: it
rebuilds each network from the written description in crates/layerlab/src/model.rs, in numpy
(float64), reads the checkpoints and the test split from disk as any user would, and compares

  (a) the test error and loss at every kept checkpoint with train's `history.parquet`
      (one row per epoch, measured on the same first `train.test_examples` test images), and the
      final checkpoint's with reset-eval's `baseline` row;
  (b) a unit re-initialized to epoch 0 (that unit's tensors from `epoch-0000`, everything else
      from the final checkpoint; BatchNorm statistics reset with the unit, i.e. `with-layer`)
      with reset-eval's `results.parquet` row for mode=reinit, that unit, source_epoch=0 and
      bn_stats `with-layer` (`none` for a network without BatchNorm).

It also checks that the checkpoint holds exactly the tensors (names and shapes) the description
implies, that the architecture name matches the checkpoint's metadata, and, when the snapshot
stage ran, that its units.parquet lists the same units with the same tensors.

Only numpy, safetensors and pyarrow are used (no torch), so a bug shared by layerlab and PyTorch
(or by layerlab and candle) cannot hide here.

Usage:
  reference_forward.py --data-dir DATA --experiment EXP [--seed S] [--datasets-dir DIR]
                       [--units first|all|NAME[,NAME...]] [--perturb TENSOR]

Exit status: 0 when everything agrees, 1 on a mismatch (each one printed), 2 when an input is
missing or malformed.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from safetensors import safe_open
from safetensors.numpy import load_file

# Constants of model.rs (BN_EPS); BatchNorm momentum only matters in training, not here.
BN_EPS = 1e-5

# Error counts are compared exactly, except that one example in the few hundred may differ:
# layerlab computes in float32 with its own summation order (gemm blocking, fused BatchNorm
# scale/shift), this reference in float64, so an example whose two largest logits are within
# float32 rounding of each other can land on either side. More than one such example in a few
# hundred would be a coincidence worth looking at, so anything beyond this is a failure.
MAX_ERROR_COUNT_DIFF = 1
# Test losses are float32 means on layerlab's side: agreement to a relative 1e-4 is far looser
# than float32 rounding of a few hundred terms and far tighter than any real difference in the
# maths (a wrong layer moves the loss in the first or second digit).
LOSS_RTOL = 1e-4
LOSS_ATOL = 1e-5

# VGG plans of model.rs: channel multiples of 64, 0 for a 2x2 max-pool (torchvision's cfg lists).
VGG_PLANS = {
    "vgg11": [1, 0, 2, 0, 4, 4, 0, 8, 8, 0, 8, 8, 0],
    "vgg13": [1, 1, 0, 2, 2, 0, 4, 4, 0, 8, 8, 0, 8, 8, 0],
    "vgg16": [1, 1, 0, 2, 2, 0, 4, 4, 4, 0, 8, 8, 8, 0, 8, 8, 8, 0],
    "vgg19": [1, 1, 0, 2, 2, 0, 4, 4, 4, 4, 0, 8, 8, 8, 8, 0, 8, 8, 8, 8, 0],
}
# Blocks per stage, and whether they are bottlenecks (1x1 -> 3x3 -> 1x1, four times the width out).
RESNET_BLOCKS = {
    "resnet18": ([2, 2, 2, 2], False),
    "resnet34": ([3, 4, 6, 3], False),
    "resnet50": ([3, 4, 6, 3], True),
    "resnet101": ([3, 4, 23, 3], True),
}


class Fail(Exception):
    """An input is missing or malformed (exit status 2)."""


# ---------------------------------------------------------------------------------------------
# The networks, described as model.rs describes them: a list of layers naming their tensors, and
# the units (the study's "layers") owning those tensors. Rebuilt here from the Rust source by
# reading it, not by calling it, so that a mistake in one is caught by the other.
# ---------------------------------------------------------------------------------------------


def rust_f64_display(x):
    """Rust's `{}` for an f64 (used in architecture names): `0.125`, `1` (never `1.0`)."""
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


def rust_round(x):
    """Rust's f64::round: halves away from zero (Python's round() goes to even)."""
    return math.floor(x + 0.5) if x >= 0 else -math.floor(-x + 0.5)


class Net:
    """Layers: tuples ("pad", p), ("flatten",), ("linear", prefix), ("conv", prefix, stride,
    padding, bias), ("bn", prefix), ("relu",), ("maxpool2",), ("gap",), ("residual", main,
    shortcut). Units: dicts with name, kind and tensors [(name, shape, trainable)]."""

    def __init__(self, model, input_chw, classes):
        self.model = model
        self.input = input_chw
        self.classes = classes
        # model.rs: pad = pad_to.saturating_sub(max(h, w)) / 2 (integer division). Only VGG and
        # ResNet use it: the FCN's Builder never pushes a Pad layer.
        self.pad = max(int(model["pad_to"]) - max(input_chw[1], input_chw[2]), 0) // 2
        self.width_mult = float(model["width_mult"])
        self.layers = []
        self.units = []
        arch = model["arch"]
        if arch == "fcn":
            self._fcn(int(model["depth"]), int(model["width"]))
        elif arch in VGG_PLANS:
            self._vgg(arch, VGG_PLANS[arch], bool(model["batch_norm"]))
        elif arch in RESNET_BLOCKS:
            self._resnet(*RESNET_BLOCKS[arch])
        else:
            raise Fail(f"unknown architecture {arch!r}")

    def channels(self, base):
        return max(int(rust_round(base * self.width_mult)), 1)

    def _unit(self, name, kind):
        self.units.append({"index": len(self.units), "name": name, "kind": kind, "tensors": []})

    def _linear(self, unit, prefix, fan_in, out):
        self._unit(unit, "linear")
        self.units[-1]["tensors"] += [(f"{prefix}.weight", (out, fan_in), True), (f"{prefix}.bias", (out,), True)]
        return ("linear", prefix)

    def _conv(self, unit, prefix, cin, cout, k, stride, bias):
        self._unit(unit, "conv")
        self.units[-1]["tensors"].append((f"{prefix}.weight", (cout, cin, k, k), True))
        if bias:
            self.units[-1]["tensors"].append((f"{prefix}.bias", (cout,), True))
        # Padding k / 2 on every side: "same" size for 3x3 at stride 1, none for a 1x1 shortcut.
        return ("conv", prefix, stride, k // 2, bias)

    def _bn(self, prefix, channels):
        # A BatchNorm belongs to the unit just before it (its conv).
        self.units[-1]["tensors"] += [
            (f"{prefix}.weight", (channels,), True),
            (f"{prefix}.bias", (channels,), True),
            (f"{prefix}.running_mean", (channels,), False),
            (f"{prefix}.running_var", (channels,), False),
        ]
        return ("bn", prefix)

    def _fcn(self, depth, width):
        self.name = f"fcn-{depth}x{width}"
        self.layers.append(("flatten",))
        fan_in = self.input[0] * self.input[1] * self.input[2]  # unpadded: pad_to is not used
        for i in range(1, depth + 2):
            out = width if i <= depth else self.classes
            self.layers.append(self._linear(f"fc{i}", f"fc{i}", fan_in, out))
            if i <= depth:
                self.layers.append(("relu",))
            fan_in = out

    def _vgg(self, arch, plan, batch_norm):
        depth = sum(1 for c in plan if c > 0) + 3
        self.name = f"vgg{depth}{'-bn' if batch_norm else ''}-w{rust_f64_display(self.width_mult)}"
        if self.pad > 0:
            self.layers.append(("pad", self.pad))
        size = max(self.input[1], self.input[2]) + 2 * self.pad
        cin = self.input[0]
        # Tensor prefixes follow torchvision: every module of `features` is numbered, ReLUs and
        # pools included, so conv k's weight is `features.<module>.weight`.
        module, conv = 0, 0
        for m in plan:
            if m == 0:
                if size < 2:
                    raise Fail("input too small for VGG's max-pools")
                size //= 2
                self.layers.append(("maxpool2",))
                module += 1
                continue
            conv += 1
            cout = self.channels(64 * m)
            self.layers.append(self._conv(f"conv{conv}", f"features.{module}", cin, cout, 3, 1, True))
            module += 1
            if batch_norm:
                self.layers.append(self._bn(f"features.{module}", cout))
                module += 1
            self.layers.append(("relu",))
            module += 1
            cin = cout
        # No adaptive average pool and a single Linear named `classifier` (not torchvision's
        # three-layer classifier): the CIFAR-style VGG of the paper.
        self.layers.append(("flatten",))
        self.layers.append(self._linear("fc", "classifier", cin * size * size, self.classes))

    def _resnet(self, blocks, bottleneck):
        depth = (3 if bottleneck else 2) * sum(blocks) + 2
        self.name = f"resnet{depth}-w{rust_f64_display(self.width_mult)}"
        if self.pad > 0:
            self.layers.append(("pad", self.pad))
        # CIFAR-style stem: one 3x3 conv at stride 1 (no bias), BatchNorm, ReLU, and no max-pool
        # (torchvision's ImageNet stem is a 7x7 stride-2 conv followed by a max-pool).
        stem = self.channels(64)
        self.layers.append(self._conv("conv1", "conv1", self.input[0], stem, 3, 1, False))
        self.layers.append(self._bn("bn1", stem))
        self.layers.append(("relu",))
        cin = stem
        for s, count in enumerate(blocks):
            width = self.channels(64 << s)
            # torchvision's Bottleneck: expansion 4 on the last 1x1.
            cout = self.channels(256 << s) if bottleneck else width
            for b in range(count):
                stride = 2 if s > 0 and b == 0 else 1
                p = f"layer{s + 1}.{b}"
                if bottleneck:
                    # ResNet v1.5 (torchvision): the stride sits on the 3x3, not on the first 1x1.
                    main = [
                        self._conv(f"{p}.conv1", f"{p}.conv1", cin, width, 1, 1, False),
                        self._bn(f"{p}.bn1", width),
                        ("relu",),
                        self._conv(f"{p}.conv2", f"{p}.conv2", width, width, 3, stride, False),
                        self._bn(f"{p}.bn2", width),
                        ("relu",),
                        self._conv(f"{p}.conv3", f"{p}.conv3", width, cout, 1, 1, False),
                        self._bn(f"{p}.bn3", cout),
                    ]
                else:
                    main = [
                        self._conv(f"{p}.conv1", f"{p}.conv1", cin, cout, 3, stride, False),
                        self._bn(f"{p}.bn1", cout),
                        ("relu",),
                        self._conv(f"{p}.conv2", f"{p}.conv2", cout, cout, 3, 1, False),
                        self._bn(f"{p}.bn2", cout),
                    ]
                shortcut = []
                if stride != 1 or cin != cout:
                    # A 1x1 projection + BatchNorm, named `shortcut.0`/`shortcut.1` (torchvision
                    # calls it `downsample`); a unit of its own, after the block's convs.
                    shortcut = [
                        self._conv(f"{p}.shortcut", f"{p}.shortcut.0", cin, cout, 1, stride, False),
                        self._bn(f"{p}.shortcut.1", cout),
                    ]
                self.layers.append(("residual", main, shortcut))
                cin = cout
        self.layers.append(("gap",))
        self.layers.append(self._linear("fc", "fc", cin, self.classes))

    def has_batch_norm(self):
        return any(t[0].endswith(".running_mean") for u in self.units for t in u["tensors"])

    def tensor_specs(self):
        return [t for u in self.units for t in u["tensors"]]


# ---------------------------------------------------------------------------------------------
# The forward pass, in float64 numpy, one layer kind at a time.
# ---------------------------------------------------------------------------------------------


def conv2d(x, w, b, stride, padding):
    """Cross-correlation (PyTorch's and candle's conv2d), zero padding on every side.
    x [n, c, h, w], w [o, c, k, k] -> [n, o, ho, wo] with ho = (h + 2p - k) / stride + 1."""
    k = w.shape[2]
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    # windows[n, c, i, j, ki, kj] = x[n, c, i + ki, j + kj]; every stride-th window is kept.
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    y = np.einsum("ncijab,ocab->noij", windows, w, optimize=True)
    if b is not None:
        y = y + b[None, :, None, None]
    return y


def batch_norm_eval(x, state, prefix):
    """Evaluation mode: the running statistics, (x - mean) / sqrt(var + eps) * weight + bias."""
    mean = state[f"{prefix}.running_mean"][None, :, None, None]
    var = state[f"{prefix}.running_var"][None, :, None, None]
    weight = state[f"{prefix}.weight"][None, :, None, None]
    bias = state[f"{prefix}.bias"][None, :, None, None]
    return (x - mean) / np.sqrt(var + BN_EPS) * weight + bias


def max_pool2(x):
    """2x2 windows at stride 2; an odd last row or column is dropped (floor), as in model.rs."""
    n, c, h, w = x.shape
    ho, wo = h // 2, w // 2
    return x[:, :, : 2 * ho, : 2 * wo].reshape(n, c, ho, 2, wo, 2).max(axis=(3, 5))


def apply(layer, state, x):
    kind = layer[0]
    if kind == "pad":
        p = layer[1]
        return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    if kind == "flatten":
        return x.reshape(x.shape[0], -1)  # C, H, W in row-major order, like flatten_from(1)
    if kind == "linear":
        p = layer[1]
        return x @ state[f"{p}.weight"].T + state[f"{p}.bias"]
    if kind == "conv":
        _, p, stride, padding, bias = layer
        return conv2d(x, state[f"{p}.weight"], state[f"{p}.bias"] if bias else None, stride, padding)
    if kind == "bn":
        return batch_norm_eval(x, state, layer[1])
    if kind == "relu":
        return np.maximum(x, 0.0)
    if kind == "maxpool2":
        return max_pool2(x)
    if kind == "gap":
        return x.mean(axis=(2, 3))
    if kind == "residual":
        _, main, shortcut = layer
        m = x
        for l in main:
            m = apply(l, state, m)
        s = x  # an empty shortcut is the identity
        for l in shortcut:
            s = apply(l, state, s)
        return np.maximum(m + s, 0.0)
    raise AssertionError(f"unknown layer {layer!r}")


def forward(net, state, x):
    for layer in net.layers:
        x = apply(layer, state, x)
    return x


def evaluate(net, state, images, labels, batch=100):
    """Number of wrong argmax predictions, mean cross-entropy, and the count of near-ties (top
    two logits within 1e-4), reported to explain a difference of one in the error counts."""
    state64 = {k: v.astype(np.float64) for k, v in state.items()}
    errors, loss_sum, near_ties = 0, 0.0, 0
    for start in range(0, len(labels), batch):
        # Inputs are pixels / 255, nothing else: no mean/std normalisation (data/mod.rs, model.rs).
        # Scaled in float32 first, as push_scaled_pixels does, then widened.
        x = (images[start : start + batch].astype(np.float32) / np.float32(255.0)).astype(np.float64)
        y = labels[start : start + batch].astype(np.int64)
        logits = forward(net, state64, x)
        # argmax takes the first maximum, as candle's does.
        errors += int((logits.argmax(axis=1) != y).sum())
        top2 = np.sort(logits, axis=1)[:, -2:]
        near_ties += int((top2[:, 1] - top2[:, 0] < 1e-4).sum())
        m = logits.max(axis=1, keepdims=True)
        logsumexp = np.log(np.exp(logits - m).sum(axis=1)) + m[:, 0]
        loss_sum += float((logsumexp - logits[np.arange(len(y)), y]).sum())
    return errors, loss_sum / len(labels), near_ties


# ---------------------------------------------------------------------------------------------
# Reading our files.
# ---------------------------------------------------------------------------------------------


def parquet_rows(path):
    if not path.exists():
        raise Fail(f"{path} is missing (did the stage run?)")
    return pq.read_table(path).to_pylist()


def parquet_meta(path):
    md = pq.ParquetFile(path).metadata.metadata or {}
    return {k.decode(): v.decode() for k, v in md.items()}


def load_checkpoint(path, net):
    """The checkpoint's tensors, after checking they are exactly the network's (names, shapes,
    float32) and that its metadata names the same architecture."""
    if not path.exists():
        raise Fail(f"checkpoint {path} is missing")
    state = load_file(str(path))
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    problems = []
    if meta.get("architecture") != net.name:
        problems.append(f"metadata architecture {meta.get('architecture')!r}, expected {net.name!r}")
    for name, shape, _ in net.tensor_specs():
        if name not in state:
            problems.append(f"tensor {name} is missing")
        elif tuple(state[name].shape) != shape or state[name].dtype != np.float32:
            problems.append(f"tensor {name} is {state[name].dtype} {state[name].shape}, expected float32 {shape}")
    expected = {t[0] for t in net.tensor_specs()}
    problems += [f"tensor {k} does not belong to {net.name}" for k in sorted(set(state) - expected)]
    return state, problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, type=Path, help="the pipeline's data_dir (holding runs/)")
    ap.add_argument("--datasets-dir", type=Path, help="datasets folder (default: DATA/datasets)")
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--seed", type=int, action="append", help="training seed (repeatable; default: every seed-*)")
    ap.add_argument(
        "--units",
        default="first",
        help="units to re-initialize to epoch 0 and compare: 'first' (unit 0, default), 'all', or names",
    )
    ap.add_argument(
        "--perturb",
        metavar="TENSOR",
        help="add 0.5 to every value of this tensor of every loaded checkpoint before comparing: a "
        "negative control, the comparison must then fail",
    )
    args = ap.parse_args()
    datasets_dir = args.datasets_dir or args.data_dir / "datasets"
    runs = args.data_dir / "runs" / args.experiment
    seeds = args.seed or sorted(int(p.name[5:]) for p in runs.glob("seed-*") if p.name[5:].isdigit())
    if not seeds:
        raise Fail(f"no runs under {runs}")

    mismatches = []
    for seed in seeds:
        run = runs / f"seed-{seed}"
        history_path = run / "train" / "history.parquet"
        history = parquet_rows(history_path)
        # The settings train read (model, train, dataset) travel with its tables: no need to
        # parse the pipeline file and resolve its defaults again.
        config = json.loads(parquet_meta(history_path)["config"])
        model, train = config["model"], config["train"]

        test_path = datasets_dir / config["dataset"] / "test.safetensors"
        if not test_path.exists():
            raise Fail(f"{test_path} is missing (give --datasets-dir)")
        test = load_file(str(test_path))
        images, labels = test["images"], test["labels"]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise Fail(f"test images are {images.dtype} {images.shape}, expected u8 [N, C, H, W]")
        # The first test_examples images, as train and reset-eval use (no shuffling).
        n = len(labels) if train.get("test_examples") is None else min(int(train["test_examples"]), len(labels))
        if n > 2000:
            print(f"note: {n} test examples; this reference is meant for a few hundred and will be slow")
        images, labels = images[:n], labels[:n]
        net = Net(model, images.shape[1:], 10)
        print(f"{args.experiment} seed {seed}: {net.name}, {len(net.units)} units, {n} test examples")

        # The snapshot stage lists the units as layerlab sees them: the same names, order and
        # tensors as this description, or one of the two is wrong.
        units_path = run / "snapshot" / "units.parquet"
        if units_path.exists():
            theirs = [(r["unit_index"], r["unit"], r["tensors"]) for r in parquet_rows(units_path)]
            ours = [(u["index"], u["name"], ",".join(t[0] for t in u["tensors"])) for u in net.units]
            if theirs != ours:
                mismatches.append(f"seed {seed}: units.parquet lists {theirs}, the reference {ours}")

        ckpt_dir = run / "train" / "checkpoints"
        epochs = sorted(int(p.stem[6:]) for p in ckpt_dir.glob("epoch-*.safetensors"))
        if not epochs or epochs[0] != 0:
            raise Fail(f"{ckpt_dir}: no epoch-0000 checkpoint (found epochs {epochs})")
        states, structural = {}, []
        for e in epochs:
            states[e], problems = load_checkpoint(ckpt_dir / f"epoch-{e:04d}.safetensors", net)
            structural += [f"seed {seed} epoch {e}: {p}" for p in problems]
            if args.perturb:
                if args.perturb not in states[e]:
                    raise Fail(f"--perturb {args.perturb}: no such tensor")
                states[e][args.perturb] = states[e][args.perturb] + np.float32(0.5)
        if structural:
            # A state that is not the network's cannot be evaluated meaningfully.
            mismatches += structural
            continue

        def check(what, ref, recorded_error, recorded_loss):
            errors, loss, ties = ref
            recorded_errors = round(recorded_error * n)
            ok_err = abs(errors - recorded_errors) <= MAX_ERROR_COUNT_DIFF
            ok_loss = math.isclose(loss, recorded_loss, rel_tol=LOSS_RTOL, abs_tol=LOSS_ATOL)
            status = "ok" if ok_err and ok_loss else "MISMATCH"
            print(
                f"  {what:<50} errors {errors:>4}/{n} vs {recorded_errors:>4}/{n}   "
                f"loss {loss:.6f} vs {recorded_loss:.6f}   near-ties {ties}   {status}"
            )
            if not ok_err:
                mismatches.append(f"seed {seed}, {what}: {errors} errors, layerlab recorded {recorded_errors}")
            if not ok_loss:
                mismatches.append(f"seed {seed}, {what}: loss {loss:.6f}, layerlab recorded {recorded_loss:.6f}")

        # (a) every kept checkpoint against history.parquet's row of the same epoch.
        by_epoch = {r["epoch"]: r for r in history}
        results = {e: evaluate(net, states[e], images, labels) for e in epochs}
        for e in epochs:
            if e not in by_epoch:
                mismatches.append(f"seed {seed}: history.parquet has no row for epoch {e}")
                continue
            r = by_epoch[e]
            check(f"epoch {e} vs history.parquet", results[e], r["test_error"], r["test_loss"])

        # (b) reset-eval: the baseline, then units re-initialized to epoch 0.
        reset_rows = parquet_rows(run / "reset" / "results.parquet")
        final = epochs[-1]
        base = [r for r in reset_rows if r["mode"] == "baseline"]
        if len(base) != 1:
            mismatches.append(f"seed {seed}: results.parquet has {len(base)} baseline rows")
        else:
            check(f"final epoch {final} vs reset baseline", results[final], base[0]["test_error"], base[0]["test_loss"])

        if args.units == "first":
            chosen = net.units[:1]
        elif args.units == "all":
            chosen = net.units
        else:
            wanted = args.units.split(",")
            chosen = [u for u in net.units if u["name"] in wanted]
            if len(chosen) != len(wanted):
                raise Fail(f"--units {args.units}: units are {[u['name'] for u in net.units]}")
        bn_stats = "with-layer" if net.has_batch_norm() else "none"
        for unit in chosen:
            # with-layer: every tensor of the unit, its BatchNorm's running statistics included,
            # comes from epoch 0; every other tensor from the final checkpoint.
            state = dict(states[final])
            for name, _, _ in unit["tensors"]:
                state[name] = states[0][name]
            rows = [
                r
                for r in reset_rows
                if r["mode"] == "reinit"
                and r["unit"] == unit["name"]
                and r["source_epoch"] == 0
                and r["bn_stats"] == bn_stats
            ]
            if len(rows) != 1:
                mismatches.append(
                    f"seed {seed}: {len(rows)} reinit rows for {unit['name']}, epoch 0, bn_stats {bn_stats}"
                )
                continue
            if rows[0]["unit_index"] != unit["index"]:
                mismatches.append(
                    f"seed {seed}: {unit['name']} has unit_index {rows[0]['unit_index']}, expected {unit['index']}"
                )
            ref = evaluate(net, state, images, labels)
            check(f"reinit {unit['name']} to epoch 0 ({bn_stats})", ref, rows[0]["test_error"], rows[0]["test_loss"])

    if mismatches:
        print(f"\nFAILED: the numpy reference disagrees with layerlab ({len(mismatches)} mismatches):", file=sys.stderr)
        for m in mismatches:
            print(f"  - {m}", file=sys.stderr)
        return 1
    print("all agree")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Fail as e:
        print(f"reference_forward.py: {e}", file=sys.stderr)
        sys.exit(2)
