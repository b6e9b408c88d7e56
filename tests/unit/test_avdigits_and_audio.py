"""Audio files and labels (class folders, ESC-50 CSVs), UCF101/HMDB51 split files, the
AV-digits set from the real FSDD and UCI digits, and the CLI's answers to bad usage."""

import hashlib
import io
import re
from collections import Counter, defaultdict
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cli.main import main
from workers.data.audio_folders import csv_labels, decode_audio, folder_labels, read_audio_clips
from workers.data.avdigits import parse_redundancy, write_av_digits
from workers.data.format import DataError, decode_pcm, read_manifest
from workers.data.splits import read_hmdb51, read_splits, read_ucf101
from workers.data.video import ClipOptions, MediaError

pytestmark = pytest.mark.unit

ENCODERS = {"wav": "pcm_s16le", "flac": "flac", "ogg": "libopus", "mp3": "libmp3lame"}


def write_audio(path: Path, *, seconds: float, freq: float = 440.0, rate: int = 44100, channels: int = 2) -> Path:
    """A sine of `freq` Hz, the same on every channel, encoded by the file's extension."""
    layout = "stereo" if channels == 2 else "mono"
    t = np.arange(round(seconds * rate)) / rate
    wave = np.tile((0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), (channels, 1))
    with av.open(str(path), "w") as container:
        stream = container.add_stream(ENCODERS[path.suffix[1:]], rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def dominant_hz(wave: np.ndarray, rate: int = 16000) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(wave))) * rate / wave.size)


@pytest.mark.parametrize(("ext", "rate"), [("wav", 22050), ("flac", 44100), ("ogg", 48000), ("mp3", 44100)])
def test_audio_files_decode_to_mono_16khz_at_the_same_pitch_and_level(tmp_path, ext, rate):
    wave, start = decode_audio(str(write_audio(tmp_path / f"a.{ext}", seconds=1.5, rate=rate)), rate=16000)
    assert wave.dtype == np.float32
    assert wave.size == pytest.approx(24000, abs=50)  # 1.5 s at 16 kHz
    assert start == pytest.approx(0.0, abs=0.03)  # mp3 without gapless info starts at its priming
    assert dominant_hz(wave) == pytest.approx(440, abs=2)
    # Both channels carry the tone at 0.5: their mean is 0.5, not a clipped sum.
    assert np.sqrt(np.mean(wave[2000:-2000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


def test_audio_clips_are_audio_only_windows_and_short_files_are_padded(tmp_path):
    options = ClipOptions(clip_seconds=1.0, clips_per_video=3)
    long = read_audio_clips(str(write_audio(tmp_path / "long.flac", seconds=5.0)), options=options, source="long.flac")
    assert [c.clip_id for c in long] == ["long.flac#000", "long.flac#001", "long.flac#002"]
    assert [round(c.start_s, 3) for c in long] == [0.333, 2.0, 3.667]  # centres of three equal parts
    for clip in long:
        assert (clip.frames, clip.height, clip.width, clip.fps, clip.sample_rate) == ([], 0, 0, 0.0, 16000)
        assert len(decode_pcm(clip.audio)) == 16000

    (short,) = read_audio_clips(
        str(write_audio(tmp_path / "short.wav", seconds=0.4, channels=1)), options=options, source="short.wav", label=2
    )
    wave = decode_pcm(short.audio)
    assert wave.size == 16000 and short.label == 2
    assert np.abs(wave[:6000]).max() > 0.4 and np.abs(wave[6500:]).max() == 0  # 0.4 s of sound, then silence


def test_a_file_without_audio_or_not_media_is_refused_naming_it(tmp_path):
    bogus = tmp_path / "bogus.ogg"
    bogus.write_bytes(b"OggS but nothing else")
    with pytest.raises(MediaError, match=re.escape("bogus.ogg")):
        decode_audio(str(bogus), rate=16000)


def test_class_folders_label_files_and_the_root_is_unlabelled():
    table = folder_labels(["rain/1.wav", "dog/2.wav", "dog/sub/3.wav", "loose.wav"])
    assert table.label_names == ["dog", "rain"]
    assert table.labels == {"rain/1.wav": 1, "dog/2.wav": 0, "dog/sub/3.wav": 0, "loose.wav": None}


def test_an_esc50_csv_gives_category_labels_and_folds_as_splits(tmp_path):
    csv_path = tmp_path / "esc50.csv"
    csv_path.write_text(
        "filename,fold,target,category,esc10,src_file,take\n"
        "1-100038-A-14.wav,1,14,chirping_birds,False,100038,A\n"
        "1-100032-A-0.wav,1,0,dog,True,100032,A\n"
        "2-101676-A-10.wav,2,10,rain,True,101676,A\n"
        "5-9032-A-0.wav,5,0,dog,True,9032,A\n"
    )
    files = ["audio/1-100032-A-0.wav", "audio/1-100038-A-14.wav", "audio/2-101676-A-10.wav", "audio/extra.wav"]
    table = csv_labels(str(csv_path), files)
    assert table.label_names == ["chirping_birds", "dog", "rain"]
    assert table.labels == {"audio/1-100038-A-14.wav": 0, "audio/1-100032-A-0.wav": 1, "audio/2-101676-A-10.wav": 2}
    assert table.splits["audio/2-101676-A-10.wav"] == "fold2"
    assert table.unlisted == ["audio/extra.wav"]
    assert table.missing == ["5-9032-A-0.wav"]


def test_a_headerless_csv_is_filename_label_fold_and_numbers_sort_as_numbers(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("a/x.wav,10\na/y.wav,2,test\nb/z.wav,2\n")
    table = csv_labels(str(csv_path), ["a/x.wav", "a/y.wav", "b/z.wav"])
    assert table.label_names == ["2", "10"]
    assert table.labels == {"a/x.wav": 1, "a/y.wav": 0, "b/z.wav": 0}
    assert table.splits == {"a/x.wav": None, "a/y.wav": "test", "b/z.wav": None}

    bad = tmp_path / "bad.csv"
    bad.write_text("a/x.wav,1\nonly-a-name\n")
    with pytest.raises(DataError, match=re.escape(f"{bad}:2: expected filename,label[,fold]")):
        csv_labels(str(bad), ["a/x.wav"])


def _ucf101_lists(folder: Path, k: int, train: list[str], test: list[str]) -> None:
    (folder / f"trainlist{k:02d}.txt").write_text("".join(f"{v} {v.split('/')[0][:1]}\r\n" for v in train))
    (folder / f"testlist{k:02d}.txt").write_text("".join(f"{v}\r\n" for v in test))


def test_ucf101_split_files_map_videos_to_train_and_test(tmp_path):
    _ucf101_lists(
        tmp_path,
        1,
        train=["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "HandstandPushups/v_HandStandPushups_g08_c01.avi"],
        test=["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"],
    )
    _ucf101_lists(tmp_path, 2, train=["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"], test=[])
    (tmp_path / "classInd.txt").write_text("1 ApplyEyeMakeup\n")

    table = read_splits(str(tmp_path))
    assert (table.dataset, table.split_index, len(table)) == ("ucf101", 1, 3)
    assert table.split_of("UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi") == "train"
    assert table.split_of("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi") == "test"
    assert table.split_of("handstandpushups/v_HandStandPushups_g08_c01.avi") == "train"  # case differs
    assert table.split_of("v_ApplyEyeMakeup_g08_c01.avi") == "train"  # found without its folder
    assert table.split_of("Other/v_Other_g01_c01.avi") is None
    assert read_ucf101(str(tmp_path), split_index=2).split_of("v_ApplyEyeMakeup_g01_c01.avi") == "train"
    with pytest.raises(DataError, match=re.escape("trainlist03.txt: UCF101 split file not found")):
        read_splits(str(tmp_path), split_index=3)


def test_hmdb51_split_files_map_1_2_0_to_train_test_unused(tmp_path):
    (tmp_path / "brush_hair_test_split1.txt").write_text(
        "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \nBrushing_2.avi 2 \n"
    )
    (tmp_path / "cartwheel_test_split1.txt").write_text("Cartwheel_1.avi 0 \n")
    (tmp_path / "cartwheel_test_split2.txt").write_text("Cartwheel_1.avi 2 \n")

    table = read_splits(str(tmp_path))
    assert (table.dataset, len(table)) == ("hmdb51", 3)
    assert table.split_of("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi") == "train"
    assert table.split_of("hmdb51/brush_hair/Brushing_2.avi") == "test"
    assert table.split_of("cartwheel/Cartwheel_1.avi") == "unused"
    assert read_hmdb51(str(tmp_path), split_index=2).split_of("cartwheel/Cartwheel_1.avi") == "test"

    (tmp_path / "cartwheel_test_split3.txt").write_text("Cartwheel_1.avi 7\n")
    with pytest.raises(DataError, match=r"cartwheel_test_split3.txt:1: expected 'video.avi 0\|1\|2'"):
        read_splits(str(tmp_path), split_index=3)
    with pytest.raises(DataError, match="neither UCF101"):
        read_splits(str(tmp_path / ".."))


def _shard_rows(out: Path) -> list[dict]:
    return [row for shard in sorted(out.glob("shard-*.parquet")) for row in pq.read_table(shard).to_pylist()]


def test_av_digits_pairs_each_spoken_digit_with_the_same_written_digit_and_holds_out_a_speaker(shared_data, tmp_path):
    inputs = {"fsdd_dir": str(shared_data / "fsdd"), "digits_csv": str(shared_data / "digits" / "digits.csv.gz")}
    progress = []
    manifest = write_av_digits(
        str(tmp_path / "a"),
        **inputs,
        max_takes=2,
        frames=4,
        size=32,
        test_speaker="theo",
        progress=lambda done, total: progress.append((done, total)),
    )

    assert manifest.num_clips == 120 and progress[-1] == (120, 120)  # 10 digits x 6 speakers x 2 takes
    assert manifest.label_names == [str(d) for d in range(10)]
    assert manifest.splits == {"train": 100, "test": 20}
    rows = _shard_rows(tmp_path / "a")
    speakers = {split: {r["clip_id"].split("_")[1] for r in rows if r["split"] == split} for split in ("train", "test")}
    assert speakers["test"] == {"theo"} and "theo" not in speakers["train"] and len(speakers["train"]) == 5
    images = {
        split: {r["source"].split("digits:")[1] for r in rows if r["split"] == split} for split in ("train", "test")
    }
    assert not images["train"] & images["test"]  # the handwriting is held out too
    for row in rows:
        assert row["label"] == int(row["clip_id"].removeprefix("avdigits-")[0])  # label = spoken digit
        assert len(row["frames"]) == 4 and (row["height"], row["width"]) == (32, 32)
        wave = decode_pcm(row["audio"])
        assert wave.size == 16000 and np.abs(wave).max() > 0.05  # 1 s at 16 kHz holding the word

    again = write_av_digits(str(tmp_path / "b"), **inputs, max_takes=2, frames=4, size=32)
    other = write_av_digits(str(tmp_path / "c"), **inputs, max_takes=2, frames=4, size=32, seed=1)

    def digest(out: str) -> str:
        return hashlib.sha256((tmp_path / out / "shard-00000.parquet").read_bytes()).hexdigest()

    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards] == [digest("a")]
    assert [s.sha256 for s in other.shards] != [s.sha256 for s in manifest.shards]


def test_cli_answers_bad_usage_with_exit_2_naming_the_problem(tmp_path, capsys):
    cases = [
        (["data", "prepare", str(tmp_path / "nowhere"), str(tmp_path / "out")], "nowhere is not a folder"),
        (["data", "prepare", str(tmp_path), str(tmp_path / "out"), "--labels", "missing.csv"], "missing.csv"),
        (["data", "prepare", str(tmp_path), str(tmp_path / "out"), "--clip-seconds", "0"], "--clip-seconds"),
        (["data", "prepare", str(tmp_path), str(tmp_path / "out"), "--fps", "x"], "--fps"),
        (["data", "av-digits", str(tmp_path / "out"), "--fsdd", str(tmp_path), "--digits", "nope.csv"], "nope.csv"),
        (["data", "av-digits", str(tmp_path / "out"), "--digits", "x"], "--fsdd"),
    ]
    for argv, named in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1, err


def test_cli_refuses_an_unknown_test_speaker(shared_data, tmp_path, capsys):
    digits = str(shared_data / "digits" / "digits.csv.gz")
    argv = ["data", "av-digits", str(tmp_path / "out"), "--fsdd", str(shared_data / "fsdd"), "--digits", digits]
    assert main([*argv, "--test-speaker", "nobody"]) == 2
    assert "'nobody' is not an FSDD speaker" in capsys.readouterr().err


def test_loudness_envelope_follows_the_sound_frame_by_frame():
    from workers.data.avdigits import loudness_envelope

    rate, frames = 16000, 8
    t = np.arange(rate) / rate
    audio = np.where((t >= 0.25) & (t < 0.5), 0.5 * np.sin(2 * np.pi * 440 * t), 0.0).astype(np.float32)
    audio[: rate // 8] += 0.005  # a faint hum in frame 0: 40 dB below the tone, under the floor
    envelope = loudness_envelope(audio, frames)
    np.testing.assert_allclose(envelope, [0, 0, 1, 1, 0, 0, 0, 0], atol=1e-6)
    assert loudness_envelope(np.zeros(rate, dtype=np.float32), frames).tolist() == [0.0] * frames


def test_band_envelopes_tell_a_vowel_from_a_fricative_frame_by_frame():
    from workers.data.avdigits import band_envelopes

    rate, frames = 16000, 4
    t = np.arange(rate) / rate
    noise = np.random.default_rng(0).standard_normal(rate)
    hiss = np.fft.irfft(
        np.fft.rfft(noise) * ((np.fft.rfftfreq(rate, 1 / rate) > 2000) & (np.fft.rfftfreq(rate, 1 / rate) < 3500))
    )
    audio = np.zeros(rate)
    # frame 0: a low "vowel", as loud (RMS 0.3) as the "s" of frame 1
    audio[: rate // 4] = 0.3 * np.sqrt(2) * np.sin(2 * np.pi * 300 * t[: rate // 4])
    audio[rate // 4 : rate // 2] = 0.3 * hiss[rate // 4 : rate // 2] / hiss.std()
    levels = band_envelopes(audio.astype(np.float32), frames, sample_rate=rate)  # frames x (low, high)
    assert levels.shape == (4, 2)
    assert levels[0, 0] > 0.9 and levels[0, 1] < 0.2  # the vowel fills the low band only
    assert levels[1, 1] > 0.9 and levels[1, 0] < 0.2  # the hiss fills the high band only
    assert (levels[2:] == 0).all()  # silence


@pytest.mark.parametrize("mode", ["scale", "ink", "both"])
def test_synchronised_frames_show_more_digit_when_the_sound_is_loud(mode):
    from workers.data.avdigits import _background, render_synced_frames

    image = np.zeros((8, 8), dtype=np.float32)
    image[1:7, 2:6] = 1.0  # a block "digit"
    size = 64
    background, _ = _background(np.random.default_rng(3), size)  # the renderer draws the same one first
    video = render_synced_frames(image, np.array([0.0, 1.0, 0.0]), np.random.default_rng(3), size=size, mode=mode)
    ink = np.abs(video.astype(np.float64) - 255 * background).sum(axis=3)  # T x size x size
    digit_pixels = (ink > 60).sum(axis=(1, 2))
    strength = ink.sum(axis=(1, 2))
    assert digit_pixels[1] > digit_pixels[0] and digit_pixels[1] > digit_pixels[2], digit_pixels
    assert strength[1] > 1.5 * strength[0], strength


def test_the_synchronised_variant_is_recorded_and_keeps_the_split(shared_data, tmp_path):
    inputs = {"fsdd_dir": str(shared_data / "fsdd"), "digits_csv": str(shared_data / "digits" / "digits.csv.gz")}
    synced = write_av_digits(str(tmp_path / "s"), **inputs, max_takes=1, frames=4, size=32, sync="both")
    plain = write_av_digits(str(tmp_path / "p"), **inputs, max_takes=1, frames=4, size=32)
    assert synced.made_by["params"]["sync"] == "both" and plain.made_by["params"]["sync"] == "none"
    assert synced.splits == plain.splits == {"train": 50, "test": 10}
    rows = {r["clip_id"]: r for r in _shard_rows(tmp_path / "s")}
    for row in _shard_rows(tmp_path / "p"):  # the same recordings, labels and splits
        assert (rows[row["clip_id"]]["label"], rows[row["clip_id"]]["split"]) == (row["label"], row["split"])
    with pytest.raises(ValueError, match="sync must be one of"):
        write_av_digits(str(tmp_path / "x"), **inputs, max_takes=1, sync="loud")


def test_spectral_frames_stretch_the_digit_with_each_band():
    from workers.data.avdigits import _background, render_synced_frames

    image = np.ones((8, 8), dtype=np.float32)  # a solid block shows its own size
    size = 64
    background, _ = _background(np.random.default_rng(4), size)
    levels = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)  # wide and flat, then narrow and tall
    video = render_synced_frames(image, levels, np.random.default_rng(4), size=size, mode="spectral")
    ink = np.abs(video.astype(np.float64) - 255 * background).sum(axis=3) > 60  # T x size x size
    widths = ink.any(axis=1).sum(axis=1)
    heights = ink.any(axis=2).sum(axis=1)
    assert widths[0] > 1.5 * heights[0] and heights[1] > 1.5 * widths[1], (widths, heights)


def _av_inputs(shared_data: Path) -> dict[str, str]:
    return {"fsdd_dir": str(shared_data / "fsdd"), "digits_csv": str(shared_data / "digits" / "digits.csv.gz")}


def _counts(rows: list[dict]) -> Counter:
    return Counter((row["split"], row["label"]) for row in rows)


def _first_frame(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["frames"][0])), dtype=np.float64)


def test_redundancy_specs_parse_to_what_the_manifest_records():
    assert parse_redundancy(None) is None and parse_redundancy("none") is None and parse_redundancy("") is None
    assert parse_redundancy("head=0:8") == {"head": {"digit": 0, "copies": 8}, "clips": 1}
    assert parse_redundancy("clips=3") == {"head": None, "clips": 3}
    both = {"head": {"digit": 7, "copies": 4}, "clips": 2}
    assert parse_redundancy(" clips=2 , head=7:4 ") == both
    assert parse_redundancy(both) == both  # the manifest's own form is accepted back
    for bad in ["head=10:2", "head=0:1", "clips=1", "head=0", "copies=2", "head=0:8,head=1:2", "head=0:40,clips=2"]:
        with pytest.raises(ValueError):
            parse_redundancy(bad)


def test_a_head_class_repeats_its_train_recordings_as_near_duplicates_and_keeps_the_test_split(shared_data, tmp_path):
    small = {**_av_inputs(shared_data), "max_takes": 1, "frames": 4, "size": 32}
    plain = write_av_digits(str(tmp_path / "plain"), **small)
    head = write_av_digits(str(tmp_path / "head"), **small, redundancy="head=3:4")
    assert plain.made_by["params"]["redundancy"] is None
    assert head.made_by["params"]["redundancy"] == {"head": {"digit": 3, "copies": 4}, "clips": 1}
    plain_rows, head_rows = _shard_rows(tmp_path / "plain"), _shard_rows(tmp_path / "head")

    # 4 times the train clips of digit 3, everything else as many as without redundancy
    assert head.splits == {"train": 50 + 3 * 5, "test": 10}
    assert _counts(head_rows) == {key: n * (4 if key == ("train", 3) else 1) for key, n in _counts(plain_rows).items()}
    # the test split is the very same: clip ids, rows (sources included) and their order
    assert [r for r in head_rows if r["split"] == "test"] == [r for r in plain_rows if r["split"] == "test"]
    # copy 0 of every recording is the clip made without redundancy, apart from its source
    plain_by_id = {r["clip_id"]: r for r in plain_rows}
    assert {r["clip_id"] for r in head_rows if "-c" not in r["clip_id"]} == set(plain_by_id)
    for row in head_rows:
        if "-c" not in row["clip_id"]:
            assert {**row, "source": ""} == {**plain_by_id[row["clip_id"]], "source": ""}

    groups = defaultdict(list)  # the train clips of each recording, by their shared source
    for row in head_rows:
        if row["split"] == "train":
            groups[row["source"]].append(row)
    assert len(groups) == 50 and all(source.startswith("fsdd:") and "+" not in source for source in groups)
    assert {len(rows) for source, rows in groups.items() if source.startswith("fsdd:3_")} == {4}
    assert {len(rows) for source, rows in groups.items() if not source.startswith("fsdd:3_")} == {1}
    ids = sorted(r["clip_id"] for r in groups["fsdd:3_george_0.wav"])
    assert ids == ["avdigits-3_george_0", "avdigits-3_george_0-c1", "avdigits-3_george_0-c2", "avdigits-3_george_0-c3"]
    firsts = {source: _first_frame(min(rows, key=lambda r: r["clip_id"])) for source, rows in groups.items()}
    for source, rows in groups.items():
        if len(rows) == 1:
            continue
        assert len({r["audio"] for r in rows}) == 4 and len({tuple(r["frames"]) for r in rows}) == 4  # distinct bytes
        assert {r["label"] for r in rows} == {3}
        # The same image over the same background, moved and noised anew: the first frames of
        # the copies differ from copy 0's by little more than the noise, other recordings' by far more.
        nearest_other = min(np.median(np.abs(f - firsts[source]).sum(axis=2)) for s, f in firsts.items() if s != source)
        for copy in sorted(rows, key=lambda r: r["clip_id"])[1:]:
            assert np.median(np.abs(_first_frame(copy) - firsts[source]).sum(axis=2)) < 40 < nearest_other, source


def test_clips_k_repeats_every_train_recording_and_combines_with_a_head_deterministically(shared_data, tmp_path):
    small = {**_av_inputs(shared_data), "max_takes": 1, "frames": 2, "size": 16, "seconds": 0.5, "sync": "scale"}
    plain = write_av_digits(str(tmp_path / "plain"), **small)
    clips = write_av_digits(str(tmp_path / "clips"), **small, redundancy="clips=2")
    assert clips.made_by["params"]["redundancy"] == {"head": None, "clips": 2}
    assert clips.splits == {"train": 2 * plain.splits["train"], "test": plain.splits["test"]}
    plain_counts = _counts(_shard_rows(tmp_path / "plain"))
    assert _counts(_shard_rows(tmp_path / "clips")) == {
        key: n * (2 if key[0] == "train" else 1) for key, n in plain_counts.items()
    }
    both = write_av_digits(str(tmp_path / "both"), **small, redundancy="head=0:3,clips=2")
    assert both.made_by["params"]["redundancy"] == {"head": {"digit": 0, "copies": 3}, "clips": 2}
    rows = _shard_rows(tmp_path / "both")
    assert _counts(rows) == {
        key: n * {"test": 1, "train": 6 if key[1] == 0 else 2}[key[0]] for key, n in plain_counts.items()
    }
    test_rows = [r for r in _shard_rows(tmp_path / "plain") if r["split"] == "test"]
    assert [r for r in rows if r["split"] == "test"] == test_rows
    assert len({r["clip_id"] for r in rows}) == len(rows) == both.num_clips
    again = write_av_digits(
        str(tmp_path / "again"), **small, redundancy={"head": {"digit": 0, "copies": 3}, "clips": 2}
    )
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in both.shards]  # deterministic per seed


def test_cli_passes_the_redundancy_to_the_generator(shared_data, tmp_path, monkeypatch, capsys):
    import workers.data.avdigits as avdigits

    real, seen = avdigits.write_av_digits, {}

    def small(out: str, **kwargs):  # the CLI's call, made on a few recordings
        seen.update(kwargs)
        return real(out, **{**kwargs, "frames": 2, "size": 16, "max_takes": 1})

    monkeypatch.setattr(avdigits, "write_av_digits", small)
    inputs = _av_inputs(shared_data)
    argv = ["data", "av-digits", str(tmp_path / "out"), "--fsdd", inputs["fsdd_dir"], "--digits", inputs["digits_csv"]]
    assert main([*argv, "--redundancy", "head=0:3,clips=2"]) == 0
    assert seen["redundancy"] == {"head": {"digit": 0, "copies": 3}, "clips": 2}
    assert "redundant train split: 2 clip(s) per recording, digit 0 x3" in capsys.readouterr().out
    assert read_manifest(str(tmp_path / "out")).made_by["params"]["redundancy"] == seen["redundancy"]


def test_a_bad_redundancy_spec_is_refused_naming_the_flag_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "fsdd").mkdir()
    (tmp_path / "digits.csv").write_text("")
    out = tmp_path / "out"
    argv = ["data", "av-digits", str(out), "--fsdd", str(tmp_path / "fsdd"), "--digits", str(tmp_path / "digits.csv")]
    for spec in [
        "head=11:2",
        "head=0",
        "head=0:1",
        "clips=0",
        "clips=two",
        "copies=3",
        "head=0:8,head=1:2",
        "head=0:9,clips=8",
    ]:
        assert main([*argv, "--redundancy", spec]) == 2, spec
        err = capsys.readouterr().err
        assert f"--redundancy {spec!r}" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    with pytest.raises(ValueError, match=re.escape("redundancy 'clips=1': clips K must be a whole number >= 2")):
        write_av_digits(str(out), fsdd_dir=str(tmp_path / "fsdd"), digits_csv="x", redundancy="clips=1")
    assert not out.exists()
