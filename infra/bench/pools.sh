#!/usr/bin/env bash
# What the candidate pool costs (docs/performance.md, "The fresh pool"): `cmacc bench train`
# of one recipe with the pool settings the samplers are compared under, on one device, run
# from the repository root:  bash infra/bench/pools.sh [OUT_DIR]   (default: $OUT, else ./bench-pools)
#
# (a) the plain step once, then (b) the whole service path for each of
#   moco         the batch itself enters (no extra clips: N = M)
#   stream       `active` on the stream pool (N = 4M recent arrivals, P = M/4)
#   fresh-2m     `active` on the fresh pool, N = 2M (M extra clips read and key-encoded a step)
#   fresh-4m     `active` on the fresh pool, N = 4M (3M extra clips)
# with the same data, steps and checkpoints. Settings (environment): DEVICE (cuda), RECIPE
# (paper), STEPS (40), WARMUP (10), EXTRA (more --set options). On a GPU machine without
# Ray, carry `.whl/` (../shared/device/gpu-wheels.sh); it is installed into /tmp/site first.
# On this project's 2-core CPU machine:
#   PYTHON=.venv/bin/python DEVICE=cpu RECIPE=bench-cpu STEPS=20 WARMUP=5 bash infra/bench/pools.sh /tmp/pools
set -euo pipefail
out=${1:-${OUT:-./bench-pools}}
mkdir -p "$out"
py=${PYTHON:-python3}
if ! $py -c "import ray" 2> /dev/null && ls .whl/*.whl > /dev/null 2>&1; then  # the GPU machine: no Ray
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
device=${DEVICE:-cuda}
recipe=${RECIPE:-paper}
read -r -a extra <<< "${EXTRA:-}"
if [[ "$recipe" == paper ]]; then
  # One GPU shared by the worker (0.75) and the actor (0.25); 768 generated clips of 16
  # frames at 112 px (what the crop needs), made once; K = 512 (at most the training clips).
  extra=(--set resources.num_workers=1 --set resources.gpus_per_worker=0.75 --set resources.cpus_per_worker=12
    --set data.num_clips=768 --set data.frames=16 --set data.size=112 --set method.dictionary_size=512
    --set train.compile=off "${extra[@]}")
fi
common=(--recipe "$recipe" "${extra[@]}" --device "$device" --steps "${STEPS:-40}" --warmup "${WARMUP:-10}"
  --checkpoint-every 1000 --storage "$out/storage")
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fi
$py -m jobs.bench train "${common[@]}" --set method.sampler=moco --set method.pool=fresh \
  --out "$out/moco.json" | tee "$out/moco.txt"
for setting in "stream:--set method.pool=stream" "fresh-2m:--set method.pool=fresh" \
  "fresh-4m:--set method.pool=fresh --set method.pool_size=$((4 * 128))"; do
  name=${setting%%:*}
  read -r -a sets <<< "${setting#*:}"
  if [[ "$name" == fresh-4m && "$recipe" != paper ]]; then sets=(--set method.pool=fresh --set method.pool_size=128); fi
  $py -m jobs.bench train "${common[@]}" --set method.sampler=active "${sets[@]}" --service-only \
    --out "$out/$name.json" | tee "$out/$name.txt"
done
$py - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
base = json.loads((out / "moco.json").read_text())
plain = base["plain"]["clips_per_s"]
print(f"\n{'pool':<10}{'clips/s':>10}{'step ms':>10}{'vs plain':>10}{'vs moco':>10}{'data wait':>11}{'select ms':>11}")
moco = base["service"]["clips_per_s"]
for name in ("moco", "stream", "fresh-2m", "fresh-4m"):
    s = json.loads((out / f"{name}.json").read_text())["service"]
    print(f"{name:<10}{s['clips_per_s']:>10.1f}{s['step_ms']:>10.1f}{s['clips_per_s'] / plain:>10.3f}"
          f"{s['clips_per_s'] / moco:>10.3f}{s['data_wait_share'] or 0:>11.3f}{s['select_ms'] or 0:>11.1f}")
print(f"plain step: {plain:.1f} clips/s ({base['device_name']})")
PY
rm -rf "$out/storage"
