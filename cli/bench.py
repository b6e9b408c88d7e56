"""`cmacc bench train|reader|sampler|cli`: measure the parts that must be fast; each prints a
table and can write JSON (docs/performance.md). `train`, `reader` and `sampler` are the
benchmarks of `jobs.bench` (their arguments are defined in `jobs.bench.cli`); `cli` times this command.

* `cli`: seconds `cmacc --help` takes in a fresh process (the CLI must answer at once, so
  it never imports torch or ray at load time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from jobs.bench.cli import (
    add_reader_arguments,
    add_sampler_arguments,
    add_train_arguments,
    run_reader,
    run_sampler,
    run_train,
)
from service import storage
from service.errors import UsageError


def _cli(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise UsageError(f"cmacc bench cli: --repeats must be >= 1, got {args.repeats}")
    command = [sys.executable, "-m", "cli", "--help"]
    timings = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        timings.append(time.perf_counter() - started)
    report = {
        "benchmark": "cli",
        "command": "cmacc --help",
        "repeats": args.repeats,
        "s_median": statistics.median(timings),
        "s_min": min(timings),
        "s_max": max(timings),
        "timings_s": timings,
    }
    text = json.dumps(report, indent=2)
    if args.json:
        print(text)
    else:
        print(f"{'command':<16}{'runs':>5}{'median s':>10}{'min s':>8}{'max s':>8}")
        print(
            f"{'cmacc --help':<16}{args.repeats:>5}{report['s_median']:>10.3f}{report['s_min']:>8.3f}{report['s_max']:>8.3f}"
        )
    if args.out:
        storage.write_bytes(args.out, (text + "\n").encode())
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("bench", help="measure the parts that must be fast")
    sub = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    sampler = sub.add_parser(
        "sampler",
        help="milliseconds per dictionary selection for pool size N, global batch M and picks P",
        description="Time one selection of P keys from a pool of N candidates for a global batch of M "
        "(d-dimensional keys, min(M, 256) pseudo-classes): warm-up, then the median of repeats; CUDA is "
        "synchronised.",
    )
    add_sampler_arguments(sampler)
    sampler.set_defaults(handler=run_sampler)
    train = sub.add_parser(
        "train",
        help="clips/s of the plain training step against the whole service path, on one device",
        description="(a) The recipe's plain single-process step (encoders, loss, optimiser, EMA; no data, no "
        "selection): the ceiling. (b) A real pretraining run of the recipe (Ray Train, the dictionary actor, the "
        "shard reader, checkpoints) on the same device. Prints clips/s, model FLOPs and utilisation, data-wait "
        "and actor-wait shares, selection ms, staleness, checkpoint stall and the ratio (b)/(a).",
    )
    add_train_arguments(train)
    train.set_defaults(handler=run_train)
    reader = sub.add_parser(
        "reader",
        help="clips/s of the shard reader for a recipe's clips, against what one GPU consumes",
        description="Read a data set with the recipe's batch, frames and audio through the training reader "
        "(decode threads, prefetch, shuffle) and report clips/s and decoded frames/s per thread count.",
    )
    add_reader_arguments(reader)
    reader.set_defaults(handler=run_reader)
    cli = sub.add_parser(
        "cli",
        help="seconds `cmacc --help` takes in a fresh process",
        description="Start `cmacc --help` in fresh processes and report the median, min and max wall time.",
    )
    cli.add_argument("--repeats", type=int, default=10, help="processes to time (default: 10)")
    cli.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    cli.add_argument("--out", metavar="URI", help="also write the JSON results to this file or URI")
    cli.set_defaults(handler=_cli)
