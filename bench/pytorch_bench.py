"""The PyTorch baseline of `cargo xtask bench`: the same workloads written the plain way a PyTorch
user would write them (nn.Sequential / nn.Module, torch.optim.SGD, DataLoader over a
TensorDataset, torch.no_grad() for evaluation).

Each workload prints one JSON object per figure on stdout:
  {"workload": ..., "figure": ..., "value": ..., "unit": ..., "flops": ..., "peak_rss_mb": ...}

Run by `cargo xtask bench` inside bench/.venv (created by it); by hand:
  bench/.venv/bin/python bench/pytorch_bench.py fcn-train --datasets data/datasets --epochs 40
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def emit(workload, figure, value, unit, flops=None):
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"workload": workload, "figure": figure, "value": value, "unit": unit,
                      "flops": flops, "peak_rss_mb": rss_mb}), flush=True)


def load_split(datasets, name, split):
    """layerlab's dataset files hold the raw u8 images [n, c, h, w] and labels; a PyTorch user
    would get the same arrays from torchvision's MNIST reader."""
    t = load_file(f"{datasets}/{name}/{split}.safetensors")
    x = torch.from_numpy(t["images"].astype(np.float32) / 255.0)
    y = torch.from_numpy(t["labels"].astype(np.int64))
    return x, y


def fcn(depth=3, width=256, inputs=784, classes=10):
    layers, fan_in = [nn.Flatten()], inputs
    for i in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, classes))
    return nn.Sequential(*layers)


def sync(device):
    """A GPU queues work: a timer may stop only once it is done."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def evaluate(model, loader):
    model.eval()
    device = next(model.parameters()).device
    errors, loss_sum, n = 0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").item()
            errors += (out.argmax(1) != y).sum().item()
            n += len(y)
    return loss_sum / n, errors / n


def fcn_train(args):
    """The default fcn-mnist protocol: 40 epochs, batch 128, SGD lr 0.01 momentum 0.9,
    test evaluation after every epoch, checkpoints at the protocol's epochs."""
    torch.manual_seed(0)
    xtr, ytr = load_split(args.datasets, "mnist", "train")
    xte, yte = load_split(args.datasets, "mnist", "test")
    train_loader = DataLoader(TensorDataset(xtr, ytr), batch_size=128, shuffle=True)
    test_loader = DataLoader(TensorDataset(xte, yte), batch_size=1000)
    model = fcn().to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    checkpoints = {0, 1, 2, 3, 5, 10, 20, 40}
    start = time.perf_counter()
    evaluate(model, test_loader)
    if 0 in checkpoints:
        torch.save(model.state_dict(), f"{args.out}/fcn-epoch-0.pt")
    epoch_rates = []
    test_error = None
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        for x, y in train_loader:
            x, y = x.to(args.device), y.to(args.device)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        sync(args.device)
        epoch_rates.append(len(xtr) / (time.perf_counter() - t0))
        _, test_error = evaluate(model, test_loader)
        if epoch in checkpoints:
            torch.save(model.state_dict(), f"{args.out}/fcn-epoch-{epoch}.pt")
    wall = time.perf_counter() - start
    # The first epoch is the warm-up; the median of the rest is the throughput.
    rate = statistics.median(epoch_rates[1:] if len(epoch_rates) > 1 else epoch_rates)
    emit("fcn-mnist", "train throughput", rate, "examples/s", flops=fcn_train_flops())
    emit("fcn-mnist", f"{args.epochs}-epoch run", wall, "s")
    print(f"final test error {test_error:.4f}", file=sys.stderr)


def fcn_forward_flops(sizes=(784, 256, 256, 256, 10)):
    return sum(2 * a * b for a, b in zip(sizes, sizes[1:]))


def fcn_train_flops(sizes=(784, 256, 256, 256, 10)):
    # Forward, weight gradients, and input gradients of every layer but the first.
    fwd = fcn_forward_flops(sizes)
    return 2 * fwd + fwd - 2 * sizes[0] * sizes[1]


def fcn_reset_grid(args):
    """The naive loop: for every unit and every checkpoint, load the trained weights, overwrite
    the unit with the checkpoint's values, evaluate the full test set; then five fresh draws."""
    xte, yte = load_split(args.datasets, "mnist", "test")
    test_loader = DataLoader(TensorDataset(xte, yte), batch_size=1000)
    ckpt_dir = args.checkpoints
    # Every kept checkpoint: 0, 1, 2, 3, 5, 10, 20, 40 for the default protocol.
    epochs = sorted(int(p.stem.split("-")[1]) for p in Path(ckpt_dir).glob("epoch-*.safetensors"))
    units = ["fc1", "fc2", "fc3", "fc4"]
    model = fcn().to(args.device)
    modules = {u: model[2 * i + 1] for i, u in enumerate(units)}
    start = time.perf_counter()
    evaluations = 0
    for unit in units:
        for epoch in epochs:
            final = {k: torch.from_numpy(v) for k, v in load_file(f"{ckpt_dir}/epoch-{args.epochs:04}.safetensors").items()}
            ckpt = {k: torch.from_numpy(v) for k, v in load_file(f"{ckpt_dir}/epoch-{epoch:04}.safetensors").items()}
            for name in (f"{unit}.weight", f"{unit}.bias"):
                final[name] = ckpt[name]
            model.load_state_dict(remap(final))
            evaluate(model, test_loader)
            evaluations += 1
        for draw in range(5):
            final = {k: torch.from_numpy(v) for k, v in load_file(f"{ckpt_dir}/epoch-{args.epochs:04}.safetensors").items()}
            model.load_state_dict(remap(final))
            torch.manual_seed(draw)
            modules[unit].reset_parameters()
            evaluate(model, test_loader)
            evaluations += 1
    wall = time.perf_counter() - start
    emit("fcn-mnist", "reset grid", wall, "s", flops=evaluations * len(yte) * fcn_forward_flops())
    print(f"{evaluations} evaluations", file=sys.stderr)


def remap(state):
    """layerlab's names (fc1..fc4) to nn.Sequential's indices (1, 3, 5, 7)."""
    out = {}
    for k, v in state.items():
        unit, field = k.split(".")
        out[f"{2 * (int(unit[2:]) - 1) + 1}.{field}"] = v
    return out


def channels(base, width):
    return max(1, round(base * width))


class VGG(nn.Module):
    def __init__(self, plan, width, in_channels=3, size=32, classes=10):
        super().__init__()
        layers, cin = [], in_channels
        for m in plan:
            if m == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                cout = channels(m, width)
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin * size * size, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5, the stride on the 3×3); `cout` is four times `width`."""

    def __init__(self, cin, width, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks, width, in_channels=3, classes=10, bottleneck=False):
        super().__init__()
        stem = channels(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        layers, cin = [], stem
        for s, count in enumerate(blocks):
            planes = channels(64 << s, width)
            for b in range(count):
                stride = 2 if s > 0 and b == 0 else 1
                if bottleneck:
                    cout = channels(256 << s, width)
                    layers.append(Bottleneck(cin, planes, cout, stride))
                else:
                    cout = planes
                    layers.append(BasicBlock(cin, cout, stride))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def conv_flops(model, size=32):
    """Multiply-adds ×2 of every conv and linear layer for one 32×32 image, counted with hooks:
    (forward, training). Training is forward + weight gradients + input gradients of every layer
    but the first, whose input gradient nobody needs."""
    counts = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            counts.append(2 * output.numel() * module.in_channels * k)
        elif isinstance(module, nn.Linear):
            counts.append(2 * output.numel() * module.in_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    total = sum(counts)
    return total, 3 * total - counts[0]


def timed_repeats(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_network(arch, width=0.25):
    """The benchmarked network (VGG-11-BN, ResNet-18 or ResNet-50, width 0.25 unless told) and its
    label."""
    torch.manual_seed(0)
    if arch == "vgg11":
        return VGG([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"], width), f"vgg11-bn-w{width}"
    if arch == "resnet50":
        return ResNet([3, 4, 6, 3], width, bottleneck=True), f"resnet50-w{width}"
    return ResNet([2, 2, 2, 2], width), f"resnet18-w{width}"


def training_batch(model, gen, bs=128):
    """A batch of random 32×32×3 images and labels, and the optimizer of the training steps."""
    x = torch.rand(bs, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (bs,), generator=gen)
    return x, y, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def cnn(args):
    arch = {"vgg": "vgg11", "resnet": "resnet18", "resnet50": "resnet50"}[args.workload]
    model, name = bench_network(arch, args.width)
    fwd_flops, train_flops = conv_flops(model)
    model.to(args.device)
    gen = torch.Generator().manual_seed(1)
    bs = 128
    x, y, opt = training_batch(model, gen, bs)
    x, y = x.to(args.device), y.to(args.device)

    def train_steps():
        model.train()
        for _ in range(args.steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sync(args.device)

    t = timed_repeats(train_steps, 1, args.repeats)
    emit(name, "train throughput", bs * args.steps / t, "images/s", flops=train_flops)
    xi = torch.rand(args.eval_batch, 3, 32, 32, generator=gen).to(args.device)

    def infer():
        model.eval()
        with torch.no_grad():
            for _ in range(args.steps):
                # Predictions back on the host, as an evaluation needs them.
                model(xi).argmax(1).cpu()

    t = timed_repeats(infer, 1, args.repeats)
    emit(name, "inference throughput", args.eval_batch * args.steps / t, "images/s", flops=fwd_flops)


def conv_layers(model, size=32, batch=128):
    """(name, module, input shape) of every convolution, in forward order, found with hooks."""
    found = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, inputs, output):
        found.append((names[module], module, tuple(inputs[0].shape)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()
        model(torch.zeros(batch, 3, size, size))
    for h in handles:
        h.remove()
    return found


def profile(args):
    """Milliseconds of each convolution's forward pass, input gradient and weight gradient at
    batch 128, each timed alone (median of repeats), then of a whole training step: the per-layer
    table of docs/performance.md, PyTorch's side (`layerlab-bench profile` prints layerlab's)."""
    model, _ = bench_network(args.arch, args.width)
    gen = torch.Generator().manual_seed(1)
    dev = args.device
    for name, conv, shape in conv_layers(model):
        x = torch.rand(shape, generator=gen).to(dev)
        w = conv.weight.detach().to(dev)
        y = nn.functional.conv2d(x, w, None, conv.stride, conv.padding)
        g = torch.rand(y.shape, generator=gen).to(dev)
        args_ = (g, x, w, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], 1)
        passes = {
            "forward": lambda: nn.functional.conv2d(x, w, None, conv.stride, conv.padding),
            "input grad": lambda: torch.ops.aten.convolution_backward(*args_, [True, False, False]),
            "weight grad": lambda: torch.ops.aten.convolution_backward(*args_, [False, True, False]),
        }
        for pass_name, fn in passes.items():
            ms = 1e3 * timed_repeats(lambda: (fn(), sync(dev)), 2, args.repeats * 4)
            print(json.dumps({"layer": name, "shape": list(shape), "out_channels": conv.out_channels,
                              "pass": pass_name, "ms": ms}), flush=True)
    model.to(dev)
    x, y, opt = training_batch(model, gen)
    x, y = x.to(dev), y.to(dev)

    def step():
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sync(dev)

    ms = 1e3 * timed_repeats(step, 2, args.repeats * 4)
    print(json.dumps({"layer": "whole step", "pass": "train", "ms": ms}), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workload", choices=["fcn-train", "fcn-reset-grid", "vgg", "resnet", "resnet50", "profile"])
    p.add_argument("--arch", default="vgg11", choices=["vgg11", "resnet18", "resnet50"], help="profile's network")
    p.add_argument("--datasets", default="data/datasets")
    p.add_argument("--checkpoints", help="layerlab checkpoints folder (fcn-reset-grid)")
    p.add_argument("--out", default="/tmp")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--width", type=float, default=0.25, help="width multiplier of vgg and resnet")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # layerlab computes f32 products in f32: TF32 (PyTorch's default for cuDNN convolutions) off.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    workloads = {"fcn-train": fcn_train, "fcn-reset-grid": fcn_reset_grid, "vgg": cnn, "resnet": cnn, "resnet50": cnn,
                 "profile": profile}
    workloads[args.workload](args)


if __name__ == "__main__":
    main()
