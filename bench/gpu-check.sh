#!/usr/bin/env bash
# The GPU checks of one lent-machine call (a GPU node with no Rust toolchain and no network).
#
# Built here first (`bench/gpu-pack.sh` makes .gpu/bin.tar.xz: the stage binaries, xtask,
# layerlab-bench and the GPU test binary, all with `--features cuda`; and .gpu/datasets.tar.xz:
# data/datasets/{mnist,fashion-mnist}). Then, from the repository root on the GPU machine:
#
#   OUT=/some/folder bash bench/gpu-check.sh [checks...]
#
# Checks (default: all, in this order): tests, resume, bench, quick, fcn, profile; on request also
# no-gpu (a CUDA build with no GPU visible: CPU under `auto`, a clear refusal under `cuda`),
# autograd (bench's layerlab side with training steps through candle's autograd, not the tape),
# vgg and resnet (the shipped experiments, three seeds, docs/gpu.toml),
# gaps (where GPU training steps part from the CPU's, kernel by kernel, to $OUT/gaps.jsonl) and
# survey (every cuDNN algorithm of every convolution, timed, to $OUT/cudnn-survey.jsonl). Each
# has a time limit, so that one slow check cannot eat the others' time; everything goes to
# $OUT/gpu-check.log.
#
# Settings: BENCH_WIDTHS (bench: "0.25 1"), FCN_EPOCHS (fcn: 40, the protocol), GPU_CHECK_DEVICE
# (resume: cuda). For the issue's targets in one call of about 8 minutes:
#   BENCH_WIDTHS=1 bash bench/gpu-check.sh tests resume bench fcn vgg
set -uo pipefail

out=${OUT:?set OUT to the folder for results}
root=$(pwd)
bin=/tmp/layerlab-bin
checks=("$@")
[ ${#checks[@]} -eq 0 ] && checks=(tests resume bench quick fcn profile)
exec > >(tee "$out/gpu-check.log") 2>&1

step() { echo; echo "== $* ($(date +%T), $SECONDS s)"; }

step unpack
mkdir -p "$bin" data
tar -xJf .gpu/bin.tar.xz -C "$bin" || exit 1
tar -xJf .gpu/datasets.tar.xz -C data || exit 1
ls -la "$bin"

# The CUDA 13 libraries: PyTorch's wheels (cuBLAS, cuDNN, cuRAND, NVRTC), the toolkit, the driver.
site=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)
libs=$(ls -d "$site"/nvidia/*/lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ldd "$bin/train" | grep -E "not found|cudnn|cublas|curand|nvrtc|libcuda"
python3 -c 'import torch; print("torch", torch.__version__, "cuDNN", torch.backends.cudnn.version())'

# A small VGG-11-BN study on Fashion-MNIST writing under $1: 3 epochs of 30,000 images (about
# 1.5 s each on an H200, so that the kill lands mid-run), a checkpoint after each.
resume_config() {
  cat <<TOML
data_dir = "$1"
datasets_dir = "$root/data/datasets"
[[experiment]]
name = "det"
dataset = "fashion-mnist"
seeds = [4]
[experiment.model]
arch = "vgg11"
width_mult = 0.25
batch_norm = true
pad_to = 32
[experiment.train]
epochs = 3
lr = 0.05
weight_decay = 5e-4
checkpoints = [0, 1, 2, 3]
train_examples = 30000
test_examples = 1000
TOML
}

# The checkpoints' sha256 sums of the run under $1.
checkpoint_sums() { (cd "$1/runs/det/seed-4/train/checkpoints" && sha256sum *.safetensors); }

# An unbroken run, then a run killed (SIGKILL) once its first resume point exists and run again.
resume_check() {
  local dev=$1 a=/tmp/layerlab-resume-a b=/tmp/layerlab-resume-b
  rm -rf $a $b && mkdir -p $a $b
  resume_config $a > $a.toml
  resume_config $b > $b.toml
  timeout 120 "$bin/train" --config $a.toml -e det -s 4 --device "$dev" 2>&1 | tail -2
  "$bin/train" --config $b.toml -e det -s 4 --device "$dev" > $b.log 2>&1 &
  local pid=$! waited=0
  while [ ! -e $b/runs/det/seed-4/train/resume.safetensors ] && [ $waited -lt 1200 ] && kill -0 $pid 2>/dev/null; do
    sleep 0.1; waited=$((waited + 1))
  done
  kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
  echo "killed after $((waited / 10)) s; stamp.json after the kill: $(ls $b/runs/det/seed-4/train/stamp.json 2>/dev/null || echo none)"
  tail -3 $b.log
  timeout 120 "$bin/train" --config $b.toml -e det -s 4 --device "$dev" > $b.rerun.log 2>&1
  tail -2 $b.rerun.log
  local sums; sums=$(checkpoint_sums $a 2>/dev/null | wc -l)
  if ! grep -q "resumed after epoch" $b.rerun.log; then
    echo "resume: FAIL (the rerun did not resume: killed too late or too early)"
  elif [ "$sums" -gt 0 ] && diff <(checkpoint_sums $a) <(checkpoint_sums $b); then
    echo "resume: PASS ($sums checkpoints byte-identical)"
  else
    echo "resume: FAIL (checkpoints differ or missing)"
  fi
}

device=${GPU_CHECK_DEVICE:-cuda}
for check in "${checks[@]}"; do
  case $check in
  tests)
    step "GPU tests"
    timeout 180 "$bin/gpu-tests" --nocapture --test-threads 1
    echo "exit $?"
    ;;
  gaps)
    step "GPU against CPU, each GPU kernel on and off"
    timeout 120 "$bin/layerlab-bench" gaps | tee "$out/gaps.jsonl"
    ;;
  survey)
    step "cuDNN algorithms"
    for net in "vgg11 1" "resnet18 1" "vgg11 0.25" "resnet18 0.25"; do
      set -- $net
      timeout 60 "$bin/layerlab-bench" cudnn --arch $1 --width-mult $2 >> "$out/cudnn-survey.jsonl"
    done
    wc -l "$out/cudnn-survey.jsonl"
    ;;
  bench)
    # layerlab then PyTorch, each network at width 0.25 (the shipped experiments) and 1 (the
    # paper's, where the issue's targets are); BENCH_WIDTHS=1 for the targets alone.
    for width in ${BENCH_WIDTHS:-0.25 1}; do
      for arch in vgg11 resnet18; do
        step "bench $arch width $width"
        # A training step through layerlab's tape (backward.rs); should it fail on this GPU, the
        # same step through candle's autograd, so that the call still measures something.
        timeout 90 "$bin/layerlab-bench" cnn --arch $arch --width-mult $width --device cuda --steps 10 --repeats 3 ||
          timeout 90 "$bin/layerlab-bench" cnn --arch $arch --width-mult $width --device cuda --steps 10 --repeats 3 --autograd
        timeout 90 python3 bench/pytorch_bench.py ${arch%%[0-9]*} --width $width --device cuda --steps 10 --repeats 3
      done
    done
    ;;
  autograd)
    # What the tape saves: training steps through candle's autograd, same kernels otherwise.
    for width in ${BENCH_WIDTHS:-0.25 1}; do
      for arch in vgg11 resnet18; do
        step "bench $arch width $width, candle's autograd"
        timeout 90 "$bin/layerlab-bench" cnn --arch $arch --width-mult $width --device cuda --steps 10 --repeats 3 --autograd
      done
    done
    ;;
  profile)
    # Each convolution's three passes alone, then a whole step: VGG-11-BN at full width.
    step "profile vgg11 width 1"
    timeout 90 "$bin/layerlab-bench" profile --arch vgg11 --width-mult 1 --device cuda --repeats 2
    timeout 90 python3 bench/pytorch_bench.py profile --arch vgg11 --width 1 --device cuda --repeats 2
    ;;
  fcn)
    # The FCN-MNIST protocol (bench/fcn-mnist.toml), 40 epochs unless FCN_EPOCHS says fewer.
    epochs=${FCN_EPOCHS:-40}
    step "FCN-MNIST, $epochs epochs, layerlab then PyTorch"
    mkdir -p /tmp/fcn
    kept=$([ "$epochs" = 40 ] && echo "[0, 1, 2, 3, 5, 10, 20, 40]" || echo "[0, $epochs]")
    sed -e "s/^epochs = 40/epochs = $epochs/" -e "s/^checkpoints = .*/checkpoints = $kept/" \
      bench/fcn-mnist.toml > bench/fcn-gpu.toml
    /usr/bin/time -f "layerlab train: %e s wall" timeout 150 "$bin/train" --config bench/fcn-gpu.toml -e fcn-mnist -s 0 --device cuda --force
    /usr/bin/time -f "pytorch: %e s wall" timeout 150 python3 bench/pytorch_bench.py fcn-train --device cuda --epochs "$epochs" --out /tmp/fcn
    ;;
  vgg|resnet)
    # The shipped experiment (docs/gpu.toml: pipeline.toml's settings, three seeds), end to end.
    exp=$([ $check = vgg ] && echo vgg11-fmnist || echo resnet18-fmnist)
    step "run-all, docs/gpu.toml, $exp, seeds side by side on the GPU"
    /usr/bin/time -f "run-all: %e s wall" timeout 300 "$bin/xtask" run-all --bin-dir "$bin" --config docs/gpu.toml \
      -e $exp --device cuda --jobs 3
    grep -h "done in\|ex/s\|evaluations in" data/gpu/logs/*$exp* 2>/dev/null | tail -40
    sed -n '/## Baseline/,/## Figures/p' data/gpu/results/$exp/report.md 2>/dev/null
    cp data/gpu/results/$exp/report.md "$out/$exp-report.md" 2>/dev/null
    ;;
  resume)
    # kill -9 of a GPU `train` as soon as its first resume point exists, then a rerun: its
    # checkpoints must be byte-identical to those of an unbroken GPU run of the same settings.
    step "kill -9 and resume, on the GPU"
    resume_check "$device"
    ;;
  no-gpu)
    # With no GPU visible, a CUDA build falls back to the CPU under `auto` and refuses `cuda`.
    step "no GPU visible"
    resume_config /tmp/layerlab-nogpu > /tmp/layerlab-nogpu.toml
    CUDA_VISIBLE_DEVICES= timeout 60 "$bin/train" --config /tmp/layerlab-nogpu.toml -e det -s 4 --device auto 2>&1 | tail -3
    echo "auto: exit ${PIPESTATUS[0]} (wanted 0, computing on the CPU)"
    CUDA_VISIBLE_DEVICES= timeout 60 "$bin/train" --config /tmp/layerlab-nogpu.toml -e det -s 4 --device cuda --force 2>&1 | tail -3
    echo "cuda: exit ${PIPESTATUS[0]} (wanted 1, with a clear error)"
    ;;
  quick)
    step "run-all, docs/cnn-quick.toml, vgg11-fmnist-small, on the GPU"
    /usr/bin/time -f "run-all: %e s wall" timeout 240 "$bin/xtask" run-all --bin-dir "$bin" --config docs/cnn-quick.toml \
      -e vgg11-fmnist-small --device cuda --jobs 1
    cat data/quick/results/vgg11-fmnist-small/report.md 2>/dev/null | head -60
    tar -czf "$out/quick-logs.tar.gz" -C data/quick logs 2>/dev/null
    ;;
  esac
done
step done
