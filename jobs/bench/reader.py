"""The reader benchmark's work (`cmacc bench reader`, `python -m jobs.bench reader`): clips per
second of the shard reader over a data set, per decode thread count, against what one GPU
consumes (docs/performance.md). Its arguments are parsed and checked in `jobs.bench.cli`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from service import config, storage
from workers.bench import check_device
from workers.bench import reader as bench_reader
from workers.data.decode import decode_on_device


def run_reader(args: argparse.Namespace, threads: list[int]) -> int:
    device = check_device(getattr(args, "device", "cpu"), command="reader")
    cfg = config.load_recipe(args.recipe, list(args.overrides))
    on_device = decode_on_device(cfg.data.decode, device)  # a setting no decoder here runs is refused first
    endpoint = args.endpoint_url or cfg.storage.endpoint_url
    results = []
    for count in threads:
        print(f"bench: reader with {count} decode thread(s) ...", file=sys.stderr, flush=True)
        with_threads = config.load_recipe(args.recipe, [*args.overrides, f"data.num_decode_threads={count}"])
        results.append(
            bench_reader.time_reader(
                with_threads,
                uri=args.data,
                batches=args.batches,
                warmup=args.warmup,
                endpoint_url=endpoint,
                device=str(device),
            )
        )
    report = {
        "benchmark": "reader",
        "data": args.data,
        "recipe": args.recipe,
        "batch_size": cfg.train.batch_size,
        "frames": cfg.model.video.frames,
        "decode": "device" if on_device else "cpu",
        "device": str(device),
        "batches": args.batches,
        "warmup": args.warmup,
        "target": args.target,
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text if args.json else bench_reader.table(report), flush=True)
    if args.out:
        storage.write_bytes(args.out, (text + "\n").encode())
    return 0
