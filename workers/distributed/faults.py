"""Fault injection for tests: environment variables the training loop reads (never set in
production; `service.preflight` passes `CMACC_FAULT_*` to the workers).

* `CMACC_FAULT_NAN_STEP=s`: the loss is non-finite at step s.
* `CMACC_FAULT_STOP_STEP=s`: the run stops after step s as a preemption would (checkpoint,
  then stop).
* `CMACC_FAULT_KILL_WORKER=r:s`: rank r SIGKILLs itself at step s.
* `CMACC_FAULT_KILL_ACTOR=s`: rank 0 SIGKILLs the dictionary actor's process at step s.
* `CMACC_FAULT_HANG_ACTOR=s`: before step s rank 0 makes the actor stop answering (it sleeps
  for an hour), as a wedged actor would.
* `CMACC_FAULT_CRASH_LOOP_ACTOR=s`: rank 0 SIGKILLs the actor before every step from s on,
  as an actor that dies whenever it works (out of memory, say) would.
* `CMACC_FAULT_CRASH_CLIP=id`: a worker aborts (SIGABRT) whenever its reader starts decoding
  clip `id`, as a decoder that crashes on one row would; every attempt meets it again.
* `CMACC_FAULT_CLIP_LOG=dir`: not a fault: every rank appends the clips of each step it
  trains to a file in `dir` (which clips a run's final lineage trained, for the tests).
* `CMACC_FAULT_STEP_S=t`: every step takes at least t seconds, so a test can act mid-run.

Kill hooks fire once per run: a marker file in `CMACC_FAULT_MARKER_DIR` remembers them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from service.errors import ActorError
from workers.actor import DictionaryClient
from workers.distributed.crashes import ReadingNote


@dataclass(kw_only=True, frozen=True)
class Faults:
    nan_step: int = -1
    stop_step: int = -1
    kill_worker: tuple[int, int] | None = None  # (rank, step)
    kill_actor_step: int = -1
    hang_actor_step: int = -1
    crash_loop_actor_step: int = -1
    crash_clip: str = ""
    clip_log: str = ""  # a folder: every rank logs the clips of every step it trains (`log_clips`)
    step_s: float = 0.0  # every step takes at least this long (a slow GPU, for tests that act mid-run)

    @classmethod
    def from_env(cls) -> Faults:
        kill_worker = os.environ.get("CMACC_FAULT_KILL_WORKER")
        return cls(
            nan_step=int(os.environ.get("CMACC_FAULT_NAN_STEP", "-1")),
            stop_step=int(os.environ.get("CMACC_FAULT_STOP_STEP", "-1")),
            kill_worker=tuple(int(x) for x in kill_worker.split(":")) if kill_worker else None,  # type: ignore[arg-type]
            kill_actor_step=int(os.environ.get("CMACC_FAULT_KILL_ACTOR", "-1")),
            hang_actor_step=int(os.environ.get("CMACC_FAULT_HANG_ACTOR", "-1")),
            crash_loop_actor_step=int(os.environ.get("CMACC_FAULT_CRASH_LOOP_ACTOR", "-1")),
            crash_clip=os.environ.get("CMACC_FAULT_CRASH_CLIP", ""),
            clip_log=os.environ.get("CMACC_FAULT_CLIP_LOG", ""),
            step_s=float(os.environ.get("CMACC_FAULT_STEP_S", "0")),
        )

    def reader_note(self, note: ReadingNote) -> Any:
        """What the reader reports its rows to: `note`, or with `crash_clip` set, `note` in a
        wrapper that aborts the process once the note holds that clip."""
        return _CrashOnClip(note, self.crash_clip) if self.crash_clip else note

    def log_clips(self, *, step: int, rank: int, world_size: int, start_step: int, batch: dict[str, Any]) -> None:
        """With `clip_log` set: this rank's clips of `step` (their indices and the epoch) as a
        JSON line in its attempt's file, so a test can count which clips the final lineage
        of a run trained."""
        if not self.clip_log:
            return
        record = {
            "attempt": start_step,
            "step": step,
            "rank": rank,
            "world_size": world_size,
            "epochs": [int(e) for e in batch["epochs"]],
            "clips": [int(i) for i in batch["index"].tolist()],
            "time": time.time(),
        }
        path = os.path.join(self.clip_log, f"clips-{os.getpid()}-rank{rank}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def before_step(self, step: int, rank: int, client: DictionaryClient | None) -> None:
        """Kill this worker or the actor when a hook says so for this step; slow the step down."""
        if self.step_s > 0:
            time.sleep(self.step_s)
        if self.kill_worker == (rank, step) and _fire_once(f"worker-{rank}-{step}"):
            # Ray Train registers a reported checkpoint when it next polls the workers (every
            # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); a crash before that loses it, so wait that long.
            time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
            os.kill(os.getpid(), signal.SIGKILL)
        if client is None:
            return
        if step == self.kill_actor_step and _fire_once(f"actor-{step}"):
            os.kill(client.status().pid, signal.SIGKILL)
        if step == self.hang_actor_step and _fire_once(f"hang-actor-{step}"):
            client.hang(3600.0)
        if 0 <= self.crash_loop_actor_step <= step:
            _fire_once(f"crash-loop-actor-{step}")  # marks that the hook fired
            with contextlib.suppress(ActorError):  # dead for good: the loop ends the run at its next call
                os.kill(client.status().pid, signal.SIGKILL)


@dataclass(frozen=True)
class _CrashOnClip:
    note: ReadingNote
    clip_id: str

    def started(self, index: int, shard: str, row: int, clip_id: str) -> None:
        self.note.started(index, shard, row, clip_id)
        if clip_id == self.clip_id:
            os.abort()

    def finished(self, index: int) -> None:
        self.note.finished(index)


def _fire_once(name: str) -> bool:
    """True the first time a kill hook fires in this run (a marker file remembers it)."""
    marker_dir = os.environ.get("CMACC_FAULT_MARKER_DIR", tempfile.gettempdir())
    marker = os.path.join(marker_dir, f"cmacc-fault-{name}")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True
