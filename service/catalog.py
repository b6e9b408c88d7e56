"""The run catalog: what storage says about runs and their checkpoints, and the run record
each job keeps there (no Ray, no torch). File and folder names come from `service.layout`.

* `run.json` (the run record): run id, recipe, resolved config, sampler, data URI, state,
  last step, the training job's progress (step, loss, rate; renewed while it trains),
  error, created and updated times, and the newest evaluation summary. The job that trains
  the run writes it (`write_run_record`); `cmacc runs`, `cmacc status` and a cluster
  ablation read it.
* Checkpoints: `checkpoint-%08d/` folders that carry their `meta.json`; `registered` says
  whether Ray Train listed the checkpoint in its snapshot, which it writes only after the
  whole folder is uploaded. Only registered checkpoints are used (resumed from, evaluated,
  shown as a run's newest): a folder's `meta.json` can arrive before its other files.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass, field
from typing import Any

from service import layout, reports, storage
from service.errors import CatalogError, UsageError
from service.lease import LeaseRecord, read_lease

__all__ = ["CatalogError", "CheckpointEntry", "RunEntry", "list_checkpoints", "list_runs", "read_run", "require_run"]


@dataclass(kw_only=True)
class CheckpointEntry:
    step: int
    uri: str
    registered: bool  # listed in Ray Train's snapshot: a rerun of the run resumes from it
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "uri": self.uri, "registered": self.registered, "meta": self.meta}


@dataclass(kw_only=True)
class RunEntry:
    run_id: str
    uri: str
    info: dict[str, Any]  # run.json
    checkpoints: list[CheckpointEntry]
    lease: LeaseRecord | None = None  # the job that trains it now (or did last)

    @property
    def held_by(self) -> str:
        """Who trains the run now (`host pid N (job J), heartbeat T s ago`), or ""."""
        return self.lease.describe() if self.lease is not None and self.lease.live() else ""

    @property
    def newest_checkpoint(self) -> CheckpointEntry | None:
        """The newest registered checkpoint: the one a rerun resumes from."""
        registered = [c for c in self.checkpoints if c.registered]
        return registered[-1] if registered else None

    def to_dict(self) -> dict[str, Any]:
        newest = self.newest_checkpoint
        info = {key: value for key, value in self.info.items() if key != "config"}
        return {
            **info,
            "run_id": self.run_id,
            "uri": self.uri,
            "newest_checkpoint": newest.uri if newest else None,
            "held_by": self.held_by,
        }


def _read_json(
    uri: str, endpoint_url: str, retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S
) -> dict[str, Any] | None:
    if not storage.exists(uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s):
        return None
    try:
        data = storage.read_bytes(uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    except FileNotFoundError:  # gone since it was seen: Ray Train deleting a checkpoint past num_to_keep, say
        return None
    return _parse_json(uri, data)


def _parse_json(uri: str, data: bytes) -> dict[str, Any]:
    try:
        return json.loads(data)
    except ValueError as err:
        raise CatalogError(f"{uri} is not valid JSON: {err}") from None


def _registered_names(
    run_uri: str, endpoint_url: str, retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S
) -> set[str] | None:
    """Names of the checkpoints Ray Train registered for the run at `run_uri`; None when the
    folder has no snapshot (not a run folder)."""
    snapshot = _read_json(storage.join(run_uri, layout.SNAPSHOT_FILE), endpoint_url, retry_budget_s)
    if snapshot is None:
        return None
    return layout.checkpoint_names_in(json.dumps(snapshot))


def list_checkpoints(
    run_uri: str, *, endpoint_url: str = "", retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S
) -> list[CheckpointEntry]:
    """The checkpoints of a run that carry their `meta.json`, oldest first.

    `registered` says whether Ray Train registered the checkpoint (it is in the run's
    snapshot); one still uploading, or uploaded in part before a crash, is not, and a rerun
    resumes from the newest registered one.
    """
    registered = _registered_names(run_uri, endpoint_url, retry_budget_s) or set()
    entries = []
    for name in storage.list_dir(run_uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s):
        step = layout.checkpoint_step(name)
        if step is None:
            continue
        uri = storage.join(run_uri, name)
        try:
            meta = _read_json(storage.join(uri, layout.CHECKPOINT_META), endpoint_url, retry_budget_s)
        except (CatalogError, IsADirectoryError):  # damaged: listed, and refused where used (service.integrity)
            entries.append(CheckpointEntry(step=step, uri=uri, registered=name in registered))
            continue
        if meta is None:  # still uploading, or abandoned half-way
            continue
        entries.append(CheckpointEntry(step=step, uri=uri, registered=name in registered, meta=meta))
    return sorted(entries, key=lambda entry: entry.step)


def read_run(
    root: str, run_id: str, *, endpoint_url: str = "", retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S
) -> RunEntry | None:
    """The run `run_id` under `root`, or None when it has neither a run.json nor a checkpoint.
    UsageError for an id that is not a run id (it would name a folder outside the run's).
    Each storage operation retries transient errors for up to `retry_budget_s`."""
    try:
        uri = layout.run_uri(root, run_id)
    except ValueError as err:
        raise UsageError(str(err)) from None
    record_uri = storage.join(uri, layout.RUN_FILE)
    found = storage.read_with_token(record_uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    info = _parse_json(record_uri, found[0]) if found else None
    checkpoints = list_checkpoints(uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    if info is None and not checkpoints:
        return None
    lease = read_lease(
        uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s
    )  # read after the record: see _record_lost_job
    if found and info.get("state") in LIVE_STATES and (lease is None or not lease.live()):
        info = _record_lost_job(uri, info, found[1], lease, endpoint_url)
    return RunEntry(run_id=run_id, uri=uri, info=info or {"run_id": run_id}, checkpoints=checkpoints, lease=lease)


# States only a live job may leave in run.json: waiting (for its workers), running,
# stopping (a stop was requested: the checkpoint and the end) and finishing (the final
# checkpoint and the evaluation). The job ends each with a final state.
LIVE_STATES = ("waiting", "running", "stopping", "finishing")


def _record_lost_job(
    uri: str, info: dict[str, Any], token: str, lease: LeaseRecord | None, endpoint_url: str
) -> dict[str, Any]:
    """A record that says `running` while no job holds the run's lease: its job died without
    a last word (SIGKILL, a lost node). Say so in run.json, so that nobody waits for it.

    A job that ends writes its final record and then releases its lease: a record read
    before that write with a lease read after the release looks the same. So the rewrite is
    a compare-and-swap against the record as read (`token`); when the job's final record got
    there first, that record is the answer."""
    if lease is not None:
        when = dt.datetime.fromtimestamp(lease.heartbeat, dt.UTC).isoformat(timespec="seconds")
        why = f"its job ({lease.host} pid {lease.pid}) stopped renewing the run's lease at {when}"
    else:
        why = "no job holds the run's lease"
    info = {
        **info,
        "state": "failed",
        "error": f"the job training the run was lost: {why}; rerun with --resume to continue from the newest checkpoint",
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    record_uri = storage.join(uri, layout.RUN_FILE)
    try:
        storage.write_if(record_uri, json.dumps(info, indent=2).encode(), token=token, endpoint_url=endpoint_url)
    except storage.PreconditionFailed:  # the job's own last word arrived meanwhile
        return _read_json(record_uri, endpoint_url) or info
    except OSError:  # read-only credentials: the answer is still right, the record catches up later
        pass
    return info


def require_run(root: str, run_id: str, *, endpoint_url: str = "") -> RunEntry:
    entry = read_run(root, run_id, endpoint_url=endpoint_url)
    if entry is None:
        raise CatalogError(f"no run {run_id!r} under {root} (no {storage.join(root, run_id, layout.RUN_FILE)})")
    return entry


def list_runs(root: str, *, endpoint_url: str = "") -> list[RunEntry]:
    """Every run under `root` (folders with a run.json), newest update first."""
    runs = []
    for name in storage.list_dir(root, endpoint_url=endpoint_url):
        if not layout.is_run_id(name) or not storage.exists(
            storage.join(root, name, layout.RUN_FILE), endpoint_url=endpoint_url
        ):
            continue  # datasets/ and anything else that is not a run
        entry = read_run(root, name, endpoint_url=endpoint_url)
        if entry is not None:
            runs.append(entry)
    return sorted(runs, key=lambda run: str(run.info.get("updated", "")), reverse=True)


def newest_checkpoint_of(root: str, run_id: str, *, endpoint_url: str = "") -> CheckpointEntry:
    """The checkpoint `cmacc eval --run` and friends use: the run's newest registered one."""
    entry = require_run(root, run_id, endpoint_url=endpoint_url)
    newest = entry.newest_checkpoint
    if newest is None:
        unfinished = f" ({len(entry.checkpoints)} not registered yet)" if entry.checkpoints else ""
        raise CatalogError(f"run {run_id!r} at {entry.uri} has no complete checkpoint yet{unfinished}")
    return newest


def wait_registered(run_uri: str, name: str, *, timeout_s: float = 60.0, endpoint_url: str = "") -> bool:
    """Wait until the run's snapshot lists checkpoint `name` (Ray Train may write it a moment
    after `fit()` returns); whether it does within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while name not in (_registered_names(run_uri, endpoint_url) or set()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def check_registered(checkpoint_uri: str, *, endpoint_url: str = "") -> None:
    """Refuse a checkpoint folder of a run that Ray Train has not registered (its upload may
    be partial). A folder outside a run folder (a copy, no snapshot beside it) is the user's
    to vouch for."""
    parent, name = checkpoint_uri.rstrip("/").rsplit("/", 1) if "/" in checkpoint_uri.rstrip("/") else ("", "")
    registered = _registered_names(parent, endpoint_url) if parent else None
    if registered is not None and name not in registered:
        newest = max(registered, default=None)
        hint = f"; the run's newest registered checkpoint is {storage.join(parent, newest)}" if newest else ""
        raise CatalogError(
            f"{checkpoint_uri} was not registered by Ray Train: its upload may be partial (still running, or "
            f"cut short by a failure){hint}"
        )


def write_run_record(
    run_uri: str,
    *,
    run_id: str,
    recipe: str,
    sampler: str,
    data: str,
    config: dict[str, Any],
    state: str,
    last_step: int | None = None,
    error: str = "",
    note: str = "",
    evaluation: dict[str, Any] | None = None,
    train_s: float | None = None,
    progress: dict[str, Any] | None = None,
    endpoint_url: str = "",
    retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S,
) -> None:
    """Write the run's record, `<run>/run.json` (no credentials in it), keeping what the
    previous record of the run said about its creation, last step, progress and evaluation.
    `train_s`: this job's training time, added to the run's total (`timings.train_s_total`).
    `note`: what the state waits on (`waiting`: the resources the cluster lacks).
    `progress`: how far a training job has come (`step`, `total`, `loss`, `clips_per_s`,
    `at`), written by the job while it trains; its step becomes the last step."""
    uri = storage.join(run_uri, layout.RUN_FILE)
    previous = _read_json(uri, endpoint_url, retry_budget_s) or {}
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if progress is not None and last_step is None:
        last_step = int(progress["step"])
    entry = {
        "run_id": run_id,
        "recipe": recipe,
        "sampler": sampler,
        "data": data,
        "state": state,
        "last_step": previous.get("last_step", 0) if last_step is None else last_step,
        "error": error,
        "note": note,
        "created": previous.get("created", now),
        "updated": now,
        "progress": previous.get("progress") if progress is None else progress,
        "trackers": previous.get("trackers"),  # the MLflow and W&B runs a resumed job continues
        "eval": previous.get("eval"),
        "finetune": previous.get("finetune"),
        "timings": dict(previous.get("timings") or {}),
        "config": config,
    }
    if train_s is not None:
        entry["timings"]["train_s_total"] = round(entry["timings"].get("train_s_total", 0.0) + train_s, 2)
    if evaluation is not None:
        entry["eval"] = {
            "step": evaluation["step"],
            "uri": evaluation.get("uri", ""),
            "top1": {
                f"{modality}/{probe}": {"untrained": untrained, "pretrained": pretrained}
                for modality, probe, untrained, pretrained in reports.summary_rows(evaluation)
            },
        }
    storage.write_bytes(
        uri, json.dumps(entry, indent=2).encode(), endpoint_url=endpoint_url, retry_budget_s=retry_budget_s
    )


def note_result(run_uri: str, key: str, value: Any, *, endpoint_url: str = "", attempts: int = 5) -> None:
    """Set `key` of the run's record (`cmacc finetune` notes its result under "finetune"),
    by compare-and-swap, so that a record the run's own job writes meanwhile is not lost."""
    uri = storage.join(run_uri, layout.RUN_FILE)
    for _ in range(attempts):
        found = storage.read_with_token(uri, endpoint_url=endpoint_url)
        if found is None:
            raise CatalogError(f"{uri} does not exist: not a run folder")
        record = {**_parse_json(uri, found[0]), key: value}
        try:
            storage.write_if(uri, json.dumps(record, indent=2).encode(), token=found[1], endpoint_url=endpoint_url)
            return
        except storage.PreconditionFailed:
            continue
    raise CatalogError(f"{uri} kept changing: could not note {key}")
