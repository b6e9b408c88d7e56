"""`ClipReader`: deterministic order, exact resume, re-partition on a world-size change, bad input."""

import dataclasses
import json
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from service import storage
from workers.data.decode import CorruptClipError, decode_audio, decode_frames
from workers.data.format import DataError, DatasetWriter, iter_clips
from workers.data.plan import bounded_shuffle
from workers.data.reader import ClipReader
from workers.data.synth import synth_clips, write_synthetic

pytestmark = pytest.mark.unit

PROJECT = Path(__file__).resolve().parents[2]

NUM_CLIPS = 64
STORED_FRAMES = 4
SECONDS = 0.25
RATE = 16000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """64 clips of 4 frames, 32x32, 0.25 s of audio, in 4 shards of 14 to 17."""
    uri = str(tmp_path_factory.mktemp("reader") / "synth")
    manifest = write_synthetic(
        uri, NUM_CLIPS, seed=3, frames=STORED_FRAMES, size=32, seconds=SECONDS, target_shard_bytes=200_000
    )
    assert len(manifest.shards) == 4
    return uri


@pytest.fixture
def dataset_copy(dataset, tmp_path) -> str:
    """A private copy of the data set that a test may damage."""
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    return str(copy)


def make_reader(uri: str, **overrides) -> ClipReader:
    settings = dict(
        uri=uri,
        rank=0,
        world_size=1,
        seed=7,
        batch_size=8,
        frames=STORED_FRAMES,
        seconds=SECONDS,
        sample_rate=RATE,
        shuffle_buffer=8,
        num_decode_threads=2,
        prefetch_batches=2,
    )
    settings.update(overrides)
    return ClipReader(**settings)


def take(reader: ClipReader, num_batches: int) -> list[dict]:
    return [next(reader) for _ in range(num_batches)]


def indices(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["index"].tolist()]


def rest_of_epoch(reader: ClipReader) -> list[int]:
    """The clips a reader hands out from now until its epoch ends. The reader must be at the
    start of a batch that does not reach into another epoch, and no row may be skipped."""
    start_epoch = reader.epoch
    out: list[int] = []
    while reader.epoch == start_epoch:
        batch = next(reader)
        out.extend(batch["index"].tolist())
    # The last batch reaches into the next epoch by as many clips as the cursor has consumed there.
    return out[: len(out) - reader.state_dict()["position"]]


def test_same_seed_gives_the_same_batches_and_another_seed_does_not(dataset):
    with make_reader(dataset) as a, make_reader(dataset, num_decode_threads=1, prefetch_batches=1) as b:
        batches_a, batches_b = take(a, 10), take(b, 10)  # 80 clips: into the second epoch
    assert indices(batches_a) == indices(batches_b)
    for x, y in zip(batches_a, batches_b):
        assert torch.equal(x["frames"], y["frames"]) and torch.equal(x["audio"], y["audio"])
        assert x["clip_id"] == y["clip_id"] and torch.equal(x["label"], y["label"])
    assert [b["epoch"] for b in batches_a] == [0] * 8 + [1] * 2
    with make_reader(dataset, seed=8) as c:
        assert indices(take(c, 10)) != indices(batches_a)


def test_epochs_are_shuffled_differently(dataset):
    with make_reader(dataset) as reader:
        got = indices(take(reader, 2 * NUM_CLIPS // 8))
    first, second = got[:NUM_CLIPS], got[NUM_CLIPS:]
    assert sorted(first) == sorted(second) == list(range(NUM_CLIPS))
    assert first != second


@pytest.mark.parametrize("uniform", [False, True], ids=["shard-plan", "uniform"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_one_epoch_covers_every_clip_exactly_once(dataset, world_size, uniform):
    seen: list[int] = []
    for rank in range(world_size):
        with make_reader(dataset, rank=rank, world_size=world_size, batch_size=4, uniform=uniform) as reader:
            seen.extend(rest_of_epoch(reader))
    assert sorted(seen) == list(range(NUM_CLIPS))


def test_batch_fields_match_the_stored_clip(dataset):
    stored = {clip.clip_id: clip for clip in iter_clips(dataset)}
    with make_reader(dataset) as reader:
        batch = next(reader)
    assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape == (8, STORED_FRAMES, 32, 32, 3)
    assert batch["audio"].dtype == torch.float32 and batch["audio"].shape == (8, round(SECONDS * RATE))
    assert batch["index"].dtype == torch.int64 and batch["label"].dtype == torch.int64
    for i, clip_id in enumerate(batch["clip_id"]):
        clip = stored[clip_id]
        assert int(clip_id.rsplit("-", 1)[1]) == batch["index"][i]  # synth ids carry the manifest position
        assert batch["label"][i] == clip.label
        assert np.array_equal(batch["frames"][i].numpy(), decode_frames(clip.frames))
        assert np.array_equal(batch["audio"][i].numpy(), decode_audio(clip.audio))


@pytest.mark.parametrize("uniform", [False, True], ids=["shard-plan", "uniform"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_continues_at_exactly_the_next_clip(dataset, world_size, uniform):
    uninterrupted = []
    for rank in range(world_size):
        with make_reader(dataset, rank=rank, world_size=world_size, uniform=uniform) as reader:
            uninterrupted.append(take(reader, 10))  # crosses at least one epoch boundary

    states = []
    for rank in range(world_size):
        # Three batches handed out while more are decoded and prefetched in the background.
        with make_reader(dataset, rank=rank, world_size=world_size, prefetch_batches=3, uniform=uniform) as r:
            take(r, 3)
            states.append(json.loads(json.dumps(r.state_dict())))  # a checkpoint holds plain JSON

    for rank in range(world_size):
        with make_reader(dataset, rank=rank, world_size=world_size, uniform=uniform) as resumed:
            resumed.load_state_dict(states)
            rest = take(resumed, 7)
        assert indices(rest) == indices(uninterrupted[rank][3:])
        for x, y in zip(rest, uninterrupted[rank][3:]):
            assert torch.equal(x["frames"], y["frames"]) and torch.equal(x["audio"], y["audio"])
            assert x["epoch"] == y["epoch"]


def test_load_state_dict_while_iterating_restarts_from_the_cursor(dataset):
    with make_reader(dataset) as reader:
        take(reader, 2)
        state = reader.state_dict()
        expected = indices(take(reader, 3))
        reader.load_state_dict([state])
        assert indices(take(reader, 3)) == expected


@pytest.mark.parametrize("uniform", [False, True], ids=["shard-plan", "uniform"])
def test_world_size_change_continues_the_epoch_with_no_clip_twice_and_none_lost(dataset, uniform):
    consumed: list[int] = []

    # Phase 1: two ranks read part of epoch 0.
    states = []
    for rank in range(2):
        with make_reader(dataset, rank=rank, world_size=2, batch_size=4, uniform=uniform) as reader:
            consumed.extend(indices(take(reader, 3)))
            states.append(reader.state_dict())

    # Phase 2: three ranks take over and read a little more.
    states3 = []
    for rank in range(3):
        with make_reader(dataset, rank=rank, world_size=3, batch_size=4, uniform=uniform) as reader:
            reader.load_state_dict(states)
            consumed.extend(rest_of_epoch_prefix(next(reader), reader))
            states3.append(reader.state_dict())

    # A same-size resume inside the re-partitioned epoch is still exact.
    with (
        make_reader(dataset, rank=1, world_size=3, batch_size=4, uniform=uniform) as a,
        make_reader(dataset, rank=1, world_size=3, batch_size=4, uniform=uniform) as b,
    ):
        a.load_state_dict(states3)
        b.load_state_dict(states3)
        assert indices(take(a, 3)) == indices(take(b, 3))

    # Phase 3: one rank finishes the epoch.
    with make_reader(dataset, rank=0, world_size=1, batch_size=4, uniform=uniform) as reader:
        reader.load_state_dict(states3)
        consumed.extend(rest_of_epoch(reader))

    assert sorted(consumed) == list(range(NUM_CLIPS))


def test_a_world_size_change_deals_what_is_left_of_the_epoch_evenly(dataset):
    """Whatever part of the epoch each old rank had left (here one rank's share is all but
    used up, the other's barely begun), every new rank gets an equal part of the rest."""
    states = []
    for rank, batches in ((0, 6), (1, 1)):  # of 32 clips each: 24 and 4 read
        with make_reader(dataset, rank=rank, world_size=2, batch_size=4) as reader:
            take(reader, batches)
            states.append(reader.state_dict())
    rests = []
    for rank in range(3):
        with make_reader(dataset, rank=rank, world_size=3, batch_size=4) as reader:
            reader.load_state_dict(states)
            rests.append(rest_of_epoch(reader))
    assert sorted(len(rest) for rest in rests) == [12, 12, 12]  # 64 - 28 = 36 clips left
    assert len({i for rest in rests for i in rest}) == 36


def test_a_version_1_cursor_of_a_re_partitioned_epoch_reads_its_share_without_the_excluded_clips(dataset):
    from workers.data.cursor import pack_bits, reads_of

    with make_reader(dataset, rank=1, world_size=2) as reader:
        share = reader.planner.share(0, 1, 2)
        excluded = np.zeros(NUM_CLIPS, dtype=bool)
        excluded[share[:5]] = True
        state = {**reader.state_dict(), "version": 1, "excluded": pack_bits(excluded)}
        del state["only"]
        only = reads_of(state, planner=reader.planner, num_clips=NUM_CLIPS)
    assert sorted(np.flatnonzero(only)) == sorted(share[5:])


def rest_of_epoch_prefix(batch: dict, reader: ClipReader) -> list[int]:
    """The clips of one batch that belong to epoch 0."""
    got = batch["index"].tolist()
    return got if reader.epoch == 0 else got[: len(got) - reader.state_dict()["position"]]


def test_states_from_another_data_set_or_seed_are_refused(dataset, tmp_path):
    other = str(tmp_path / "other")
    write_synthetic(other, 16, seed=1, frames=2, size=16, seconds=0.1)
    with make_reader(other) as reader:
        foreign = reader.state_dict()
    with make_reader(dataset) as reader:
        with pytest.raises(DataError, match="another data set"):
            reader.load_state_dict([foreign])
        state = reader.state_dict()
    with make_reader(dataset, seed=9) as reader, pytest.raises(ValueError, match="seed"):
        reader.load_state_dict([state])
    with make_reader(dataset, rank=1, world_size=2) as reader, pytest.raises(ValueError, match="rank order"):
        reader.load_state_dict([state, state])


def test_corrupt_jpeg_and_bad_rows_are_skipped_counted_and_logged(tmp_path, caplog):
    uri = str(tmp_path / "damaged")
    clips = list(synth_clips(32, seed=5, frames=2, size=16, seconds=0.1))
    clips[5] = dataclasses.replace(clips[5], frames=[clips[5].frames[0], b"\xff\xd8 not a jpeg"])
    clips[9] = dataclasses.replace(clips[9], frames=[clips[9].frames[0][:40], clips[9].frames[1]])  # truncated
    clips[20] = dataclasses.replace(clips[20], audio=clips[20].audio[:-1])  # odd PCM length
    writer = DatasetWriter(uri, label_names=[f"c{i}" for i in range(8)], made_by={"generator": "test"})
    for clip in clips:
        writer.add(clip)
    writer.close()

    with (
        caplog.at_level(logging.WARNING, logger="workers.data.reader"),
        make_reader(uri, frames=2, seconds=0.1, batch_size=4) as reader,
    ):
        seen = indices(take(reader, 8))  # the 29 good clips of epoch 0, then 3 of epoch 1
        assert reader.epoch == 1
        skipped_in_epoch_1 = reader.state_dict()["position"] - 3
        assert reader.num_skipped == 3 + skipped_in_epoch_1
    assert sorted(seen[:29]) == sorted(set(range(32)) - {5, 9, 20})
    for bad in (5, 9, 20):
        assert any(clips[bad].clip_id in record.getMessage() for record in caplog.records)


def claims_size(jpeg: bytes, height: int, width: int) -> bytes:
    """`jpeg` with its frame header rewritten to claim height x width (the data stays small)."""
    from workers.data.decode import jpeg_size

    at = jpeg.index(b"\xff\xc0")  # baseline start-of-frame
    out = bytearray(jpeg)
    out[at + 5 : at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    assert jpeg_size(bytes(out)) == (height, width)
    return bytes(out)


def test_a_jpeg_claiming_a_huge_picture_is_skipped_before_decoding_with_memory_bounded(tmp_path):
    """A 60000 x 60000 claim would make the decoder allocate 10.8 GB; the header is read
    first, the row is skipped and counted, and the reading process stays small."""
    import subprocess
    import sys

    uri = str(tmp_path / "poisoned")
    clips = list(synth_clips(16, seed=5, frames=2, size=16, seconds=0.1))
    bomb = claims_size(clips[3].frames[1], 60000, 60000)
    assert len(bomb) < 2000
    clips[3] = dataclasses.replace(clips[3], frames=[clips[3].frames[0], bomb])
    clips[7] = dataclasses.replace(clips[7], sample_rate=10**9)  # resampling from 1 GHz
    writer = DatasetWriter(uri, label_names=[f"c{i}" for i in range(8)], made_by={"generator": "test"})
    for clip in clips:
        writer.add(clip)
    writer.close()
    with pytest.raises(CorruptClipError, match="claims 60000 x 60000 pixels"):
        decode_frames([bomb], clip_id=clips[3].clip_id)

    script = f"""
import sys
sys.path.insert(0, {str(PROJECT)!r})
from workers.data.reader import ClipReader
reader = ClipReader(uri={uri!r}, rank=0, world_size=1, seed=7, batch_size=7, frames=2, seconds=0.1,
                    sample_rate={RATE}, shuffle_buffer=4, num_decode_threads=2, prefetch_batches=1)
seen = [i for _ in range(2) for i in next(reader)["index"].tolist()]
# VmHWM: this process's own peak. ru_maxrss is not: Linux carries the parent's peak over
# the exec of a (v)forked child, which was the whole pytest process's (2.3 GB in the suite).
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(sorted(seen), reader.num_skipped, peak_kib // 1024)
reader.close()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    seen, skipped, peak_mib = result.stdout.strip().rsplit(" ", 2)[0], *map(int, result.stdout.split()[-2:])
    assert json.loads(seen) == sorted(set(range(16)) - {3, 7})
    assert skipped == 2
    assert "claims 60000 x 60000 pixels" in result.stderr and "sample_rate is 1000000000" in result.stderr
    assert peak_mib < 2048, f"the reader peaked at {peak_mib} MiB"


def test_a_set_where_no_row_decodes_fails_instead_of_spinning(tmp_path):
    uri = str(tmp_path / "hopeless")
    writer = DatasetWriter(uri, label_names=["c0"], made_by={"generator": "test"})
    for clip in synth_clips(6, seed=1, num_classes=1, frames=1, size=16, seconds=0.1):
        writer.add(dataclasses.replace(clip, frames=[b"junk"]))
    writer.close()
    expected = f"none of the 6 clips planned for rank 0 in epoch 0 of {uri}"
    with make_reader(uri, frames=1, seconds=0.1, batch_size=2) as reader, pytest.raises(DataError, match=expected):
        next(reader)


def test_missing_shard_is_an_error_naming_its_uri(dataset_copy):
    shard = storage.join(dataset_copy, "shard-00002.parquet")
    storage.remove(shard)
    with make_reader(dataset_copy) as reader:
        with pytest.raises(DataError, match=f"{shard} is missing"):
            take(reader, 8)
        with pytest.raises(DataError, match=shard):  # and it stays failed
            next(reader)


def test_shard_whose_sha256_differs_is_an_error_naming_its_uri(dataset_copy):
    shard = storage.join(dataset_copy, "shard-00001.parquet")
    data = bytearray(storage.read_bytes(shard))
    data[len(data) // 2] ^= 0xFF  # same size, different content
    storage.write_bytes(shard, bytes(data))
    with make_reader(dataset_copy) as reader, pytest.raises(DataError, match=f"{shard} fails its checksum"):
        take(reader, 8)


def test_missing_empty_or_splitless_data_sets_fail_before_reading(tmp_path, dataset):
    missing = str(tmp_path / "nothing-here")
    with pytest.raises(DataError, match=f"no data set at {missing}"):
        make_reader(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "modalities": {"video": True, "audio": True},
                "label_names": [],
                "made_by": {},
                "shards": [],
            }
        )
    )
    with pytest.raises(DataError, match=f"{empty} holds no clips"):
        make_reader(str(empty))
    with pytest.raises(DataError, match=f"split 'validation' of {dataset}"):
        make_reader(dataset, split="validation")


def test_split_reads_only_the_rows_of_that_split(dataset):
    expected = sorted(i for i, clip in enumerate(iter_clips(dataset)) if clip.split == "test")
    assert 0 < len(expected) < NUM_CLIPS
    with make_reader(dataset, split="test", batch_size=2) as reader:
        assert sorted(rest_of_epoch(reader)) == expected
        assert reader.num_clips == len(expected)


def test_frames_are_windowed_or_padded_and_audio_fits_the_length(dataset):
    stored = {clip.clip_id: clip for clip in iter_clips(dataset)}
    with make_reader(dataset, frames=6, seconds=0.5) as reader:
        batch = next(reader)
    clip = stored[batch["clip_id"][0]]
    frames, wave = decode_frames(clip.frames), decode_audio(clip.audio)
    assert torch.equal(batch["frames"][0, :4], torch.from_numpy(frames))
    assert all(torch.equal(batch["frames"][0, t], batch["frames"][0, 3]) for t in (4, 5))  # last frame repeats
    assert batch["audio"].shape == (8, 8000)
    assert torch.equal(batch["audio"][0, :4000], torch.from_numpy(wave))
    assert not batch["audio"][0, 4000:].any()  # silence after the stored audio

    with make_reader(dataset, frames=2, seconds=0.125) as reader:
        batch = next(reader)
    clip = stored[batch["clip_id"][0]]
    frames, wave = decode_frames(clip.frames), decode_audio(clip.audio)
    assert torch.equal(batch["frames"][0], torch.from_numpy(frames[1:3]))  # the centred window
    # Frames 1-2 span 1/16..3/16 s at 16 fps: the audio window is centred on 2/16 s.
    assert torch.equal(batch["audio"][0], torch.from_numpy(wave[1000:3000]))


def test_audio_only_and_video_only_sets(tmp_path):
    clips = list(synth_clips(8, seed=2, frames=2, size=16, seconds=0.1, sample_rate=8000))
    for name, change in (("audio-only", {"frames": []}), ("video-only", {"audio": b""})):
        uri = str(tmp_path / name)
        writer = DatasetWriter(uri, label_names=[f"c{i}" for i in range(8)], made_by={"generator": "test"})
        for clip in clips:
            writer.add(dataclasses.replace(clip, **change))
        writer.close()
        with make_reader(uri, frames=2, seconds=0.1, sample_rate=16000, batch_size=4) as reader:
            batch = next(reader)
        if name == "audio-only":
            assert batch["frames"] is None
            assert batch["audio"].shape == (4, 1600)  # 8 kHz rows resampled to 16 kHz
        else:
            assert batch["audio"] is None
            assert batch["frames"].shape == (4, 2, 16, 16, 3)


def test_close_stops_every_background_thread(dataset):
    def reader_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("cmacc-")]

    reader = make_reader(dataset, num_decode_threads=3)
    take(reader, 2)
    assert reader_threads()
    reader.close()
    assert not reader_threads()
    next(reader)  # iterating again restarts the pipeline from the cursor
    reader.close()
    assert not reader_threads()


def test_state_is_small(dataset):
    with make_reader(dataset) as reader:
        take(reader, 3)
        assert len(json.dumps(reader.state_dict())) < 400


def test_bounded_shuffle_is_a_permutation_that_stays_near_its_input():
    stream = np.arange(1000)
    out = bounded_shuffle(stream, 16, np.random.default_rng(0))
    assert sorted(out.tolist()) == stream.tolist()
    assert not np.array_equal(out, stream)
    # An element leaves the buffer on average 16 draws after it enters: nothing jumps far ahead.
    assert (out - stream < 16).all()


def test_excluded_clips_are_skipped_and_counted_and_the_cursor_stays_exact(dataset):
    """`exclude_clips` (the remedy for a clip that kills workers): the clips are never
    decoded, count as skipped, and the reader still consumes their positions, so the rest of
    the sequence is the one a reader without them hands out, minus those clips."""
    with make_reader(dataset) as plain:
        seen = take(plain, 4)
    order = [clip for batch in seen for clip in batch["clip_id"]]
    dropped = {order[3], order[10]}

    class Note:  # what workers.distributed.crashes.ReadingNote is told
        def __init__(self):
            self.decoding: dict[int, str] = {}
            self.begun: list[str] = []
            self.lock = threading.Lock()

        def started(self, index, shard, row, clip_id):
            with self.lock:
                self.decoding[index] = clip_id
                self.begun.append(clip_id)

        def finished(self, index):
            with self.lock:
                del self.decoding[index]

    note = Note()
    with make_reader(dataset, exclude_clips=frozenset(dropped), note=note) as reader:
        got = [clip for batch in take(reader, 4) for clip in batch["clip_id"]]
        assert reader.num_skipped == 2
    assert got == [clip for clip in order if clip not in dropped] + got[-2:]
    assert not dropped & set(note.begun), "an excluded clip was decoded"
    assert set(got) <= set(note.begun)


# --- the fresh pool's extra stream: a uniform draw --------------------------------------------


def many_shards(num_shards: int = 40, seed: int = 0) -> list[np.ndarray]:
    """Per shard the global indices of its rows: `num_shards` shards of 30 to 70 rows."""
    sizes = np.random.default_rng(seed).integers(30, 71, size=num_shards)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(offsets[i], offsets[i + 1]) for i in range(num_shards)]


def steps_of(planner, *, clips_per_step: int, world_size: int = 1) -> np.ndarray:
    """An epoch's worth of steps of `planner`: [steps, clips_per_step] clip indices (every
    rank's part of a step side by side)."""
    plans = [planner.plan(0, rank, world_size) for rank in range(world_size)]
    per_rank = clips_per_step // world_size
    steps = min(len(plan) for plan in plans) // per_rank
    return np.stack([np.concatenate([p[s * per_rank : (s + 1) * per_rank] for p in plans]) for s in range(steps)])


def chi_square_per_step(steps: np.ndarray, cell_of: np.ndarray, probabilities: np.ndarray) -> tuple[float, int]:
    """Sum over steps of the chi-square statistic of the step's clips over cells (`cell_of`:
    the cell of each clip index) against `probabilities`; its degrees of freedom."""
    expected = steps.shape[1] * probabilities
    total = 0.0
    for step in steps:
        counts = np.bincount(cell_of[step], minlength=len(probabilities))
        total += float(((counts - expected) ** 2 / expected).sum())
    return total, len(steps) * (len(probabilities) - 1)


def beyond_chance(statistic: float, dof: int) -> bool:
    """Above the chi-square's mean by more than 4 standard deviations (p < 1e-4, normal approx.)."""
    return statistic > dof + 4 * np.sqrt(2 * dof)


@pytest.mark.parametrize("world_size", [1, 4])
def test_the_extra_streams_clips_follow_the_sets_shards_and_rows_and_overlap_the_batch_by_chance(world_size):
    from workers.data.plan import EpochPlanner

    shards = many_shards()
    n = sum(len(rows) for rows in shards)
    shard_of = np.concatenate([np.full(len(rows), i) for i, rows in enumerate(shards)])
    # Every shard a cell (probability: its share of the rows), and five bins of a row's
    # relative place in its shard.
    place = np.concatenate([np.arange(len(rows)) / len(rows) for rows in shards])
    row_bin = np.minimum((place * 5).astype(int), 4)
    shard_p = np.bincount(shard_of) / n
    row_p = np.bincount(row_bin) / n
    m = e = 64

    def planner(stream, uniform):
        return EpochPlanner(shard_indices=shards, seed=3, shuffle_buffer=256, stream=stream, uniform=uniform)

    batch = steps_of(planner(0, False), clips_per_step=m, world_size=world_size)
    for uniform in (True, False):  # the uniform stream, and the shard plan it replaced as the control
        extra = steps_of(planner(1, uniform), clips_per_step=e, world_size=world_size)
        by_shard = chi_square_per_step(extra, shard_of, shard_p)
        by_row = chi_square_per_step(extra, row_bin, row_p)
        steps = min(len(batch), len(extra))
        overlap = sum(len(np.intersect1d(batch[s], extra[s])) for s in range(steps))
        expected = steps * m * e / n  # independent uniform draws: each batch clip is in E of N
        sd = np.sqrt(expected)  # a sum of hypergeometric counts: variance below the mean
        if uniform:
            assert not beyond_chance(*by_shard) and not beyond_chance(*by_row), (by_shard, by_row)
            assert abs(overlap - expected) < 4 * sd, (overlap, expected)
            assert sorted(np.concatenate(extra).tolist()) == sorted(set(np.concatenate(extra).tolist()))
        else:  # a 256-row window over one or two shards at a time is no draw from the set
            assert beyond_chance(*by_shard), by_shard


def test_a_uniform_reader_with_a_small_cache_refetches_shards_and_reads_the_right_clips(dataset, caplog):
    stored = {clip.clip_id: clip for clip in iter_clips(dataset)}
    with caplog.at_level(logging.WARNING), make_reader(dataset, uniform=True, cache_mb=0.1) as reader:  # ~1 shard
        assert "will read their shard again" in caplog.text and "data.extra_cache_mb" in caplog.text
        batches = take(reader, 16)  # two epochs
        fetches = reader._pipeline._cache.fetches
    assert fetches > 2 * 4  # each shard read more than once an epoch
    for batch in batches[:4]:
        for i, clip_id in enumerate(batch["clip_id"]):
            assert np.array_equal(batch["audio"][i].numpy(), decode_audio(stored[clip_id].audio))
    with make_reader(dataset, uniform=True) as roomy:
        assert indices(take(roomy, 16)) == indices(batches)  # the cache changes what is read again, not the order
        assert roomy._pipeline._cache.fetches == 4


def test_an_extra_stream_cursor_saved_on_the_shard_plan_starts_the_uniform_stream_over(dataset, caplog):
    with make_reader(dataset, stream=1) as old:
        take(old, 3)
        saved = old.state_dict()
    with make_reader(dataset, stream=1, uniform=True) as new, caplog.at_level(logging.WARNING):
        new.load_state_dict([saved])
        assert new.state_dict()["position"] == 0
        with make_reader(dataset, stream=1, uniform=True) as fresh:
            assert indices(take(new, 2)) == indices(take(fresh, 2))
    assert "saved on the shard plan" in caplog.text
    with make_reader(dataset, stream=0) as training, pytest.raises(DataError, match="another data set"):
        make_reader(dataset, stream=1, uniform=True).load_state_dict([training.state_dict()])
