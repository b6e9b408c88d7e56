"""`cmacc bench reader`: clips per second of the training reader (`ClipReader`: shard
fetches, JPEG and audio decode in threads, batching) for a recipe's clips, against what one
GPU consumes. With `data.decode=device` the reader leaves the JPEGs encoded and the figure
includes their batched decode on the device (`decode.decode_batch`), as a worker runs it."""

from __future__ import annotations

import time
from typing import Any

import torch

from service.config import Config
from workers.data.decode import decode_batch
from workers.data.reader import training_reader
from workers.tensors import synchronize


def time_reader(
    cfg: Config, *, uri: str, batches: int, warmup: int, endpoint_url: str = "", device: str = "cpu"
) -> dict[str, Any]:
    """Clips/s and frames/s of the reader a training run of `cfg` builds (one rank, every
    clip), over `batches` batches after `warmup` untimed ones, with the
    `data.num_decode_threads` threads of `cfg` (the reader cycles through the set as often
    as needed); `data.decode` resolved on `device` says where the JPEGs are decoded."""
    threads = cfg.data.num_decode_threads
    torch.set_num_threads(max(1, threads))
    torch_device = torch.device(device)
    reader = training_reader(cfg, uri=uri, endpoint_url=endpoint_url, device=torch_device)
    with reader:
        started = time.perf_counter()
        shape: tuple[int, ...] = ()
        for i, batch in enumerate(reader):
            if i == warmup:
                started = time.perf_counter()
            frames = batch["frames"]
            if frames is None and "jpeg" in batch:
                frames = decode_batch(batch["jpeg"], device=torch_device, clip_ids=batch["clip_id"])
            if frames is not None:
                shape = tuple(frames.shape)
            if i + 1 == warmup + batches:
                break
        synchronize(torch_device)
        elapsed = time.perf_counter() - started
    clips = batches * cfg.train.batch_size
    frames_per_clip = shape[1] if shape else 0
    return {
        "threads": threads,
        "decode": reader.decode,
        "device": str(torch_device),
        "clips_per_s": clips / elapsed,
        "frames_per_s": clips * frames_per_clip / elapsed,
        "batch_shape": list(shape),
        "seconds": elapsed,
        "skipped": reader.num_skipped,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"reader over {report['data']}: batch {report['batch_size']}, {report['frames']} frames, "
        f"{report['batches']} batches after {report['warmup']} warm-up, the device decode on "
        f"{report.get('device', 'cpu')}; one GPU consumes {report['target']:g} clips/s",
        f"{'decode':>8}{'threads':>8}{'clips/s':>10}{'frames/s':>11}{'x one GPU':>11}",
    ]
    for result in report["results"]:
        lines.append(
            f"{result.get('decode', 'cpu'):>8}{result['threads']:>8}{result['clips_per_s']:>10.1f}{result['frames_per_s']:>11.0f}"
            f"{result['clips_per_s'] / report['target']:>11.3f}"
        )
    return "\n".join(lines)
