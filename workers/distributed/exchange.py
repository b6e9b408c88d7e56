"""Step 4 on a cluster: the dictionary exchange every Ray Train worker makes after its step
(docs/architecture.md, "A training step").

`ActorExchange.exchange` gathers the global batch's arrivals on every rank; rank 0 measures
what the batch met in the replicas (at log steps), sends the batch to the dictionary actor
without waiting and takes the deltas due at this step (`replicas.DeltaSchedule`); the deltas
are broadcast and every rank applies them to its replicas, so all replicas stay identical.

With `method.max_staleness` >= 1 the deltas due now are of batches at least one step older,
so rank 0 stages this batch (its copy to the host runs without waiting) and submits it at
the next step; at log steps, checkpoints and the end, or with `max_staleness = 0`, it
submits it now. Either way the actor sees every batch in step order, so the run does not
depend on when the copies finish.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import numpy as np
import torch

from service.config import Config
from service.errors import ActorError
from workers.actor import Delta
from workers.diagnostics import entry_metrics
from workers.dictionary import NegativeDictionary
from workers.distributed import collectives
from workers.distributed.replicas import DeltaSchedule, Replicas
from workers.enqueue import Arrivals, Exchanged
from workers.tensors import to_numpy


class HostCopy:
    """A step's global batch on its way to the host for the actor: on CUDA copied into pinned
    memory without waiting, with an event to wait on when it is submitted (by then, usually,
    long done); on the CPU the tensors themselves."""

    def __init__(self, step: int, tensors: dict[str, torch.Tensor]):
        self.step = step  # the step whose batch this is
        self.event = None
        self.tensors = dict(tensors)
        if any(t.is_cuda for t in tensors.values()):
            self.tensors = {}
            for name, tensor in tensors.items():
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                self.tensors[name] = host
            self.event = torch.cuda.Event()
            self.event.record()

    def arrays(self) -> dict[str, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return {name: to_numpy(tensor) for name, tensor in self.tensors.items()}


def gather_arrivals(arrivals: Arrivals) -> Arrivals:
    """The global batch: every rank's rows of every field, in rank order (all ranks)."""
    gathered = {
        f.name: collectives.gather_rows(getattr(arrivals, f.name)) for f in fields(arrivals) if f.name != "step"
    }
    return Arrivals(step=arrivals.step, **gathered)


class ActorExchange:
    """The dictionaries a rank's loss reads (its replicas) and the exchange with the actor.
    `schedule` exists on rank 0 only; `measure(batch, views)`, on rank 0, makes the
    statistics of a log step."""

    def __init__(
        self,
        *,
        cfg: Config,
        replicas: Replicas,
        schedule: DeltaSchedule | None,
        measure: Callable[..., dict[str, float]] | None = None,
    ):
        self.cfg = cfg
        self.replicas = replicas
        self.schedule = schedule
        self.measure = measure
        self.staged: HostCopy | None = None  # rank 0: the newest global batch, not submitted yet

    @property
    def dictionary_v(self) -> NegativeDictionary:
        return self.replicas.dictionary_v

    @property
    def dictionary_a(self) -> NegativeDictionary:
        return self.replicas.dictionary_a

    def flush_due(self, step: int) -> bool:
        """Is the batch of a step that leaves `step` steps taken submitted at once (a log step,
        a checkpoint, the end)?"""
        train, every = self.cfg.train, self.cfg.checkpoint.every_steps
        return step % train.log_every == 0 or step % every == 0 or step >= train.steps

    def exchange(self, arrivals: Arrivals, *, measure: bool = False) -> Exchanged:
        batch = gather_arrivals(arrivals)
        statistics = {}
        if measure and self.schedule is not None and self.measure is not None:  # before the replicas change
            statistics = self.measure(batch, self.replicas.views())
        taken = batch.step + 1  # steps taken after this one
        control: dict[str, Any] = {"deltas": [], "stop": False, "error": ""}
        digests: dict[int, float] = {}
        deltas = []
        if self.schedule is not None:
            try:
                digests.update(self.submit_staged())  # the previous step's batch
                self.staged = HostCopy(batch.step, self.host_tensors(batch))
                if self.flush_due(taken) or self.cfg.method.max_staleness == 0:
                    digests.update(self.submit_staged())
                deltas = self.schedule.due(taken, self.replicas, drain=taken >= self.cfg.train.steps)
            except ActorError as err:  # what the schedule could not recover from
                control["error"] = str(err)
            control["deltas"] = [delta.without_shadows() for delta in deltas]  # only rank 0 keeps shadows
            control["stop"] = any(delta.stop_requested for delta in deltas)
        control = collectives.broadcast_from_rank0(control)
        counts = {"arrived": 0.0, "entered_v": 0.0, "entered_a": 0.0}
        if control["error"]:
            return Exchanged(
                batch=batch,
                counts=counts,
                statistics=statistics,
                digests=digests,
                stop_requested=True,
                error=control["error"],
            )
        applied = deltas if self.schedule is not None else control["deltas"]
        for delta in applied:
            self.replicas.apply(delta)
        counts = {
            "arrived": float(batch.num_clips * len(applied)),
            "entered_v": float(sum(len(delta.entered_v.slots) for delta in applied)),
            "entered_a": float(sum(len(delta.entered_a.slots) for delta in applied)),
            **summed_counts(applied, "main", ("picked_v", "picked_a", "picked_from_batch_v", "picked_from_batch_a")),
        }
        shadow_counts = {name: summed_counts(applied, name) for name in self.cfg.shadow_samplers}
        shadow_counts = {name: c for name, c in shadow_counts.items() if c}  # rank 0 keeps the shadows
        if statistics:
            statistics.update(entry_metrics(counts))
            for name, member in shadow_counts.items():
                statistics.update(entry_metrics(member, f"shadow/{name}"))
        select_ms = [delta.select_ms for delta in applied]
        return Exchanged(
            batch=batch,
            counts=counts,
            shadow_counts=shadow_counts,
            statistics=statistics,
            select_ms=float(np.mean(select_ms)) if select_ms else float("nan"),
            deltas=applied,
            digests=digests,
            stop_requested=control["stop"],
        )

    @staticmethod
    def host_tensors(batch: Arrivals) -> dict[str, torch.Tensor]:
        return {f.name: getattr(batch, f.name) for f in fields(batch) if f.name != "step"}

    def submit_staged(self) -> dict[int, float]:
        """Rank 0: submit the staged batch to the actor; returns {its step's record: the batch's
        digest} (nothing when none is staged)."""
        if self.staged is None or self.schedule is None:
            return {}
        staged, self.staged = self.staged, None
        arrays = staged.arrays()
        self.schedule.submit(staged.step, arrays)
        # the global batch's clip ids, condensed: resumed and uninterrupted runs must agree
        return {staged.step + 1: float(zlib.crc32(arrays["clip_ids"].tobytes()))}

    def actor_state(self, digests: dict[int, float]) -> tuple[dict[str, Any] | None, str]:
        """The actor's state for a checkpoint (rank 0; None elsewhere), after the staged batch
        (a stop between flushes leaves one) is submitted, its digest added to `digests`; and,
        on every rank, the error that ends the run when the actor cannot give it ("" when it
        did)."""
        actor_state, error = None, ""
        if self.schedule is not None:
            try:
                digests.update(self.submit_staged())
                actor_state = self.schedule.actor_state(self.replicas)
            except ActorError as err:
                error = str(err)
        return actor_state, collectives.broadcast_from_rank0(error)

    def actor_metrics(self, exchanged: Exchanged) -> dict[str, float]:
        """Rank 0's view of the actor, every step: selection time, staleness, restarts."""
        if self.schedule is None:
            return {}
        return {
            "dict/select_ms": exchanged.select_ms,
            "dict/staleness": float(len(self.schedule.pending)),
            "dict/version": float(self.replicas.version),
            "dict/wait_s": self.schedule.wait_s,
            "dict/actor_restarts": float(self.schedule.actor_restarts),
        }


def summed_counts(deltas: list[Delta], member: str, names: tuple[str, ...] | None = None) -> dict[str, float]:
    """Step 4's counts of `member` ("main" or a shadow's sampler) summed over `deltas` (the
    names in `names`, or all it has; a delta without them adds nothing)."""
    out: dict[str, float] = {}
    for delta in deltas:
        for name, value in delta.counts.get(member, {}).items():
            if names is None or name in names:
                out[name] = out.get(name, 0.0) + value
    return out
