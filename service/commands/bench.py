"""`cmacc bench sampler|cli`: measure the parts that must be fast; each prints a table and
can write JSON.

* `sampler`: milliseconds per dictionary selection (the sampler's cost against pool size N
  and picks M). The arguments are defined here, torch-free, and shared with
  `python -m jobs.bench`; the work is `workers.bench`, imported only when it runs.
* `cli`: seconds `cmacc --help` takes in a fresh process (the CLI must answer at once, so
  it never imports torch or ray).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from service import storage
from service.errors import UsageError

DEFAULT_POOL_SIZES = (1024, 4096, 16384)  # N
DEFAULT_PICKS = (128, 256, 1024)  # M
QUICK_CASES = ((256, 16), (512, 32))
SAMPLERS = ("active", "uncertainty", "diversity")  # `random` selects nothing, there is nothing to time


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """`"1024x128,4096x256"` -> [(1024, 128), (4096, 256)]: (N candidates, M picks) per case."""
    cases = []
    for item in text.split(","):
        n, sep, m = item.strip().lower().partition("x")
        if not sep or not n.isdigit() or not m.isdigit() or int(n) < 1 or int(m) < 1:
            raise UsageError(f"cmacc bench sampler: --sizes expects NxM[,NxM...] with positive integers, got {item!r}")
        cases.append((int(n), int(m)))
    return cases


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where selection runs (default: cpu)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="active", help="sampler to time (default: active)")
    parser.add_argument(
        "--sizes",
        metavar="NxM,...",
        help="cases as pool size x picks, e.g. 1024x128,4096x256 "
        "(default: N in 1024, 4096, 16384 by M in 128, 256, 1024)",
    )
    parser.add_argument("--quick", action="store_true", help="two small cases and two repeats (a smoke test)")
    parser.add_argument("--dim", type=int, default=128, help="key dimension d (default: 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed selections per case; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed selections per case first (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--out", metavar="URI", help="also write the JSON results to this file or URI")


def sampler_cases(args: argparse.Namespace) -> list[tuple[int, int]]:
    if args.quick and args.sizes:
        raise UsageError("cmacc bench sampler: give --quick or --sizes, not both")
    if args.quick:
        return list(QUICK_CASES)
    if args.sizes:
        return parse_sizes(args.sizes)
    return [(n, m) for n in DEFAULT_POOL_SIZES for m in DEFAULT_PICKS]


def run_sampler(args: argparse.Namespace) -> int:
    """The sampler benchmark of the parsed arguments (here and in `python -m jobs.bench`)."""
    cases = sampler_cases(args)
    from workers import bench  # torch loads only now

    return bench.run_sampler_command(args, cases)


def _cli(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise UsageError(f"cmacc bench cli: --repeats must be >= 1, got {args.repeats}")
    command = [sys.executable, "-m", "service.cli", "--help"]
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
        help="milliseconds per dictionary selection for pool sizes N and picks M",
        description="Time one selection of M keys from a pool of N candidates (d-dimensional keys, "
        "min(M, 256) pseudo-classes): warm-up, then the median of repeats; CUDA is synchronised.",
    )
    add_sampler_arguments(sampler)
    sampler.set_defaults(handler=run_sampler)
    cli = sub.add_parser(
        "cli",
        help="seconds `cmacc --help` takes in a fresh process",
        description="Start `cmacc --help` in fresh processes and report the median, min and max wall time.",
    )
    cli.add_argument("--repeats", type=int, default=10, help="processes to time (default: 10)")
    cli.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    cli.add_argument("--out", metavar="URI", help="also write the JSON results to this file or URI")
    cli.set_defaults(handler=_cli)
