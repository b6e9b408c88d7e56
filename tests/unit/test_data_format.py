"""The clip-shard format: round trips, manifests, shard checks, row decoding."""

import hashlib
import json
import re

import numpy as np
import pytest

from service import storage
from service.errors import InputError
from workers.data.decode import CorruptClipError, decode_frames, decode_row, fit_audio, frame_window
from workers.data.format import (
    DataError,
    DatasetWriter,
    decode_pcm,
    encode_jpeg,
    encode_pcm,
    iter_clips,
    read_manifest,
    read_shard,
    read_shard_columns,
)
from workers.data.inspect import summarize, verify
from workers.data.synth import class_names, synth_clips, write_synthetic

pytestmark = pytest.mark.unit

SMALL = dict(seed=4, num_classes=3, frames=3, size=16, seconds=0.1, sample_rate=8000)


@pytest.mark.parametrize("root_kind", ["local", "memory"])
def test_synthetic_set_reads_back_identical_clips(root_kind, tmp_path):
    uri = str(tmp_path / "ds") if root_kind == "local" else f"memory://format-{tmp_path.name}/ds"
    manifest = write_synthetic(uri, 20, target_shard_bytes=8_000, **SMALL)
    assert len(manifest.shards) > 1
    assert list(iter_clips(uri)) == list(synth_clips(20, **SMALL))
    again = read_manifest(uri)
    assert again == manifest
    assert again.has_video and again.has_audio
    assert again.label_names == class_names(3)
    assert sum(again.splits.values()) == 20
    for shard in manifest.shards:
        data = storage.read_bytes(storage.join(uri, shard.name))
        assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes


def test_generator_is_deterministic_per_seed():
    assert list(synth_clips(4, **SMALL)) == list(synth_clips(4, **SMALL))
    assert list(synth_clips(4, **{**SMALL, "seed": 5})) != list(synth_clips(4, **SMALL))


def test_jpeg_and_pcm_round_trip():
    rng = np.random.default_rng(0)
    frame = np.zeros((12, 20, 3), dtype=np.uint8)
    frame[:, 10:] = 200
    decoded = decode_frames([encode_jpeg(frame), encode_jpeg(frame)])
    assert decoded.shape == (2, 12, 20, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - frame).mean() < 3  # JPEG is lossy, but barely at quality 90
    wave = rng.uniform(-1, 1, 500).astype(np.float32)
    assert np.abs(decode_pcm(encode_pcm(wave)) - wave).max() < 1e-4


def test_corrupt_rows_raise_a_clear_error_naming_the_clip():
    good = encode_jpeg(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(CorruptClipError, match="clip c7: frame 1 is not a decodable JPEG"):
        decode_frames([good, b"garbage"], clip_id="c7")
    with pytest.raises(CorruptClipError, match="clip c8: frame 0 is not a decodable JPEG"):
        decode_frames([good[: len(good) // 2]], clip_id="c8")
    with pytest.raises(CorruptClipError, match="frame 1 is"):
        decode_frames([good, encode_jpeg(np.zeros((4, 8, 3), dtype=np.uint8))], clip_id="c9")
    row = {
        "clip_id": "c10",
        "fps": 8.0,
        "sample_rate": 8000,
        "height": 8,
        "width": 8,
        "frames": [good],
        "audio": b"abc",
    }
    with pytest.raises(CorruptClipError, match="clip c10: audio has an odd number of bytes"):
        decode_row(row, frames=1, num_samples=10, sample_rate=8000, video=True, audio=True)
    with pytest.raises(CorruptClipError, match="the row says"):
        decode_row({**row, "height": 9}, frames=1, num_samples=10, sample_rate=8000, video=True, audio=False)


def test_frame_window_and_audio_fit():
    assert frame_window(8, 4)[1].tolist() == [2, 3, 4, 5]
    assert frame_window(2, 4)[1].tolist() == [0, 1, 1, 1]
    wave = np.arange(10, dtype=np.float32)
    assert fit_audio(wave, 4, centre=5).tolist() == [3, 4, 5, 6]
    assert fit_audio(wave, 4, centre=0).tolist() == [0, 1, 2, 3]
    assert fit_audio(wave, 4, centre=10).tolist() == [6, 7, 8, 9]
    assert fit_audio(wave, 12, centre=5).tolist() == [*range(10), 0, 0]


def test_tampered_or_missing_shards_are_reported_by_uri(tmp_path):
    uri = str(tmp_path / "ds")
    manifest = write_synthetic(uri, 12, target_shard_bytes=8_000, **SMALL)
    assert verify(uri) == []
    first, second = (storage.join(uri, s.name) for s in manifest.shards[:2])
    data = bytearray(storage.read_bytes(first))
    data[-100] ^= 1
    storage.write_bytes(first, bytes(data))
    storage.remove(second)
    problems = verify(uri)
    assert len(problems) == 2
    assert f"{first} fails its checksum" in problems[0]
    assert f"{second} is missing" in problems[1]
    with pytest.raises(DataError, match=f"{first} fails its checksum"):
        read_shard(uri, manifest.shards[0])
    with pytest.raises(DataError, match=f"{second} is missing"):
        read_shard_columns(uri, manifest.shards[1], ["label"])


def test_manifest_errors_name_the_uri(tmp_path):
    missing = str(tmp_path / "none")
    with pytest.raises(DataError, match=f"no data set at {missing}"):
        read_manifest(missing)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=f"{bad}/manifest.json: not a valid manifest"):
        read_manifest(str(bad))
    (bad / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(DataError, match="format version 99"):
        read_manifest(str(bad))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m["shards"][0].update(name="../../etc/passwd.parquet"), "not a file name"),
        (lambda m: m["shards"][0].update(name="sub/shard-00000.parquet"), "not a file name"),
        (lambda m: m["shards"][0].update(rows="12"), "rows '12' is not a count"),
        (lambda m: m["shards"][0].update(bytes=-1), "bytes -1 is not a count"),
        (lambda m: m["shards"][0].update(sha256="abc"), "not a hex digest"),
        (lambda m: m.update(label_names="abc"), "not a list of names"),
        (lambda m: m["modalities"].update(video="yes"), "true or false"),
        (lambda m: m.update(splits={"train": "many"}), "not a table of clip counts"),
    ],
)
def test_a_manifest_with_wrong_field_types_or_a_shard_outside_the_folder_is_refused(tmp_path, change, words):
    uri = str(tmp_path / "ds")
    write_synthetic(uri, 4, **SMALL)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    change(manifest)
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"{uri}/manifest.json: not a valid manifest .*{re.escape(words)}"):
        read_manifest(uri)


def test_data_errors_are_input_errors_the_cli_maps_to_exit_1():
    assert issubclass(DataError, InputError) and issubclass(DataError, ValueError)
    assert issubclass(CorruptClipError, DataError)


def test_writer_refuses_duplicates_empty_clips_and_an_existing_set(tmp_path):
    uri = str(tmp_path / "ds")
    clips = list(synth_clips(2, **SMALL))
    writer = DatasetWriter(uri, label_names=class_names(3), made_by={"generator": "test"})
    writer.add(clips[0])
    with pytest.raises(DataError, match="duplicate clip_id"):
        writer.add(clips[0])
    writer.add(clips[1])
    writer.close()
    with pytest.raises(DataError, match="already holds a data set"):
        DatasetWriter(uri, label_names=[], made_by={})
    with pytest.raises(DataError, match="no clips were written"):
        DatasetWriter(str(tmp_path / "empty"), label_names=[], made_by={}).close()


def test_summary_counts_labels_splits_and_sizes(tmp_path):
    uri = str(tmp_path / "ds")
    write_synthetic(uri, 12, target_shard_bytes=8_000, **SMALL)
    summary = summarize(uri)
    assert summary.num_clips == 12 and summary.num_shards > 1
    assert summary.clips_per_label == {name: 4 for name in class_names(3)}
    assert summary.frame_sizes == ["16x16"] and summary.sample_rates == [8000] and summary.fps == [30.0]
    assert sum(summary.splits.values()) == 12
    text = summary.to_text()
    assert "12 in" in text and "video + audio" in text
    assert json.loads(json.dumps(summary.to_dict()))["num_clips"] == 12
