"""Evaluate a checkpoint (DESIGN.md section 7): frozen features of a labelled data set's
training and held-out splits, then the linear probe and k-NN per modality, for the
checkpoint's query encoders and for the same encoders at their random initialisation (the
run's step 0: `train.seed`), so every accuracy comes with its untrained baseline.

Clips are decoded once and every model sees the same batches, with the evaluation
transforms (centre crop, no jitter). Deterministic: same checkpoint and data, same numbers.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from service import config as config_module
from service import storage
from service.catalog import RUN_FILE
from service.config import Config
from workers.data.format import DataError
from workers.data.reader import ClipReader
from workers.distributed import META_FILE as CHECKPOINT_META
from workers.distributed import TRAIN_FILE, build_transforms
from workers.models import AudioVisualEncoder, build_encoders
from workers.probe import MODALITIES, evaluate_features, extract_features

PROBES = ("linear", "knn")
EVAL_BATCH = 64


def checkpoint_config(checkpoint_uri: str, *, endpoint_url: str = "") -> tuple[Config, dict[str, Any]]:
    """The run config of a checkpoint and its meta.json: from the meta itself, or else from the
    run.json of the run folder above it."""
    meta_uri = storage.join(checkpoint_uri, CHECKPOINT_META)
    if not storage.exists(meta_uri, endpoint_url=endpoint_url):
        raise DataError(f"{checkpoint_uri} is not a checkpoint (no {CHECKPOINT_META})")
    meta = json.loads(storage.read_bytes(meta_uri, endpoint_url=endpoint_url))
    raw = meta.get("config")
    if raw is None:
        run_json = storage.join(checkpoint_uri.rstrip("/").rsplit("/", 1)[0], RUN_FILE)
        if not storage.exists(run_json, endpoint_url=endpoint_url):
            raise DataError(f"{checkpoint_uri} carries no config and {run_json} does not exist")
        raw = json.loads(storage.read_bytes(run_json, endpoint_url=endpoint_url))["config"]
    return config_module.from_dict(raw), meta


def load_query_encoders(checkpoint_uri: str, cfg: Config, *, endpoint_url: str = "") -> AudioVisualEncoder:
    """The checkpoint's query encoders f_v, f_a (with heads), on the CPU."""
    uri = storage.join(checkpoint_uri, TRAIN_FILE)
    if not storage.exists(uri, endpoint_url=endpoint_url):
        raise DataError(f"{checkpoint_uri} holds no {TRAIN_FILE} (written by rank 0 of the run)")
    saved = torch.load(io.BytesIO(storage.read_bytes(uri, endpoint_url=endpoint_url)), weights_only=False)
    model = build_encoders(cfg.model)
    model.load_state_dict(saved["train"]["query"])
    return model


def untrained_encoders(cfg: Config) -> AudioVisualEncoder:
    """The run's query encoders at step 0: the same seed, the same initialisation."""
    torch.manual_seed(cfg.train.seed)
    return build_encoders(cfg.model)


def _batches(
    cfg: Config, data_uri: str, split: str, *, device: torch.device, endpoint_url: str
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches covering every clip of `split` exactly once."""
    reader = ClipReader(
        uri=data_uri,
        rank=0,
        world_size=1,
        seed=0,
        batch_size=EVAL_BATCH,
        frames=cfg.model.video.frames,
        seconds=cfg.data.clip_seconds,
        sample_rate=cfg.data.sample_rate,
        split=split,
        shuffle_buffer=1,
        num_decode_threads=cfg.data.num_decode_threads,
        endpoint_url=endpoint_url,
    )
    transforms = build_transforms(cfg, device=device, train=False)

    def generate() -> Iterator[dict[str, torch.Tensor]]:
        seen = torch.zeros(reader.manifest.num_clips, dtype=torch.bool)
        remaining = reader.num_clips
        with reader:
            while remaining > 0:  # the reader runs on into the next epoch: keep each clip once
                raw = next(reader)
                fresh = ~seen[raw["index"]]
                seen[raw["index"][fresh]] = True
                remaining -= int(fresh.sum())
                if not fresh.any():
                    continue
                with torch.no_grad():
                    yield {
                        "video": transforms.video(raw["frames"][fresh].to(device)),
                        "audio": transforms.audio(raw["audio"][fresh].to(device)),
                        "label": raw["label"][fresh],
                        "index": raw["index"][fresh],
                    }

    return generate()


def features_of(
    models: dict[str, AudioVisualEncoder],
    cfg: Config,
    data_uri: str,
    split: str,
    *,
    device: torch.device,
    endpoint_url: str = "",
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """{model name: extract_features output} over every clip of `split`, in clip order."""
    batches = _batches(cfg, data_uri, split, device=device, endpoint_url=endpoint_url)
    parts: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in models}
    order = []
    for batch in batches:
        order.append(batch["index"])
        for name, model in models.items():
            parts[name].append(extract_features(model, [batch], device=device))
        if progress is not None:
            progress(int(batch["index"].shape[0]))
    permutation = torch.argsort(torch.cat(order))
    return {
        name: {key: torch.cat([p[key] for p in chunks])[permutation] for key in (*MODALITIES, "label")}
        for name, chunks in parts.items()
    }


def evaluate_checkpoint(
    checkpoint_uri: str,
    *,
    data_uri: str,
    probes: tuple[str, ...] = PROBES,
    train_split: str = "train",
    test_split: str = "test",
    baseline: bool = True,
    device: str = "cpu",
    endpoint_url: str = "",
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Probe accuracies of a checkpoint's encoders (and of the untrained ones) on `data_uri`.

    Returns a JSON-ready dict: `checkpoint`, `step`, `data`, `splits` (clip counts),
    `num_classes`, `results[model][modality][probe]` (`top1`, `per_class`, `confusion`) with
    model in {"pretrained", "untrained"}, and `seconds`.
    """
    started = time.perf_counter()
    unknown = sorted(set(probes) - set(PROBES))
    if unknown:
        raise ValueError(f"probe {unknown[0]!r}: choose from {', '.join(PROBES)}")
    cfg, meta = checkpoint_config(checkpoint_uri, endpoint_url=endpoint_url)
    models = {"pretrained": load_query_encoders(checkpoint_uri, cfg, endpoint_url=endpoint_url)}
    if baseline:
        models["untrained"] = untrained_encoders(cfg)
    torch_device = torch.device(device)
    for model in models.values():
        model.to(torch_device)
    features = {}
    for split in (train_split, test_split):
        try:
            features[split] = features_of(
                models, cfg, data_uri, split, device=torch_device, endpoint_url=endpoint_url, progress=progress
            )
        except DataError as err:
            raise DataError(f"evaluation data {data_uri}, split {split!r}: {err}") from None
    labels = torch.cat([features[split]["pretrained"]["label"] for split in features])
    if (labels < 0).any():
        raise DataError(f"evaluation data {data_uri} has unlabelled clips; the probes need a label for every clip")
    num_classes = int(labels.max()) + 1
    results = {
        name: {
            modality: {probe: result.to_dict() for probe, result in per_probe.items()}
            for modality, per_probe in evaluate_features(
                features[train_split][name],
                features[test_split][name],
                num_classes=num_classes,
                cfg=cfg.eval,
                probes=probes,
            ).items()
        }
        for name in models
    }
    return {
        "checkpoint": checkpoint_uri,
        "step": int(meta.get("step", -1)),
        "run_id": meta.get("run_id", ""),
        "data": data_uri,
        "splits": {split: int(features[split]["pretrained"]["label"].shape[0]) for split in features},
        "num_classes": num_classes,
        "knn_k": cfg.eval.knn_k,
        "results": results,
        "seconds": round(time.perf_counter() - started, 2),
    }


def summary_rows(evaluation: dict[str, Any]) -> list[tuple[str, str, float | None, float]]:
    """(modality, probe, untrained top-1 or None, pretrained top-1) per row of the table."""
    rows = []
    results = evaluation["results"]
    for modality in MODALITIES:
        for probe, scores in results["pretrained"][modality].items():
            untrained = results.get("untrained", {}).get(modality, {}).get(probe)
            rows.append((modality, probe, untrained["top1"] if untrained else None, scores["top1"]))
    return rows


def format_table(evaluation: dict[str, Any]) -> str:
    """The accuracy table: one row per modality and probe, untrained next to pretrained."""
    names = {"linear": "linear", "knn": f"k-NN (k={evaluation.get('knn_k', '?')})"}
    splits = evaluation["splits"]
    lines = [
        f"top-1 on {splits.get('test', '?')} held-out clips ({evaluation['num_classes']} classes; "
        f"probes fit on {splits.get('train', '?')} clips), checkpoint step {evaluation['step']}:",
        f"  {'modality':<9}{'probe':<13}{'untrained':>10}{'pretrained':>12}{'change':>9}",
    ]
    for modality, probe, untrained, pretrained in summary_rows(evaluation):
        base = f"{untrained:.3f}" if untrained is not None else "-"
        change = f"{pretrained - untrained:+.3f}" if untrained is not None else ""
        lines.append(f"  {modality:<9}{names.get(probe, probe):<13}{base:>10}{pretrained:>12.3f}{change:>9}")
    return "\n".join(lines)
