"""Where things live in storage: the one place that names files and folders of a run.

A storage root holds run folders and the generated data sets:

    <root>/<run id>/                  one run (the run id is its name for Ray Train too)
        run.json                      the run record (service.catalog reads and writes it)
        lease.json                    which job trains the run now (service.lease)
        crashes.json                  where dead workers were reading (workers.distributed.crashes)
        checkpoint-%08d/              a checkpoint; the number is its step
            meta.json                 step, run id, world size, sampler, time, config, format
            train.pt                  rank 0: encoders, optimiser, schedule, replicas, ...
            actor.pt                  rank 0: the dictionary actor's state
            reader-%05d.json          every rank: its reader cursor
            extra-reader-%05d.json    every rank: its fresh-pool reader cursor (method.pool = "fresh")
        checkpoint_manager_snapshot.json   Ray Train's registered checkpoints
        metrics/metrics.jsonl, metrics/tensorboard/
        eval/checkpoint-%08d.json     evaluations of checkpoints (-<data set> on another set),
        eval/...-<modality>-<probe>.png   their confusion matrices
        eval/finetune-checkpoint-%08d-<modality>.json   fine-tuning of a checkpoint
    <root>/datasets/synth-<hash>/     generated data sets, made once and reused

docs/architecture.md describes what each file holds. Torch-free: the CLI imports it.
"""

from __future__ import annotations

import re
from typing import Any

from service import storage
from service.errors import CheckpointError

RUN_FILE = "run.json"
LEASE_FILE = "lease.json"  # the live job's lease on the run (service.lease)
CRASHES_FILE = "crashes.json"  # the notes of workers that died (workers.distributed.crashes)
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # written by Ray Train
CHECKPOINT_META = "meta.json"
TRAIN_FILE = "train.pt"
ACTOR_FILE = "actor.pt"
METRICS_FOLDER = "metrics"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_FOLDER = "tensorboard"
EVAL_FOLDER = "eval"
DATASETS_FOLDER = "datasets"

# Version of what a checkpoint folder holds; meta.json records it ("format"). Format 1 (no
# "format" recorded) was written before the candidate-pool rule (a pool of 4M arrivals, P
# entering per step): its pools and its `random` sampler mean something else, so a run
# cannot continue from it. Format 2 stored the actor's state with numpy arrays, which load
# only by unpickling objects; format 3 stores tensors and plain values only, so every `.pt`
# file loads without running code. The encoders (`train.pt`) of every format are the same
# tensors and can still be evaluated.
CHECKPOINT_FORMAT = 3
EVALUABLE_FORMATS = (1, 2, 3)
_RESUME_HINTS = {
    1: " (format 1 predates the candidate-pool rule): start a new run id",
    2: " (format 2 stored the dictionary actor's state as pickled numpy arrays, which cmacc no longer"
    " unpickles): start a new run id",
}

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d{8})$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def check_run_id(run_id: str) -> str:
    """A run id is a folder name and a Ray submission id: letters, digits, `_`, `.`, `-`.

    Raises ValueError with the rule; callers turn it into their own error.
    """
    if not is_run_id(run_id):
        raise ValueError(
            f"run id {run_id!r}: use 1 to 100 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return run_id


def is_run_id(name: object) -> bool:
    return isinstance(name, str) and bool(_RUN_ID.fullmatch(name))  # fullmatch: no trailing newline


def run_uri(root: str, run_id: str) -> str:
    """The run's folder; ValueError for an id that is not a run id (`../x` never leaves the root)."""
    return storage.join(root, check_run_id(run_id))


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder name, or None when `name` is not one."""
    match = _CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def checkpoint_names_in(text: str) -> set[str]:
    """The checkpoint folder names a text mentions: how the run's snapshot (`SNAPSHOT_FILE`,
    Ray Train's) lists the checkpoints it registered."""
    return set(re.findall(r"checkpoint-\d{8}", text))


def checkpoint_format(meta: dict[str, Any]) -> int:
    return int(meta.get("format", 1))  # no "format": written before it was recorded


def check_checkpoint_format(meta: dict[str, Any], where: str, *, to: str = "resume") -> None:
    """Refuse a checkpoint (its `meta.json`) whose format this code cannot `to` "resume" (only
    the current format) or "evaluate" (any format with the same encoders)."""
    found = checkpoint_format(meta)
    readable = (CHECKPOINT_FORMAT,) if to == "resume" else EVALUABLE_FORMATS
    if found not in readable:
        known = ", ".join(str(f) for f in readable[:-1]) + (" or " if len(readable) > 1 else "") + str(readable[-1])
        hint = _RESUME_HINTS.get(found, "") if to == "resume" else ""
        raise CheckpointError(
            f"{where} has checkpoint format {found}; this version of cmacc can {to} format {known}{hint}"
        )


def reader_file(rank: int) -> str:
    return f"reader-{rank:05d}.json"


def extra_reader_file(rank: int) -> str:
    """The cursor of a rank's second reader stream (the fresh pool's extra clips)."""
    return f"extra-reader-{rank:05d}.json"


def metrics_uri(run: str) -> str:
    return storage.join(run, METRICS_FOLDER)


def eval_uri(run: str, step: int, *, data: str = "") -> str:
    """The evaluation of the checkpoint at `step`: on the run's own data set, or (`data`, a
    tag of another data set) on another."""
    return storage.join(run, EVAL_FOLDER, f"{checkpoint_name(step)}{'-' + data if data else ''}.json")


def finetune_uri(run: str, step: int, modality: str, *, data: str = "") -> str:
    """The fine-tuning of the checkpoint at `step`'s `modality` encoder (`data` as for
    `eval_uri`)."""
    return storage.join(
        run, EVAL_FOLDER, f"finetune-{checkpoint_name(step)}-{modality}{'-' + data if data else ''}.json"
    )


def datasets_uri(root: str) -> str:
    return storage.join(root, DATASETS_FOLDER)
