"""`cmacc data synth|inspect`: make a generated clip-shard data set, or describe and verify one.

Handlers import `workers.data` (numpy, pyarrow, PIL) inside themselves so the CLI stays quick.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from service.config import DataConfig
from service.errors import Failure, UsageError


def _positive(name: str, value: float, minimum: float = 1) -> None:
    if value < minimum:
        raise UsageError(f"cmacc data synth: {name} must be >= {minimum:g}, got {value:g}")


def _synth(args: argparse.Namespace) -> int:
    _positive("--clips", args.clips)
    _positive("--classes", args.classes)
    _positive("--frames", args.frames)
    _positive("--size", args.size, 8)
    _positive("--sample-rate", args.sample_rate, 1000)
    if args.seconds <= 0:
        raise UsageError(f"cmacc data synth: --seconds must be > 0, got {args.seconds:g}")
    if args.shard_mb <= 0:
        raise UsageError(f"cmacc data synth: --shard-mb must be > 0, got {args.shard_mb:g}")
    if args.seed < 0:
        raise UsageError(f"cmacc data synth: --seed must be >= 0, got {args.seed}")

    from tqdm import tqdm

    from workers.data.synth import write_synthetic

    started = time.perf_counter()
    # disable=None: a bar on a terminal, nothing in logs that are not one.
    with tqdm(total=args.clips, unit="clip", desc="synth", file=sys.stderr, disable=None) as bar:
        manifest = write_synthetic(
            args.out,
            args.clips,
            seed=args.seed,
            num_classes=args.classes,
            frames=args.frames,
            size=args.size,
            seconds=args.seconds,
            sample_rate=args.sample_rate,
            target_shard_bytes=round(args.shard_mb * 2**20),
            progress=bar.update,
        )
    elapsed = time.perf_counter() - started
    num_bytes = sum(s.bytes for s in manifest.shards)
    splits = ", ".join(f"{name or 'none'} {n}" for name, n in sorted(manifest.splits.items()))
    print(
        f"wrote {manifest.num_clips} clips ({args.classes} classes; {args.frames} frames of "
        f"{args.size}x{args.size}; {args.seconds:g} s of audio at {args.sample_rate} Hz; splits {splits}) "
        f"in {len(manifest.shards)} shard(s), {num_bytes / 2**20:.1f} MiB, to {args.out} in {elapsed:.1f} s"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from workers.data.inspect import check, summarize, verify

    check(args.uri)  # the check a run makes before it starts: same words, first damaged shard named
    summary = summarize(args.uri)
    problems: list[str] = []
    if args.verify:
        with tqdm(
            total=summary.num_bytes, unit="B", unit_scale=True, desc="verify", file=sys.stderr, disable=None
        ) as bar:
            problems = verify(args.uri, progress=bar.update)
    if args.json:
        out = summary.to_dict()
        if args.verify:
            out["verify"] = {"shards_checked": summary.num_shards, "problems": problems}
        print(json.dumps(out, indent=2))
    else:
        print(summary.to_text())
        if args.verify:
            verdict = "all match the manifest" if not problems else f"{len(problems)} problem(s)"
            print(f"{'verify':<11}{summary.num_shards} shard(s) re-hashed: {verdict}")
            for problem in problems:
                print(f"  {problem}")
    if problems:
        raise Failure(f"{args.uri}: {len(problems)} shard(s) fail verification; first: {problems[0]}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `synth` and `inspect` to the `cmacc data` subcommands."""
    synth = commands.add_parser(
        "synth",
        help="generate the procedural audio-visual data set (the demo's and tests' default data)",
        description="Generate procedural clips whose sound and picture share hidden factors; labels = class.",
    )
    synth.add_argument("out", metavar="OUT", help="data set folder URI (local path or s3://bucket/prefix)")
    synth.add_argument("--clips", type=int, required=True, help="number of clips")
    defaults = DataConfig()  # the generated set of a run that names no data: data.* of the config
    synth.add_argument(
        "--classes", type=int, default=defaults.num_classes, help="number of classes (default: %(default)s)"
    )
    synth.add_argument("--frames", type=int, default=defaults.frames, help="frames per clip (default: %(default)s)")
    synth.add_argument(
        "--size", type=int, default=defaults.size, help="frame height and width, pixels (default: %(default)s)"
    )
    synth.add_argument(
        "--seconds", type=float, default=defaults.clip_seconds, help="clip length, seconds (default: %(default)s)"
    )
    synth.add_argument(
        "--sample-rate", type=int, default=defaults.sample_rate, help="audio sample rate, Hz (default: %(default)s)"
    )
    synth.add_argument("--shard-mb", type=float, default=256.0, help="target shard size, MiB (default: 256)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    synth.set_defaults(handler=_synth)

    inspect = commands.add_parser(
        "inspect",
        help="describe a data set: clips, shards, bytes, labels, modalities, splits",
        description="Describe a clip-shard data set from its manifest and label columns.",
    )
    inspect.add_argument("uri", metavar="URI", help="data set folder URI")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument(
        "--verify", action="store_true", help="re-hash every shard against the manifest; exit 1 on any mismatch"
    )
    inspect.set_defaults(handler=_inspect)
