"""Clip shards through a real S3 endpoint on loopback (moto's server): write, read, verify."""

import subprocess
import sys

import pytest
import torch

from service import storage
from workers.data.format import DataError, iter_clips, read_manifest
from workers.data.reader import ClipReader
from workers.data.synth import synth_clips, write_synthetic

pytestmark = pytest.mark.integration

PARAMS = dict(seed=6, num_classes=4, frames=3, size=24, seconds=0.2, sample_rate=16000)


def reader(uri: str, **overrides) -> ClipReader:
    settings = dict(uri=uri, rank=0, world_size=1, seed=1, batch_size=6, frames=3, seconds=0.2, shuffle_buffer=8)
    settings.update(overrides)
    return ClipReader(**settings)


def test_synth_to_s3_and_back_gives_identical_clips_and_batches(s3_bucket, tmp_path):
    uri = storage.join(s3_bucket, "data", "synth")
    manifest = write_synthetic(uri, 30, target_shard_bytes=60_000, **PARAMS)
    assert len(manifest.shards) > 1
    assert read_manifest(uri) == manifest
    assert list(iter_clips(uri)) == list(synth_clips(30, **PARAMS))

    local = str(tmp_path / "synth")
    write_synthetic(local, 30, target_shard_bytes=60_000, **PARAMS)
    with reader(uri, split="train") as from_s3, reader(local, split="train") as from_disk:
        for _ in range(6):
            a, b = next(from_s3), next(from_disk)
            assert a["clip_id"] == b["clip_id"]
            assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["audio"], b["audio"])


def test_resume_on_s3_continues_at_the_next_clip(s3_bucket):
    uri = storage.join(s3_bucket, "resume")
    write_synthetic(uri, 30, target_shard_bytes=60_000, **PARAMS)
    with reader(uri) as whole:
        expected = [next(whole)["index"].tolist() for _ in range(8)]
    with reader(uri, prefetch_batches=3) as first:
        for _ in range(3):
            next(first)
        state = first.state_dict()
    with reader(uri) as resumed:
        resumed.load_state_dict([state])
        assert [next(resumed)["index"].tolist() for _ in range(5)] == expected[3:]


def test_tampered_shard_on_s3_fails_the_reader_and_inspect_verify(s3_bucket, s3_endpoint):
    uri = storage.join(s3_bucket, "tampered")
    manifest = write_synthetic(uri, 30, target_shard_bytes=60_000, **PARAMS)
    shard = storage.join(uri, manifest.shards[0].name)
    data = bytearray(storage.read_bytes(shard))
    data[100] ^= 0xFF
    storage.write_bytes(shard, bytes(data))

    with reader(uri) as r, pytest.raises(DataError, match=f"{shard} fails its checksum"):
        for _ in range(10):
            next(r)

    # The subprocess inherits the endpoint and test credentials from the fixture's environment.
    result = subprocess.run(
        [sys.executable, "-m", "cli", "data", "inspect", uri, "--verify"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert shard in result.stdout and shard in result.stderr


def test_missing_data_set_on_s3_fails_early(s3_bucket):
    with pytest.raises(DataError, match=f"no data set at {s3_bucket}/absent"):
        reader(f"{s3_bucket}/absent")
