"""The run catalog: what storage says about runs and their checkpoints (no Ray, no torch).

A run lives in `<storage root>/<run id>/`:

* `run.json`: the job's catalogue entry (run id, recipe, resolved config, sampler, data URI,
  state, last step, error, created and updated times, and the newest evaluation summary);
* `checkpoint-%08d/`: checkpoints (the number is the step), each with a `meta.json`;
* `checkpoint_manager_snapshot.json`: Ray Train's list of the checkpoints it registered (the
  ones a rerun resumes from); `metrics/`: the JSONL log and TensorBoard events;
* `eval/checkpoint-%08d.json`: the evaluations of checkpoints.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from service import storage

RUN_FILE = "run.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
CHECKPOINT_META = "meta.json"  # workers.distributed.META_FILE (this module stays torch-free)
EVAL_FOLDER = "eval"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d{8})$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class CatalogError(LookupError):
    """A run or checkpoint is missing or unreadable; the message names the URI."""


def check_run_id(run_id: str) -> str:
    """A run id is a folder name and a Ray submission id: letters, digits, `_`, `.`, `-`."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(
            f"run id {run_id!r}: use 1 to 100 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return run_id


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


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

    @property
    def newest_checkpoint(self) -> CheckpointEntry | None:
        registered = [c for c in self.checkpoints if c.registered]
        candidates = registered or self.checkpoints
        return candidates[-1] if candidates else None

    def to_dict(self) -> dict[str, Any]:
        newest = self.newest_checkpoint
        info = {key: value for key, value in self.info.items() if key != "config"}
        return {**info, "run_id": self.run_id, "uri": self.uri, "newest_checkpoint": newest.uri if newest else None}


def _read_json(uri: str, endpoint_url: str) -> dict[str, Any] | None:
    if not storage.exists(uri, endpoint_url=endpoint_url):
        return None
    try:
        return json.loads(storage.read_bytes(uri, endpoint_url=endpoint_url))
    except ValueError as err:
        raise CatalogError(f"{uri} is not valid JSON: {err}") from None


def list_checkpoints(run_uri: str, *, endpoint_url: str = "") -> list[CheckpointEntry]:
    """The checkpoints of a run that carry their `meta.json`, oldest first.

    `registered` says whether Ray Train registered the checkpoint (it is in the run's
    snapshot); a checkpoint uploaded just before a crash may not be, and a rerun then resumes
    from the newest registered one.
    """
    snapshot = _read_json(storage.join(run_uri, SNAPSHOT_FILE), endpoint_url)
    registered = set(re.findall(r"checkpoint-\d{8}", json.dumps(snapshot))) if snapshot else set()
    entries = []
    for name in storage.list_dir(run_uri, endpoint_url=endpoint_url):
        match = _CHECKPOINT_NAME.match(name)
        if not match:
            continue
        uri = storage.join(run_uri, name)
        meta = _read_json(storage.join(uri, CHECKPOINT_META), endpoint_url)
        if meta is None:  # still uploading, or abandoned half-way
            continue
        entries.append(CheckpointEntry(step=int(match.group(1)), uri=uri, registered=name in registered, meta=meta))
    return sorted(entries, key=lambda entry: entry.step)


def read_run(root: str, run_id: str, *, endpoint_url: str = "") -> RunEntry | None:
    """The run `run_id` under `root`, or None when it has neither a run.json nor a checkpoint."""
    uri = storage.join(root, run_id)
    info = _read_json(storage.join(uri, RUN_FILE), endpoint_url)
    checkpoints = list_checkpoints(uri, endpoint_url=endpoint_url)
    if info is None and not checkpoints:
        return None
    return RunEntry(run_id=run_id, uri=uri, info=info or {"run_id": run_id}, checkpoints=checkpoints)


def require_run(root: str, run_id: str, *, endpoint_url: str = "") -> RunEntry:
    entry = read_run(root, run_id, endpoint_url=endpoint_url)
    if entry is None:
        raise CatalogError(f"no run {run_id!r} under {root} (no {storage.join(root, run_id, RUN_FILE)})")
    return entry


def list_runs(root: str, *, endpoint_url: str = "") -> list[RunEntry]:
    """Every run under `root` (folders with a run.json), newest update first."""
    runs = []
    for name in storage.list_dir(root, endpoint_url=endpoint_url):
        if not storage.exists(storage.join(root, name, RUN_FILE), endpoint_url=endpoint_url):
            continue  # datasets/ and anything else that is not a run
        entry = read_run(root, name, endpoint_url=endpoint_url)
        if entry is not None:
            runs.append(entry)
    return sorted(runs, key=lambda run: str(run.info.get("updated", "")), reverse=True)


def eval_uri(run_uri: str, step: int) -> str:
    return storage.join(run_uri, EVAL_FOLDER, f"{checkpoint_name(step)}.json")
