"""`cmacc bench reader`: clips per second of the training reader (`ClipReader`: shard
fetches, JPEG and audio decode in threads, batching) for a recipe's clips, against what one
GPU consumes."""

from __future__ import annotations

import time
from typing import Any

import torch

from service.config import Config
from workers.data.reader import training_reader


def time_reader(cfg: Config, *, uri: str, batches: int, warmup: int, endpoint_url: str = "") -> dict[str, Any]:
    """Clips/s and frames/s of the reader a training run of `cfg` builds (one rank, every
    clip), over `batches` batches after `warmup` untimed ones, with the
    `data.num_decode_threads` threads of `cfg` (the reader cycles through the set as often
    as needed)."""
    threads = cfg.data.num_decode_threads
    torch.set_num_threads(max(1, threads))
    reader = training_reader(cfg, uri=uri, endpoint_url=endpoint_url)
    with reader:
        started = time.perf_counter()
        shape: tuple[int, ...] = ()
        for i, batch in enumerate(reader):
            if i == warmup:
                started = time.perf_counter()
            if batch["frames"] is not None:
                shape = tuple(batch["frames"].shape)
            if i + 1 == warmup + batches:
                break
        elapsed = time.perf_counter() - started
    clips = batches * cfg.train.batch_size
    frames_per_clip = shape[1] if shape else 0
    return {
        "threads": threads,
        "clips_per_s": clips / elapsed,
        "frames_per_s": clips * frames_per_clip / elapsed,
        "batch_shape": list(shape),
        "seconds": elapsed,
        "skipped": reader.num_skipped,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"reader over {report['data']}: batch {report['batch_size']}, {report['frames']} frames, "
        f"{report['batches']} batches after {report['warmup']} warm-up; one GPU consumes {report['target']:g} clips/s",
        f"{'threads':>8}{'clips/s':>10}{'frames/s':>11}{'x one GPU':>11}",
    ]
    for result in report["results"]:
        lines.append(
            f"{result['threads']:>8}{result['clips_per_s']:>10.1f}{result['frames_per_s']:>11.0f}"
            f"{result['clips_per_s'] / report['target']:>11.3f}"
        )
    return "\n".join(lines)
