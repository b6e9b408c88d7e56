"""`cmacc bench sampler|cli`: measure the parts that must be fast; each prints a table and
can write JSON.

* `sampler`: milliseconds per dictionary selection (the sampler's cost against pool size N,
  global batch M and picks P). The arguments are defined here, torch-free, and shared with
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

# The method's defaults (N = 4M candidates, P = M / 4 picks) at the paper recipe's 128 clips
# per GPU: one GPU, 8 GPUs and 64 GPUs.
DEFAULT_BATCHES = (128, 1024, 8192)  # M
QUICK_CASES = ((256, 64, 16), (512, 128, 32))
SAMPLERS = ("active", "uncertainty", "diversity", "random")  # `moco` selects nothing, there is nothing to time


def default_case(batch: int) -> tuple[int, int, int]:
    """(N, M, P) of the method's defaults for a global batch of M clips."""
    return 4 * batch, batch, max(1, batch // 4)


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """`"4096x1024x256,512x128"` -> [(4096, 1024, 256), (512, 128, 32)]: (N candidates, M clips
    in the global batch, P picks) per case; P defaults to M / 4."""
    cases = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise UsageError(f"cmacc bench sampler: --sizes expects NxM[xP][,...] with positive integers, got {item!r}")
        n, m = int(parts[0]), int(parts[1])
        cases.append((n, m, int(parts[2]) if len(parts) == 3 else max(1, m // 4)))
    return cases


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where selection runs (default: cpu)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="active", help="sampler to time (default: active)")
    parser.add_argument(
        "--sizes",
        metavar="NxM[xP],...",
        help="cases as pool size N x global batch M x picks P (default P = M/4), e.g. 4096x1024x256 "
        "(default: the method's N = 4M, P = M/4 for M = 128, 1024, 8192: 1, 8 and 64 GPUs of 128 clips)",
    )
    parser.add_argument("--quick", action="store_true", help="two small cases and two repeats (a smoke test)")
    parser.add_argument("--dim", type=int, default=128, help="key dimension d (default: 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed selections per case; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed selections per case first (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--out", metavar="URI", help="also write the JSON results to this file or URI")


def sampler_cases(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    if args.quick and args.sizes:
        raise UsageError("cmacc bench sampler: give --quick or --sizes, not both")
    if args.quick:
        return list(QUICK_CASES)
    if args.sizes:
        return parse_sizes(args.sizes)
    return [default_case(m) for m in DEFAULT_BATCHES]


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
        help="milliseconds per dictionary selection for pool size N, global batch M and picks P",
        description="Time one selection of P keys from a pool of N candidates for a global batch of M "
        "(d-dimensional keys, min(M, 256) pseudo-classes): warm-up, then the median of repeats; CUDA is "
        "synchronised.",
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
