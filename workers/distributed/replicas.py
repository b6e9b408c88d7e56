"""Every rank's replicas of D_v and D_a, and rank 0's schedule of the actor's deltas.

Replicas follow the actor on a fixed schedule: before step s every rank applies the deltas
of the batches of steps <= s - 1 - `method.max_staleness`. Rank 0 fetches them (waiting only
when the actor has not finished one: staleness is bounded, never silent) and broadcasts
them, so all ranks apply the same deltas at the same step and the replicas stay identical.
The fixed schedule also makes a run independent of timing: a resumed run equals an
uninterrupted one. With `max_staleness = 0` the replicas see every selection before the
next step, exactly as the single-process trainer does.

When Ray restarts a dead actor (blank state), rank 0 re-seeds it from its replica and drops
the selections the actor lost; training does not stop. An actor that keeps failing (more than
`resources.max_actor_restarts` times, or dead for good) raises `ActorError`, which fails the
run: training on without dictionary updates would be a different method.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.config import Config
from service.errors import ActorError, ActorRestarted
from workers.actor import ENTERED_PARTS, RESTART_WAIT_S, ActorStatus, Delta, DictionaryClient, Entered, PendingDelta
from workers.dictionary import NegativeDictionary
from workers.enqueue import build_dictionaries
from workers.tensors import to_numpy, to_torch

logger = logging.getLogger("cmacc")
MAX_RECOVERIES_PER_CALL = 3


def apply_entered(dictionary: NegativeDictionary, entered: Entered) -> None:
    """Write what entered a dictionary in the actor into this replica of it."""
    if len(entered.slots) == 0:
        return
    device = dictionary.keys.device
    index = to_torch(entered.slots, device, torch.long)
    dictionary.keys[index] = to_torch(entered.keys, device, dictionary.keys.dtype)
    for name in ENTERED_PARTS[2:]:
        getattr(dictionary, name)[index] = to_torch(getattr(entered, name), device, torch.long)
    dictionary.pointer = (int(entered.slots[-1]) + 1) % dictionary.size


@dataclass(kw_only=True)
class Replicas:
    """This rank's copies of D_v and D_a and the version they are at; on rank 0 also the
    shadows' (by sampler name), which only rank 0 measures."""

    dictionary_v: NegativeDictionary
    dictionary_a: NegativeDictionary
    version: int = 0
    shadows: dict[str, Replicas] = field(default_factory=dict)

    def dictionary(self, modality: str) -> NegativeDictionary:
        return self.dictionary_v if modality == "v" else self.dictionary_a

    def apply(self, delta: Delta) -> None:
        apply_entered(self.dictionary_v, delta.entered_v)
        apply_entered(self.dictionary_a, delta.entered_a)
        for name, (entered_v, entered_a) in delta.shadows.items():
            if name in self.shadows:
                apply_entered(self.shadows[name].dictionary_v, entered_v)
                apply_entered(self.shadows[name].dictionary_a, entered_a)
        self.version = delta.version

    def views(self) -> dict[str, tuple[NegativeDictionary, NegativeDictionary]]:
        """(D_v, D_a) by metric prefix: "dict" for the run's, "shadow/<sampler>" for each shadow."""
        out = {"dict": (self.dictionary_v, self.dictionary_a)}
        out.update({f"shadow/{name}": (r.dictionary_v, r.dictionary_a) for name, r in self.shadows.items()})
        return out

    def clone(self) -> Replicas:
        return Replicas(
            dictionary_v=_clone_dictionary(self.dictionary_v),
            dictionary_a=_clone_dictionary(self.dictionary_a),
            version=self.version,
            shadows={name: r.clone() for name, r in self.shadows.items()},
        )

    def members(self) -> dict[str, dict[str, Any]]:
        """The dictionaries as the actor re-seeds from them ("main" and each shadow)."""
        members = {"main": self}
        members.update(self.shadows)
        return {
            name: {f"dictionary_{m}": to_numpy(r.dictionary(m).state_dict()) for m in "va"}
            for name, r in members.items()
        }

    def state_dict(self) -> dict[str, Any]:
        state = {
            "dictionary_v": self.dictionary_v.state_dict(),
            "dictionary_a": self.dictionary_a.state_dict(),
            "version": self.version,
        }
        if self.shadows:
            state["shadows"] = {name: r.state_dict() for name, r in self.shadows.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dictionary_v.load_state_dict(state["dictionary_v"])
        self.dictionary_a.load_state_dict(state["dictionary_a"])
        self.version = int(state["version"])
        for name, shadow in self.shadows.items():
            saved = (state.get("shadows") or {}).get(name)
            if saved is not None:  # a run that gains a shadow on resume starts it from the initial keys
                shadow.load_state_dict(saved)

    def checksum(self) -> float:
        return float(self.dictionary_v.keys.double().sum() + 3 * self.dictionary_a.keys.double().sum())


def build_replicas(cfg: Config, *, device: torch.device, with_shadows: bool = False) -> Replicas:
    """Replicas initialised exactly as the actor initialises its dictionaries; with
    `with_shadows` (rank 0) also one per shadow sampler."""

    def build(sampler: str | None) -> Replicas:
        dictionaries = build_dictionaries(cfg, device=device, sampler=sampler)
        return Replicas(dictionary_v=dictionaries.dictionary_v, dictionary_a=dictionaries.dictionary_a)

    replicas = build(None)
    if with_shadows:
        replicas.shadows = {name: build(name) for name in cfg.shadow_samplers}
    return replicas


def _clone_dictionary(dictionary: NegativeDictionary) -> NegativeDictionary:
    clone = NegativeDictionary(size=dictionary.size, dim=dictionary.dim, device=dictionary.keys.device)
    clone.load_state_dict(dictionary.state_dict())
    return clone


@dataclass(kw_only=True)
class DeltaSchedule:
    """Rank 0's view of the actor: batches submitted whose deltas are not applied yet, oldest
    first, as (step, PendingDelta or Delta). `due(step)` returns the deltas the replicas must
    apply before `step`, waiting for the actor only when one is late."""

    client: DictionaryClient
    max_staleness: int
    max_restarts: int = 3  # resources.max_actor_restarts
    incarnation: str = ""
    pending: collections.deque[tuple[int, PendingDelta | Delta]] = field(default_factory=collections.deque)
    actor_restarts: int = 0
    wait_s: float = 0.0

    def start(self, *, actor_state: dict[str, Any] | None, pending_steps: list[int], replica_version: int) -> None:
        """Bring the actor to the run's start: blank for a new run, else the checkpoint's
        state, with the deltas the replicas had not applied yet pending again."""
        if actor_state is None:
            self.client.reset()
        else:
            self.client.load_state_dict(actor_state)
            behind = {delta.step: delta for delta in self.client.deltas_after(replica_version)}
            self.pending.extend((step, behind[step]) for step in pending_steps if step in behind)
        self.incarnation = self.client.status().incarnation

    def submit(self, step: int, arrays: dict[str, np.ndarray]) -> None:
        self.pending.append((step, self.client.submit(step=step, **arrays)))

    def due(self, step: int, replicas: Replicas, *, drain: bool = False) -> list[Delta]:
        deltas: list[Delta] = []
        while self.pending and (drain or self.pending[0][0] <= step - 1 - self.max_staleness):
            entry = self.pending[0][1]
            started = time.perf_counter()
            try:
                delta = entry if isinstance(entry, Delta) else self.client.wait(entry)
            except ActorRestarted as err:
                self._recover(replicas, deltas, str(err))
                return deltas
            finally:
                self.wait_s += time.perf_counter() - started
            if delta.incarnation != self.incarnation:  # Ray restarted it: its state is blank
                self._recover(replicas, deltas, "restarted by Ray")
                return deltas
            self.pending.popleft()
            deltas.append(delta)
        return deltas

    def actor_state(self, replicas: Replicas) -> dict[str, Any]:
        """The actor's state for a checkpoint, re-seeding it first if Ray restarted it."""
        for _ in range(MAX_RECOVERIES_PER_CALL):
            try:
                state = self.client.state_dict()
            except ActorRestarted as err:
                self._recover(replicas, [], str(err))
                continue
            if state["incarnation"] == self.incarnation:
                return state
            self._recover(replicas, [], "restarted by Ray")
        raise ActorError("the dictionary actor keeps failing; giving up on this attempt")

    def _recover(self, replicas: Replicas, applied_now: list[Delta], reason: str) -> None:
        """The actor died: wait for Ray to restart it, re-seed it from this replica (plus the
        deltas about to be applied) and drop the selections it lost."""
        if self.actor_restarts >= self.max_restarts:
            raise ActorError(
                f"the dictionary actor failed {self.actor_restarts + 1} times, more than "
                f"resources.max_actor_restarts = {self.max_restarts}; last: {reason}"
            )
        logger.warning("dictionary actor failed (%s); waiting for Ray to restart it", reason)
        seed = replicas.clone()
        for delta in applied_now:
            seed.apply(delta)
        try:
            status = self._status_after_restart()
            # Submits queued before this call run first on the new actor; their deltas are dropped.
            self.client.reseed(members=seed.members(), version=seed.version)
        except ActorError as err:  # dead for good (Ray's restarts used up) or failing again at once
            raise ActorError(f"the dictionary actor did not come back after it failed ({reason}): {err}") from None
        self.incarnation = status.incarnation
        self.pending.clear()
        self.actor_restarts += 1
        logger.warning("dictionary actor restarted and re-seeded at version %d", seed.version)

    def _status_after_restart(self) -> ActorStatus:
        """The restarted actor's status. A call made just as the actor died can fail although
        Ray is restarting it, so failures are retried for `RESTART_WAIT_S` (an actor that Ray
        will not restart fails every call; the run then fails)."""
        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            try:
                return self.client.status()
            except ActorRestarted:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def pending_steps(self) -> list[int]:
        return [step for step, _ in self.pending]
