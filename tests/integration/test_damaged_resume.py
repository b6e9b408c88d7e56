"""Damaged inputs met by a real run (2 gloo workers on a local Ray, data on the S3 endpoint on
loopback): a shard that turns out damaged mid-run ends the run after the one attempt that met
it, and `--resume` continues from the newest checkpoint that verifies, or refuses when none
does. The checks before Ray starts are tests/unit/test_damaged_inputs.py."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from service import catalog, integrity, layout, storage
from service.errors import CheckpointError
from tests.integration.test_distributed import EVERY, args, pretrain_here
from workers.metrics import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    import boto3

    name = f"damaged-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def _synth(uri: str, *, shard_bytes: int | None = None) -> None:
    from workers.data.synth import write_synthetic

    extra = {"target_shard_bytes": shard_bytes} if shard_bytes else {}
    write_synthetic(uri, 48, seed=3, num_classes=4, frames=4, size=32, seconds=0.5, **extra)


def test_a_shard_damaged_past_the_check_ends_the_run_on_every_rank_without_retries(ray_session, bucket):
    """Every shard keeps its size, footer and row count (the check before Ray passes), but one
    has other bytes in its data pages: the rank that fetches it fails its checksum. The run
    ends after that attempt, not after `resources.max_failures` retries, naming the shard."""
    from workers.data.format import read_manifest, shard_uri

    data = f"{bucket}/data/bitrot"
    _synth(data, shard_bytes=40_000)
    manifest = read_manifest(data)
    assert len(manifest.shards) >= 4
    victim = shard_uri(data, manifest.shards[1])
    blob = bytearray(storage.read_bytes(victim))
    blob[len(blob) // 3] ^= 0xFF  # inside a data page: the footer, size and row count stay
    storage.write_bytes(victim, bytes(blob))
    root = f"{bucket}/runs"
    outcome = pretrain_here(*args("bitrot", root, data, 3 * EVERY, "resources.max_failures=3"))
    assert outcome["state"] == "failed"
    assert victim in outcome["error"] and "checksum" in outcome["error"]
    assert "not retried" in outcome["error"]
    run_uri = storage.join(root, "bitrot")
    crashes = json.loads(storage.read_bytes(storage.join(run_uri, layout.CRASHES_FILE)))["crashes"]
    assert len(crashes) == 1, "the damaged shard was met more than once"
    entry = catalog.read_run(root, "bitrot")
    if entry.newest_checkpoint is not None:  # where it failed depends on the shard order
        assert integrity.verify(entry.newest_checkpoint.uri).intact


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_passes_over_a_damaged_newest_checkpoint_and_refuses_when_all_are_damaged(
    ray_session, bucket, tmp_path, capsys
):
    data = f"{bucket}/data/clean"
    _synth(data)
    root = tmp_path / "runs"
    first = pretrain_here(*args("older", str(root), data, 2 * EVERY))
    assert first["state"] == "succeeded"
    run = root / "older"
    newest = run / layout.checkpoint_name(2 * EVERY)
    record = json.loads((newest / integrity.record_file(0)).read_text())
    assert set(record["files"]) >= {layout.CHECKPOINT_META, layout.TRAIN_FILE, layout.ACTOR_FILE}
    (newest / layout.TRAIN_FILE).write_bytes(os.urandom(512))  # the newest checkpoint is damaged
    capsys.readouterr()

    resumed = pretrain_here(*args("older", str(root), data, 2 * EVERY), "--resume")
    said = capsys.readouterr().err
    assert resumed["state"] == "succeeded" and resumed["start_step"] == EVERY
    assert f"resuming from {run / layout.checkpoint_name(EVERY)}" in said
    assert f"{layout.checkpoint_name(2 * EVERY)}: {newest / layout.TRAIN_FILE} is 512 bytes" in said
    starts = [int(r["run/start_step"]) for r in read_metrics(str(run)) if "run/start_step" in r]
    assert starts == [0, EVERY]
    moved = list((run / "damaged").iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in moved] == [layout.checkpoint_name(2 * EVERY)]
    assert integrity.verify(str(newest)).intact  # written again by the resumed run, whole

    for name in integrity.registered_names(str(run)):
        (run / name / layout.CHECKPOINT_META).write_bytes(b"\xff\xfe not json")
    before = _tree(root)
    with pytest.raises(CheckpointError) as refused:
        pretrain_here(*args("older", str(root), data, 3 * EVERY), "--resume")
    message = str(refused.value)
    assert "every checkpoint of run 'older' is damaged" in message and "nothing was changed" in message
    for name in integrity.registered_names(str(run)):
        assert str(run / name / layout.CHECKPOINT_META) in message
    assert _tree(root) == before
