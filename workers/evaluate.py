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

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from service import catalog, integrity, layout, storage
from service import config as config_module
from service.config import Config
from service.errors import CheckpointError, DataError, UsageError
from service.requests import PROBES, EvaluateRequest
from workers import ray_init
from workers.data.reader import ClipReader, first_seen
from workers.data.transforms import build_transforms
from workers.models import AudioVisualEncoder, build_encoders
from workers.probe import MODALITIES, combine, evaluate_features, extract_features
from workers.protocols import choose as choose_protocol
from workers.protocols import read_clip_table
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
    """Evaluate a request in this process, with a progress bar on a terminal; with
    `request.on_ray` (inside a Ray job), as a Ray task on that cluster (a GPU when it has
    one)."""
    from tqdm import tqdm

    checkpoint, data = resolve(request, endpoint_url=endpoint_url)
    settings = {
        "data_uri": data,
        "probes": request.probes,
        "protocol": request.protocol,
        "test_fraction": request.test_fraction,
        "seed": request.seed,
        "endpoint_url": endpoint_url,
        "check_data": not request.skip_data_check,
    }
    if request.on_ray:
        evaluation = _evaluate_on_cluster(checkpoint, settings)
    else:
        with tqdm(unit="clip", desc="features", file=sys.stderr, disable=None if show_progress else True) as bar:
            evaluation = evaluate_checkpoint(checkpoint, device=request.device, progress=bar.update, **settings)
    evaluation["saved"] = save_beside_checkpoint(evaluation, endpoint_url=endpoint_url)
    return evaluation


def _evaluate_on_cluster(checkpoint: str, settings: dict[str, Any]) -> dict[str, Any]:
    checkpoint_config(checkpoint, endpoint_url=settings["endpoint_url"])  # readable and registered, before Ray
    if settings["check_data"]:  # and the data set's shards, before Ray too
        check_evaluation_data(settings["data_uri"], endpoint_url=settings["endpoint_url"])
    settings = {**settings, "check_data": False}
    print(f"cmacc eval: evaluating {checkpoint} as a Ray task", file=sys.stderr, flush=True)
    return ray_init.run_task(evaluate_checkpoint, checkpoint, **settings)


def check_evaluation_data(data_uri: str, *, endpoint_url: str = "") -> None:
    """`cmacc data inspect`'s check of the data set to probe on (`workers.data.inspect.check`):
    a DataError naming the first damaged shard, before any feature is computed."""
    from workers.data.inspect import check

    try:
        check(data_uri, endpoint_url=endpoint_url)
    except DataError as err:
        raise DataError(f"evaluation data {data_uri}: {err}") from None


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
    """Store it as `<run>/eval/checkpoint-%08d[-<data set>].json` (the suffix when the data
    set is not the one the run trained on), with a confusion-matrix PNG per modality and
    probe of the pretrained encoders beside it (`...-<modality>-<probe>.png`); returns the
    JSON's URI."""
    uri = layout.eval_uri(run_uri, evaluation["step"], data=data_tag(run_uri, evaluation, endpoint_url))
    stem = uri.removesuffix(".json")
    for modality, per_probe in evaluation["results"]["pretrained"].items():
        for probe, result in per_probe.items():
            title = (
                f"{evaluation.get('run_id') or 'checkpoint'} step {evaluation['step']}: {modality}, {probe} probe, "
                f"{evaluation['protocol']['name']}; top-1 {result['top1']:.3f}"
            )
            png = confusion_png(result["confusion"], evaluation["class_names"], title)
            storage.write_bytes(f"{stem}-{modality}-{probe}.png", png, endpoint_url=endpoint_url)
    storage.write_bytes(uri, json.dumps(evaluation, indent=2).encode(), endpoint_url=endpoint_url)
    return uri


def data_tag(run_uri: str, evaluation: dict[str, Any], endpoint_url: str) -> str:
    """ "" for the data set the run trained on (or when unknown), else a short tag of the other."""
    record = storage.join(run_uri, layout.RUN_FILE)
    trained_on = ""
    if storage.exists(record, endpoint_url=endpoint_url):
        trained_on = json.loads(storage.read_bytes(record, endpoint_url=endpoint_url)).get("data", "")
    data = evaluation["data"]
    if not trained_on or storage.absolute(data).rstrip("/") == storage.absolute(trained_on).rstrip("/"):
        return ""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", data.rstrip("/").rsplit("/", 1)[-1])[:40]
    return f"{name}-{hashlib.sha256(data.encode()).hexdigest()[:8]}"


def run_folder_of(checkpoint_uri: str, *, endpoint_url: str = "") -> str:
    """The run folder a checkpoint lies in (the folder above it holds a run.json), or ""."""
    parent, sep, _ = checkpoint_uri.rstrip("/").rpartition("/")
    if not sep or not storage.exists(storage.join(parent, layout.RUN_FILE), endpoint_url=endpoint_url):
        return ""
    return parent


def save_beside_checkpoint(evaluation: dict[str, Any], *, endpoint_url: str = "") -> str:
    """`cmacc eval`: save the evaluation in the `eval/` folder of the run the checkpoint
    belongs to; "" for a checkpoint outside a run folder, or when the run folder cannot be
    written (the result is printed either way)."""
    run_uri = ""
    try:
        run_uri = run_folder_of(evaluation["checkpoint"], endpoint_url=endpoint_url)
        return save_evaluation(run_uri, evaluation, endpoint_url=endpoint_url) if run_uri else ""
    except OSError as err:
        print(f"cmacc: warning: could not save the evaluation in {run_uri}: {err}", file=sys.stderr)
        return ""


def confusion_png(confusion: list[list[int]], class_names: list[str], title: str) -> bytes:
    """The confusion matrix as a PNG: rows true class, columns predicted, each row shaded by
    its share of the row (so classes of any size compare), counts written in the cells."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(confusion, dtype=np.int64)
    n = counts.shape[0]
    names = [str(name) for name in class_names][:n] + [str(c) for c in range(len(class_names), n)]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    if n <= 30:
        for t in range(n):
            for p in range(n):
                if counts[t, p]:
                    colour = "white" if shares[t, p] > 0.5 else "black"
                    ax.text(p, t, str(counts[t, p]), ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def checkpoint_config(checkpoint_uri: str, *, endpoint_url: str = "") -> tuple[Config, dict[str, Any]]:
    """The run config of a checkpoint and its meta.json: from the meta itself, or else from the
    run.json of the run folder above it. The checkpoint's files are checked against its
    records first (`service.integrity`, nothing unpickled): a damaged checkpoint is a
    CheckpointError naming the file and the newest intact checkpoint of the same run."""
    meta_uri = storage.join(checkpoint_uri, layout.CHECKPOINT_META)
    if not storage.exists(meta_uri, endpoint_url=endpoint_url):
        raise CheckpointError(f"{checkpoint_uri} is not a checkpoint (no {layout.CHECKPOINT_META})")
    catalog.check_registered(checkpoint_uri, endpoint_url=endpoint_url)
    verdict = integrity.verify(checkpoint_uri, endpoint_url=endpoint_url)
    if not verdict.intact:
        parent = checkpoint_uri.rstrip("/").rsplit("/", 1)[0] if "/" in checkpoint_uri.rstrip("/") else ""
        intact, _ = integrity.newest_intact(parent, endpoint_url=endpoint_url) if parent else (None, [])
        raise CheckpointError(integrity.damaged_error_text(verdict, intact=intact.uri if intact else None))
    if verdict.note():
        print(f"cmacc: note: {verdict.note()}", file=sys.stderr, flush=True)
    meta = verdict.meta
    layout.check_checkpoint_format(meta, checkpoint_uri, to="evaluate")
    raw = meta.get("config")
    if raw is None:
        run_json = storage.join(checkpoint_uri.rstrip("/").rsplit("/", 1)[0], layout.RUN_FILE)
        if not storage.exists(run_json, endpoint_url=endpoint_url):
            raise CheckpointError(f"{checkpoint_uri} carries no config and {run_json} does not exist")
        try:
            raw = json.loads(storage.read_bytes(run_json, endpoint_url=endpoint_url))["config"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{run_json} is not a run record with a config") from None
    try:
        return config_module.from_dict(raw), meta
    except (config_module.ConfigError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{meta_uri}: its config is not valid here: {err}") from None


def load_query_encoders(checkpoint_uri: str, cfg: Config, *, endpoint_url: str = "") -> AudioVisualEncoder:
    """The checkpoint's query encoders f_v, f_a (with heads), on the CPU."""
    uri = storage.join(checkpoint_uri, layout.TRAIN_FILE)
    if not storage.exists(uri, endpoint_url=endpoint_url):
        raise CheckpointError(f"{checkpoint_uri} holds no {layout.TRAIN_FILE} (written by rank 0 of the run)")
    saved = load_tensors(storage.read_bytes(uri, endpoint_url=endpoint_url), where=uri)
    model = build_encoders(cfg.model)
    try:
        model.load_state_dict(saved["train"]["query"])
    except (KeyError, TypeError, RuntimeError) as err:  # a recorded file of another shape (an old copy, say)
        what = f"no {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise CheckpointError(f"{uri} does not hold the query encoders of its config: {what}") from None
    return model


def untrained_encoders(cfg: Config) -> AudioVisualEncoder:
    """The run's query encoders at step 0: the same seed, the same initialisation."""
    torch.manual_seed(cfg.train.seed)
    return build_encoders(cfg.model)


def _batches(
    cfg: Config, data_uri: str, clips: Any, *, device: torch.device, endpoint_url: str
) -> Iterator[dict[str, Any]]:
    """Batches covering each of `clips` (clip indices) once; a clip that cannot be decoded is
    skipped (the reader counts and names it). `video` or `audio` is None when the set lacks
    that modality."""
    reader = ClipReader(
        uri=data_uri,
        rank=0,
        world_size=1,
        seed=0,
        batch_size=EVAL_BATCH,
        frames=cfg.model.video.frames,
        seconds=cfg.data.clip_seconds,
        sample_rate=cfg.data.sample_rate,
        shuffle_buffer=1,
        num_decode_threads=cfg.data.num_decode_threads,
        endpoint_url=endpoint_url,
        clips=clips,
    )
    transforms = build_transforms(cfg, device=device, train=False)

    def generate() -> Iterator[dict[str, Any]]:
        seen = torch.zeros(reader.manifest.num_clips, dtype=torch.bool)
        remaining = reader.num_clips
        with reader:
            # Until every clip was seen, or the reader went on into a second epoch (the clips
            # still missing were skipped: they cannot be decoded).
            while remaining > 0 and reader.epoch == 0:
                raw = next(reader)
                fresh = first_seen(raw["index"], seen)
                remaining -= len(fresh)
                if not len(fresh):
                    continue
                with torch.no_grad():
                    yield {
                        "video": None if raw["frames"] is None else transforms.video(raw["frames"][fresh].to(device)),
                        "audio": None if raw["audio"] is None else transforms.audio(raw["audio"][fresh].to(device)),
                        "label": raw["label"][fresh],
                        "index": raw["index"][fresh],
                    }

    return generate()


def features_of(
    models: dict[str, AudioVisualEncoder],
    cfg: Config,
    data_uri: str,
    clips: Any,
    *,
    device: torch.device,
    endpoint_url: str = "",
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """{model name: extract_features output plus `index`} over the clips of `clips` that
    decode, in clip-index order."""
    batches = _batches(cfg, data_uri, clips, device=device, endpoint_url=endpoint_url)
    parts: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in models}
    order = []
    for batch in batches:
        order.append(batch["index"])
        for name, model in models.items():
            parts[name].append(extract_features(model, [batch], device=device))
        if progress is not None:
            progress(int(batch["index"].shape[0]))
    if not order:
        raise DataError("none of its clips could be decoded; see the warnings for the reasons")
    index = torch.cat(order)
    permutation = torch.argsort(index)
    return {
        name: {
            "index": index[permutation],
            **{key: torch.cat([p[key] for p in chunks])[permutation] for key in chunks[0]},
        }
        for name, chunks in parts.items()
    }


def evaluate_checkpoint(
    checkpoint_uri: str,
    *,
    data_uri: str,
    probes: tuple[str, ...] = PROBES,
    protocol: str = "auto",
    test_fraction: float = 0.3,
    seed: int = 0,
    baseline: bool = True,
    device: str = "cpu",
    endpoint_url: str = "",
    progress: Callable[[int], None] | None = None,
    check_data: bool = True,
) -> dict[str, Any]:
    """Probe accuracies of a checkpoint's encoders (and of the untrained ones) on `data_uri`,
    under the set's evaluation protocol (`workers.protocols`), for each modality the set has.
    The checkpoint is checked first, then (`check_data`) the data set's shards.

    Returns a JSON-ready dict: `checkpoint`, `step`, `data`, `protocol` (name, description,
    folds), `splits` (clip counts), `num_classes`, `class_names`, `modalities`,
    `results[model][modality][probe]` (`top1`, `top5` with more than 5 classes, `per_class`,
    `support`, `confusion`; over folds also `top1_std` and each fold's figures) with model in
    {"pretrained", "untrained"}, and `seconds`.
    """
    started = time.perf_counter()
    unknown = sorted(set(probes) - set(PROBES))
    if unknown:
        raise UsageError(f"probe {unknown[0]!r}: choose from {', '.join(PROBES)}")
    cfg, meta = checkpoint_config(checkpoint_uri, endpoint_url=endpoint_url)  # the checkpoint first
    if check_data:
        check_evaluation_data(data_uri, endpoint_url=endpoint_url)
    try:
        table = read_clip_table(data_uri, endpoint_url=endpoint_url)
        chosen = choose_protocol(table, protocol, test_fraction=test_fraction, seed=seed)
    except DataError as err:
        raise DataError(f"evaluation data {data_uri}: {err}") from None
    if any(len(fold.train) == 0 or len(fold.test) == 0 for fold in chosen.folds):
        raise DataError(f"evaluation data {data_uri}: {chosen.description}: a side of the split is empty")
    models = {"pretrained": load_query_encoders(checkpoint_uri, cfg, endpoint_url=endpoint_url)}
    if baseline:
        models["untrained"] = untrained_encoders(cfg)
    torch_device = torch.device(device)
    for model in models.values():
        model.to(torch_device)
    needed = np.unique(np.concatenate([np.concatenate([fold.train, fold.test]) for fold in chosen.folds]))
    try:
        features = features_of(
            models, cfg, data_uri, needed, device=torch_device, endpoint_url=endpoint_url, progress=progress
        )
    except DataError as err:
        raise DataError(f"evaluation data {data_uri}: {err}") from None
    decoded = next(iter(features.values()))["index"]  # the same clips for every model
    row_of = torch.full((len(table),), -1, dtype=torch.int64)
    row_of[decoded] = torch.arange(len(decoded))

    def rows(clips: np.ndarray) -> torch.Tensor:  # feature rows of the clips that decoded
        found = row_of[torch.as_tensor(clips)]
        return found[found >= 0]

    fold_rows = [(rows(fold.train), rows(fold.test)) for fold in chosen.folds]
    labelled = table.label[table.label >= 0]
    num_classes = max(len(table.label_names), int(labelled.max()) + 1)
    fold_names = [fold.name for fold in chosen.folds]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name, feats in features.items():
        feats.pop("index")
        per_fold = [
            evaluate_features(
                {key: value[train] for key, value in feats.items()},
                {key: value[test] for key, value in feats.items()},
                num_classes=num_classes,
                cfg=cfg.eval,
                probes=probes,
            )
            for train, test in fold_rows
        ]
        results[name] = {
            modality: {probe: combine([f[modality][probe] for f in per_fold], fold_names) for probe in per_probe}
            for modality, per_probe in per_fold[0].items()
        }
    return {
        "checkpoint": checkpoint_uri,
        "step": int(meta.get("step", -1)),
        "run_id": meta.get("run_id", ""),
        "data": data_uri,
        "protocol": chosen.to_dict(),
        "splits": (
            {"train": len(fold_rows[0][0]), "test": len(fold_rows[0][1])}
            if len(fold_rows) == 1
            else {name: len(test) for name, (_, test) in zip(fold_names, fold_rows, strict=True)}
        ),
        "skipped_clips": len(needed) - len(decoded),
        "num_classes": num_classes,
        "class_names": table.label_names or [str(c) for c in range(num_classes)],
        "modalities": [m for m in MODALITIES if m in next(iter(features.values()))],
        "knn_k": cfg.eval.knn_k,
        "results": results,
        "seconds": round(time.perf_counter() - started, 2),
    }
