"""Which clip kills a worker: a crash that repeats at the same place ends the run and names
the clip, instead of being retried until `resources.max_failures` runs out.

A row that raises while it is decoded costs that row only (the reader skips and counts it).
A row that takes the whole process down (a decoder that segfaults or aborts, an allocation
the kernel answers with a kill) leaves no Python exception to catch: Ray Train restarts the
worker group from the newest checkpoint, the reader replays the same clips in the same
order, and the worker dies at the same row again. So every rank keeps a note on its node's
local disk, rewritten as its reader starts and finishes each row: the step it is at and the
rows being decoded now (`ReadingNote`). Python's `faulthandler` writes a fatal signal's
traceback next to it. A rank that ends normally removes both; a rank that dies leaves them.

When an attempt starts, the ranks collect the notes the dead attempt left on their nodes
(`collect_notes`) and rank 0 adds them to the run's crash history (`crashes.json` in the run
folder). When the two newest crashes have a rank that died while decoding the same row (or
with a fatal signal at the same step), the run ends with an error that names the shard, the
row and the clip, and how to train on without it (`data.exclude_clips`). See
docs/architecture.md, "Failure model".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import faulthandler
import hashlib
import json
import os
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from service import layout, storage

HISTORY_KEPT = 10  # crashes remembered in crashes.json
# What a rank's collective raises when a peer process died: a consequence, not a cause.
_PEER_LOST = ("closed by peer", "reset by peer", "DistBackendError", "NCCL", "gloo")
_FATAL_LINES = 3  # lines of a fatal signal's report shown in the history and the error


def note_dir(run_uri: str) -> Path:
    """This node's folder for the notes of the run at `run_uri` (any job, any attempt)."""
    key = hashlib.sha256(run_uri.encode()).hexdigest()[:16]
    root = os.environ.get("CMACC_CRASH_NOTES_DIR") or os.path.join(tempfile.gettempdir(), "cmacc-crash-notes")
    return Path(root, key)


class ReadingNote:
    """This rank's note of where it is: the step, and the rows its reader is decoding now.

    Rewritten in place (one `pwrite` of padded JSON, no fsync: the note has to outlive the
    process, not the machine) whenever a row starts or finishes and at every step. `close()`
    removes it; a process that dies leaves it for `collect_notes`."""

    def __init__(self, run_uri: str, rank: int):
        self.rank = rank
        folder = note_dir(run_uri)
        stem = f"rank{rank:05d}-pid{os.getpid()}"
        self.path = folder / f"{stem}.json"
        self.fatal_path = folder / f"{stem}.fatal"
        self._lock = threading.Lock()
        self._rows: dict[int, list[Any]] = {}  # clip index -> [shard file, row in shard, clip id]
        self._step = 0
        self._raised = ""
        self._written = 0
        self._fd = -1
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
            self._fatal = open(self.fatal_path, "w")  # noqa: SIM115 - faulthandler writes to it until close()
        except OSError as err:  # no local disk to write on: train on, without crash notes
            print(f"cmacc: warning: no crash notes for rank {rank} ({err})", file=sys.stderr, flush=True)
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            return
        self._had_faulthandler = faulthandler.is_enabled()
        faulthandler.enable(file=self._fatal, all_threads=True)
        self._write()

    def at_step(self, step: int) -> None:
        with self._lock:
            self._step = step
            self._write()

    def started(self, index: int, shard: str, row: int, clip_id: str) -> None:
        with self._lock:
            self._rows[index] = [shard, row, clip_id]
            self._write()

    def finished(self, index: int) -> None:
        with self._lock:
            self._rows.pop(index, None)
            self._write()

    def _write(self) -> None:
        if self._fd < 0:
            return
        record = {
            "rank": self.rank,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "step": self._step,
            "rows": sorted(self._rows.values()),
        }
        if self._raised:
            record["raised"] = self._raised
        data = json.dumps(record).encode()
        # Padded to the longest record so far: the file is always one whole JSON document.
        os.pwrite(self._fd, data.ljust(self._written), 0)
        self._written = max(self._written, len(data))

    def raised(self, err: BaseException) -> None:
        """The rank ends with a Python exception (Ray Train reports it with its traceback):
        the note stays, saying so, so that this attempt's death is not blamed on the rows
        that the other ranks, killed by Ray Train, were decoding."""
        with self._lock:
            self._raised = f"{type(err).__name__}: {err}"[:500]
            self._write()

    def close(self) -> None:
        """The rank ends: the note goes, unless the rank raised (`raised`)."""
        with self._lock:
            if self._fd < 0:
                return
            faulthandler.disable()
            if self._had_faulthandler:
                faulthandler.enable(file=sys.__stderr__, all_threads=True)
            self._fatal.close()
            os.close(self._fd)
            self._fd = -1
            for path in (self.fatal_path,) if self._raised else (self.path, self.fatal_path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def collect_notes(run_uri: str) -> list[dict[str, Any]]:
    """The notes that ranks of the run left on this node when they died, removed from it
    (each taken by exactly one collecting rank), with their fatal-signal report if any.
    Call before this rank writes its own note."""
    folder = note_dir(run_uri)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        claimed = path.with_suffix(f".claimed-{os.getpid()}")
        try:
            path.rename(claimed)  # atomic: two ranks on one node never take the same note
        except FileNotFoundError:
            continue
        try:
            note = json.loads(claimed.read_text() or "{}")
        except (OSError, ValueError):
            note = {}
        finally:
            claimed.unlink(missing_ok=True)
        fatal_path = path.with_suffix(".fatal")
        with contextlib.suppress(OSError):
            lines = [line for line in fatal_path.read_text(errors="replace").splitlines() if line.strip()]
            note["fatal"] = "\n".join(lines[:_FATAL_LINES])
            note["fatal_report"] = "\n".join(lines)
        fatal_path.unlink(missing_ok=True)
        if "rank" in note and "step" in note:
            found.append(note)
    return found


def record_crash(
    run_uri: str,
    notes: list[dict[str, Any]],
    *,
    endpoint_url: str = "",
    retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S,
) -> list[dict[str, Any]]:
    """Add one dead attempt's notes (every rank's, gathered on rank 0) to the run's crash
    history and return the history, oldest first."""
    uri = storage.join(run_uri, layout.CRASHES_FILE)
    history: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError, ValueError):
        history = list(
            json.loads(storage.read_bytes(uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)).get(
                "crashes", []
            )
        )
    kept = [{key: value for key, value in note.items() if key != "fatal_report"} for note in notes]
    found_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    history = [*history, {"found_at": found_at, "notes": sorted(kept, key=lambda note: note["rank"])}][-HISTORY_KEPT:]
    storage.write_bytes(
        uri,
        json.dumps({"crashes": history}, indent=2).encode(),
        endpoint_url=endpoint_url,
        retry_budget_s=retry_budget_s,
    )
    return history


def repeated_crash(history: list[dict[str, Any]]) -> str:
    """The error that ends the run when the two newest crashes happened at the same place
    ("" when they did not): a rank died while decoding the same row both times, or died of
    a fatal signal at the same step both times. A rank that raised an input error (a damaged
    shard, a checkpoint file that does not match its record) ends the run after one crash:
    the file would be as damaged on every retry (`damaged_input`).

    Not every rank's note is evidence. When a rank dies, the others lose their peer (their
    collective raises) or are killed by Ray Train, wherever they were. So: a crash in which
    a rank raised a Python error of its own (Ray Train reports it, with its traceback) is
    not blamed on rows; when some rank died of a fatal signal in both, only such ranks are
    looked at; otherwise only ranks that died without raising anything (killed: out of
    memory, say)."""
    damaged = damaged_input(history[-1]["notes"]) if history else ""
    if damaged:
        return damaged
    if len(history) < 2:
        return ""
    crashes = history[-2:]
    if any(note.get("raised") and not _peer_lost(note["raised"]) for crash in crashes for note in crash["notes"]):
        return ""
    before = {note["rank"]: note for note in crashes[0]["notes"]}
    now = {note["rank"]: note for note in crashes[1]["notes"]}
    ranks = sorted(before.keys() & now.keys())
    fatal = [rank for rank in ranks if before[rank].get("fatal") and now[rank].get("fatal")]
    killed = [rank for rank in ranks if not before[rank].get("raised") and not now[rank].get("raised")]
    for rank in fatal or killed:
        common = {tuple(row) for row in before[rank]["rows"]} & {tuple(row) for row in now[rank]["rows"]}
        how = f" ({now[rank]['fatal'].splitlines()[0]})" if now[rank].get("fatal") else ""
        steps = f"steps {before[rank]['step']} and {now[rank]['step']}"
        if common:
            rows = "; ".join(f"{shard} row {row} (clip {clip})" for shard, row, clip in sorted(common))
            clips = ",".join(sorted(clip for _, _, clip in common))
            return (
                f"rank {rank} died twice{how} while its reader was decoding the same clip ({steps}): {rows}. "
                f"That clip most likely kills the worker, and every retry would replay it; the run stops here "
                f"instead. Train on without it: rerun with --resume --set data.exclude_clips={clips}"
            )
        if rank in fatal and before[rank]["step"] == now[rank]["step"]:
            return (
                f"rank {rank} died twice{how} at step {now[rank]['step']}, with no clip being decoded: a "
                f"failure that repeats at that step (see the worker logs for the full report); every retry "
                f"would meet it again"
            )
    return ""


# What a rank raises when an input is damaged (service.errors): retrying cannot help.
_INPUT_ERRORS = ("DataError", "CheckpointError")


def damaged_input(notes: list[dict[str, Any]]) -> str:
    """The error that ends the run when a rank of the dead attempt raised an input error ("" when
    none did): its message (naming the shard, and the row where known), on one line."""
    for note in sorted(notes, key=lambda note: note.get("rank", 0)):
        kind, _, message = str(note.get("raised", "")).partition(": ")
        if kind in _INPUT_ERRORS and message:
            first = " ".join(message.split())
            return (
                f"rank {note['rank']} stopped at step {note['step']}: {first}. A damaged input is not retried "
                "(it would be as damaged on every attempt); repair or replace it, then rerun with --resume"
            )
    return ""


def _peer_lost(raised: str) -> bool:
    return any(sign in raised for sign in _PEER_LOST)
