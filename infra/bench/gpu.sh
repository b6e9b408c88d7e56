#!/usr/bin/env bash
# Every GPU figure of docs/performance.md in one call on a one-GPU machine, run from the
# repository root:  bash infra/bench/gpu.sh [OUT_DIR]   (default: $OUT, else ./bench-gpu)
#
# 1. the sampler with both k-means++ seedings at both pools' 1, 8 and 64-GPU sizes;
# 2. `cmacc bench train --recipe paper` on one GPU: (a) the plain step with its variants
#    (fused optimiser, torch.compile, channels_last_3d, bf16 each flipped) and (b) the whole
#    service path (Ray Train worker, the actor on a quarter of the same GPU, the reader over
#    a generated set at the paper's resolution, a checkpoint every 25 steps);
# 3. `cmacc bench reader` over that set at the paper's batch and frames, 4, 8 and 16 threads;
# 4. data.decode=cpu against device: the reader, and the service path for moco, the stream and
#    the fresh pool with 4 and 12 CPUs for the worker (the H200 table of docs/performance.md).
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

# 1. Both k-means++ seedings (method.seeding) at both pools' 1, 8 and 64-GPU sizes (stream:
#    N = 4M, P = M/4; fresh: N = 2M, P = M; M = 128 clips a GPU), interleaved per case.
#    The issue's goal for parallel: at most 50 ms at both 64-GPU sizes.
sizes=${SIZES:-512x128x32,256x128x128,4096x1024x256,2048x1024x1024,32768x8192x2048,16384x8192x8192}
$py -m jobs.bench sampler --device "$device" --sizes "$sizes" --seeding "${SEEDINGS:-exact,parallel}" \
  --repeats 10 --warmup 3 --out "$out/sampler.json" | tee "$out/sampler.txt"

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
  --batches 10 --set data.decode=cpu --device "$device" --out "$out/reader.json" | tee "$out/reader.txt"

# 4. JPEG frames decoded on the GPU (data.decode=device) against the reader's CPU threads:
#    the reader alone (its figure includes the batched nvJPEG decode), then the service path
#    for moco, the stream pool and the fresh pool (N = 2M) with 4 and 12 CPUs for the worker,
#    both decodes, 40 steps after 10 (pools.sh's settings), and the plain step compiled.
#    DECODES, POOLS and READER_CPUS shorten it (12 service runs of about a minute each).
$py -m jobs.bench reader --data "$dataset" --recipe paper "${extra[@]}" --threads "${THREADS_DEVICE:-1,4}" \
  --batches 10 --set data.decode=device --device "$device" --out "$out/reader-device.json" | tee "$out/reader-device.txt"
pools=(--recipe paper --set resources.num_workers=1 --set resources.gpus_per_worker=0.75 --set data.num_clips=768
  --set data.frames=16 --set data.size=112 --set method.dictionary_size=512 --set train.compile=off "${extra[@]}"
  --device "$device" --steps "${DECODE_STEPS:-40}" --warmup "${DECODE_WARMUP:-10}" --checkpoint-every 1000
  --storage "$out/storage")
$py -m jobs.bench train "${pools[@]}" --plain-only --set train.compile=on --out "$out/plain-compiled.json" \
  | tee "$out/plain-compiled.txt"
for decode in ${DECODES:-cpu device}; do
  for cpus in ${READER_CPUS:-4 12}; do
    for pool in ${POOLS:-moco stream fresh}; do
      case $pool in
        moco) sets=(--set method.sampler=moco --set method.pool=fresh) ;;
        stream) sets=(--set method.sampler=active --set method.pool=stream) ;;
        fresh) sets=(--set method.sampler=active --set method.pool=fresh) ;;
      esac
      name="decode-$decode-cpus$cpus-$pool"
      $py -m jobs.bench train "${pools[@]}" "${sets[@]}" --set "data.decode=$decode" \
        --set "resources.cpus_per_worker=$cpus" --set "data.num_decode_threads=$((cpus > 2 ? cpus - 2 : 1))" \
        --service-only --out "$out/$name.json" | tee "$out/$name.txt"
    done
  done
done
$py - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"\n{'run':<30}{'clips/s':>10}{'data wait':>11}{'compute ms':>12}")
for path in sorted(out.glob("decode-*.json")):
    s = json.loads(path.read_text())["service"]
    print(f"{path.stem:<30}{s['clips_per_s']:>10.1f}{s['data_wait_share'] or 0:>11.3f}{s['compute_ms'] or 0:>12.1f}")
PY
rm -rf "$out/storage"
