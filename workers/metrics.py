"""Per-step metrics of a run: a JSONL file and TensorBoard events in the run folder.

Rank 0 logs; every other rank holds a `NullMetricsLog`, so the loop has no `if rank == 0`
around logging. Files are written locally and uploaded to `<run>/metrics/` at every
checkpoint and at the end, so they live in object storage next to the checkpoints.

A resumed run appends to the same JSONL file. Steps it repeats (those after the checkpoint
it resumed from that the earlier attempt had already logged) carry `"replayed": true`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

from service import storage

METRICS_FILE = "metrics.jsonl"


class NullMetricsLog:
    """Does nothing: what ranks other than 0 log to."""

    def log(self, step: int, metrics: dict[str, float], *, at: float | None = None) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLog(NullMetricsLog):
    """JSONL + TensorBoard metrics under `<run_uri>/metrics/`. Metric names are flat
    (`train/loss`, `dict/staleness`, `data/wait_s`)."""

    def __init__(self, *, run_uri: str, endpoint_url: str = ""):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = storage.join(run_uri, "metrics")
        self.endpoint_url = endpoint_url
        self.local = tempfile.mkdtemp(prefix="cmacc-metrics-")
        self.logged_until = -1
        remote_jsonl = storage.join(self.remote, METRICS_FILE)
        if storage.exists(remote_jsonl, endpoint_url=endpoint_url):
            data = storage.read_bytes(remote_jsonl, endpoint_url=endpoint_url)
            with open(os.path.join(self.local, METRICS_FILE), "wb") as f:
                f.write(data)
            for line in data.decode().splitlines():
                if line.strip():
                    self.logged_until = max(self.logged_until, int(json.loads(line)["step"]))
        self.jsonl = open(os.path.join(self.local, METRICS_FILE), "a")  # noqa: SIM115 - open for the run
        self.tensorboard_dir = os.path.join(self.local, "tensorboard")
        self.tensorboard = SummaryWriter(self.tensorboard_dir)

    def log(self, step: int, metrics: dict[str, float], *, at: float | None = None) -> None:
        """One step's record; `at`: the wall time the step ended (default: now)."""
        record: dict[str, Any] = {"step": step, "time": round(time.time() if at is None else at, 3)}
        if step <= self.logged_until:
            record["replayed"] = True
        for name, value in metrics.items():
            record[name] = value if math.isfinite(value) else str(value)
            self.tensorboard.add_scalar(name, value, step)
        self.jsonl.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        """Upload the JSONL file and the TensorBoard event files to the run folder."""
        self.jsonl.flush()
        self.tensorboard.flush()
        with open(os.path.join(self.local, METRICS_FILE), "rb") as f:
            storage.write_bytes(storage.join(self.remote, METRICS_FILE), f.read(), endpoint_url=self.endpoint_url)
        for name in sorted(os.listdir(self.tensorboard_dir)):
            with open(os.path.join(self.tensorboard_dir, name), "rb") as f:
                target = storage.join(self.remote, "tensorboard", name)
                storage.write_bytes(target, f.read(), endpoint_url=self.endpoint_url)

    def close(self) -> None:
        self.sync()
        self.jsonl.close()
        self.tensorboard.close()
        shutil.rmtree(self.local, ignore_errors=True)


def read_metrics(run_uri: str, *, endpoint_url: str = "") -> list[dict[str, Any]]:
    """The JSONL records of a run, in the order they were logged."""
    uri = storage.join(run_uri, "metrics", METRICS_FILE)
    if not storage.exists(uri, endpoint_url=endpoint_url):
        return []
    text = storage.read_bytes(uri, endpoint_url=endpoint_url).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
