"""The JPEG decode on the training device (`data.decode = device`) against the reader's CPU
decode: the same augmented batches, the same rows refused, bad settings refused, and the
batch of step s + 1 prepared ahead without changing anything a step sees or a checkpoint saves.

On this machine both paths decode with libjpeg-turbo (the device path runs on CPU tensors
through the same code a GPU worker runs), so the batches must be equal, not close."""

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from service import config
from service.config import ConfigError
from tests.unit.test_reader import make_reader
from workers.data.decode import CorruptClipError, decode_batch, decode_on_device
from workers.data.format import DatasetWriter
from workers.data.prefetch import BatchPrefetcher, CursorAt
from workers.data.reader import ClipReader, training_reader
from workers.data.synth import synth_clips, write_synthetic
from workers.data.transforms import AudioTransform, Transforms, VideoTransform, step_generator

pytestmark = pytest.mark.unit

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
RATE = 16000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("device-decode") / "synth")
    write_synthetic(uri, 40, seed=3, frames=6, size=32, seconds=0.25, target_shard_bytes=120_000)
    return uri


def reader(uri: str, decode: str, **overrides) -> ClipReader:
    """The reader of the reader's own tests, decoding as `decode` says."""
    return make_reader(uri, decode=decode, **overrides)


def transforms(frames: int, size: int) -> Transforms:
    return Transforms(
        video=VideoTransform(frames=frames, size=size, train=True),
        audio=AudioTransform(sample_rate=RATE, n_mels=16, hop_ms=10.0, train=True),
    )


def assert_same_model_inputs(cpu: ClipReader, device: ClipReader, num_batches: int, *, frames: int, size: int):
    """Both readers' batches through the training transforms with each step's generator."""
    augment = transforms(frames, size)
    for step in range(num_batches):
        raw_cpu, raw_device = next(cpu), next(device)
        assert raw_device["frames"] is None and "jpeg" in raw_device  # nothing decoded on the reader
        assert raw_cpu["clip_id"] == raw_device["clip_id"]
        a = augment(raw_cpu, device=torch.device("cpu"), generator=step_generator(7, 0, step))
        b = augment(raw_device, device=torch.device("cpu"), generator=step_generator(7, 0, step))
        for name in ("video", "audio", "index", "label", "source"):
            assert torch.equal(a[name], b[name]), f"step {step}: {name} differs"


def test_the_device_path_gives_the_same_augmented_batches_as_the_cpu_path(dataset):
    with reader(dataset, "cpu") as cpu, reader(dataset, "device") as device:
        assert_same_model_inputs(cpu, device, 7, frames=4, size=16)  # 56 clips: into the second epoch
        assert cpu.state_dict() == device.state_dict()


def test_the_same_on_the_real_video(tmp_path):
    """Big Buck Bunny (1280 x 720 H.264), cut as `cmacc data prepare` cuts a file, at the
    paper's 16 x 112 x 112."""
    video = SHARED_DATA / "real-av" / "bigbuckbunny.mp4"
    if not video.exists():
        pytest.skip(f"{video} is absent (see ../shared/data/README.md)")
    from workers.data.prepare import FileJob, prepare_file
    from workers.data.video import ClipOptions

    # The paper's stored frames (128 pixels on the short side, 16 a second), as `cmacc data
    # prepare` cuts them, without Ray: one file.
    options = ClipOptions(clip_seconds=1.0, fps=16, short_side=128, clips_per_video=4)
    result = prepare_file(FileJob(path=str(video), source="bunny.mp4", label=0, split=None), options)
    assert result.skipped_reason is None, result.skipped_reason
    uri = str(tmp_path / "bunny")
    write(uri, result.clips)
    with (
        reader(uri, "cpu", batch_size=2, frames=16, seconds=1.0, shuffle_buffer=4) as cpu,
        reader(uri, "device", batch_size=2, frames=16, seconds=1.0, shuffle_buffer=4) as device,
    ):
        assert_same_model_inputs(cpu, device, 3, frames=16, size=112)


def write(uri: str, clips) -> None:
    writer = DatasetWriter(uri, label_names=[f"c{i}" for i in range(8)], made_by={"generator": "test"})
    for clip in clips:
        writer.add(clip)
    writer.close()


def test_clips_of_different_sizes_in_a_batch_are_cropped_alike_and_a_clip_of_mixed_sizes_is_refused(tmp_path):
    small = list(synth_clips(12, seed=1, frames=4, size=24, seconds=0.25))
    large = [
        dataclasses.replace(c, clip_id=f"L{c.clip_id}")
        for c in synth_clips(12, seed=2, frames=4, size=40, seconds=0.25)
    ]
    mixed = large[3]
    large[3] = dataclasses.replace(mixed, frames=[*mixed.frames[:2], small[0].frames[2], *mixed.frames[3:]])
    uri = str(tmp_path / "sizes")
    write(uri, [c for pair in zip(small, large) for c in pair])
    with reader(uri, "cpu") as cpu, reader(uri, "device") as device:
        assert_same_model_inputs(cpu, device, 2, frames=4, size=16)
        assert cpu.num_skipped == device.num_skipped == 1


def damaged_set(tmp_path) -> tuple[str, list, dict[int, str]]:
    """24 clips, five of them damaged so that their headers tell (not a JPEG, cut short in
    the header, cut short in the data, claims 60000 x 60000 pixels) or an odd PCM length."""
    from tests.unit.test_reader import claims_size

    clips = list(synth_clips(24, seed=5, frames=2, size=16, seconds=0.1))
    damage = {
        2: [clips[2].frames[0], b"\xff\xd8 not a jpeg"],
        6: [clips[6].frames[0][:40], clips[6].frames[1]],
        11: [clips[11].frames[0], clips[11].frames[1][: len(clips[11].frames[1]) * 4 // 5]],
        17: [claims_size(clips[17].frames[0], 60000, 60000), clips[17].frames[1]],
    }
    for index, frames in damage.items():
        clips[index] = dataclasses.replace(clips[index], frames=frames)
    clips[20] = dataclasses.replace(clips[20], audio=clips[20].audio[:-1])
    uri = str(tmp_path / "damaged")
    write(uri, clips)
    return uri, clips, {2: "not a decodable JPEG", 6: "not a decodable JPEG", 11: "cut short", 17: "claims 60000"}


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_corrupt_and_oversized_frames_are_skipped_before_any_decoder_on_both_paths(tmp_path, caplog, decode):
    import logging

    uri, clips, reasons = damaged_set(tmp_path)
    with (
        caplog.at_level(logging.WARNING, logger="workers.data.reader"),
        reader(uri, decode, frames=2, seconds=0.1, batch_size=4) as rows,
    ):
        seen = []
        for _ in range(5):  # the 19 good clips of epoch 0, then 1 of epoch 1
            raw = next(rows)
            if decode == "device":
                decode_batch(raw["jpeg"], device="cpu", clip_ids=raw["clip_id"])
            seen += raw["index"].tolist()
    assert sorted(seen[:19]) == sorted(set(range(24)) - {2, 6, 11, 17, 20})
    messages = [record.getMessage() for record in caplog.records]
    for index, reason in reasons.items():
        assert any(clips[index].clip_id in m and reason in m and "shard-00000.parquet" in m for m in messages)


def test_a_frame_only_the_decoder_rejects_is_an_error_naming_its_shard_row_and_clip(tmp_path):
    """A header that reads well (size, end marker) over a broken segment: the CPU path skips
    the row; on the device the batch has left the reader, so the worker stops with an error
    that names the row and how to train on without it (`data.exclude_clips`)."""
    clips = list(synth_clips(8, seed=5, frames=2, size=16, seconds=0.1))
    broken = bytearray(clips[5].frames[1])
    broken[broken.index(b"\xff\xc0") + 9] = 7  # seven colour components: libjpeg calls the segment bogus
    clips[5] = dataclasses.replace(clips[5], frames=[clips[5].frames[0], bytes(broken)])
    uri = str(tmp_path / "bogus")
    write(uri, clips)
    with reader(uri, "cpu", frames=2, seconds=0.1, batch_size=8, shuffle_buffer=1) as cpu:
        next(cpu)
        assert cpu.num_skipped == 1
    with reader(uri, "device", frames=2, seconds=0.1, batch_size=8, shuffle_buffer=1) as device:
        raw = next(device)
    assert device.num_skipped == 0
    row = raw["clip_id"].index(clips[5].clip_id)
    shard, in_shard = raw["jpeg"]["rows"][row]
    with pytest.raises(CorruptClipError) as caught:
        decode_batch(raw["jpeg"], device="cpu", clip_ids=raw["clip_id"])
    message = str(caught.value)
    assert f"clip {clips[5].clip_id} ({shard} row {in_shard})" in message and "frame 1" in message
    assert f"data.exclude_clips={clips[5].clip_id}" in message
    with reader(uri, "device", frames=2, seconds=0.1, batch_size=7, exclude_clips=frozenset({clips[5].clip_id})) as r:
        raw = next(r)
        assert decode_batch(raw["jpeg"], device="cpu", clip_ids=raw["clip_id"]).shape == (7, 2, 16, 16, 3)


def test_bad_decode_settings_are_refused_naming_the_field(tmp_path, capsys):
    from cli.main import main

    with pytest.raises(ConfigError, match=r"data\.decode: 'gpu' is not one of auto, cpu, device"):
        config.load_recipe("demo", ["data.decode=gpu"])
    assert main(["pretrain", "--storage", str(tmp_path / "runs"), "--set", "data.decode=gpu"]) == 2
    assert "data.decode: 'gpu'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing written
    with pytest.raises(ConfigError, match=r"data\.decode: 'device', but no JPEG decoder runs on meta"):
        decode_on_device("device", torch.device("meta"))
    assert decode_on_device("auto", "cpu") is False and decode_on_device("cpu", "cpu") is False
    assert decode_on_device("device", "cpu") is True
    if not torch.cuda.is_available():
        assert decode_on_device("auto", torch.device("meta")) is False  # auto falls back to the CPU


def test_the_training_reader_follows_data_decode_on_its_device(dataset):
    cfg = config.load_recipe("demo", ["data.decode=device", "train.batch_size=4", "model.video.frames=4"])
    with training_reader(cfg, uri=dataset, device="cpu") as rows:
        assert rows.decode == "device" and next(rows)["frames"] is None
    cfg = config.load_recipe("demo", ["train.batch_size=4", "model.video.frames=4"])  # auto, on a CPU
    with training_reader(cfg, uri=dataset, device="cpu") as rows:
        assert rows.decode == "cpu" and next(rows)["frames"].shape[0] == 4


@pytest.mark.parametrize("ahead", [False, True])
def test_prefetching_ahead_changes_neither_batches_nor_the_cursor_a_checkpoint_saves(dataset, ahead):
    augment = transforms(4, 16)
    with reader(dataset, "device") as rows, reader(dataset, "cpu") as plain:

        def prepare(step: int):
            raw = next(rows)
            at = CursorAt(rows)
            return augment(raw, device=torch.device("cpu"), generator=step_generator(7, 0, step)), at

        prefetcher = BatchPrefetcher(prepare, device=torch.device("cpu"), start_step=3, ahead=ahead)
        try:
            for step in range(3, 8):
                batch, at = prefetcher.get(step)
                expected = augment(next(plain), device=torch.device("cpu"), generator=step_generator(7, 0, step))
                assert torch.equal(batch["video"], expected["video"]) and torch.equal(batch["audio"], expected["audio"])
                assert at.state_dict() == plain.state_dict()  # however far the reader has read since
            with pytest.raises(RuntimeError, match="asked for step 9"):
                prefetcher.get(9)
        finally:
            prefetcher.close()
    assert not [t for t in threading.enumerate() if t.name == "cmacc-prefetch"]


def test_an_error_preparing_a_batch_comes_out_of_the_get_of_its_step():
    def prepare(step: int):
        if step == 2:
            raise CorruptClipError("clip x (shard-00000.parquet row 4): frame 1 is not a decodable JPEG")
        return {"step": torch.tensor(step)}

    prefetcher = BatchPrefetcher(prepare, device=torch.device("cpu"), start_step=0, ahead=True)
    try:
        assert [int(prefetcher.get(s)["step"]) for s in (0, 1)] == [0, 1]
        with pytest.raises(CorruptClipError, match="row 4"):
            prefetcher.get(2)
    finally:
        prefetcher.close()


def test_encoded_batches_hold_each_stored_frame_once(dataset):
    """A short clip repeats its last frame by index, not by a second copy of its JPEG."""
    with reader(dataset, "device", frames=9) as rows:  # 6 stored frames: 3 repeats a clip
        encoded = next(rows)["jpeg"]
    assert encoded["frame_index"].shape == (8, 9)
    assert len(encoded["offsets"]) - 1 == 8 * 6
    assert np.array_equal(encoded["frame_index"][0].numpy(), [0, 1, 2, 3, 4, 5, 5, 5, 5])


def test_bench_reader_includes_the_device_decode_and_says_which_ran(dataset):
    from jobs.bench import cli as bench
    from workers.bench.reader import table, time_reader

    overrides = ["train.batch_size=4", "model.video.frames=4", "data.num_decode_threads=1"]
    figures = {}
    for decode in ("cpu", "device"):
        cfg = config.load_recipe("demo", [*overrides, f"data.decode={decode}"])
        figures[decode] = time_reader(cfg, uri=dataset, batches=2, warmup=1)
        assert figures[decode]["decode"] == decode and figures[decode]["batch_shape"] == [4, 4, 32, 32, 3]
    report = {"data": dataset, "batch_size": 4, "frames": 4, "batches": 2, "warmup": 1, "target": 733.0}
    lines = table({**report, "results": list(figures.values())}).splitlines()
    assert lines[-2].split()[0] == "cpu" and lines[-1].split()[0] == "device"
    with pytest.raises(ConfigError, match=r"data\.decode"):
        bench.main(["reader", "--data", dataset, "--recipe", "demo", "--set", "data.decode=sometimes"])
