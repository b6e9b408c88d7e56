"""The train benchmark's work (`cmacc bench train`, `python -m jobs.bench train`): (a) the
plain step of a recipe against (b) a real pretraining job, side by side on one device
(docs/performance.md). Its arguments are parsed and checked in `jobs.bench.cli`."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from typing import Any

import torch

from jobs.pretrain import pretrain
from service import config, layout, storage
from service.errors import Failure
from service.requests import PretrainRequest
from workers.bench import check_device, device_name
from workers.bench import train as bench_train
from workers.bench.train import service_figures
from workers.data.decode import decode_on_device
from workers.metrics import read_metrics
from workers.training import autocast_dtype, use_compile


def variants(cfg: config.Config, device: str) -> list[tuple[str, list[str]]]:
    """The plain-step variants, (name, settings): each speed setting flipped from what the
    recipe resolves to on `device` (channels_last and precision act on CUDA only)."""
    resolved = torch.device(device)
    flips = [
        f"optim.fused={str(not cfg.optim.fused).lower()}",
        f"train.compile={'off' if use_compile(cfg.train, resolved) else 'on'}",
    ]
    if resolved.type == "cuda":
        flips.append(f"train.channels_last={str(not cfg.train.channels_last).lower()}")
        flips.append(f"train.precision={'fp32' if autocast_dtype(cfg.train.precision, resolved) else 'bf16'}")
    return [(flip, [flip]) for flip in flips]


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class QuietProgress:
    """The service run's progress for the bench: a line on stderr every 5 s."""

    def __init__(self, client: Any, total: int, initial: int):
        self.total, self.last = total, 0.0

    def show(self, progress: dict[str, Any]) -> None:
        if time.monotonic() - self.last >= 5:
            self.last = time.monotonic()
            say(f"bench: service path at step {progress['step']}/{self.total}")

    def close(self) -> None:
        pass


def service_path(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """(b): a real pretraining run of the recipe with the bench's steps and checkpoints,
    reduced to figures from its metrics log; the run's folder is removed unless --storage."""
    forced = [
        f"train.steps={args.warmup + args.steps}",
        f"checkpoint.every_steps={args.checkpoint_every}",
        "eval.after_training=false",
        f"resources.num_workers={args.workers}",
        f"resources.use_gpu={'true' if device == 'cuda' else 'false'}",
    ]
    cfg = config.load_recipe(args.recipe, [*args.overrides, *forced])  # a bad setting is refused here, first
    root = args.storage or tempfile.mkdtemp(prefix="cmacc-bench-")
    run_id = time.strftime("bench-%Y%m%d-%H%M%S")
    request = PretrainRequest(
        run_id=run_id, recipe=args.recipe, overrides=(*args.overrides, *forced), storage=root, data=args.data
    )
    say(f"bench: (b) the service path: pretraining run {run_id} in {root} ...")
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the job's own lines: stdout is the report's
        outcome = pretrain(request, progress=QuietProgress)
    wall_s = time.perf_counter() - started
    if outcome["state"] != "succeeded":
        raise Failure(f"cmacc bench train: the service run {run_id} ended {outcome['state']}: {outcome.get('error')}")
    run_uri = layout.run_uri(root, run_id)
    records = read_metrics(run_uri, endpoint_url=cfg.storage.endpoint_url)
    figures = service_figures(
        records, global_batch=cfg.global_batch_size, warmup=args.warmup, checkpoint_every=args.checkpoint_every
    )
    figures.update(run=run_uri, wall_s=wall_s, timings=outcome.get("timings", {}))
    if args.storage is None:  # a temporary folder of this bench
        shutil.rmtree(root, ignore_errors=True)
        figures["run"] = None
    return figures


def run_train(args: argparse.Namespace) -> int:
    device = check_device(args.device, command="train")
    device_settings = [f"resources.use_gpu={'true' if device.type == 'cuda' else 'false'}"]
    cfg = config.load_recipe(args.recipe, [*args.overrides, *device_settings])
    decode = "device" if decode_on_device(cfg.data.decode, device) else "cpu"  # refused here, before any run
    if device.type == "cpu":
        torch.set_num_threads(max(1, cfg.resources.cpus_per_worker))  # as many as a worker gets
    peak = args.peak_tflops or bench_train.known_peak(device)
    plain: dict[str, Any] = {}
    flops_per_clip = None
    if not getattr(args, "service_only", False):
        say(f"bench: (a) the plain step of {args.recipe} on {args.device} ...")
        plain = bench_train.plain_step(cfg, device=device, steps=args.steps, warmup=args.warmup)
        flops_per_clip = plain["flops_per_step"] / cfg.train.batch_size if plain["flops_per_step"] else None
        bench_train.with_utilisation(plain, flops_per_clip=flops_per_clip, peak_tflops=peak)
    report: dict[str, Any] = {
        "benchmark": "train",
        "recipe": args.recipe,
        "overrides": list(args.overrides),
        "device": args.device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": cfg.train.batch_size,
        "decode": decode,
        "workers": args.workers,
        "steps": args.steps,
        "warmup": args.warmup,
        "checkpoint_every": args.checkpoint_every,
        "peak_tflops": peak,
        "flops_per_clip": flops_per_clip,
        "date": time.strftime("%Y-%m-%d"),
        "plain": plain,
        "variants": [],
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()
    service: dict[str, Any] = {}
    if not args.plain_only:
        service = service_path(args, args.device)
        bench_train.with_utilisation(service, flops_per_clip=flops_per_clip, peak_tflops=peak)
    report["service"] = service
    ratio = service.get("clips_per_s")
    report["ratio"] = ratio / plain["clips_per_s"] if ratio and plain else None
    # The variants last: compiling leaves worker processes behind that would share the CPUs with (b).
    if args.variants:
        for name, settings in variants(cfg, args.device):
            say(f"bench: (a) variant {name} ...")
            variant_cfg = config.load_recipe(args.recipe, [*args.overrides, *device_settings, *settings])
            try:
                figures = bench_train.plain_step(
                    variant_cfg, device=device, steps=args.steps, warmup=args.warmup, count_flops=False
                )
                report["variants"].append({"name": name, "figures": figures, "error": ""})
            except Exception as err:  # a variant this machine cannot run (e.g. no compiler): said, not fatal
                report["variants"].append({"name": name, "figures": None, "error": f"{type(err).__name__}: {err}"})
    text = json.dumps(report, indent=2)
    print(text if args.json else bench_train.table(report), flush=True)
    if args.out:
        storage.write_bytes(args.out, (text + "\n").encode())
    return 0
