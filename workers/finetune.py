"""Fine-tuning (docs/architecture.md, "Evaluation"): a checkpoint's video (or audio) encoder
trained end to end with a linear classifier on the set's training clips, as the paper
evaluates on UCF101 and HMDB51, next to the same encoder trained from scratch with the same
budget (the reference row).

Both rows use the same clips, transforms (the run's training augmentation, the evaluation
crop for testing), optimiser (SGD with momentum, cosine learning rate), epochs and seed.
The test clips are scored one by one (clip-level top-1) and, averaging the softmax of the
clips cut from one source file, per video (video-level top-1): `cmacc data prepare
--clips-per-video K` cuts K clips per file.

`finetune` serves `cmacc finetune`: it runs `finetune_checkpoint` as a Ray task (with a GPU
when the cluster has one) and stores the result beside the checkpoint's evaluations.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from service import catalog, layout, storage
from service.config import Config
from service.errors import UsageError
from service.requests import FinetuneSettings
from workers import ray_init
from workers.data.reader import ClipReader, first_seen
from workers.data.transforms import build_transforms
from workers.evaluate import (
    checkpoint_config,
    data_tag,
    load_query_encoders,
    resolve,
    run_folder_of,
    untrained_encoders,
)
from workers.models import AudioVisualEncoder
from workers.protocols import Fold, read_clip_table
from workers.protocols import choose as choose_protocol

ROWS = ("pretrained", "scratch")


def finetune_checkpoint(
    checkpoint_uri: str,
    *,
    data_uri: str,
    settings: FinetuneSettings,
    protocol: str = "auto",
    test_fraction: float = 0.3,
    split_seed: int = 0,
    rows: tuple[str, ...] = ROWS,
    device: str = "cpu",
    endpoint_url: str = "",
) -> dict[str, Any]:
    """Fine-tune the checkpoint's encoder of `settings.modality` (and, for the `scratch`
    row, the same architecture at the run's initialisation) on the protocol's training clips
    and score the held-out ones. With the `folds` protocol the first fold is held out.

    Returns a JSON-ready dict: `checkpoint`, `step`, `data`, `protocol`, `settings`, and per
    row `clip_top1`, `video_top1`, `test_clips`, `test_videos`, `train_loss` per epoch,
    `seconds`."""
    started = time.perf_counter()
    cfg, meta = checkpoint_config(checkpoint_uri, endpoint_url=endpoint_url)  # the checkpoint first
    table = read_clip_table(data_uri, endpoint_url=endpoint_url)
    chosen = choose_protocol(table, protocol, test_fraction=test_fraction, seed=split_seed)
    fold = chosen.folds[0]
    if len(fold.train) == 0 or len(fold.test) == 0:
        raise UsageError(f"{data_uri}: {chosen.description}: a side of the split is empty")
    labelled = table.label[table.label >= 0]
    num_classes = max(len(table.label_names), int(labelled.max()) + 1)
    results = {}
    for row in rows:
        model = (
            load_query_encoders(checkpoint_uri, cfg, endpoint_url=endpoint_url)
            if row == "pretrained"
            else untrained_encoders(cfg)
        )
        print(f"cmacc finetune: {row} {settings.modality} encoder, {settings.epochs} epochs", flush=True)
        results[row] = _train_and_test(
            model,
            cfg,
            data_uri,
            fold,
            sources=table.source,
            num_classes=num_classes,
            settings=settings,
            device=torch.device(device),
            endpoint_url=endpoint_url,
        )
    return {
        "kind": "finetune",
        "checkpoint": checkpoint_uri,
        "step": int(meta.get("step", -1)),
        "run_id": meta.get("run_id", ""),
        "data": data_uri,
        "protocol": {
            **chosen.to_dict(),
            "held_out": fold.name,
        },
        "splits": {"train": len(fold.train), "test": len(fold.test)},
        "num_classes": num_classes,
        "settings": asdict(settings),
        "device": device,
        "results": results,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _reader(
    cfg: Config, data_uri: str, clips: np.ndarray, *, seed: int, batch_size: int, endpoint_url: str, train: bool
):
    return ClipReader(
        uri=data_uri,
        rank=0,
        world_size=1,
        seed=seed,
        batch_size=batch_size,
        frames=cfg.model.video.frames,
        seconds=cfg.data.clip_seconds,
        sample_rate=cfg.data.sample_rate,
        shuffle_buffer=max(1, min(len(clips), 4096)) if train else 1,
        num_decode_threads=cfg.data.num_decode_threads,
        prefetch_batches=cfg.data.prefetch_batches,
        endpoint_url=endpoint_url,
        clips=clips,
    )


def _train_and_test(
    model: AudioVisualEncoder,
    cfg: Config,
    data_uri: str,
    fold: Fold,
    *,
    sources: list[str],
    num_classes: int,
    settings: FinetuneSettings,
    device: torch.device,
    endpoint_url: str,
) -> dict[str, Any]:
    started = time.perf_counter()
    modality = settings.modality
    torch.manual_seed(settings.seed)
    encoder = getattr(model, modality).to(device)
    classifier = nn.Linear(encoder.backbone.out_features, num_classes).to(device)
    parameters = [*encoder.backbone.parameters(), *classifier.parameters()]  # the projection head is not used
    optimizer = torch.optim.SGD(parameters, lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay)
    batch_size = min(settings.batch_size, len(fold.train))
    steps_per_epoch = max(1, len(fold.train) // batch_size)
    total = settings.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    train_transforms = build_transforms(cfg, device=device, train=True)
    test_transforms = build_transforms(cfg, device=device, train=False)
    field = "frames" if modality == "video" else "audio"
    losses = []
    encoder.train()
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    with _reader(
        cfg, data_uri, fold.train, seed=settings.seed, batch_size=batch_size, endpoint_url=endpoint_url, train=True
    ) as reader:
        for epoch in range(settings.epochs):
            total_loss = 0.0
            for _ in range(steps_per_epoch):
                raw = next(reader)
                x = getattr(train_transforms, modality)(raw[field].to(device), generator=generator)
                loss = F.cross_entropy(classifier(encoder.features(x)), raw["label"].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total_loss += float(loss.detach())
            losses.append(round(total_loss / steps_per_epoch, 4))
            print(f"cmacc finetune: epoch {epoch + 1}/{settings.epochs} loss {losses[-1]:.4f}", flush=True)
    encoder.eval()
    probabilities = torch.zeros(len(sources), num_classes)
    labels = torch.full((len(sources),), -1, dtype=torch.int64)
    remaining = len(fold.test)
    seen = torch.zeros(len(sources), dtype=torch.bool)
    with _reader(cfg, data_uri, fold.test, seed=0, batch_size=64, endpoint_url=endpoint_url, train=False) as reader:
        while remaining > 0 and reader.epoch == 0:  # each clip once; a second epoch: the rest were skipped
            raw = next(reader)
            fresh = first_seen(raw["index"], seen)
            if not len(fresh):
                continue
            index = raw["index"][fresh]
            remaining -= len(index)
            with torch.no_grad():
                x = getattr(test_transforms, modality)(raw[field][fresh].to(device))
                probabilities[index] = F.softmax(classifier(encoder.features(x)).float(), dim=1).cpu()
            labels[index] = raw["label"][fresh]
    test = torch.as_tensor(fold.test)
    test = test[seen[test]]  # a clip that cannot be decoded was skipped (the reader named it)
    if len(test) == 0:
        raise UsageError(f"{data_uri}: none of the held-out clips could be decoded")
    clip_top1 = float((probabilities[test].argmax(dim=1) == labels[test]).float().mean())
    videos: dict[str, list[int]] = {}
    for i in test.tolist():
        videos.setdefault(sources[i], []).append(i)
    hits = []
    for members in videos.values():
        averaged = probabilities[members].mean(dim=0)
        truth = int(torch.mode(labels[members]).values)
        hits.append(int(averaged.argmax()) == truth)
    return {
        "clip_top1": clip_top1,
        "video_top1": float(np.mean(hits)),
        "test_clips": len(test),
        "test_videos": len(videos),
        "train_loss": losses,
        "seconds": round(time.perf_counter() - started, 2),
    }


def save_finetune(run_uri: str, result: dict[str, Any], *, endpoint_url: str = "") -> str:
    """`<run>/eval/finetune-checkpoint-%08d-<modality>[-<data set>].json`; returns its URI."""
    tag = data_tag(run_uri, result, endpoint_url)
    uri = layout.finetune_uri(run_uri, result["step"], result["settings"]["modality"], data=tag)
    storage.write_bytes(uri, json.dumps(result, indent=2).encode(), endpoint_url=endpoint_url)
    return uri


def format_finetune(result: dict[str, Any]) -> str:
    """The table `cmacc finetune` prints: clip- and video-level top-1 per row."""
    settings = result["settings"]
    lines = [
        f"protocol: {result['protocol']['description']}"
        + (f" (held out: {result['protocol']['held_out']})" if result["protocol"]["name"] == "folds" else ""),
        f"fine-tuned {settings['modality']} encoder + linear classifier, {settings['epochs']} epochs, "
        f"lr {settings['lr']:g}, batch {settings['batch_size']}, on {result['splits']['train']} clips "
        f"({result['device']}); checkpoint step {result['step']}:",
        f"  {'encoder':<22}{'clip top-1':>11}{'video top-1':>13}{'videos':>8}{'final loss':>12}",
    ]
    names = {"pretrained": "pretrained (CM-ACC)", "scratch": "from scratch"}
    for row, scores in result["results"].items():
        lines.append(
            f"  {names.get(row, row):<22}{scores['clip_top1']:>11.3f}{scores['video_top1']:>13.3f}"
            f"{scores['test_videos']:>8}{scores['train_loss'][-1]:>12.4f}"
        )
    if result.get("saved"):
        lines.append(f"saved: {result['saved']}")
    return "\n".join(lines)


def finetune(request: Any) -> dict[str, Any]:
    """`cmacc finetune` and `python -m jobs.finetune`: resolve the checkpoint and data
    (`--run` or `--checkpoint`), run `finetune_checkpoint` on Ray (the cluster of RAY_ADDRESS,
    as in a job, or a local Ray), store the result in the run's eval/ folder and note it in
    the run's record."""
    checkpoint, data = resolve(request)
    checkpoint_config(checkpoint)  # a readable, registered checkpoint, before Ray starts
    result = ray_init.run_task(
        finetune_checkpoint,
        checkpoint,
        data_uri=data,
        settings=request.settings,
        protocol=request.protocol,
        test_fraction=request.test_fraction,
        split_seed=request.split_seed,
        rows=ROWS if request.scratch else ("pretrained",),
    )
    run_uri = run_folder_of(checkpoint)
    if run_uri:
        try:
            result["saved"] = save_finetune(run_uri, result)
            catalog.note_result(run_uri, "finetune", _summary(result))
        except OSError as err:
            print(f"cmacc: warning: could not save the result in {run_uri}: {err}", file=sys.stderr)
    return result


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": result["step"],
        "modality": result["settings"]["modality"],
        "data": result["data"],
        "uri": result.get("saved", ""),
        "top1": {
            row: {"clip": scores["clip_top1"], "video": scores["video_top1"]}
            for row, scores in result["results"].items()
        },
    }
