"""The dictionary actor (DESIGN.md section 5): the authority over both negative dictionaries.

* `DictionaryService` is a plain class that does the work: it owns both dictionaries, both
  candidate pools and the sampler (with its random state), a version number and the recent
  deltas. `submit` runs step 4 of the method for one global batch through the same
  `update_dictionaries` as the single-process trainer, then returns the delta: which slots of
  each dictionary now hold which keys. Tested without Ray.
* `DictionaryActor` is the thin Ray actor around it, restarted by Ray when its process dies.
* `DictionaryClient` is the typed client the training loop and the driver use, hiding
  `.remote()` and `ray.get`.

Only numpy arrays cross the object store, and only deltas (M keys per modality) cross per
step: the full dictionary moves only for checkpoints and re-seeding.
"""

from __future__ import annotations

import collections
import os
import time
import uuid
from typing import Any

import numpy as np
import torch

from service import config as config_module
from service.config import Config
from workers.trainer import Dictionaries, build_dictionaries, update_dictionaries

DELTA_HISTORY = 64  # deltas kept for replicas that resume behind the actor
RESTART_WAIT_S = 120.0  # how long a caller waits for Ray to restart a dead actor


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.array(array), device=device)  # a copy: object-store arrays are read-only


class DictionaryService:
    """Both dictionaries, both pools, the sampler state, a version and the recent deltas.

    A delta is a dict of numpy arrays and numbers: `version` (the version it creates), `step`
    (the training step whose batch it came from), `slots_v`, `keys_v`, `ids_v`, `slots_a`,
    `keys_a`, `ids_a` (slots [P] of the dictionary and the keys [P, d] and clip ids [P] now in
    them), `select_ms` (time the selection took here), `stop_requested` and `incarnation`
    (which process made it).
    """

    def __init__(self, *, config: dict[str, Any], device: str = "cpu"):
        self.cfg: Config = config_module.from_dict(config)
        self.device = torch.device(device)
        # New with every process: a restarted actor (blank state) is told apart by it.
        self.incarnation = uuid.uuid4().hex
        self.last_progress: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        """Back to the initial state: what a run without a checkpoint starts from."""
        self.dictionaries: Dictionaries = build_dictionaries(self.cfg, device=self.device)
        self.version = 0
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=DELTA_HISTORY)
        self.stop_requested = False

    def submit(
        self,
        *,
        step: int,
        queries_v: np.ndarray,
        queries_a: np.ndarray,
        keys_v: np.ndarray,
        keys_a: np.ndarray,
        clip_ids: np.ndarray,
    ) -> dict[str, Any]:
        """Select and enqueue for one global batch (all arrays [M, d], clip_ids [M]); the delta."""
        started = time.perf_counter()
        pointers = {m: getattr(self.dictionaries, f"dictionary_{m}").pointer for m in "va"}
        counts = update_dictionaries(
            self.dictionaries,
            queries_v=_tensor(queries_v, self.device),
            queries_a=_tensor(queries_a, self.device),
            keys_v=_tensor(keys_v, self.device),
            keys_a=_tensor(keys_a, self.device),
            clip_ids=_tensor(clip_ids, self.device),
        )
        self.version += 1
        delta: dict[str, Any] = {"version": self.version, "step": step, "incarnation": self.incarnation}
        for modality in "va":
            dictionary = getattr(self.dictionaries, f"dictionary_{modality}")
            num_enqueued = int(counts[f"enqueued_{modality}"])
            slots = (pointers[modality] + torch.arange(num_enqueued, device=self.device)) % dictionary.size
            delta[f"slots_{modality}"] = slots.cpu().numpy()
            delta[f"keys_{modality}"] = dictionary.keys[slots].cpu().numpy()
            delta[f"ids_{modality}"] = dictionary.ids[slots].cpu().numpy()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        delta["select_ms"] = 1000 * (time.perf_counter() - started)
        delta["stop_requested"] = self.stop_requested  # rides on the deltas: no extra call per step
        self.history.append(delta)
        return delta

    def deltas_after(self, version: int) -> list[dict[str, Any]]:
        """The kept deltas that create versions > `version`, oldest first."""
        if version < self.version and (not self.history or self.history[0]["version"] > version + 1):
            raise LookupError(f"deltas after version {version} are no longer kept (now at {self.version})")
        return [delta for delta in self.history if delta["version"] > version]

    def reseed(self, *, dictionary_v: dict[str, Any], dictionary_a: dict[str, Any], version: int) -> None:
        """Take the dictionaries from a replica after a restart; pools start empty again."""
        self.reset()
        self.dictionaries.dictionary_v.load_state_dict(_to_torch(dictionary_v))
        self.dictionaries.dictionary_a.load_state_dict(_to_torch(dictionary_a))
        self.version = version

    def state_dict(self) -> dict[str, Any]:
        return {
            "dictionaries": to_numpy(self.dictionaries.state_dict()),
            "version": self.version,
            "history": list(self.history),
            "incarnation": self.incarnation,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.dictionaries.load_state_dict(_to_torch(state["dictionaries"]))
        self.version = int(state["version"])
        # The kept deltas now belong to this process's state. A stop request belonged to the
        # run that saved them: replayed after a resume, it would stop the new run at once.
        self.history.extend(
            {**delta, "incarnation": self.incarnation, "stop_requested": False} for delta in state["history"]
        )

    def request_stop(self) -> None:
        """Ask the training loop to checkpoint and stop (the driver's Ctrl-C)."""
        self.stop_requested = True

    def report_progress(self, progress: dict[str, float]) -> None:
        """Rank 0's newest step, loss and rate, for the driver's progress bar (not checkpointed)."""
        self.last_progress = dict(progress)

    def progress(self) -> dict[str, float]:
        return self.last_progress

    def status(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "stop_requested": self.stop_requested,
            "pid": os.getpid(),
            "incarnation": self.incarnation,
        }


def to_numpy(tree: Any) -> Any:
    """Tensors in a nested dict as numpy arrays (what crosses the object store)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().numpy()
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    return tree


def _to_torch(tree: Any) -> Any:
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(tree.copy())
    if isinstance(tree, dict):
        return {k: _to_torch(v) for k, v in tree.items()}
    return tree


def actor_name(run_id: str) -> str:
    """A fresh name per driver: a previous driver's actor of the same run (a stopped job's,
    still being torn down) must never be picked up by the next one."""
    return f"cmacc-dictionary-{run_id}-{uuid.uuid4().hex[:8]}"


class DictionaryClient:
    """Typed access to the `DictionaryActor` of a run; the only place `.remote()` is called."""

    def __init__(self, handle: Any, name: str = ""):
        self.handle = handle
        self.name = name

    @classmethod
    def create(cls, *, run_id: str, config: Config, max_restarts: int = -1) -> DictionaryClient:
        """Start the run's actor (CPU, or `resources.actor_gpus` of a GPU when set), owned by
        this driver: it ends with it."""
        import ray

        gpus = config.resources.actor_gpus
        name = actor_name(run_id)
        actor_class = ray.remote(DictionaryService).options(
            name=name, max_restarts=max_restarts, num_cpus=1, num_gpus=gpus
        )
        handle = actor_class.remote(config=config.to_dict(), device="cuda" if gpus > 0 else "cpu")
        return cls(handle, name)

    @classmethod
    def connect(cls, name: str) -> DictionaryClient:
        """The actor the driver created, by the name it passed to the workers."""
        import ray

        return cls(ray.get_actor(name), name)

    def submit(self, **arrays: Any) -> Any:
        """Send one global batch without waiting; returns the ObjectRef of its delta."""
        return self.handle.submit.remote(**arrays)

    def report_progress(self, progress: dict[str, float]) -> None:
        """Fire and forget: the driver's progress bar reads it with `progress`."""
        self.handle.report_progress.remote(progress)

    def call(self, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        """Call a method and wait for its answer. While Ray restarts the actor the call is
        repeated (for up to `RESTART_WAIT_S`): every method but `submit` may run twice."""
        import ray

        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            try:
                return ray.get(getattr(self.handle, method).remote(*args, **kwargs), timeout=timeout_s)
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def kill(self) -> None:
        import ray

        ray.kill(self.handle, no_restart=True)
