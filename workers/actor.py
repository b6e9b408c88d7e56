"""The dictionary actor: the authority over both negative dictionaries (docs/architecture.md,
"The dictionary actor and the replicas").

* `DictionaryService` is a plain class that does the work: it owns the run's dictionaries
  and their shadows (`workers.enqueue.DictionarySet`: dictionaries, stream pools, samplers
  with their random states), a version number and the recent deltas. `submit` runs step 4
  of the method for one global batch through the same `DictionarySet.update` as the
  single-process trainer and returns a `Delta`: which slots of each dictionary (and of each
  shadow) now hold which keys. Tested without Ray.
* `DictionaryClient` is the typed client the training loop and the driver use: one method
  per operation of the actor, no `.remote()` or `ray.get` outside this module, and actor
  failures turned into the project's errors (`ActorRestarted`, `ActorError`). Ray runs
  `DictionaryService` itself as the actor and restarts it when its process dies; past
  `resources.max_actor_restarts` failures rank 0 fails the run. Every wait is bounded by
  `resources.actor_timeout_s`: an actor that does not answer in time is killed, so Ray
  restarts it, and the caller sees `ActorRestarted` as for a crash.

Only numpy arrays cross the object store, and only deltas (the keys that entered) cross per
step: the full dictionary moves only for checkpoints and re-seeding.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service import config as config_module
from service.config import Config
from service.errors import ActorError, ActorRestarted
from workers.dictionary import NegativeDictionary
from workers.enqueue import Arrivals, DictionarySet, build_dictionary_set
from workers.tensors import to_numpy, to_torch

DELTA_HISTORY = 64  # deltas kept for replicas that resume behind the actor
RESTART_WAIT_S = 120.0  # how long a caller waits for Ray to restart a dead actor
MODALITIES = ("v", "a")
ENTERED_PARTS = ("slots", "keys", "ids", "labels", "steps", "sources")


@dataclass(kw_only=True)
class Entered:
    """The keys that entered one dictionary: `slots` [P] of the dictionary now hold `keys`
    [P, d] of the clips `ids` [P], with their `labels` [P] (-1 unknown), arrival `steps` [P]
    and `sources` [P] (-1 unknown)."""

    slots: np.ndarray
    keys: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    steps: np.ndarray
    sources: np.ndarray

    @classmethod
    def since(cls, dictionary: NegativeDictionary, pointer: int, count: int) -> Entered:
        """The `count` keys written into `dictionary` from slot `pointer` on."""
        slots = (pointer + torch.arange(count, device=dictionary.device)) % dictionary.size
        return cls(
            slots=to_numpy(slots),
            keys=to_numpy(dictionary.keys[slots]),
            **{name: to_numpy(getattr(dictionary, name)[slots]) for name in ENTERED_PARTS[2:]},
        )


@dataclass(kw_only=True)
class Delta:
    """What one global batch changed in the dictionaries: version `version` (the one it
    creates), made from the batch of training step `step` by the actor process `incarnation`.

    `entered_v` and `entered_a` say what entered D_v and D_a, `shadows` what entered each
    shadow's (D_v, D_a) by sampler name; `select_ms` is the time the selection took in the
    actor; `stop_requested` carries the driver's stop request to the training loop (no extra
    call per step); `counts` are step 4's counts of each member ("main" and each shadow's
    sampler: `workers.enqueue.update_dictionaries`), empty in deltas saved before they were kept.
    """

    version: int
    step: int
    incarnation: str
    entered_v: Entered
    entered_a: Entered
    select_ms: float
    stop_requested: bool
    shadows: dict[str, tuple[Entered, Entered]] = field(default_factory=dict)
    counts: dict[str, dict[str, float]] = field(default_factory=dict)

    def entered(self, modality: str) -> Entered:
        return self.entered_v if modality == "v" else self.entered_a

    def without_shadows(self) -> Delta:
        """The same delta for ranks that keep no shadows (only rank 0 measures them)."""
        return dataclasses.replace(self, shadows={}, counts={k: v for k, v in self.counts.items() if k == "main"})

    def to_dict(self) -> dict[str, Any]:
        """The stored form (in checkpoints): flat names, numpy arrays."""
        out: dict[str, Any] = {"version": self.version, "step": self.step, "incarnation": self.incarnation}
        members = {"": (self.entered_v, self.entered_a)}
        members.update({f"shadow/{name}/": pair for name, pair in self.shadows.items()})
        for prefix, pair in members.items():
            for m, entered in zip(MODALITIES, pair, strict=True):
                for part in ENTERED_PARTS:
                    out[f"{prefix}{part}_{m}"] = getattr(entered, part)
        out.update({"select_ms": self.select_ms, "stop_requested": self.stop_requested})
        for member, counts in self.counts.items():
            out.update({f"counts/{member}/{name}": value for name, value in counts.items()})
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Delta:
        def entered(prefix: str, m: str) -> Entered:
            unknown = np.full_like(raw[f"{prefix}ids_{m}"], -1)  # deltas saved before a column was kept
            return Entered(**{part: raw.get(f"{prefix}{part}_{m}", unknown) for part in ENTERED_PARTS})

        names = sorted({key.split("/")[1] for key in raw if key.startswith("shadow/")})
        counts: dict[str, dict[str, float]] = {}
        for key, value in raw.items():
            if key.startswith("counts/"):
                _, member, name = key.split("/", 2)
                counts.setdefault(member, {})[name] = float(value)
        return cls(
            version=int(raw["version"]),
            step=int(raw["step"]),
            incarnation=str(raw["incarnation"]),
            entered_v=entered("", "v"),
            entered_a=entered("", "a"),
            select_ms=float(raw["select_ms"]),
            stop_requested=bool(raw["stop_requested"]),
            shadows={name: (entered(f"shadow/{name}/", "v"), entered(f"shadow/{name}/", "a")) for name in names},
            counts=counts,
        )


@dataclass(kw_only=True, frozen=True)
class ActorStatus:
    version: int
    stop_requested: bool
    pid: int
    incarnation: str  # new with every process: a restarted actor (blank state) is told apart by it


class DictionaryService:
    """Both dictionaries, both pools, the sampler state, a version and the recent deltas."""

    def __init__(self, *, config: dict[str, Any], device: str = "cpu"):
        self.cfg: Config = config_module.from_dict(config)
        self.device = torch.device(device)
        self.incarnation = uuid.uuid4().hex
        self.last_progress: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        """Back to the initial state: what a run without a checkpoint starts from."""
        self.dictionaries: DictionarySet = build_dictionary_set(self.cfg, device=self.device)
        self.version = 0
        self.history: collections.deque[Delta] = collections.deque(maxlen=DELTA_HISTORY)
        self.stop_requested = False

    def submit(self, *, step: int, **arrays: np.ndarray) -> Delta:
        """Select and enqueue for one global batch of training step `step` (the arrays of
        `workers.enqueue.Arrivals`: [M, d] embeddings, [M] columns, the fresh pool's extra
        clips); the delta."""
        started = time.perf_counter()
        members = {"main": self.dictionaries.main, **self.dictionaries.shadows}
        pointers = {name: {m: d.dictionary(m).pointer for m in MODALITIES} for name, d in members.items()}
        counts = self.dictionaries.update(Arrivals.from_arrays(step, arrays, self.device))
        self.version += 1
        entered = {
            name: tuple(
                Entered.since(d.dictionary(m), pointers[name][m], int(counts[name][f"entered_{m}"])) for m in MODALITIES
            )
            for name, d in members.items()
        }
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        delta = Delta(
            version=self.version,
            step=step,
            incarnation=self.incarnation,
            entered_v=entered["main"][0],
            entered_a=entered["main"][1],
            select_ms=1000 * (time.perf_counter() - started),
            stop_requested=self.stop_requested,
            shadows={name: pair for name, pair in entered.items() if name != "main"},
            counts=counts,
        )
        self.history.append(delta)
        return delta

    def deltas_after(self, version: int) -> list[Delta]:
        """The kept deltas that create versions > `version`, oldest first."""
        if version < self.version and (not self.history or self.history[0].version > version + 1):
            raise LookupError(f"deltas after version {version} are no longer kept (now at {self.version})")
        return [delta for delta in self.history if delta.version > version]

    def reseed(self, *, members: dict[str, dict[str, Any]], version: int) -> None:
        """Take the dictionaries from rank 0's replicas after a restart ("main" and each
        shadow's, each {"dictionary_v": state, "dictionary_a": state}); pools start empty
        again and the samplers from their seeds."""
        self.reset()
        for name, dictionaries in members.items():
            target = self.dictionaries.main if name == "main" else self.dictionaries.shadows.get(name)
            if target is None:
                continue
            for m in MODALITIES:
                target.dictionary(m).load_state_dict(to_torch(dictionaries[f"dictionary_{m}"]))
        self.version = version

    def state_dict(self) -> dict[str, Any]:
        return {
            "dictionaries": to_numpy(self.dictionaries.state_dict()),
            "version": self.version,
            "history": [delta.to_dict() for delta in self.history],
            "incarnation": self.incarnation,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.dictionaries.load_state_dict(to_torch(state["dictionaries"]))
        self.version = int(state["version"])
        # The kept deltas now belong to this process's state. A stop request belonged to the
        # run that saved them: replayed after a resume, it would stop the new run at once.
        for raw in state["history"]:
            delta = Delta.from_dict(raw)
            delta.incarnation, delta.stop_requested = self.incarnation, False
            self.history.append(delta)

    def request_stop(self) -> None:
        """Ask the training loop to checkpoint and stop (the driver's Ctrl-C)."""
        self.stop_requested = True

    def report_progress(self, progress: dict[str, float]) -> None:
        """Rank 0's newest step, loss and rate, for the driver's progress bar (not checkpointed)."""
        self.last_progress = dict(progress)

    def progress(self) -> dict[str, float]:
        return self.last_progress

    def status(self) -> ActorStatus:
        return ActorStatus(
            version=self.version, stop_requested=self.stop_requested, pid=os.getpid(), incarnation=self.incarnation
        )

    def hang(self, seconds: float) -> None:
        """Test hook (`CMACC_FAULT_HANG_ACTOR`): stop answering for `seconds`, as a wedged
        actor would; the calls queued behind this one wait with it."""
        time.sleep(seconds)


def actor_name(run_id: str) -> str:
    """A fresh name per driver: a previous driver's actor of the same run (a stopped job's,
    still being torn down) must never be picked up by the next one."""
    return f"cmacc-dictionary-{run_id}-{uuid.uuid4().hex[:8]}"


class PendingDelta:
    """The answer to a `submit` that has not been waited for (an ObjectRef inside)."""

    def __init__(self, ref: Any):
        self.ref = ref


class DictionaryClient:
    """Typed access to a run's dictionary actor. Every call that waits raises
    `ActorRestarted` when the actor died under it (Ray restarts it with a blank state) or did
    not answer within `timeout_s` (it is killed, and Ray restarts it), and `ActorError` when
    it stays unreachable for `RESTART_WAIT_S`."""

    def __init__(self, handle: Any, name: str = "", *, timeout_s: float | None = None):
        self._handle = handle
        self.name = name
        self.timeout_s = timeout_s
        self._progress_pending: Any = None

    @classmethod
    def create(cls, *, run_id: str, config: Config) -> DictionaryClient:
        """Start the run's actor (CPU, or `resources.actor_gpus` of a GPU when set), owned by
        this driver: it ends with it. Ray restarts it whenever it dies; the cap
        (`resources.max_actor_restarts`) is rank 0's, which counts the failures it recovers
        from and fails the run past it. (Ray's own limit would count deaths rank 0 has not
        seen yet, and a dead-for-good actor cannot be told from one being restarted.)"""
        import ray

        gpus = config.resources.actor_gpus
        name = actor_name(run_id)
        placement: dict[str, Any] = {"num_cpus": 1}
        if config.resources.elastic:
            # Ray Train's elastic policy counts every CPU of a node as room for a worker and
            # cannot see this actor's: reserving one here left it starting a group the nodes
            # could not hold, again and again. In an elastic run the actor reserves no CPU and
            # stays beside the driver (docs/scaling.md, "Elastic runs").
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            node = ray.get_runtime_context().get_node_id()
            placement = {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True)}
        actor_class = ray.remote(DictionaryService).options(name=name, max_restarts=-1, num_gpus=gpus, **placement)
        handle = actor_class.remote(config=config.to_dict(), device="cuda" if gpus > 0 else "cpu")
        return cls(handle, name, timeout_s=config.resources.actor_timeout_s)

    @classmethod
    def connect(cls, name: str, *, timeout_s: float | None = None) -> DictionaryClient:
        """The actor the driver created, by the name it passed to the workers."""
        import ray

        return cls(ray.get_actor(name), name, timeout_s=timeout_s)

    # --- the training loop's calls ----------------------------------------------------------

    def submit(self, *, step: int, **arrays: np.ndarray) -> PendingDelta:
        """Send one global batch (`DictionaryService.submit`'s arrays) without waiting."""
        return PendingDelta(self._handle.submit.remote(step=step, **arrays))

    def wait(self, pending: PendingDelta) -> Delta:
        """The delta of a submitted batch, waiting for the actor to finish it."""
        return self._wait(pending.ref, what="submit")

    def reset(self) -> None:
        self._call("reset")

    def reseed(self, *, members: dict[str, dict[str, Any]], version: int) -> None:
        self._call("reseed", members=members, version=version)

    def state_dict(self) -> dict[str, Any]:
        return self._call("state_dict")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._call("load_state_dict", state)

    def deltas_after(self, version: int) -> list[Delta]:
        return self._call("deltas_after", version)

    def status(self) -> ActorStatus:
        return self._call("status")

    def report_progress(self, progress: dict[str, float]) -> None:
        """Fire and forget: the driver's progress bar reads it with `poll_progress`."""
        self._handle.report_progress.remote(progress)

    # --- the driver's calls -----------------------------------------------------------------

    def request_stop(self) -> None:
        """Fire and forget: the training loop checkpoints and stops after its next step."""
        self._handle.request_stop.remote()

    def hang(self, seconds: float) -> None:
        """Fire and forget (test hook): the actor stops answering for `seconds`."""
        self._handle.hang.remote(seconds)

    def poll_progress(self) -> dict[str, float] | None:
        """Never blocks: the answer to the previous poll when it has arrived (and asks again),
        else None. Also None while the actor restarts."""
        import ray

        answer = None
        if self._progress_pending is not None:
            ready, _ = ray.wait([self._progress_pending], timeout=0)
            if not ready:
                return None
            try:
                answer = ray.get(self._progress_pending)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                answer = None  # the actor is restarting: the next answer will do
        self._progress_pending = self._handle.progress.remote()
        return answer

    def kill(self) -> None:
        import ray

        ray.kill(self._handle, no_restart=True)

    # --- plumbing ---------------------------------------------------------------------------

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a method and wait for its answer. While Ray restarts the actor the call is
        repeated (for up to `RESTART_WAIT_S`): every method but `submit` may run twice."""
        import ray

        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            try:
                return self._wait(getattr(self._handle, method).remote(*args, **kwargs), what=method, retry=True)
            except ray.exceptions.ActorUnavailableError as err:
                if time.monotonic() > deadline:
                    raise ActorError(
                        f"the dictionary actor {self.name} stayed unavailable for {RESTART_WAIT_S:.0f} s "
                        f"({method}): {err}"
                    ) from None
                time.sleep(0.5)

    def _wait(self, ref: Any, *, what: str, retry: bool = False) -> Any:
        import ray

        try:
            return ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            # A wedged actor holds the run: kill its process (Ray restarts it, within the cap),
            # and let the caller recover as from a crash.
            ray.kill(self._handle, no_restart=False)
            raise ActorRestarted(
                f"the dictionary actor {self.name} did not answer {what} within {self.timeout_s:g} s "
                "(resources.actor_timeout_s); killed it for Ray to restart"
            ) from None
        except ray.exceptions.ActorUnavailableError:
            if retry:
                raise
            raise ActorRestarted(f"the dictionary actor {self.name} is restarting ({what})") from None
        except ray.exceptions.RayActorError as err:
            raise ActorRestarted(f"the dictionary actor {self.name} died ({what}): {type(err).__name__}") from None
