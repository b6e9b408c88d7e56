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

from service import catalog, layout, storage
from service.config import Config
from workers.trackers import Tracker, flatten, open_trackers

METRICS_FILE = "metrics.jsonl"


class NullMetricsLog:
    """Does nothing: what ranks other than 0 log to."""

    logged_until = -1

    def log(self, step: int, metrics: dict[str, float], *, at: float | None = None) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLog(NullMetricsLog):
    """JSONL (and, unless `tensorboard` is off, TensorBoard) metrics under
    `<run_uri>/metrics/`. Metric names are flat (`train/loss`, `dict/staleness`,
    `data/wait_s`). `logged_until`: the newest step an earlier job of the run logged."""

    def __init__(
        self,
        *,
        run_uri: str,
        endpoint_url: str = "",
        retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S,
        tensorboard: bool = True,
    ):
        self.remote = storage.join(run_uri, "metrics")
        self.endpoint_url = endpoint_url
        self.retry_budget_s = retry_budget_s
        self.local = tempfile.mkdtemp(prefix="cmacc-metrics-")
        self.logged_until = -1
        remote_jsonl = storage.join(self.remote, METRICS_FILE)
        if storage.exists(remote_jsonl, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s):
            data = storage.read_bytes(remote_jsonl, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
            with open(os.path.join(self.local, METRICS_FILE), "wb") as f:
                f.write(data)
            for line in data.decode().splitlines():
                if line.strip():
                    self.logged_until = max(self.logged_until, int(json.loads(line)["step"]))
        self.jsonl = open(os.path.join(self.local, METRICS_FILE), "a")  # noqa: SIM115 - open for the run
        self.tensorboard_dir = os.path.join(self.local, "tensorboard")
        self.tensorboard = None
        if tensorboard:  # train.trackers names it (the default)
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(self.tensorboard_dir)

    def log(self, step: int, metrics: dict[str, float], *, at: float | None = None) -> None:
        """One step's record; `at`: the wall time the step ended (default: now)."""
        record: dict[str, Any] = {"step": step, "time": round(time.time() if at is None else at, 3)}
        if step <= self.logged_until:
            record["replayed"] = True
        for name, value in metrics.items():
            record[name] = value if math.isfinite(value) else str(value)
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(name, value, step)
        self.jsonl.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        """Upload the JSONL file and the TensorBoard event files to the run folder."""
        self.jsonl.flush()
        uploads = [(os.path.join(self.local, METRICS_FILE), storage.join(self.remote, METRICS_FILE))]
        if self.tensorboard is not None:
            self.tensorboard.flush()
            uploads += [
                (os.path.join(self.tensorboard_dir, name), storage.join(self.remote, "tensorboard", name))
                for name in sorted(os.listdir(self.tensorboard_dir))
            ]
        for local, remote in uploads:
            with open(local, "rb") as f:
                data = f.read()
            storage.write_bytes(remote, data, endpoint_url=self.endpoint_url, retry_budget_s=self.retry_budget_s)

    def close(self) -> None:
        self.sync()
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        shutil.rmtree(self.local, ignore_errors=True)


def open_run_trackers(cfg: Config, *, run_uri: str, run_id: str, endpoint_url: str = "") -> Tracker:
    """The MLflow and W&B runs of `train.trackers` for this run (rank 0 of the training loop;
    the driver, for the evaluation): the same tracker runs an earlier job of the run kept in
    its record (`run.json`, "trackers"), else new ones, whose ids are noted there; the
    resolved config logged as parameters. The no-op `Tracker` when none is named."""
    names = [name for name in cfg.train.trackers if name != "tensorboard"]
    if not names:
        return Tracker()
    budget = cfg.storage.retry_budget_s
    record_uri = storage.join(run_uri, layout.RUN_FILE)
    kept = None
    if storage.exists(record_uri, endpoint_url=endpoint_url, retry_budget_s=budget):
        kept = json.loads(storage.read_bytes(record_uri, endpoint_url=endpoint_url, retry_budget_s=budget)).get(
            "trackers"
        )
    tracker = open_trackers(
        names,
        run_uri=run_uri,
        run_name=run_id,
        project=cfg.train.tracker_project,
        ids=kept,
        endpoint_url=endpoint_url,
        retry_budget_s=budget,
    )
    if tracker.ids != kept:
        catalog.note_result(run_uri, "trackers", tracker.ids, endpoint_url=endpoint_url)
    tracker.log_params(flatten(cfg.to_dict()))
    return tracker


def read_metrics(run_uri: str, *, endpoint_url: str = "") -> list[dict[str, Any]]:
    """The JSONL records of a run, in the order they were logged."""
    uri = storage.join(run_uri, "metrics", METRICS_FILE)
    if not storage.exists(uri, endpoint_url=endpoint_url):
        return []
    text = storage.read_bytes(uri, endpoint_url=endpoint_url).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
