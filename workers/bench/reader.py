"""`cmacc bench reader`: clips per second of the training reader (`ClipReader`: shard
fetches, JPEG and audio decode in threads, batching) for a recipe's clips, against what one
GPU consumes."""

from __future__ import annotations

import time
from typing import Any

import torch

from service.config import Config
from workers.data.reader import ClipReader


def time_reader(
    cfg: Config, *, uri: str, threads: int, batches: int, warmup: int, endpoint_url: str = ""
) -> dict[str, Any]:
    """Clips/s and frames/s over `batches` batches after `warmup` untimed ones, with
    `threads` decode threads (the reader cycles through the set as often as needed)."""
    torch.set_num_threads(max(1, threads))
    reader = ClipReader(
        uri=uri,
        rank=0,
        world_size=1,
        seed=cfg.train.seed,
        batch_size=cfg.train.batch_size,
        frames=cfg.model.video.frames,
        seconds=cfg.data.clip_seconds,
        sample_rate=cfg.data.sample_rate,
        shuffle_buffer=cfg.data.shuffle_buffer,
        num_decode_threads=threads,
        prefetch_batches=cfg.data.prefetch_batches,
        endpoint_url=endpoint_url,
    )
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
