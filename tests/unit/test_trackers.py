"""Experiment trackers (workers.trackers) against real stores: MLflow's SQLite store in a
temporary run folder, in a `MLFLOW_TRACKING_URI` store and in a `memory://` run folder;
W&B offline. No network: W&B runs with WANDB_MODE=offline, MLflow's telemetry is off.

MLflow's first creation of a database takes seconds, so the local run of the module fixture
makes the one database every other MLflow test starts from (a copy)."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import sqlite3
import uuid
from pathlib import Path

import pytest

from service import storage
from service.errors import UsageError
from workers import trackers

pytestmark = [
    pytest.mark.unit,
    # MLflow 3.18's own use of SQLAlchemy 2.1
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),
]

PNG = b"\x89PNG\r\n\x1a\n-confusion-"
LONG = "x" * 7000


@pytest.fixture(autouse=True)
def quiet_and_offline(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def run_two_jobs(names, run_uri, *, project="cmacc-test"):
    """A first job (params, steps 1..3, an artifact) and a second job of the same run
    resumed from the first one's ids (params again, one changed; steps 4..5, an artifact).
    Returns both trackers' ids."""
    first = trackers.open_trackers(names, run_uri=run_uri, run_name="r1", project=project, ids=None)
    first.log_params(trackers.flatten({"method": {"sampler": "active"}, "data": {"uri": LONG}, "train": {"steps": 3}}))
    first.log_metrics(1, {"train/loss": 0.5})
    first.log_metrics(2, {"train/loss": 0.375, "dict/staleness": math.nan})
    first.log_metrics(3, {"train/loss": 0.25})
    first.log_artifact("eval/confusion-video-linear.png", PNG)
    first.sync()
    first.close()
    second = trackers.open_trackers(names, run_uri=run_uri, run_name="r1", project=project, ids=first.ids)
    second.log_params({"method.sampler": "active", "train.steps": 5})
    second.log_metrics(4, {"train/loss": 0.1875})
    second.log_metrics(5, {"train/loss": 0.125})
    second.log_artifact("eval/checkpoint-00000005.json", b'{"step": 5}')
    second.close()
    return first.ids, second.ids


def check_mlflow_run(client, run_id):
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["method.sampler"] == "active" and run.data.params["train.steps"] == "3"
    assert run.data.params["data.uri"] == LONG[:6000]
    assert run.data.tags["param_changed.train.steps"] == "5"
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.375), (3, 0.25), (4, 0.1875), (5, 0.125)]
    assert "dict/staleness" not in run.data.metrics  # NaN: skipped
    listed = {f.path for folder in ("", "eval") for f in client.list_artifacts(run_id, folder or None)}
    assert {"eval/confusion-video-linear.png", "eval/checkpoint-00000005.json"} <= listed


@pytest.fixture(scope="module")
def local_mlflow_run(tmp_path_factory):
    """Two jobs of a run in a local run folder with MLflow (its store made from nothing)."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    run = tmp_path_factory.mktemp("local") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        ids = run_two_jobs(["tensorboard", "mlflow"], str(run))
    return run, ids


def mlflow_client(db: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def test_mlflow_in_a_local_run_folder_continues_its_run_when_resumed(local_mlflow_run):
    run, (first, second) = local_mlflow_run
    db = run / "mlflow" / "mlflow.db"
    assert first == second and set(first) == {"mlflow"}
    kept = first["mlflow"]
    assert kept["tracking_uri"] == f"sqlite:///{db}" and kept["run_id"] and kept["experiment_id"]
    client = mlflow_client(db)
    experiment = client.get_experiment_by_name("cmacc-test")
    assert experiment.artifact_location == str(run / "mlflow" / "artifacts")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [kept["run_id"]]
    check_mlflow_run(client, kept["run_id"])
    assert (
        run / "mlflow" / "artifacts" / kept["run_id"] / "artifacts" / "eval" / "confusion-video-linear.png"
    ).exists()


def test_mlflow_tracking_uri_wins_over_the_run_folder(local_mlflow_run, tmp_path, monkeypatch):
    server = tmp_path / "server"
    server.mkdir()
    shutil.copy(local_mlflow_run[0] / "mlflow" / "mlflow.db", server / "mlflow.db")  # a store with a run in it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{server / 'mlflow.db'}")
    first, second = run_two_jobs(["mlflow"], str(tmp_path / "run"), project="cmacc-env")
    assert first == second and first["mlflow"]["tracking_uri"] == f"sqlite:///{server / 'mlflow.db'}"
    assert not (tmp_path / "run" / "mlflow").exists()
    client = mlflow_client(server / "mlflow.db")
    experiment = client.get_experiment_by_name("cmacc-env")
    assert experiment.artifact_location == str(server / "artifacts")  # next to the database, not the cwd
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [first["mlflow"]["run_id"]]
    assert len(client.search_runs([client.get_experiment_by_name("cmacc-test").experiment_id])) == 1
    check_mlflow_run(client, first["mlflow"]["run_id"])


def memory_files(uri: str) -> dict[str, bytes]:
    fs, base = storage.filesystem(uri)
    return {path[len(base) :].lstrip("/"): fs.cat_file(path) for path in fs.find(base)}


def test_mlflow_in_a_remote_run_folder_is_uploaded_and_found_again(local_mlflow_run, tmp_path):
    run = f"memory://cmacc-trackers-{uuid.uuid4().hex}/runs/r1"
    storage.write_bytes(f"{run}/mlflow/mlflow.db", (local_mlflow_run[0] / "mlflow" / "mlflow.db").read_bytes())
    first = trackers.open_trackers(["mlflow"], run_uri=run, run_name="r1", project="cmacc-remote", ids=None)
    local = first.trackers[0].mirror.local
    run_id = first.ids["mlflow"]["run_id"]
    assert first.ids["mlflow"]["tracking_uri"] == f"{run}/mlflow/mlflow.db"
    first.log_metrics(1, {"train/loss": 0.5})
    first.log_artifact("eval/confusion-video-linear.png", PNG)
    first.sync()  # uploaded at sync
    artifact = f"artifacts/{run_id}/artifacts/eval/confusion-video-linear.png"
    assert memory_files(f"{run}/mlflow")[artifact] == PNG
    first.log_metrics(2, {"train/loss": 0.25})
    first.close()  # and at close, which removes the local copy
    assert not os.path.exists(local)

    second = trackers.open_trackers(["mlflow"], run_uri=run, run_name="r1", project="cmacc-remote", ids=first.ids)
    assert second.ids["mlflow"]["run_id"] == run_id and second.trackers[0].mirror.local != local
    second.log_metrics(3, {"train/loss": 0.125})
    second.log_artifact("eval/checkpoint-00000003.json", b"{}")
    second.close()

    files = memory_files(f"{run}/mlflow")
    assert f"artifacts/{run_id}/artifacts/eval/checkpoint-00000003.json" in files and artifact in files
    db = tmp_path / "mlflow.db"
    db.write_bytes(files["mlflow.db"])
    with sqlite3.connect(db) as con:
        steps = con.execute("SELECT step FROM metrics WHERE run_uuid = ? ORDER BY step", (run_id,)).fetchall()
        (status,) = con.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
    assert [s for (s,) in steps] == [1, 2, 3] and status == "FINISHED"


def wandb_runs(folder: Path, run_id: str) -> list[Path]:
    return sorted((folder / "wandb").glob(f"offline-run-*-{run_id}"))


def test_wandb_offline_run_lands_in_the_run_folder_and_resumes_its_id(tmp_path):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    run = tmp_path / "run"
    first = trackers.open_trackers(["wandb"], run_uri=str(run), run_name="r1", project="cmacc-test", ids=None)
    run_id = first.ids["wandb"]["id"]
    assert first.ids == {"wandb": {"id": run_id, "project": "cmacc-test"}}
    first.log_params(trackers.flatten({"method": {"sampler": "active"}}))
    first.log_metrics(1, {"train/loss": 0.5})
    first.log_metrics(2, {"train/loss": math.inf, "dict/staleness": 3.0})
    first.log_metrics(3, {"train/loss": 0.4375})
    first.log_artifact("eval/confusion-video-linear.png", PNG)
    first.close()
    (folder,) = wandb_runs(run, run_id)
    # W&B 0.31 offline writes no wandb-summary.json: the metrics are in the run's transaction
    # log, `run-<id>.wandb`, whose history records hold each key and its value as JSON text.
    records = (folder / f"run-{run_id}.wandb").read_bytes()
    assert b"train/loss" in records and b"0.4375" in records and b"method.sampler" in records
    assert b"Infinity" not in records
    assert (folder / "files" / "eval" / "confusion-video-linear.png").read_bytes() == PNG

    # another run open in the process meanwhile: closing waits for the file, not for W&B's teardown
    other = trackers.open_trackers(["wandb"], run_uri=str(tmp_path / "other"), run_name="o", project="p", ids=None)
    second = trackers.open_trackers(["wandb"], run_uri=str(run), run_name="r1", project="cmacc-test", ids=first.ids)
    assert second.ids == first.ids
    second.log_metrics(4, {"train/loss": 0.3125})
    second.close()
    folders = wandb_runs(run, run_id)
    assert len(folders) == 2 and b"0.3125" in (folders[1] / f"run-{run_id}.wandb").read_bytes()
    other.close()


def test_both_trackers_in_a_remote_run_folder(local_mlflow_run):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    run = f"memory://cmacc-trackers-{uuid.uuid4().hex}/runs/r2"
    storage.write_bytes(f"{run}/mlflow/mlflow.db", (local_mlflow_run[0] / "mlflow" / "mlflow.db").read_bytes())
    tracker = trackers.open_trackers(
        ["tensorboard", "mlflow", "wandb"], run_uri=run, run_name="r2", project="cmacc-both", ids=None
    )
    assert set(tracker.ids) == {"mlflow", "wandb"}
    tracker.log_metrics(1, {"train/loss": 0.5})
    tracker.log_artifact("eval/confusion-video-linear.png", PNG)
    tracker.close()
    run_id = tracker.ids["wandb"]["id"]
    files = memory_files(f"{run}/wandb")
    assert any(name.startswith("offline-run-") and name.endswith(f"/run-{run_id}.wandb") for name in files)
    assert any(name.endswith("/files/eval/confusion-video-linear.png") for name in files)
    assert f"artifacts/{tracker.ids['mlflow']['run_id']}/artifacts/eval/confusion-video-linear.png" in memory_files(
        f"{run}/mlflow"
    )


def test_no_trackers_is_the_no_op_tracker(tmp_path):
    for names in ([], ["tensorboard"]):
        tracker = trackers.open_trackers(names, run_uri=str(tmp_path), run_name="r", project="p", ids=None)
        assert type(tracker) is trackers.Tracker and tracker.ids == {}
        tracker.log_params({"a": 1})
        tracker.log_metrics(1, {"train/loss": 1.0})
        tracker.log_artifact("eval/x.json", b"{}")
        tracker.sync()
        tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_check_available_names_the_setting_the_tracker_and_the_extra(monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    trackers.check_available(["tensorboard", "mlflow"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UsageError) as err:
        trackers.check_available(["mlflow"])
    assert str(err.value) == "train.trackers: 'mlflow' needs the mlflow extra: pip install -e '.[mlflow]'"
    with pytest.raises(UsageError, match=r"train\.trackers: unknown tracker 'neptune' \(known: tensorboard, mlflow"):
        trackers.open_trackers(["neptune"], run_uri="memory://x", run_name="r", project="p", ids=None)


def test_flatten_makes_dotted_keys():
    config = {"method": {"sampler": "active", "dictionary": {"size": 4096}}, "seed": 1, "extra": {}}
    assert trackers.flatten(config) == {
        "method.sampler": "active",
        "method.dictionary.size": 4096,
        "seed": 1,
        "extra": {},
    }
