"""Experiment trackers of a training run: MLflow and Weights & Biases, next to the JSONL file
and TensorBoard events of `workers.metrics` (`tensorboard`, that module's, is accepted here
and ignored). Rank 0 opens them (`open_trackers`) and logs; every other rank, and a run
without trackers, holds the no-op `Tracker`. A package is imported when its tracker opens.

Where they write (`<run>`: the run folder):

* MLflow: the tracking URI in `MLFLOW_TRACKING_URI` when it is set (read at open); else the
  run's own SQLite store `<run>/mlflow/mlflow.db`, artifacts in `<run>/mlflow/artifacts/`
  (`mlflow ui --backend-store-uri sqlite:///<run>/mlflow/mlflow.db` shows it). A run folder
  in object storage gets that layout in a local temporary folder, downloaded from
  `<run>/mlflow/` at open and uploaded there (changed files, the database last) at `sync()`
  and `close()`. Experiment: the project; run: the run name. Each tracker has an
  `MlflowClient` of its own, with explicit ids (never the fluent active run).
* W&B: `wandb.init(dir=<run>)`, so a local run folder gets `<run>/wandb/`; a remote one a
  temporary folder uploaded to `<run>/wandb/` at `sync()` and `close()`. Its mode (online,
  `WANDB_MODE=offline`: `wandb sync <run>/wandb/offline-run-*` later) is W&B's to read.

A later job of the run passes the `ids` an earlier one kept, and each tracker continues its
run: the same MLflow run (one its store does not hold: a new run, with a warning), the same
W&B run id (`resume="allow"`). Steps a resumed job repeats are logged again; W&B plots every
metric against the logged `step`, so it drops none of them.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import Any

from service import storage
from service.errors import UsageError

logger = logging.getLogger("cmacc")

KNOWN = ("tensorboard", "mlflow", "wandb")
# The modules each tracker needs (MLflow's own SQLite store needs SQLAlchemy and Alembic).
_MODULES = {"tensorboard": (), "mlflow": ("mlflow", "sqlalchemy", "alembic"), "wandb": ("wandb",)}


def check_available(names: Iterable[str]) -> None:
    """Refuse (UsageError) a name that is not in `KNOWN`, or a tracker whose package is not
    installed, naming the extra that installs it. Imports nothing."""
    for name in names:
        if name not in _MODULES:
            raise UsageError(f"train.trackers: unknown tracker {name!r} (known: {', '.join(KNOWN)})")
        for module in _MODULES[name]:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise UsageError(f"train.trackers: {name!r} needs the {name} extra: pip install -e '.[{name}]'")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config with dotted keys: {"method": {"sampler": "active"}} ->
    {"method.sampler": "active"}. An empty table stays `{}`."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items() if math.isfinite(float(value))}


class Tracker:
    """Does nothing: what a run without trackers, and every rank but 0, holds; the base of
    the trackers. `ids`: what a later job of the run needs to continue the same runs."""

    def __init__(self) -> None:
        self.ids: dict[str, Any] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log the run's settings (flat keys: `flatten(config)`)."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log one step's metrics. Non-finite values (NaN, inf) are skipped (the JSONL file
        of `workers.metrics` keeps them)."""

    def log_artifact(self, name: str, data: bytes) -> None:
        """Store a file of the run as `name`, a relative path (`eval/confusion-video-linear.png`)."""

    def sync(self) -> None:
        """Make what was logged so far durable in the run folder (uploads a remote one's)."""

    def close(self, status: str = "FINISHED") -> None:
        """End the tracker's run (`status`: FINISHED, FAILED or KILLED) and sync it."""


class Trackers(Tracker):
    """Fans every call out to its trackers, in order. `sync` and `close` reach every tracker
    even when one fails, then raise the first error."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    @property
    def ids(self) -> dict[str, Any]:  # type: ignore[override]
        return {key: value for tracker in self.trackers for key, value in tracker.ids.items()}

    def log_params(self, params: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_params(params)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(step, metrics)

    def log_artifact(self, name: str, data: bytes) -> None:
        for tracker in self.trackers:
            tracker.log_artifact(name, data)

    def sync(self) -> None:
        _every([tracker.sync for tracker in self.trackers])

    def close(self, status: str = "FINISHED") -> None:
        _every([lambda t=tracker: t.close(status) for tracker in self.trackers])


def _every(calls: list[Any]) -> None:
    """Make every call, then raise the first error (the others are logged)."""
    first: Exception | None = None
    for call in calls:
        try:
            call()
        except Exception as err:
            if first is not None:
                logger.warning("tracker: %s: %s", type(err).__name__, err)
            first = first or err
    if first is not None:
        raise first


def open_trackers(
    names: Iterable[str],
    *,
    run_uri: str,
    run_name: str,
    project: str,
    ids: Mapping[str, Any] | None,
    endpoint_url: str = "",
    retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S,
) -> Tracker:
    """The named trackers as one `Tracker` (the no-op one when none is left). `ids`: the
    `ids` an earlier job of the same run kept (None for a new run)."""
    names = list(dict.fromkeys(names))
    check_available(names)
    io = {"endpoint_url": endpoint_url, "retry_budget_s": retry_budget_s}
    kinds: dict[str, Any] = {"mlflow": MlflowTracker, "wandb": WandbTracker}
    opened: list[Tracker] = []
    try:
        for name in names:
            if name in kinds:
                opened.append(kinds[name](run_uri, run_name, project, (ids or {}).get(name), io))
    except BaseException:
        for tracker in opened:
            try:
                tracker.close("FAILED")
            except Exception as err:
                logger.warning("tracker: closing after a failed open: %s: %s", type(err).__name__, err)
        raise
    return Trackers(opened) if opened else Tracker()


class _Mirror:
    """A local temporary folder standing for the remote folder `remote`: `pull` downloads
    what that holds, `push` uploads every file that changed since (the files named in `last`
    after the others; symbolic links skipped). `io`: endpoint_url and retry_budget_s."""

    def __init__(self, remote: str, prefix: str, io: dict[str, Any]) -> None:
        self.remote, self.io = remote, io
        self.local = tempfile.mkdtemp(prefix=prefix)
        self.pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) uploaded

    def pull(self) -> None:
        fs, base = storage.filesystem(self.remote, endpoint_url=self.io["endpoint_url"])
        base = base.rstrip("/")
        for path in storage.retry("list", self.remote, lambda: fs.find(base), budget_s=self.io["retry_budget_s"]):
            rel = path[len(base) :].lstrip("/") if path.startswith(base) else os.path.relpath(path, base)
            if rel and not rel.startswith(".."):
                target = os.path.join(self.local, *rel.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(storage.read_bytes(storage.join(self.remote, rel), **self.io))
                self.pushed[rel] = _state(target)

    def push(self, last: tuple[str, ...] = ()) -> None:
        found = [
            os.path.relpath(os.path.join(folder, name), self.local).replace(os.sep, "/")
            for folder, _, files in os.walk(self.local)
            for name in files
            if not os.path.islink(os.path.join(folder, name))
        ]
        for rel in sorted(found, key=lambda rel: (rel in last, rel)):
            try:
                state = _state(os.path.join(self.local, rel))
                if self.pushed.get(rel) == state:
                    continue
                with open(os.path.join(self.local, rel), "rb") as f:
                    data = f.read()
            except FileNotFoundError:  # removed meanwhile by its writer
                continue
            storage.write_bytes(storage.join(self.remote, rel), data, **self.io)
            self.pushed[rel] = state

    def close(self, last: tuple[str, ...] = ()) -> None:
        """Push, then remove the local folder (also when the push fails)."""
        try:
            self.push(last)
        finally:
            shutil.rmtree(self.local, ignore_errors=True)


def _state(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


# --- MLflow -----------------------------------------------------------------------------------


class MlflowTracker(Tracker):
    """One MLflow run, through an `MlflowClient` of its own (see the module's docstring)."""

    def __init__(self, run_uri: str, run_name: str, project: str, ids: Mapping[str, Any] | None, io: dict) -> None:
        super().__init__()
        from mlflow import MlflowClient  # sets its loggers' levels when first imported

        for name in ("mlflow", "alembic"):  # their INFO lines (database creation, migrations)
            logging.getLogger(name).setLevel(max(logging.getLogger(name).getEffectiveLevel(), logging.WARNING))
        self.mirror: _Mirror | None = None
        self.own_store = ""  # the folder of the run's own store ("" with MLFLOW_TRACKING_URI)
        tracking_uri = kept_uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        artifacts = _artifacts_next_to(tracking_uri)
        if not tracking_uri:
            if storage.is_local(run_uri):
                self.own_store = os.path.join(storage.absolute(run_uri), "mlflow")
                os.makedirs(self.own_store, exist_ok=True)
            else:
                self.mirror = _Mirror(storage.join(run_uri, "mlflow"), "cmacc-mlflow-", io)
                self.mirror.pull()
                self.own_store = self.mirror.local
            db = os.path.join(self.own_store, "mlflow.db")
            artifacts = os.path.join(self.own_store, "artifacts")
            _relocate_artifacts(db, artifacts)  # a store that moved (a remote one always has)
            tracking_uri = f"sqlite:///{db}"
            kept_uri = tracking_uri if self.mirror is None else storage.join(run_uri, "mlflow", "mlflow.db")
        self.client: Any = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = self._resume((ids or {}).get("run_id")) or self._new_run(project, run_name, artifacts)
        info = self.client.get_run(self.run_id).info
        # The own store's artifacts are written here directly (see log_artifact).
        self.artifact_dir = info.artifact_uri.removeprefix("file://") if self.own_store else ""
        self.ids = {"mlflow": {"run_id": self.run_id, "experiment_id": info.experiment_id, "tracking_uri": kept_uri}}

    def _resume(self, run_id: str | None) -> str | None:
        from mlflow.exceptions import MlflowException

        if not run_id:
            return None
        try:
            self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            logger.warning("mlflow: run %s is not in this store (%s): starting a new run", run_id, err.message)
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _new_run(self, project: str, run_name: str, artifacts: str | None) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(project)
        if experiment is None:
            try:
                self.client.create_experiment(project, artifact_location=artifacts)
            except MlflowException as err:  # unless another job created it meanwhile
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            experiment = self.client.get_experiment_by_name(project)
        return self.client.create_run(experiment.experiment_id, run_name=run_name).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Values become strings of at most MLflow's length. MLflow never changes a logged
        param: a value that differs from the one an earlier job logged becomes the tag
        `param_changed.<key>`."""
        from mlflow.entities import Param, RunTag
        from mlflow.utils import validation

        key_max, value_max = validation.MAX_ENTITY_KEY_LENGTH, validation.MAX_PARAM_VAL_LENGTH
        logged = self.client.get_run(self.run_id).data.params
        new, changed = [], []
        for key, value in params.items():
            key, text = str(key)[:key_max], str(value)[:value_max]
            if key not in logged:
                new.append(Param(key, text))
            elif logged[key] != text:
                changed.append(RunTag(f"param_changed.{key}"[:key_max], text))
        batch = validation.MAX_PARAMS_TAGS_PER_BATCH
        for start in range(0, max(len(new), len(changed)), batch):
            self.client.log_batch(self.run_id, params=new[start : start + batch], tags=changed[start : start + batch])

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Non-finite values are skipped."""
        from mlflow.entities import Metric

        at = int(time.time() * 1000)
        entries = [Metric(name, value, at, int(step)) for name, value in _finite(metrics).items()]
        for start in range(0, len(entries), 1000):
            self.client.log_batch(self.run_id, metrics=entries[start : start + 1000])

    def log_artifact(self, name: str, data: bytes) -> None:
        """The run's own store: written into the run's artifact folder, as MLflow's local
        artifact repository would (MLflow caches a run's artifact location per process,
        which a relocated store outdates); any other store: through MLflow."""
        name = name.strip("/")
        with tempfile.TemporaryDirectory(prefix="cmacc-artifact-") as tmp:
            path = os.path.join(tmp, os.path.basename(name))
            with open(path, "wb") as f:
                f.write(data)
            if self.artifact_dir:
                target = os.path.join(self.artifact_dir, *name.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.move(path, target)
            else:
                self.client.log_artifact(self.run_id, path, artifact_path=os.path.dirname(name) or None)

    def sync(self) -> None:
        """Upload a remote run folder's store (its database last); a local store and a
        tracking server have everything already."""
        if self.mirror is not None:
            self.mirror.push(last=("mlflow.db",))

    def close(self, status: str = "FINISHED") -> None:
        if self.client is None:
            return
        client, self.client = self.client, None
        try:
            status = status.upper() if status.upper() in ("FINISHED", "FAILED", "KILLED") else "FINISHED"
            client.set_terminated(self.run_id, status=status)
        finally:
            if self.own_store:  # let go of the database file (MLflow caches its store by URI)
                engine = getattr(getattr(getattr(client, "_tracking_client", None), "store", None), "engine", None)
                if engine is not None:
                    engine.dispose()
            if self.mirror is not None:
                self.mirror.close(last=("mlflow.db",))


def _artifacts_next_to(tracking_uri: str) -> str | None:
    """Where a new experiment of a `MLFLOW_TRACKING_URI` store keeps its artifacts: next to
    a SQLite database file (not in the current folder); elsewhere, the store's default."""
    path = tracking_uri.removeprefix("sqlite:///")
    if path != tracking_uri and path not in ("", ":memory:"):
        return os.path.join(os.path.dirname(os.path.abspath(path)), "artifacts")
    return None


def _relocate_artifacts(db: str, artifacts: str) -> None:
    """Point the experiments and runs of the run's own store at `artifacts` when the store was
    written elsewhere (each job downloads a remote run folder's store to a new temporary
    folder; a local run folder may have moved): MLflow keeps absolute artifact locations and
    has no API to change them. Experiment 0 (MLflow's Default) is left alone."""
    if not os.path.exists(db):
        return
    moved = "SELECT experiment_id FROM experiments WHERE experiment_id != 0 AND artifact_location != ?"
    con = sqlite3.connect(db)
    try:
        with con:
            con.execute(
                f"UPDATE runs SET artifact_uri = ? || '/' || run_uuid || '/artifacts' WHERE experiment_id IN ({moved})",
                (artifacts, artifacts),
            )
            con.execute(
                f"UPDATE experiments SET artifact_location = ? WHERE experiment_id IN ({moved})", (artifacts,) * 2
            )
    except sqlite3.Error as err:
        logger.warning("mlflow: could not point %s at %s: %s", db, artifacts, err)
    finally:
        con.close()


# --- Weights & Biases ---------------------------------------------------------------------------


class WandbTracker(Tracker):
    """One W&B run (see the module's docstring); metrics are plotted against `step`."""

    STEP = "step"

    def __init__(self, run_uri: str, run_name: str, project: str, ids: Mapping[str, Any] | None, io: dict) -> None:
        super().__init__()
        import wandb

        self.mirror: _Mirror | None = None
        if storage.is_local(run_uri):
            folder = storage.absolute(run_uri)
            os.makedirs(folder, exist_ok=True)
        else:  # W&B writes `wandb/` into the temporary folder, and nothing else
            self.mirror = _Mirror(run_uri, "cmacc-wandb-", io)
            folder = self.mirror.local
        ids = ids or {}
        project = ids.get("project") or project
        self.run: Any = wandb.init(
            project=project,
            name=run_name,
            id=ids.get("id") or None,
            resume="allow",
            dir=folder,
            reinit="create_new",  # a run per tracker: several may be open in a process
        )
        self.run.define_metric(self.STEP, hidden=True)
        self.run.define_metric("*", step_metric=self.STEP)
        self.ids = {"wandb": {"id": self.run.id, "project": project}}
        self.sync_file = str(getattr(self.run.settings, "sync_file", "") or "")  # run-<id>.wandb

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Non-finite values are skipped."""
        finite = _finite(metrics)
        if finite:
            self.run.log({self.STEP: int(step), **finite})

    def log_artifact(self, name: str, data: bytes) -> None:
        """The file goes to the run's files (`files/<name>` in its folder; uploaded now when
        the run is online)."""
        path = os.path.join(self.run.dir, *name.strip("/").split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        self.run.save(path, base_path=self.run.dir, policy="now")

    def sync(self) -> None:
        """Upload a remote run folder's W&B files as they are now (W&B's own process writes
        them: its newest records may wait for the next sync, or the close)."""
        if self.mirror is not None:
            self.mirror.push()

    def close(self, status: str = "FINISHED") -> None:
        """Finish the run, wait until W&B has written it (`_wait_written`), then upload a
        remote run folder's files."""
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=1 if status.upper() == "FAILED" else 0)
            _wait_written(self.sync_file)
        finally:
            if self.mirror is not None:
                self.mirror.close()


def _wait_written(sync_file: str, *, quiet_s: float = 0.5, limit_s: float = 10.0) -> None:
    """`run.finish()` returns before W&B's service has written the run's last records (offline,
    its transaction log may hold just its header then). With no other W&B run active in the
    process, `wandb.teardown()` waits until the service has written every run and stopped
    (the next `wandb.init` starts another); else wait until the transaction log has not
    changed for `quiet_s` (at most `limit_s`)."""
    import wandb

    try:
        from wandb.sdk import wandb_setup

        others = wandb_setup.singleton().most_recent_active_run is not None
    except Exception:  # a W&B without it: wait on the file
        others = True
    if not others:
        wandb.teardown()
        return
    deadline = time.monotonic() + limit_s
    last, since = None, time.monotonic()
    while sync_file and time.monotonic() < deadline:
        size = os.path.getsize(sync_file) if os.path.exists(sync_file) else None
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.05)
