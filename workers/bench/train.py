"""`cmacc bench train`: the plain training step against the whole service path, on one device.

* (a) `plain_step`: the recipe's encoders and loss in one process, on one batch already on
  the device, the way a bare PyTorch script would run them: query forward and backward, key
  forward, the cross-modal loss against a full dictionary, the optimiser step and the EMA of
  the key encoders. No data loading, no selection, no checks: the ceiling.
* (b) `service_figures`: what a real pretraining run (Ray Train worker, dictionary actor,
  shard reader, checkpoints; run by `jobs.bench.train`) logged in its metrics, reduced to the same
  clips/s plus where the rest of the time went.

Model FLOPs per step come from torch's FlopCounterMode on (a)'s step (convolutions and
matrix products, forward and backward); utilisation is reported where the device's peak is
known (`PEAK_TFLOPS`, or `--peak-tflops`).
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from service.config import Config
from workers.bench import device_name
from workers.data.transforms import build_transforms
from workers.enqueue import build_dictionaries
from workers.loss import cross_modal_nce
from workers.models import momentum_update
from workers.tensors import synchronize
from workers.training import autocast_dtype, build_train_state, prepare_video, use_channels_last

# Dense bf16 matrix peaks measured on the device (TFLOP/s), by a substring of its name.
PEAK_TFLOPS = {"H200": 790.0}


def known_peak(device: torch.device) -> float | None:
    """The measured peak of this device in TFLOP/s, or None (CPUs, GPUs not measured)."""
    name = device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def model_batch(cfg: Config, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """One training batch of the recipe's shapes on `device`: random raw clips through the
    recipe's training transforms (so the encoders see exactly what a run feeds them)."""
    generator = torch.Generator().manual_seed(seed)
    b, data = cfg.train.batch_size, cfg.data
    raw = {
        "frames": torch.randint(0, 256, (b, data.frames, data.size, data.size, 3), generator=generator).to(torch.uint8),
        "audio": torch.rand(b, round(data.clip_seconds * data.sample_rate), generator=generator) * 2 - 1,
        "index": torch.arange(b, dtype=torch.long),
        "label": torch.full((b,), -1, dtype=torch.long),
    }
    with torch.no_grad():
        return build_transforms(cfg, device=device)(raw, device=device, generator=generator)


def plain_step(
    cfg: Config, *, device: torch.device, steps: int, warmup: int, count_flops: bool = True
) -> dict[str, Any]:
    """(a): clips/s of `steps` timed steps after `warmup` untimed ones, and the FLOPs of one."""
    state = build_train_state(cfg, device=device)
    dictionaries = build_dictionaries(cfg, device=device)
    batch = model_batch(cfg, device)
    video = prepare_video(batch["video"], channels_last=use_channels_last(cfg.train, device))
    audio = batch["audio"]
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    method = cfg.method

    def step() -> None:
        state.optimizer.zero_grad(set_to_none=True)
        autocast = nullcontext() if amp_dtype is None else torch.autocast(device_type=device.type, dtype=amp_dtype)
        with autocast:
            queries_v, queries_a = state.query(video, audio)
            with torch.no_grad():
                keys_v, keys_a = state.key(video, audio)
        losses = cross_modal_nce(
            queries_v=queries_v,
            keys_a=keys_a,
            dictionary_a=dictionaries.dictionary_a.keys,
            queries_a=queries_a,
            keys_v=keys_v,
            dictionary_v=dictionaries.dictionary_v.keys,
            temperature=method.temperature,
            in_batch_negatives=method.in_batch_negatives,
        )
        losses["loss"].backward()
        state.optimizer.step()
        momentum_update(state.key, state.query, method.momentum)

    state.query.train()
    state.key.train()
    flops = None
    if count_flops:
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = float(counter.get_total_flops())
    first = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warm_s = time.perf_counter() - first
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - started
    clips_per_s = steps * cfg.train.batch_size / elapsed
    return {
        "clips_per_s": clips_per_s,
        "step_ms": 1000 * elapsed / steps,
        "compute_ms": 1000 * elapsed / steps,
        "warmup_s": warm_s,
        "flops_per_step": flops,
        "data_wait_share": 0.0,
    }


def with_utilisation(figures: dict[str, Any], *, flops_per_clip: float | None, peak_tflops: float | None) -> None:
    """Add achieved TFLOP/s and MFU (None where the FLOPs or the peak are unknown)."""
    achieved = figures["clips_per_s"] * flops_per_clip / 1e12 if flops_per_clip and figures["clips_per_s"] else None
    figures["tflops"] = achieved
    figures["mfu"] = achieved / peak_tflops if achieved is not None and peak_tflops else None


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def service_figures(
    records: list[dict[str, Any]], *, global_batch: int, warmup: int, checkpoint_every: int
) -> dict[str, Any]:
    """(b) from a run's metrics log (one record per step, rank 0's wall time at each step's
        end): clips/s over the steps after `warmup` (checkpoints included), the share of that
        time spent waiting for batches and for the actor, mean selection ms and staleness, and
        the median compute time of a step (from the batch on the device to the deltas applied), and
    the stall of each checkpoint (the two step intervals around it minus two median ones:
        the actor's state is fetched before the step is logged, the files written after)."""
    by_step = {int(r["step"]): r for r in records}  # a resumed attempt may log a step twice: the last counts
    steady = [by_step[s] for s in sorted(by_step) if s > warmup]
    if len(steady) < 3:
        raise ValueError(f"the run logged {len(steady)} steps after {warmup} warm-up steps; need at least 3")
    times = [float(r["time"]) for r in steady]
    elapsed = times[-1] - times[0]
    intervals = [b - a for a, b in itertools.pairwise(times)]
    checkpoints = [
        i for i in range(1, len(steady) - 1) if int(steady[i]["step"]) % checkpoint_every == 0
    ]  # index i: the step whose record precedes the files being written
    around = {i - 1 for i in checkpoints} | set(checkpoints)  # intervals ending at / starting after a checkpoint step
    plain = [dt for j, dt in enumerate(intervals) if j not in around] or intervals
    median = statistics.median(plain)
    stalls = [intervals[i - 1] + intervals[i] - 2 * median for i in checkpoints]
    counted = steady[1:]  # the first steady record only marks the start of the window
    compute = [
        global_batch / float(r["train/clips_per_s"]) for r in counted if float(r.get("train/clips_per_s", 0)) > 0
    ]
    actor_wait = float(steady[-1].get("dict/wait_s", 0.0)) - float(steady[0].get("dict/wait_s", 0.0))
    return {
        "clips_per_s": len(intervals) * global_batch / elapsed if elapsed > 0 else None,
        "step_ms": 1000 * elapsed / len(intervals),
        "median_step_ms": 1000 * median,
        "steps_timed": len(intervals),
        # from the batch on the device to the deltas applied: the step itself, as the worker ran it
        "compute_ms": 1000 * statistics.median(compute) if compute else None,
        "data_wait_share": sum(float(r.get("data/wait_s", 0.0)) for r in counted) / elapsed if elapsed > 0 else None,
        "actor_wait_share": actor_wait / elapsed if elapsed > 0 else None,
        "select_ms": _mean([r.get("dict/select_ms") for r in counted]),
        "staleness": _mean([r.get("dict/staleness") for r in counted]),
        "checkpoint_stall_s": _mean(stalls),
        "checkpoints_timed": len(stalls),
    }


ROWS = (
    ("clips/s", "clips_per_s", "{:.1f}"),
    ("step ms", "step_ms", "{:.1f}"),
    ("compute ms (median)", "compute_ms", "{:.1f}"),
    ("TFLOP/s", "tflops", "{:.4f}"),
    ("MFU", "mfu", "{:.1%}"),
    ("data-wait share", "data_wait_share", "{:.1%}"),
    ("actor-wait share", "actor_wait_share", "{:.1%}"),
    ("selection ms", "select_ms", "{:.1f}"),
    ("staleness (steps)", "staleness", "{:.2f}"),
    ("checkpoint stall s", "checkpoint_stall_s", "{:.3f}"),
)


def _cell(figures: dict[str, Any], key: str, form: str) -> str:
    value = figures.get(key)
    return "-" if value is None else form.format(value)


def table(report: dict[str, Any]) -> str:
    """The report as a text table: one row per figure, (a), (b), and the ratio (b)/(a)."""
    plain, service = report["plain"], report["service"]
    lines = [
        f"{report['recipe']} on {report['device_name']} ({report['device']}), batch {report['batch_size']} per "
        f"worker, {report['workers']} worker(s), {report['steps']} steps after {report['warmup']} warm-up, "
        f"JPEGs decoded on the {'device' if report.get('decode') == 'device' else 'reader CPU threads'}",
        f"{'figure':<20}{'(a) plain step':>16}{'(b) service':>14}",
    ]
    lines += [f"{label:<20}{_cell(plain, key, form):>16}{_cell(service, key, form):>14}" for label, key, form in ROWS]
    ratio = report["ratio"]
    lines.append(f"(b)/(a) clips/s: {'-' if ratio is None else f'{ratio:.3f}'}")
    if report.get("variants"):
        lines.append("")
        lines.append(f"{'(a) variant':<34}{'clips/s':>10}{'step ms':>10}{'vs default':>12}")
        base = report["plain"]["clips_per_s"]
        for variant in report["variants"]:
            figures = variant["figures"]
            if figures is None:
                lines.append(f"{variant['name']:<34}{'failed: ' + variant['error'][:60]}")
                continue
            lines.append(
                f"{variant['name']:<34}{figures['clips_per_s']:>10.1f}{figures['step_ms']:>10.1f}"
                f"{figures['clips_per_s'] / base:>12.3f}"
            )
    return "\n".join(lines)
