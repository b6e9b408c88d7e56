"""`cmacc bench train|reader|sampler|cli`: measure the parts that must be fast; each prints a
table and can write JSON (docs/performance.md).

* `train`: the plain training step of a recipe against the whole service path (Ray Train,
  the dictionary actor, the reader, checkpoints), side by side on one device;
* `reader`: clips per second of the shard reader against what one GPU consumes.

* `sampler`: milliseconds per dictionary selection (the sampler's cost against pool size N,
  global batch M and picks P). The arguments are defined here, torch-free, and shared with
  `python -m jobs.bench`; the work is `workers.bench.sampler`, imported only when it runs.
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
    from workers.bench import sampler as bench  # torch loads only now

    return bench.run_sampler_command(args, cases)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="demo", help="recipe name in jobs/recipes/ or a TOML path (default: demo)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe setting"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both paths run (default: cpu)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each path (default: 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    parser.add_argument(
        "--checkpoint-every", type=int, default=10, help="steps between the service's checkpoints (default: 10)"
    )
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers of the service path (default: 1)")
    parser.add_argument("--data", default=None, help="data set URI for the service path (default: generated)")
    parser.add_argument(
        "--storage", default=None, help="storage root of the service's run (default: a temporary folder)"
    )
    parser.add_argument(
        "--variants", action="store_true", help="also time the plain step with each speed setting flipped"
    )
    parser.add_argument("--plain-only", action="store_true", help="time the plain step only (no Ray)")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's peak, for MFU (default: known GPUs)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--out", metavar="URI", help="also write the JSON results to this file or URI")


def check_train_arguments(args: argparse.Namespace) -> None:
    for name in ("steps", "warmup", "checkpoint_every", "workers"):
        minimum = 0 if name == "warmup" else (3 if name == "steps" else 1)
        if getattr(args, name) < minimum:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"cmacc bench train: {flag} must be >= {minimum}, got {getattr(args, name)}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UsageError(f"cmacc bench train: --peak-tflops must be > 0, got {args.peak_tflops}")


def run_train(args: argparse.Namespace) -> int:
    """The train benchmark of the parsed arguments (here and in `python -m jobs.bench`)."""
    check_train_arguments(args)
    from jobs import benchmarks  # torch and ray load only now

    return benchmarks.run_train(args)


def add_reader_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="clip-shard data set URI (a folder, s3:// or any fsspec URL)")
    parser.add_argument(
        "--recipe", default="paper", help="recipe whose frames, batch and audio to read (default: paper)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe setting"
    )
    parser.add_argument("--threads", default="1,2", help="decode thread counts to time, comma-separated (default: 1,2)")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per thread count (default: 8)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first (default: 1)")
    parser.add_argument(
        "--target", type=float, default=733.0, help="clips/s one GPU consumes, to compare with (default: 733)"
    )
    parser.add_argument("--endpoint-url", default="", help="S3 endpoint (default: storage.endpoint_url or AWS's)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--out", metavar="URI", help="also write the JSON results to this file or URI")


def reader_threads(args: argparse.Namespace) -> list[int]:
    try:
        threads = [int(part) for part in args.threads.split(",") if part.strip()]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        raise UsageError(f"cmacc bench reader: --threads expects positive integers like 1,2,4, got {args.threads!r}")
    if args.batches < 1 or args.warmup < 0:
        raise UsageError("cmacc bench reader: --batches must be >= 1 and --warmup >= 0")
    return threads


def run_reader(args: argparse.Namespace) -> int:
    threads = reader_threads(args)
    from jobs import benchmarks  # torch loads only now

    return benchmarks.run_reader(args, threads)


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
