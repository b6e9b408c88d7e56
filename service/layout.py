"""Where things live in storage: the one place that names files and folders of a run.

A storage root holds run folders and the generated data sets:

    <root>/<run id>/                  one run (the run id is its name for Ray Train too)
        run.json                      the run record (service.catalog reads and writes it)
        checkpoint-%08d/              a checkpoint; the number is its step
            meta.json                 step, run id, world size, sampler, time, config, format
            train.pt                  rank 0: encoders, optimiser, schedule, replicas, ...
            actor.pt                  rank 0: the dictionary actor's state
            reader-%05d.json          every rank: its reader cursor
        checkpoint_manager_snapshot.json   Ray Train's registered checkpoints
        metrics/metrics.jsonl, metrics/tensorboard/
        eval/checkpoint-%08d.json     evaluations of checkpoints
    <root>/datasets/synth-<hash>/     generated data sets, made once and reused

docs/architecture.md describes what each file holds. Torch-free: the CLI imports it.
"""

from __future__ import annotations

import re
from typing import Any

from service import storage
from service.errors import CheckpointError

RUN_FILE = "run.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # written by Ray Train
CHECKPOINT_META = "meta.json"
TRAIN_FILE = "train.pt"
ACTOR_FILE = "actor.pt"
METRICS_FOLDER = "metrics"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_FOLDER = "tensorboard"
EVAL_FOLDER = "eval"
DATASETS_FOLDER = "datasets"

# Version of what a checkpoint folder holds. Checkpoints written before the version was
# recorded (no "format" in meta.json) have the same contents as version 1.
CHECKPOINT_FORMAT = 1

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d{8})$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def check_run_id(run_id: str) -> str:
    """A run id is a folder name and a Ray submission id: letters, digits, `_`, `.`, `-`.

    Raises ValueError with the rule; callers turn it into their own error.
    """
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(
            f"run id {run_id!r}: use 1 to 100 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return run_id


def run_uri(root: str, run_id: str) -> str:
    return storage.join(root, run_id)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder name, or None when `name` is not one."""
    match = _CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def check_checkpoint_format(meta: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint (its `meta.json`) of a format this code does not read."""
    found = int(meta.get("format", 1))  # no "format": written before it was recorded, same as 1
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{where} has checkpoint format {found}; this version of cmacc reads format {CHECKPOINT_FORMAT}"
        )


def reader_file(rank: int) -> str:
    return f"reader-{rank:05d}.json"


def metrics_uri(run: str) -> str:
    return storage.join(run, METRICS_FOLDER)


def eval_uri(run: str, step: int) -> str:
    return storage.join(run, EVAL_FOLDER, f"{checkpoint_name(step)}.json")


def datasets_uri(root: str) -> str:
    return storage.join(root, DATASETS_FOLDER)
