"""Evaluate a checkpoint (docs/architecture.md, "Evaluation"): frozen features of a labelled
data set's training and held-out splits, then the linear probe and k-NN per modality, for the
checkpoint's query encoders and for the same encoders at their random initialisation (the
run's step 0: `train.seed`), so every accuracy comes with its untrained baseline.

`evaluate` serves `cmacc eval` and `python -m jobs.evaluate` (in this process, with a
progress bar); `evaluate_remote` runs `evaluate_checkpoint` as a Ray task after training.

Clips are decoded once and every model sees the same batches, with the evaluation
transforms (centre crop, no jitter). Deterministic: same checkpoint and data, same numbers.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from service import catalog, layout, storage
from service import config as config_module
from service.config import Config
from service.errors import CheckpointError, DataError, UsageError
from service.requests import PROBES, EvaluateRequest
from workers.data.reader import ClipReader
from workers.data.transforms import build_transforms
from workers.models import AudioVisualEncoder, build_encoders
from workers.probe import MODALITIES, evaluate_features, extract_features
from workers.tensors import load_tensors

EVAL_BATCH = 64


def resolve(request: EvaluateRequest, *, endpoint_url: str = "") -> tuple[str, str]:
    """(checkpoint URI, data URI) of a request: `--run` picks the run's newest checkpoint and,
    without `--data`, the data set the run trained on."""
    if (request.checkpoint is None) == (request.run_id is None):
        raise UsageError("give exactly one of --checkpoint URI and --run ID")
    checkpoint, data = request.checkpoint, request.data
    if request.run_id is not None:
        root = request.storage or Config().storage.root
        newest = catalog.newest_checkpoint_of(root, request.run_id, endpoint_url=endpoint_url)
        checkpoint = newest.uri
        data = data or catalog.require_run(root, request.run_id, endpoint_url=endpoint_url).info.get("data")
    if not data:
        raise UsageError("--data URI is required with --checkpoint (the labelled data set to probe on)")
    return checkpoint, data


def evaluate(request: EvaluateRequest, *, endpoint_url: str = "", show_progress: bool = True) -> dict[str, Any]:
    """Evaluate a request in this process, with a progress bar on a terminal."""
    from tqdm import tqdm

    checkpoint, data = resolve(request, endpoint_url=endpoint_url)
    with tqdm(unit="clip", desc="features", file=sys.stderr, disable=None if show_progress else True) as bar:
        return evaluate_checkpoint(
            checkpoint,
            data_uri=data,
            probes=request.probes,
            device=request.device,
            endpoint_url=endpoint_url,
            progress=bar.update,
        )


def evaluate_remote(cfg: Config, *, checkpoint: str, data: str) -> dict[str, Any]:
    """Evaluate as a Ray task with one worker's resources (its GPU when the run uses GPUs)."""
    import ray

    use_gpu = cfg.resources.use_gpu
    task = ray.remote(evaluate_checkpoint).options(
        num_cpus=cfg.resources.cpus_per_worker, num_gpus=cfg.resources.gpus_per_worker if use_gpu else 0
    )
    return ray.get(
        task.remote(
            checkpoint,
            data_uri=data,
            device="cuda" if use_gpu else "cpu",
            endpoint_url=cfg.storage.endpoint_url,
        )
    )


def save_evaluation(run_uri: str, evaluation: dict[str, Any], *, endpoint_url: str = "") -> str:
    """Store it as `<run>/eval/checkpoint-%08d.json`; returns the URI."""
    uri = layout.eval_uri(run_uri, evaluation["step"])
    storage.write_bytes(uri, json.dumps(evaluation, indent=2).encode(), endpoint_url=endpoint_url)
    return uri


def checkpoint_config(checkpoint_uri: str, *, endpoint_url: str = "") -> tuple[Config, dict[str, Any]]:
    """The run config of a checkpoint and its meta.json: from the meta itself, or else from the
    run.json of the run folder above it."""
    meta_uri = storage.join(checkpoint_uri, layout.CHECKPOINT_META)
    if not storage.exists(meta_uri, endpoint_url=endpoint_url):
        raise CheckpointError(f"{checkpoint_uri} is not a checkpoint (no {layout.CHECKPOINT_META})")
    catalog.check_registered(checkpoint_uri, endpoint_url=endpoint_url)
    meta = json.loads(storage.read_bytes(meta_uri, endpoint_url=endpoint_url))
    layout.check_checkpoint_format(meta, checkpoint_uri, to="evaluate")
    raw = meta.get("config")
    if raw is None:
        run_json = storage.join(checkpoint_uri.rstrip("/").rsplit("/", 1)[0], layout.RUN_FILE)
        if not storage.exists(run_json, endpoint_url=endpoint_url):
            raise CheckpointError(f"{checkpoint_uri} carries no config and {run_json} does not exist")
        raw = json.loads(storage.read_bytes(run_json, endpoint_url=endpoint_url))["config"]
    try:
        return config_module.from_dict(raw), meta
    except config_module.ConfigError as err:
        raise CheckpointError(f"{checkpoint_uri}: its config is not valid here: {err}") from None


def load_query_encoders(checkpoint_uri: str, cfg: Config, *, endpoint_url: str = "") -> AudioVisualEncoder:
    """The checkpoint's query encoders f_v, f_a (with heads), on the CPU."""
    uri = storage.join(checkpoint_uri, layout.TRAIN_FILE)
    if not storage.exists(uri, endpoint_url=endpoint_url):
        raise CheckpointError(f"{checkpoint_uri} holds no {layout.TRAIN_FILE} (written by rank 0 of the run)")
    saved = load_tensors(storage.read_bytes(uri, endpoint_url=endpoint_url), where=uri)
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
        raise UsageError(f"probe {unknown[0]!r}: choose from {', '.join(PROBES)}")
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
