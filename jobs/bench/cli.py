"""`python -m jobs.bench train|reader|sampler ...`: the benchmarks behind `cmacc bench`, as a job
(for example on a GPU node). Each prints a table and can write JSON (docs/performance.md).

* `train`: the plain training step of a recipe against the whole service path (Ray Train,
  the dictionary actor, the reader, checkpoints), side by side on one device
  (`jobs.bench.train`);
* `reader`: clips per second of the shard reader against what one GPU consumes
  (`jobs.bench.reader`);
* `sampler`: milliseconds per dictionary selection (the sampler's cost against pool size N,
  global batch M and picks P; `workers.bench.sampler`).

The arguments are defined and checked here, torch-free (the command line shares them); the
work imports torch and ray when it runs.
"""

from __future__ import annotations

import argparse
import typing

from service.config import Seeding
from service.errors import UsageError

# The method's defaults (N = 4M candidates, P = M / 4 picks) at the paper recipe's 128 clips
# per GPU: one GPU, 8 GPUs and 64 GPUs.
DEFAULT_BATCHES = (128, 1024, 8192)  # M
QUICK_CASES = ((256, 64, 16), (512, 128, 32))
SAMPLERS = ("active", "uncertainty", "diversity", "random")  # `moco` selects nothing, there is nothing to time
SEEDINGS = typing.get_args(Seeding)


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
        "--seeding",
        default="parallel",
        metavar="NAME[,NAME]",
        help="k-means++ seedings to time, each case once per seeding, interleaved: exact, parallel or "
        "exact,parallel (default: parallel, the recipes' method.seeding; random and uncertainty do not seed)",
    )
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


def parse_seedings(text: str) -> list[str]:
    """`"exact,parallel"` -> ["exact", "parallel"]; an unknown or repeated name is refused."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SEEDINGS]
    if not names or unknown or len(set(names)) != len(names):
        raise UsageError(
            f"cmacc bench sampler: --seeding expects distinct names of {', '.join(SEEDINGS)}, got {text!r}"
        )
    return names


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
    seedings = parse_seedings(args.seeding)
    from workers.bench import sampler as bench  # torch loads only now

    return bench.run_sampler_command(args, cases, seedings)


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
        "--service-only", action="store_true", help="time the service path only (comparing its settings)"
    )
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
    from jobs.bench import train  # torch and ray load only now

    return train.run_train(args)


def add_reader_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="clip-shard data set URI (a folder, s3:// or any fsspec URL)")
    parser.add_argument(
        "--recipe", default="paper", help="recipe whose frames, batch and audio to read (default: paper)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe setting"
    )
    parser.add_argument("--threads", default="1,2", help="decode thread counts to time, comma-separated (default: 1,2)")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="the training device: where data.decode=device (or auto, on cuda) decodes the JPEGs (default: cpu)",
    )
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
    from jobs.bench import reader  # torch loads only now

    return reader.run_reader(args, threads)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    add_sampler_arguments(sub.add_parser("sampler", help="milliseconds per dictionary selection"))
    add_train_arguments(sub.add_parser("train", help="plain step against the service path"))
    add_reader_arguments(sub.add_parser("reader", help="clips/s of the shard reader"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.benchmark == "train":
        return run_train(args)
    if args.benchmark == "reader":
        return run_reader(args)
    return run_sampler(args)
