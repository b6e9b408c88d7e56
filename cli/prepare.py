"""`cmacc data prepare|av-digits`: real media files, or the real AV-digits inputs, to a data set.

Handlers import `workers.data` (numpy, pyarrow, PyAV) and Ray inside themselves so the CLI
stays quick.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from service.errors import UsageError


def _require(ok: bool, command: str, message: str) -> None:
    if not ok:
        raise UsageError(f"cmacc data {command}: {message}")


def _progress_bar(desc: str, unit: str) -> tuple[Any, Callable[[int, int], None]]:
    """A tqdm bar on stderr and a `progress(done, total)` callback that drives it."""
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in logs that are not one.
    bar = tqdm(unit=unit, desc=desc, file=sys.stderr, disable=None)

    def progress(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return bar, progress


def _prepare(args: argparse.Namespace) -> int:
    _require(os.path.isdir(args.src), "prepare", f"SRC {args.src} is not a folder")
    _require(args.labels == "folders" or os.path.isfile(args.labels), "prepare", f"--labels: no such CSV {args.labels}")
    _require(args.clip_seconds > 0, "prepare", f"--clip-seconds must be > 0, got {args.clip_seconds:g}")
    _require(args.fps > 0, "prepare", f"--fps must be > 0, got {args.fps:g}")
    _require(round(args.clip_seconds * args.fps) >= 1, "prepare", "--clip-seconds x --fps must give at least one frame")
    _require(args.short_side >= 8, "prepare", f"--short-side must be >= 8 pixels, got {args.short_side}")
    _require(args.clips_per_video >= 1, "prepare", f"--clips-per-video must be >= 1, got {args.clips_per_video}")
    _require(args.split_index >= 1, "prepare", f"--split-index must be >= 1, got {args.split_index}")
    _require(args.splits is None or os.path.isdir(args.splits), "prepare", f"--splits: no such folder {args.splits}")

    from workers.data.prepare import prepare

    bar, progress = _progress_bar("prepare", "file")
    with bar:
        summary = prepare(
            args.src,
            args.out,
            labels=args.labels,
            clip_seconds=args.clip_seconds,
            fps=args.fps,
            short_side=args.short_side,
            clips_per_video=args.clips_per_video,
            allow_silent=args.allow_silent,
            splits_dir=args.splits,
            split_index=args.split_index,
            progress=progress,
        )
    splits = ", ".join(f"{name or 'none'} {n}" for name, n in sorted(summary.splits.items()))
    labels = f"{len(summary.label_names)} labels" if summary.label_names else "unlabelled"
    print(
        f"prepared {summary.num_clips} clips from {summary.files_ok} files ({labels}; splits {splits}) "
        f"to {summary.out} in {summary.seconds:.1f} s; {summary.files_skipped} files skipped"
    )
    for item in summary.skipped:
        print(f"  skipped {item['file']}: {item['reason']}")
    return 0


def _av_digits(args: argparse.Namespace) -> int:
    _require(os.path.isdir(args.fsdd), "av-digits", f"--fsdd: no such folder {args.fsdd}")
    _require(os.path.isfile(args.digits), "av-digits", f"--digits: no such file {args.digits}")
    _require(args.frames >= 1, "av-digits", f"--frames must be >= 1, got {args.frames}")
    _require(args.size >= 16, "av-digits", f"--size must be >= 16 pixels, got {args.size}")
    _require(args.seconds > 0, "av-digits", f"--seconds must be > 0, got {args.seconds:g}")
    _require(args.seed >= 0, "av-digits", f"--seed must be >= 0, got {args.seed}")

    from workers.data.avdigits import find_recordings, parse_redundancy, write_av_digits

    try:
        redundancy = parse_redundancy(args.redundancy)
    except ValueError as err:
        raise UsageError(f"cmacc data av-digits: --redundancy {args.redundancy!r}: {err}") from None

    speakers = sorted({r.speaker for r in find_recordings(args.fsdd)})
    _require(
        args.test_speaker in speakers,
        "av-digits",
        f"--test-speaker {args.test_speaker!r} is not an FSDD speaker in {args.fsdd} ({', '.join(speakers)})",
    )
    bar, progress = _progress_bar("av-digits", "clip")
    with bar:
        manifest = write_av_digits(
            args.out,
            fsdd_dir=args.fsdd,
            digits_csv=args.digits,
            test_speaker=args.test_speaker,
            frames=args.frames,
            size=args.size,
            seconds=args.seconds,
            seed=args.seed,
            sync=args.sync,
            redundancy=redundancy,
            progress=progress,
        )
    splits = ", ".join(f"{name or 'none'} {n}" for name, n in sorted(manifest.splits.items()))
    num_bytes = sum(s.bytes for s in manifest.shards)
    variant = "class only" if args.sync == "none" else f"picture synchronised with the sound: {args.sync}"
    if redundancy is not None:
        head = redundancy["head"]
        variant += f"; redundant train split: {redundancy['clips']} clip(s) per recording" + (
            f", digit {head['digit']} x{head['copies']}" if head else ""
        )
    print(
        f"wrote {manifest.num_clips} clips (10 digits, {variant}; test speaker {args.test_speaker}; splits {splits}; "
        f"{args.frames} frames of {args.size}x{args.size}) in {len(manifest.shards)} shard(s), "
        f"{num_bytes / 2**20:.1f} MiB, to {args.out}"
    )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `prepare` and `av-digits` to the `cmacc data` subcommands."""
    prepare = commands.add_parser(
        "prepare",
        help="turn a folder of real video or audio files into clips (Ray tasks in parallel)",
        description=(
            "Decode video (mp4, avi, mkv, webm, mov) and audio (wav, flac, ogg, mp3) files under SRC into "
            "clips: frames resampled and resized, audio downmixed to mono 16 kHz and aligned with the frames. "
            "Skipped files and why go to OUT/skipped.json and the summary."
        ),
    )
    prepare.add_argument("src", metavar="SRC", help="local folder of media files (class sub-folders for labels)")
    prepare.add_argument("out", metavar="OUT", help="data set folder URI (local path or s3://bucket/prefix)")
    prepare.add_argument(
        "--labels",
        default="folders",
        metavar="folders|FILE.csv",
        help="class per sub-folder (default), or a CSV filename,label[,fold] as in ESC-50",
    )
    prepare.add_argument("--clip-seconds", type=float, default=1.0, help="clip length, seconds (default: 1.0)")
    prepare.add_argument("--fps", type=float, default=16.0, help="frames per second stored (default: 16)")
    prepare.add_argument("--short-side", type=int, default=128, help="shorter frame side, pixels (default: 128)")
    prepare.add_argument(
        "--clips-per-video", type=int, default=4, help="at most this many clips per file, evenly spaced (default: 4)"
    )
    prepare.add_argument(
        "--allow-silent", action="store_true", help="keep videos without audio as video-only clips (default: skip)"
    )
    prepare.add_argument(
        "--splits", metavar="DIR", help="folder of UCF101 (trainlist0K.txt...) or HMDB51 (*_test_splitK.txt) splits"
    )
    prepare.add_argument("--split-index", type=int, default=1, help="which official split, K (default: 1)")
    prepare.set_defaults(handler=_prepare)

    av_digits = commands.add_parser(
        "av-digits",
        help="pair real spoken digits (FSDD) with real handwritten digits (UCI) moving over a background",
        description=(
            "One clip per FSDD recording (more per train recording with --redundancy); label = digit; one "
            "speaker held out as the test split."
        ),
    )
    av_digits.add_argument("out", metavar="OUT", help="data set folder URI (local path or s3://bucket/prefix)")
    av_digits.add_argument("--fsdd", required=True, metavar="DIR", help="FSDD folder (holding recordings/)")
    av_digits.add_argument("--digits", required=True, metavar="FILE", help="UCI digits CSV (digits.csv.gz)")
    av_digits.add_argument("--frames", type=int, default=8, help="frames per clip (default: 8)")
    av_digits.add_argument("--size", type=int, default=64, help="frame height and width, pixels (default: 64)")
    av_digits.add_argument("--seconds", type=float, default=1.0, help="clip length, seconds (default: 1.0)")
    av_digits.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    av_digits.add_argument("--test-speaker", default="theo", help="FSDD speaker held out as test (default: theo)")
    av_digits.add_argument(
        "--sync",
        choices=("none", "scale", "ink", "both", "spectral"),
        default="none",
        help="none: the digit is all picture and sound share (default); scale, ink, both: the digit's size "
        "and/or ink also follow the recording's loudness, as lips move with speech; spectral: its width and "
        "height follow the low and the high band of the sound",
    )
    av_digits.add_argument(
        "--redundancy",
        metavar="SPEC",
        help="repeat train recordings as near-duplicate clips (other motion, noise, level and placement; same "
        "recording, image and background), the regime where active sampling should help; the test split is "
        "unchanged. head=D:R: each train recording of digit D gives R clips (a head class); clips=K: every "
        "train recording gives K clips; both: head=0:8,clips=2 (D gets R x K). R, K >= 2. Default: none",
    )
    av_digits.set_defaults(handler=_av_digits)
