#!/usr/bin/env python3
"""Train one of layerlab's networks in PyTorch, with your own loop, and save checkpoints that
layerlab imports (`train.import`), so that its reset study runs on a network trained elsewhere.

    bench/.venv/bin/python examples/train_in_pytorch.py --arch fcn-2x64 --dataset mnist \\
        --epochs 3 --out data/elsewhere/fcn
    bench/.venv/bin/python examples/train_in_pytorch.py --arch vgg11-bn-w0.125 --pad-to 32 \\
        --dataset fashion-mnist --epochs 2 --train-examples 6000 --out data/elsewhere/vgg

Then declare the run in a pipeline file and run layerlab's stages on it (docs/guide.md, "Analysing
a run trained elsewhere"):

    [[experiment]]
    name = "fcn-elsewhere"
    dataset = "mnist"
    seeds = [0]
    [experiment.model]
    arch = "fcn"
    depth = 2
    width = 64
    [experiment.train]
    import = "data/elsewhere/fcn"     # relative to the pipeline file
    epochs = 3
    checkpoints = [0, 1, 2, 3]

The networks are `examples/load_in_pytorch.py`'s (torchvision's modules, shaped as layerlab's),
initialized by PyTorch's defaults, which are layerlab's `model.init = "pytorch"` distributions (so
that layerlab's re-randomization draws from the distribution the run started from). The data are
layerlab's own dataset files (`fetch-data`), pixels / 255 as in layerlab. `save_for_layerlab` is
the part to copy into your own training script.
"""

import argparse
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_in_pytorch import build  # noqa: E402  (the module definitions, beside this file)


def layerlab_name(name):
    """layerlab's name for a tensor of these modules: without the padding wrapper's `net.`, and an
    FCN's Sequential index i as its Linear `fc{(i + 1) / 2}`. torchvision's `downsample` stays:
    layerlab reads it as its `shortcut`."""
    name = name.removeprefix("net.")
    m = re.fullmatch(r"(\d+)\.(weight|bias)", name)
    return f"fc{(int(m[1]) + 1) // 2}.{m[2]}" if m else name


def save_for_layerlab(model, path, epoch):
    """Saves `model`'s weights as a checkpoint `train.import` reads: f32 tensors under layerlab's
    names, the epoch in the metadata. Call it before the first step (epoch 0: re-initialization
    needs the initial weights) and after every epoch to keep."""
    state = {
        layerlab_name(k): v.detach().to(torch.float32).cpu().contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    save_file(state, str(path), metadata={"epoch": str(epoch)})


def error_and_loss(model, images, labels):
    model.eval()
    errors, loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(labels), 1000):
            x, y = images[start : start + 1000].float() / 255.0, labels[start : start + 1000]
            logits = model(x)
            errors += int((logits.argmax(1) != y).sum())
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    return errors / len(labels), loss / len(labels)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True, help="layerlab's name: fcn-2x64, vgg11-bn-w0.25, resnet18-w0.25, …")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--datasets-dir", type=Path, default=Path("data/datasets"))
    ap.add_argument("--pad-to", type=int, default=0, help="model.pad_to (32 for the CNNs on 28×28 images)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-examples", type=int, help="train on the first N examples only")
    ap.add_argument("--test-examples", type=int, help="evaluate on the first N test examples only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True, help="folder for epoch-NNNN.safetensors")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    train = load_file(str(args.datasets_dir / args.dataset / "train.safetensors"))
    test = load_file(str(args.datasets_dir / args.dataset / "test.safetensors"))
    images, labels = train["images"][: args.train_examples], train["labels"].long()[: args.train_examples]
    test_images, test_labels = test["images"][: args.test_examples], test["labels"].long()[: args.test_examples]
    model, _ = build(args.arch, tuple(images.shape[1:]), args.pad_to, 10)
    model.to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    args.out.mkdir(parents=True, exist_ok=True)

    save_for_layerlab(model, args.out / "epoch-0000.safetensors", 0)
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), args.batch_size):
            idx = order[start : start + args.batch_size]
            x = (images[idx].float() / 255.0).to(args.device)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), labels[idx].to(args.device)).backward()
            opt.step()
        save_for_layerlab(model, args.out / f"epoch-{epoch:04d}.safetensors", epoch)
        model.cpu()
        error, loss = error_and_loss(model, test_images, test_labels)
        model.to(args.device)
        print(f"epoch {epoch}: test error {error:.4f} ({round(error * len(test_labels))}/{len(test_labels)}), "
              f"loss {loss:.6f}")


if __name__ == "__main__":
    main()
