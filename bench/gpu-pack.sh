#!/usr/bin/env bash
# Packs what bench/gpu-check.sh needs on a GPU machine that has no Rust toolchain, into .gpu/
# (which git ignores; a device call carries it):
#   .gpu/bin.tar.xz       the stage binaries, xtask, layerlab-bench and the GPU test binary,
#                         built with `--features cuda` in target/cuda, stripped;
#   .gpu/datasets.tar.xz  data/datasets/{mnist,fashion-mnist} (run fetch-data first).
# Needs the CUDA toolkit from `cargo xtask cuda-env`. One solid xz archive: the binaries share
# most of their bytes (candle's CUDA kernels), which a dictionary larger than one binary finds.
set -euo pipefail
source target/cuda-env/env.sh
export CARGO_TARGET_DIR=$PWD/target/cuda
features=train/cuda,snapshot/cuda,reset-eval/cuda,layerlab-bench/cuda
cargo build --release --features $features -p train -p snapshot -p reset-eval -p fetch-data -p aggregate \
  -p layerlab-bench -p xtask
tests=$(cargo test --release -p layerlab --features cuda --test gpu --no-run --message-format json 2>/dev/null \
  | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
stage=$(mktemp -d)
for b in train snapshot reset-eval fetch-data aggregate layerlab-bench xtask; do
  cp "$CARGO_TARGET_DIR/release/$b" "$stage/"
done
cp "$tests" "$stage/gpu-tests"
strip "$stage"/*
mkdir -p .gpu
tar -C "$stage" -cf - . | xz -T1 --lzma2=preset=9,dict=256MiB > .gpu/bin.tar.xz
rm -rf "$stage"
[ -f .gpu/datasets.tar.xz ] || tar -C data -cf - datasets/mnist datasets/fashion-mnist | xz -9 -T1 > .gpu/datasets.tar.xz
ls -la .gpu
