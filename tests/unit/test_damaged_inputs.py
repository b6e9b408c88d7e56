"""Damaged inputs at every door: each command that reads a data set or a checkpoint, against
each way disks, copies and interrupted uploads damage files. Every case must end with the
error model's exit code, one line on stderr naming the damaged file (or field), no
traceback, and nothing written or changed. The commands run in this process (`cli.main`);
Ray must not start (the checks come first): `workers.driver.start_ray` and
`workers.ray_init.run_task` fail the test if they are reached.

The cases that need a real run (a shard damaged past the check, resuming past a damaged
checkpoint) are tests/integration/test_damaged_resume.py."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cli.main import main
from service import config, integrity, layout
from workers.data.format import MANIFEST_NAME, read_manifest
from workers.data.inspect import check
from workers.data.synth import write_synthetic
from workers.models import build_encoders

pytestmark = pytest.mark.unit

SETTINGS = ["model.video.frames=4", "model.video.size=16", "model.audio.n_mels=16", "data.clip_seconds=0.25"]
RUN_SETS = [f"--set={item}" for item in [*SETTINGS, "method.dictionary_size=4", "method.enqueue=2"]]
VICTIM = 1  # the shard each data case damages


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A labelled data set of several shards and a run with two intact checkpoints (steps 2
    and 4), as `cmacc pretrain` leaves them (records included); copied for every case."""
    base = tmp_path_factory.mktemp("pristine")
    write_synthetic(
        str(base / "data"), 12, seed=1, num_classes=2, frames=4, size=16, seconds=0.25, target_shard_bytes=20_000
    )
    assert len(read_manifest(str(base / "data")).shards) >= 3
    cfg = config.load_recipe("demo", SETTINGS)
    run = base / "runs" / "r"
    for step in (2, 4):
        folder = run / layout.checkpoint_name(step)
        folder.mkdir(parents=True)
        torch.manual_seed(step)
        torch.save({"train": {"query": build_encoders(cfg.model).state_dict()}}, folder / layout.TRAIN_FILE)
        torch.save({"version": torch.tensor(step)}, folder / layout.ACTOR_FILE)
        (folder / layout.reader_file(0)).write_text(json.dumps({"epoch": 0, "position": step}))
        meta = {
            "step": step,
            "run_id": "r",
            "world_size": 1,
            "format": layout.CHECKPOINT_FORMAT,
            "config": cfg.to_dict(),
            "time": 1.0e9 + step,
        }
        (folder / layout.CHECKPOINT_META).write_text(json.dumps(meta))
        integrity.write_record(str(folder), 0)
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": layout.checkpoint_name(s)} for s in (2, 4)]}
    (run / layout.SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    record = {
        "run_id": "r",
        "recipe": "demo",
        "state": "succeeded",
        "last_step": 4,
        "config": cfg.to_dict(),
        "data": str(base / "data"),
    }
    (run / layout.RUN_FILE).write_text(json.dumps(record))
    return base


@pytest.fixture
def world(pristine, tmp_path, monkeypatch) -> Path:
    shutil.copytree(pristine, tmp_path / "w")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started: the damage was not found before it")

    monkeypatch.setattr("workers.driver.start_ray", no_ray)
    monkeypatch.setattr("workers.ray_init.run_task", no_ray)
    return tmp_path / "w"


def tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# --- the damages ------------------------------------------------------------------------------


def shard(world: Path) -> Path:
    return world / "data" / read_manifest(str(world / "data")).shards[VICTIM].name


def _rewrite_manifest(world: Path, change: Callable[[dict], None]) -> None:
    path = world / "data" / MANIFEST_NAME
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _wrong_schema(world: Path) -> None:
    """A readable Parquet file of the right size in the manifest, with `label` as text."""
    path = shard(world)
    table = pq.read_table(path)
    table = table.set_column(
        table.schema.get_field_index("label"), "label", pa.array([str(v) for v in table.column("label").to_pylist()])
    )
    pq.write_table(table, path)

    def relist(raw: dict) -> None:
        import hashlib

        entry = raw["shards"][VICTIM]
        entry["bytes"], entry["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()

    _rewrite_manifest(world, relist)


def _to_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "part-0").write_bytes(b"x")


DATA_DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    # name: (damage, what the line must say besides the shard's URI)
    "missing": (lambda w: shard(w).unlink(), "is missing"),
    "empty": (lambda w: shard(w).write_bytes(b""), "is 0 bytes"),
    "truncated": (lambda w: shard(w).write_bytes(shard(w).read_bytes()[:1000]), "is 1000 bytes"),
    "random bytes": (lambda w: shard(w).write_bytes(os.urandom(shard(w).stat().st_size)), "not a readable Parquet"),
    "wrong schema": (_wrong_schema, "column 'label' is string"),
    "rows disagree": (
        lambda w: _rewrite_manifest(
            w, lambda raw: raw["shards"][VICTIM].update(rows=raw["shards"][VICTIM]["rows"] + 1)
        ),
        "rows, the manifest says",
    ),
    "a folder": (lambda w: _to_folder(shard(w)), "is a folder"),
}

MANIFEST_DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing": (lambda w: (w / "data" / MANIFEST_NAME).unlink(), "manifest.json is missing"),
    "random bytes": (lambda w: (w / "data" / MANIFEST_NAME).write_bytes(os.urandom(300)), "not a valid manifest"),
    "wrong type": (lambda w: _rewrite_manifest(w, lambda raw: raw.update(label_names=5)), "label_names 5"),
}


def data_doors(world: Path) -> dict[str, list[str]]:
    data, root = str(world / "data"), str(world / "runs")
    checkpoint = str(world / "runs" / "r" / layout.checkpoint_name(4))
    return {
        "pretrain": ["pretrain", "--run-id", "new", "--storage", root, "--data", data, *RUN_SETS],
        "ablate": ["ablate", "--data", data, "--storage", root, "--samplers", "random", "--seeds", "1", *RUN_SETS],
        "submit": [
            "submit",
            "--address",
            "http://127.0.0.1:9",
            "--run-id",
            "new",
            "--storage",
            root,
            "--data",
            data,
            *RUN_SETS,
        ],
        "eval": ["eval", "--checkpoint", checkpoint, "--data", data],
        "data inspect": ["data", "inspect", data],
    }


def run_door(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_one_line(code: int, lines: list[str], *, exit_code: int, names: list[str]) -> None:
    assert code == exit_code, lines
    assert len(lines) == 1 and lines[0].startswith("cmacc: error: "), lines
    assert "Traceback" not in lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.mark.parametrize("door", ["pretrain", "ablate", "submit", "eval", "data inspect"])
@pytest.mark.parametrize("damage", list(DATA_DAMAGES))
def test_a_damaged_shard_is_named_in_one_line_before_anything_starts(world, capsys, door, damage):
    harm, says = DATA_DAMAGES[damage]
    victim = str(shard(world))
    harm(world)
    before = tree(world)
    code, lines = run_door(data_doors(world)[door], capsys)
    assert_one_line(code, lines, exit_code=1, names=[victim, says])
    assert tree(world) == before


@pytest.mark.parametrize("door", ["pretrain", "ablate", "submit", "eval", "data inspect"])
@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGES))
def test_a_damaged_manifest_is_named_in_one_line_before_anything_starts(world, capsys, door, damage):
    harm, says = MANIFEST_DAMAGES[damage]
    harm(world)
    before = tree(world)
    code, lines = run_door(data_doors(world)[door], capsys)
    assert_one_line(code, lines, exit_code=1, names=[str(world / "data"), says])
    assert tree(world) == before


def test_the_data_check_can_be_skipped_by_name(world, capsys):
    """`--skip-data-check` skips the footer check: the run goes on towards Ray (here: the test's
    stand-in for it) with a truncated shard its readers would meet."""
    shard(world).write_bytes(shard(world).read_bytes()[:1000])
    with pytest.raises(AssertionError, match="Ray was started"):
        main([*data_doors(world)["pretrain"], "--skip-data-check"])


# --- checkpoints ------------------------------------------------------------------------------


def newest(world: Path) -> Path:
    return world / "runs" / "r" / layout.checkpoint_name(4)


def _world_of_two(world: Path) -> None:
    meta = newest(world) / layout.CHECKPOINT_META
    raw = json.loads(meta.read_text())
    meta.write_text(json.dumps({**raw, "world_size": 2}))
    integrity.write_record(str(newest(world)), 0)  # a whole part of rank 0; rank 1's never arrived


CHECKPOINT_DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing": (lambda w: (newest(w) / layout.TRAIN_FILE).unlink(), f"{layout.TRAIN_FILE} is missing"),
    "empty": (lambda w: (newest(w) / layout.ACTOR_FILE).write_bytes(b""), f"{layout.ACTOR_FILE} is 0 bytes"),
    "truncated": (
        lambda w: (newest(w) / layout.TRAIN_FILE).write_bytes((newest(w) / layout.TRAIN_FILE).read_bytes()[:999]),
        f"{layout.TRAIN_FILE} is 999 bytes",
    ),
    "random bytes": (
        lambda w: (newest(w) / layout.CHECKPOINT_META).write_bytes(b"\xff\xfe" + os.urandom(200)),
        f"{layout.CHECKPOINT_META} is not valid JSON",
    ),
    "wrong type": (lambda w: (newest(w) / layout.CHECKPOINT_META).write_text("[4]"), "is not a JSON object"),
    "counts disagree": (_world_of_two, f"{integrity.record_file(1)} is missing"),
    "a folder": (lambda w: _to_folder(newest(w) / layout.TRAIN_FILE), f"{layout.TRAIN_FILE} is a folder"),
}


def checkpoint_doors(world: Path) -> dict[str, list[str]]:
    data, root, out = str(world / "data"), str(world / "runs"), str(world / "export")
    return {
        "eval": ["eval", "--checkpoint", str(newest(world)), "--data", data],
        "eval --run": ["eval", "--run", "r", "--storage", root],
        "export": ["export", "--checkpoint", str(newest(world)), "--out", out],
        "finetune": ["finetune", "--checkpoint", str(newest(world)), "--data", data],
    }


@pytest.mark.parametrize("door", ["eval", "eval --run", "export", "finetune"])
@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGES))
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_newest_intact_one(world, capsys, door, damage):
    harm, says = CHECKPOINT_DAMAGES[damage]
    harm(world)
    before = tree(world)
    code, lines = run_door(checkpoint_doors(world)[door], capsys)
    intact = world / "runs" / "r" / layout.checkpoint_name(2)
    assert_one_line(
        code, lines, exit_code=1, names=[str(newest(world)), says, f"newest intact checkpoint of the run is {intact}"]
    )
    assert tree(world) == before


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGES))
def test_resume_with_every_checkpoint_damaged_is_refused_naming_them_with_nothing_changed(world, capsys, damage):
    harm, says = CHECKPOINT_DAMAGES[damage]
    harm(world)
    older = world / "runs" / "r" / layout.checkpoint_name(2)
    (older / layout.TRAIN_FILE).write_bytes(b"not a tensor file")
    before = tree(world)
    argv = [
        "pretrain",
        "--run-id",
        "r",
        "--storage",
        str(world / "runs"),
        "--data",
        str(world / "data"),
        "--resume",
        *RUN_SETS,
    ]
    code, lines = run_door(argv, capsys)
    assert_one_line(
        code,
        lines,
        exit_code=1,
        names=[
            "every checkpoint of run 'r' is damaged",
            str(newest(world)),
            says,
            f"{older / layout.TRAIN_FILE} is 17 bytes",
            "nothing was changed",
        ],
    )
    assert "storage" not in lines[0]
    assert tree(world) == before


def test_a_checkpoint_written_before_the_records_still_loads_and_says_so(world, capsys):
    for name in os.listdir(newest(world)):
        if name.startswith(integrity.RECORD_PREFIX):
            (newest(world) / name).unlink()
    verdict = integrity.verify(str(newest(world)))
    assert verdict.intact and not verdict.recorded
    assert "written before checkpoints recorded their files" in verdict.note()
    code = main(checkpoint_doors(world)["export"])
    err = capsys.readouterr().err
    assert code == 0 and "written before checkpoints recorded their files" in err


def test_a_file_with_its_size_but_other_bytes_is_caught_by_its_hash(world):
    path = newest(world) / layout.TRAIN_FILE
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 1
    path.write_bytes(bytes(blob))
    verdict = integrity.verify(str(newest(world)))
    assert f"{path} does not match its recorded sha256" in verdict.problem
    assert integrity.verify(str(newest(world)), hash_files=False).intact  # sizes alone cannot see it


def test_the_check_reads_footers_not_whole_shards(world, monkeypatch):
    """Two small range reads per shard: no shard is read whole."""
    from service import storage

    whole = []
    monkeypatch.setattr(storage, "read_bytes", lambda uri, **kw: whole.append(uri) or Path(uri).read_bytes())
    assert check(str(world / "data")) == len(read_manifest(str(world / "data")).shards)
    assert [uri for uri in whole if uri.endswith(".parquet")] == []


def test_a_rank_that_met_a_damaged_input_ends_the_run_after_one_crash():
    """The crash history's verdict: a rank that raised a DataError ends the run at the group's
    next start, naming the shard and row; a lost peer or a killed rank alone does not."""
    from workers.distributed.crashes import repeated_crash

    shard_error = "DataError: shard s3://b/set/shard-00003.parquet fails its checksum: sha256 ab differs"
    notes = [
        {"rank": 0, "step": 5, "rows": [], "raised": "DistBackendError: Connection closed by peer"},
        {"rank": 1, "step": 5, "rows": [["shard-00003.parquet", 7, "c7"]], "raised": shard_error},
    ]
    verdict = repeated_crash([{"found_at": "t", "notes": notes}])
    assert "rank 1 stopped at step 5" in verdict and "s3://b/set/shard-00003.parquet fails its checksum" in verdict
    assert "not retried" in verdict and "\n" not in verdict
    killed = [{"rank": 1, "step": 5, "rows": [["shard-00003.parquet", 7, "c7"]]}]
    assert repeated_crash([{"found_at": "t", "notes": killed}]) == ""  # one kill: Ray Train retries it
