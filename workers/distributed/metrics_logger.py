"""The training loop's metrics logger (docs/architecture.md, "Metrics"): every step's record
is kept with its loss values still on the device and written every `train.log_every` steps,
at checkpoints and at the end, all read in one host copy; rank 0 prints the progress line
and tells the driver (through the actor) how far it is.

Every rank holds one; on ranks other than 0 the log is a `NullMetricsLog` and nothing is
printed or reported, so the loop has no `if rank == 0` around logging.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from workers.metrics import NullMetricsLog
from workers.step import host_values
from workers.trackers import Tracker

PROGRESS_EVERY_S = 0.5  # how often rank 0 tells the actor its step, for the driver's progress bar
CHECKPOINTS_SHOWN = 16  # the newest checkpoint steps each progress report carries


class PendingMetrics:
    """Steps' metrics not written yet, with their loss values still on the device: `flush`
    reads them all in one host copy, writes each step's record (timed when the step ended)
    and returns the newest record."""

    def __init__(self, log: NullMetricsLog):
        self.log = log
        self.records: list[tuple[int, dict[str, Any], float]] = []

    def add(self, step: int, record: dict[str, Any], *, at: float) -> None:
        self.records.append((step, record, at))

    def patch(self, step: int, values: dict[str, Any]) -> None:
        """Add `values` to the pending record of `step` (none there: nothing to add to)."""
        for pending_step, record, _ in reversed(self.records):
            if pending_step == step:
                record.update(values)
                return

    def flush(self) -> list[tuple[int, dict[str, float]]]:
        """Write every pending record; the (step, record) pairs written, oldest first."""
        if not self.records:
            return []
        resolved = host_values([record for _, record, _ in self.records])
        for (step, _, at), record in zip(self.records, resolved, strict=True):
            self.log.log(step, record, at=at)
        written = [(step, record) for (step, _, _), record in zip(self.records, resolved, strict=True)]
        self.records.clear()
        return written


class MetricsLogger:
    """Records, progress and the progress line of one rank. `report(progress)`, on rank 0,
    sends rank 0's progress to the driver (the actor's `report_progress`); `tracker`, on
    rank 0, gets every record written (MLflow, W&B: `workers.trackers`)."""

    def __init__(
        self,
        log: NullMetricsLog,
        *,
        log_every: int,
        total: int,
        rank: int,
        report: Any = None,
        tracker: Tracker | None = None,
    ):
        self.log = log
        self.tracker = tracker or Tracker()
        self.pending = PendingMetrics(log)
        self.log_every = log_every
        self.total = total
        self.rank = rank
        self.report = report
        self.written: dict[str, float] = {}  # the newest record written
        self.checkpoint_steps: list[int] = []  # the checkpoints this job reported, newest last
        self.last_line = self.last_report = time.perf_counter()

    def due(self, step: int) -> bool:
        """Are step `step`'s metrics measured and written with it (every `log_every` steps and
        the last step)? `step`: the count of steps taken after it (1-based)."""
        return step % self.log_every == 0 or step >= self.total

    def add(self, step: int, record: dict[str, Any], *, at: float) -> None:
        self.pending.add(step, record, at=at)

    def patch(self, step: int, values: dict[str, Any]) -> None:
        self.pending.patch(step, values)

    def flush(self) -> dict[str, float]:
        """Write the pending records; the newest as written (or the last one written before)."""
        written = self.pending.flush()
        for step, record in written:
            self.tracker.log_metrics(step, record)
        if written:
            self.written = written[-1][1]
        return self.written

    def progress(self, step: int, now: dict[str, Any], *, force: bool = False) -> None:
        """Rank 0: tell the driver the step now, the loss as of the last written metrics (NaN
        before the first) and the clips/s now, at most every `PROGRESS_EVERY_S`."""
        if self.report is None or not (force or time.perf_counter() - self.last_report >= PROGRESS_EVERY_S):
            return
        self.report(
            {
                "step": step,
                "total": self.total,
                "loss": self.written.get("train/loss", math.nan),
                "clips_per_s": now["train/clips_per_s"],
                "world_size": now.get("train/world_size"),
                "checkpoint": self.checkpoint_steps[-1] if self.checkpoint_steps else None,
                # the driver polls: two checkpoints can fall between its polls in a fast run
                "checkpoints": self.checkpoint_steps[-CHECKPOINTS_SHOWN:],
            }
        )
        self.last_report = time.perf_counter()

    def checkpointed(self, step: int, now: dict[str, Any]) -> None:
        """Rank 0 reported a checkpoint at `step`: the driver says so on the terminal."""
        self.checkpoint_steps.append(step)
        self.progress(step, now, force=True)

    def line(self, step: int) -> None:
        """Rank 0: the progress line of the newest written metrics."""
        if self.rank != 0 or not self.written:
            return
        rate = self.log_every if step % self.log_every == 0 else 1
        say(progress_line(step, self.total, self.written, rate / max(time.perf_counter() - self.last_line, 1e-9)))
        self.last_line = time.perf_counter()

    def sync(self) -> None:
        self.log.sync()
        self.tracker.sync()

    def close(self, *, status: str = "FINISHED") -> None:
        try:
            self.log.close()
        finally:
            self.tracker.close(status=status)


def say(line: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver. Not `print`: inside a
    Ray Train worker, print is patched to go both to stdout and to Train's logger, and the
    driver then shows every line twice."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def progress_line(step: int, total: int, metrics: dict[str, float], steps_per_s: float) -> str:
    eta = (total - step) / steps_per_s if steps_per_s > 0 else math.inf
    parts = [
        f"step {step}/{total}",
        f"loss {metrics['train/loss']:.4f}",
        f"clips/s {metrics['train/clips_per_s']:.1f}",
    ]
    if "dict/select_ms" in metrics and math.isfinite(metrics["dict/select_ms"]):
        parts.append(f"select {metrics['dict/select_ms']:.1f} ms")
    if "dict/staleness" in metrics:
        parts.append(f"stale {metrics['dict/staleness']:.0f}")
    if "embed/cos_qv" in metrics:  # collapse shows here: cosines near 1, no positive-negative gap
        parts.append(f"q cos v/a {metrics['embed/cos_qv']:.2f}/{metrics['embed/cos_qa']:.2f}")
        gap = metrics["embed/pos_cos_va"] - metrics["embed/neg_cos_va"]
        parts.append(f"pos-neg {gap:+.2f}")
    parts.append(f"eta {eta:.0f} s")
    return "  ".join(parts)
