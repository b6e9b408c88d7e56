"""The training loop's checkpointer (docs/architecture.md, "Checkpoints"): when a checkpoint
is due, what its folder holds, written and read.

Every rank writes its reader cursors (the training stream's and, with the fresh candidate
pool, the extra clips' stream); rank 0 also writes the encoders, optimiser, schedule, step,
replicas (with the shadows') and the pending delta schedule (`train.pt`), the actor's state
(`actor.pt`) and `meta.json` (step, run id, world size, sampler, time, config and the
checkpoint format). Each rank's part ends with its record of the files it wrote (size and
sha256, `service.integrity`), written last: a checkpoint whose files do not match the
records is known to be damaged before anything is unpickled. The `.pt` files hold tensors
and plain values only and load without unpickling objects (`workers.tensors.load_tensors`).
Randomness needs no saved state: the transforms are seeded per (seed, rank, step), the
actor's sampler state is part of its state, and the reader is a function of (seed, epoch,
rank) plus its cursor. File names come from `service.layout`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from service import integrity, layout
from service.config import Config
from service.errors import CheckpointError
from workers.data.reader import ClipReader
from workers.distributed.replicas import DeltaSchedule, Replicas
from workers.tensors import load_tensors, to_numpy_deep, to_plain
from workers.training import TrainState


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (state dicts without the `module.` prefix)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


class Checkpointer:
    """When a checkpoint is due (every `checkpoint.every_steps`, at the end and on a stop), and
    writing one."""

    def __init__(self, cfg: Config, *, run_id: str):
        self.cfg, self.run_id = cfg, run_id

    def due(self, step: int, *, at_end: bool) -> bool:
        """After `step` steps: write a checkpoint now?"""
        return at_end or step % self.cfg.checkpoint.every_steps == 0

    def save(self, **parts: Any) -> None:
        """`save_checkpoint` with this run's config and id."""
        save_checkpoint(cfg=self.cfg, run_id=self.run_id, **parts)


def save_checkpoint(
    *,
    cfg: Config,
    run_id: str,
    state: TrainState,
    reader: ClipReader,
    replicas: Replicas,
    schedule: DeltaSchedule | None,
    actor_state: dict[str, Any] | None,
    metrics: dict[str, float],
    extra_reader: ClipReader | None = None,
    nodes: list[str] | None = None,
) -> None:
    """Write this rank's part of a checkpoint to a fresh folder and report it to Ray Train,
    which uploads it in the background. `schedule` and the actor's state (fetched before,
    so that a failing actor ends the run on every rank) are given on rank 0 only."""
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    folder = tempfile.mkdtemp(prefix="cmacc-ckpt-")
    with open(os.path.join(folder, layout.reader_file(rank)), "w") as f:
        json.dump(reader.state_dict(), f)
    if extra_reader is not None:
        with open(os.path.join(folder, layout.extra_reader_file(rank)), "w") as f:
            json.dump(extra_reader.state_dict(), f)
    if schedule is not None and actor_state is not None:  # rank 0 writes the shared state
        torch.save(to_plain(actor_state), os.path.join(folder, layout.ACTOR_FILE))
        train_state = {**state.state_dict(), "query": unwrap(state.query).state_dict()}  # no DDP prefix
        torch.save(
            {
                "train": train_state,
                "replicas": replicas.state_dict(),
                "pending_steps": schedule.pending_steps(),
            },
            os.path.join(folder, layout.TRAIN_FILE),
        )
        meta = {
            "step": state.step,
            "run_id": run_id,
            "world_size": context.get_world_size(),
            "nodes": nodes or [],  # each rank's node ("id (ip)"): what a resize lost or gained
            "sampler": cfg.method.sampler,
            "time": time.time(),
            "format": layout.CHECKPOINT_FORMAT,
            "config": cfg.to_dict(),  # makes the checkpoint self-describing for `cmacc eval`
        }
        with open(os.path.join(folder, layout.CHECKPOINT_META), "w") as f:
            json.dump(meta, f)
    integrity.write_record(folder, rank)  # last: a part without its record is known to be incomplete
    ray.train.report(
        {"step": state.step, **metrics},
        checkpoint=ray.train.Checkpoint.from_directory(folder),
        checkpoint_dir_name=layout.checkpoint_name(state.step),
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
    )


@dataclass(kw_only=True)
class Restored:
    """A checkpoint's contents, as a resumed run reads them."""

    meta: dict[str, Any]
    train: dict[str, Any]
    replicas: dict[str, Any]
    pending_steps: list[int]
    actor: dict[str, Any]
    readers: list[dict[str, Any]]
    extra_readers: list[dict[str, Any]]  # the fresh pool's stream; [] without one


def load_checkpoint(checkpoint: Any) -> Restored:
    """Download a Ray Train checkpoint into a folder of this process's own and read it.

    A private folder, not `as_directory()`: ranks on one node would otherwise share a
    download folder, and one rank can read a file another is still writing. The files are
    checked against the checkpoint's records first (`service.integrity`): a damaged one is a
    CheckpointError naming the file, before anything is unpickled; only recorded reader
    cursors are read (a folder rewritten by a later attempt may hold stale ones).
    """
    folder = tempfile.mkdtemp(prefix="cmacc-restore-")
    where = str(checkpoint.path).rstrip("/")
    try:
        checkpoint.to_directory(folder)
        verdict = integrity.verify_local(folder, where)
        if not verdict.intact:
            raise CheckpointError(f"checkpoint {where} is damaged: {verdict.problem}")
        meta = verdict.meta
        layout.check_checkpoint_format(meta, where)
        saved = load_tensors(os.path.join(folder, layout.TRAIN_FILE), where=f"{where}/{layout.TRAIN_FILE}")
        actor = load_tensors(os.path.join(folder, layout.ACTOR_FILE), where=f"{where}/{layout.ACTOR_FILE}")
        readers, extra_readers = [], []
        names = verdict.files if verdict.recorded else sorted(os.listdir(folder))
        for name in names:
            if name.startswith(("reader-", "extra-reader-")):
                with open(os.path.join(folder, name)) as f:
                    (readers if name.startswith("reader-") else extra_readers).append(json.load(f))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return Restored(
        meta=meta,
        train=saved["train"],
        replicas=saved["replicas"],
        pending_steps=saved["pending_steps"],
        actor=to_numpy_deep(actor),  # the actor's state travels as numpy (zero-copy through Ray)
        readers=readers,
        extra_readers=extra_readers,
    )
