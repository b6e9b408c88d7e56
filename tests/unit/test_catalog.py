"""The run catalog reads storage only: runs, checkpoints (registered or not), the refusal to
reuse a run id with a checkpoint, and the cached default data set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service import catalog, layout, storage

pytestmark = pytest.mark.unit

PROJECT = Path(__file__).resolve().parents[2]


def make_run(root: str, run_id: str, *, steps: list[int], registered: list[int], updated: str, state="succeeded"):
    """A run folder as `jobs.pretrain` and Ray Train leave it (only the files the catalog reads)."""
    run = storage.join(root, run_id)
    info = {"run_id": run_id, "recipe": "demo", "sampler": "active", "state": state, "last_step": max(steps, default=0)}
    storage.write_bytes(storage.join(run, "run.json"), json.dumps({**info, "updated": updated, "config": {}}).encode())
    for step in steps:
        meta = {"step": step, "run_id": run_id, "time": 1.0e9 + step}
        storage.write_bytes(storage.join(run, layout.checkpoint_name(step), "meta.json"), json.dumps(meta).encode())
    snapshot = {"checkpoints": [{"path": f"{run}/{layout.checkpoint_name(s)}"} for s in registered]}
    storage.write_bytes(storage.join(run, layout.SNAPSHOT_FILE), json.dumps(snapshot).encode())
    return run


def test_runs_are_listed_newest_first_with_their_newest_registered_checkpoint(tmp_path):
    root = str(tmp_path / "runs")
    make_run(root, "old", steps=[2, 4], registered=[2, 4], updated="2026-11-01T00:00:00+00:00")
    # checkpoint 6 was uploaded but not registered before a crash: a rerun resumes from 4
    make_run(root, "new", steps=[2, 4, 6], registered=[2, 4], updated="2026-11-02T00:00:00+00:00")
    storage.write_bytes(storage.join(root, "datasets", "synth-x", "manifest.json"), b"{}")  # not a run
    runs = catalog.list_runs(root)
    assert [r.run_id for r in runs] == ["new", "old"]
    assert runs[0].newest_checkpoint.step == 4
    assert [(c.step, c.registered) for c in runs[0].checkpoints] == [(2, True), (4, True), (6, False)]
    assert runs[0].to_dict()["newest_checkpoint"].endswith("new/checkpoint-00000004")
    assert "config" not in runs[0].to_dict()


def test_a_checkpoint_without_its_meta_is_still_uploading_and_not_listed(tmp_path):
    root = str(tmp_path)
    run = make_run(root, "r", steps=[2], registered=[2], updated="")
    storage.write_bytes(storage.join(run, layout.checkpoint_name(4), "train.pt"), b"partial")
    assert [c.step for c in catalog.list_checkpoints(run)] == [2]


def test_a_checkpoint_deleted_while_it_is_listed_is_left_out(tmp_path, monkeypatch):
    """Ray Train deletes checkpoints past `num_to_keep` while `cmacc runs` lists them: a
    meta.json seen by `exists` and gone when read is a checkpoint no longer there."""
    root = str(tmp_path)
    run = make_run(root, "r", steps=[2, 4], registered=[4], updated="")
    gone = storage.join(run, layout.checkpoint_name(2), "meta.json")
    read_bytes = storage.read_bytes

    def deleted_meanwhile(uri, **kwargs):
        if uri == gone:
            raise FileNotFoundError(f"read: no such file or object: {uri}")
        return read_bytes(uri, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", deleted_meanwhile)
    assert [c.step for c in catalog.list_checkpoints(run)] == [4]
    assert [r.run_id for r in catalog.list_runs(root)] == ["r"]


def test_missing_run_names_the_uri(tmp_path):
    assert catalog.read_run(str(tmp_path), "nope") is None
    with pytest.raises(catalog.CatalogError, match=str(tmp_path / "nope")):
        catalog.require_run(str(tmp_path), "nope")


@pytest.mark.parametrize("bad", ["", "a/b", ".hidden", "x" * 101, "sp ace", "-dash", "ok\n", "../x", ".."])
def test_run_ids_must_be_folder_and_job_names(bad):
    with pytest.raises(ValueError, match="run id"):
        layout.check_run_id(bad)


def test_commands_that_read_a_run_refuse_an_id_that_leaves_the_storage_root(tmp_path):
    root = tmp_path / "root"
    make_run(str(tmp_path), "outside", steps=[2], registered=[2], updated="2026-01-01")
    root.mkdir()
    for argv in (["checkpoints", "../outside"], ["eval", "--run", "../outside"]):
        result = _cmacc(*argv, "--storage", str(root))
        assert result.returncode == 2, result.stderr
        assert "run id '../outside'" in result.stderr and "Traceback" not in result.stderr


def _cmacc(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", *argv], cwd=PROJECT, capture_output=True, text=True, timeout=120
    )


def test_cmacc_pretrain_refuses_a_run_id_with_a_checkpoint_without_resume_and_touches_nothing(tmp_path):
    root = tmp_path / "runs"
    make_run(str(root), "taken", steps=[2], registered=[2], updated="")
    before = {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    result = _cmacc("pretrain", "--run-id", "taken", "--storage", str(root))
    assert result.returncode == 2, result.stderr
    assert "--resume" in result.stderr and str(root / "taken") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    after = {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before


def test_catalog_commands_print_tables_and_fail_clearly(tmp_path):
    root = str(tmp_path / "runs")
    make_run(root, "r1", steps=[2, 4], registered=[2, 4], updated="2026-11-01T00:00:00+00:00")
    runs = _cmacc("runs", "--storage", root)
    assert runs.returncode == 0 and "r1" in runs.stdout and "checkpoint-00000004" in runs.stdout
    checkpoints = _cmacc("checkpoints", "r1", "--storage", root, "--json")
    assert [c["step"] for c in json.loads(checkpoints.stdout)] == [2, 4]
    missing = _cmacc("checkpoints", "r2", "--storage", root)
    assert missing.returncode == 1 and "r2" in missing.stderr
    no_data = _cmacc("eval", "--checkpoint", f"{root}/r1/checkpoint-00000004")
    assert no_data.returncode == 2 and "--data" in no_data.stderr


def test_default_data_is_generated_once_and_reused(tmp_path, capsys):
    from service.config import load_recipe
    from workers import driver

    cfg = load_recipe("demo", ["data.num_clips=12", "data.frames=2", "data.size=16", "data.clip_seconds=0.25"])
    first = driver.default_data(cfg, str(tmp_path))
    assert "generating 12 synthetic clips" in capsys.readouterr().out
    written = {p: p.stat().st_mtime_ns for p in Path(first).rglob("*")}
    assert driver.default_data(cfg, str(tmp_path)) == first
    assert "generating" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in Path(first).rglob("*")} == written
    other = load_recipe("demo", ["data.num_clips=13", "data.frames=2", "data.size=16", "data.clip_seconds=0.25"])
    assert driver.default_data(other, str(tmp_path)) != first  # other parameters, another data set


def test_a_checkpoint_of_another_format_is_refused_naming_both_formats(tmp_path):
    root = str(tmp_path / "runs")
    run = make_run(root, "r1", steps=[2], registered=[2], updated="")
    meta = storage.join(run, layout.checkpoint_name(2), layout.CHECKPOINT_META)
    storage.write_bytes(meta, json.dumps({"step": 2, "format": layout.CHECKPOINT_FORMAT + 1, "config": {}}).encode())
    result = _cmacc("eval", "--run", "r1", "--storage", root, "--data", str(tmp_path / "data"))
    assert result.returncode == 1, result.stderr
    assert f"checkpoint format {layout.CHECKPOINT_FORMAT + 1}" in result.stderr
    assert "can evaluate format 1, 2 or 3" in result.stderr


def test_a_run_whose_checkpoint_predates_the_pool_rule_is_refused_a_resume_with_nothing_touched(tmp_path):
    root = tmp_path / "runs"
    make_run(str(root), "old", steps=[2], registered=[2], updated="")  # meta.json without "format": format 1
    before = {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    result = _cmacc("pretrain", "--run-id", "old", "--storage", str(root), "--resume")
    assert result.returncode == 1, result.stderr
    assert "checkpoint format 1" in result.stderr and "predates the candidate-pool rule" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("door", [["-m", "cli", "eval"], ["-m", "jobs.evaluate"]])
def test_every_door_gives_a_bad_evaluation_request_the_same_exit_code(door, tmp_path):
    """`cmacc eval` and `python -m jobs.evaluate` map errors to exit codes the same way."""
    no_data = subprocess.run(
        [sys.executable, *door, "--checkpoint", str(tmp_path / "c")], cwd=PROJECT, capture_output=True, text=True
    )
    assert no_data.returncode == 2 and "--data" in no_data.stderr
    not_a_checkpoint = subprocess.run(
        [sys.executable, *door, "--checkpoint", str(tmp_path / "c"), "--data", str(tmp_path / "d")],
        cwd=PROJECT,
        capture_output=True,
        text=True,
    )
    assert not_a_checkpoint.returncode == 1 and "is not a checkpoint" in not_a_checkpoint.stderr


def test_a_checkpoint_ray_train_has_not_registered_is_never_used(tmp_path):
    """Its meta.json may have arrived before its other files: neither `eval --run`, `eval
    --checkpoint` nor the catalog's newest checkpoint uses it."""
    root = str(tmp_path / "runs")
    make_run(root, "r1", steps=[2, 4, 6], registered=[2, 4], updated="")
    make_run(root, "fresh", steps=[2], registered=[], updated="")
    assert catalog.read_run(root, "fresh").newest_checkpoint is None
    partial = _cmacc("eval", "--checkpoint", f"{root}/r1/checkpoint-00000006", "--data", str(tmp_path / "data"))
    assert partial.returncode == 1, partial.stderr
    assert "checkpoint-00000006 was not registered by Ray Train" in partial.stderr
    assert "newest registered checkpoint is " + f"{root}/r1/checkpoint-00000004" in partial.stderr
    none_yet = _cmacc("eval", "--run", "fresh", "--storage", root, "--data", str(tmp_path / "data"))
    assert none_yet.returncode == 1 and "no complete checkpoint yet (1 not registered yet)" in none_yet.stderr
    runs = _cmacc("runs", "--storage", root, "--json")
    newest = {run["run_id"]: run["newest_checkpoint"] for run in json.loads(runs.stdout)}
    assert newest == {"r1": f"{root}/r1/checkpoint-00000004", "fresh": None}
