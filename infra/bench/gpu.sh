#!/usr/bin/env bash
# Every GPU figure of docs/performance.md in one call on a one-GPU machine, run from the
# repository root:  bash infra/bench/gpu.sh [OUT_DIR]   (default: $OUT, else ./bench-gpu)
#
# 1. the sampler at the paper's sizes (N = 4M, P = M/4 for M = 1024 and 4096: 8 and 32 GPUs);
# 2. `cmacc bench train --recipe paper` on one GPU: (a) the plain step with its variants
#    (fused optimiser, torch.compile, channels_last_3d, bf16 each flipped) and (b) the whole
#    service path (Ray Train worker, the actor on a quarter of the same GPU, the reader over
#    a generated set at the paper's resolution, a checkpoint every 25 steps);
# 3. `cmacc bench reader` over that set at the paper's batch and frames, 4, 8 and 16 threads.
# Where the machine has no Ray (see docs/performance.md), carry `.whl/` with the call; it
# is installed into /tmp/site first. Full JSON goes to OUT_DIR; the tables are printed.
# A dry run of the plumbing on a CPU machine (tiny sizes, no variants, no GPU share):
#   DEVICE=cpu STEPS=4 WARMUP=1 VARIANTS= SIZES=512x128x32 THREADS=1,2 EXTRA="--set
#   resources.actor_gpus=0 --set train.batch_size=8 --set model.video.width=0.125 ..."
#   bash infra/bench/gpu.sh /tmp/out
set -euo pipefail
out=${1:-${OUT:-./bench-gpu}}
mkdir -p "$out"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
steps=${STEPS:-60}
warmup=${WARMUP:-20}
variants=${VARIANTS---variants}
read -r -a extra <<< "${EXTRA:-}"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fi

sizes=${SIZES:-4096x1024x256,16384x4096x1024}
$py -m jobs.bench sampler --device "$device" --sizes "$sizes" --repeats 10 --warmup 3 \
  --out "$out/sampler.json" | tee "$out/sampler.txt"

# One GPU shared by the worker (0.75) and the actor (0.25); data generated once at the
# paper's 16 frames of 128 px, 4096 clips. K = 2048 instead of the paper's 16,384: a
# dictionary may not hold more keys than the set has training clips, and the loss against
# K keys (M x K x d multiply-adds) is a small part of the step either way.
paper=(--recipe paper --set resources.num_workers=1 --set resources.gpus_per_worker=0.75
  --set resources.cpus_per_worker=8 --set data.num_clips=4096 --set data.frames=16 --set data.size=128
  --set method.dictionary_size=2048)
$py -m jobs.bench train "${paper[@]}" "${extra[@]}" --device "$device" --steps "$steps" --warmup "$warmup" \
  --checkpoint-every 25 $variants --storage "$out/storage" --out "$out/train.json" | tee "$out/train.txt"

dataset=$(ls -d "$out"/storage/datasets/* | head -n 1)
$py -m jobs.bench reader --data "$dataset" --recipe paper "${extra[@]}" --threads "${THREADS:-4,8,16}" \
  --batches 10 --out "$out/reader.json" | tee "$out/reader.txt"
rm -rf "$out/storage"
