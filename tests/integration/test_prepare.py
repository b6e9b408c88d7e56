"""Real media files -> clips: PyAV decoding of generated videos, `prepare` on Ray into the
moto S3 endpoint, the UCF101/HMDB51/ESC-50 layouts, and the real Big Buck Bunny excerpt.

The videos are written here with PyAV: a white square crossing a grey frame at a known
speed, and a 440 Hz tone that starts at a known time, so where the square is and when the
tone starts tell whether frames and audio were cut from the right time.
"""

import io
import itertools
import json
import re
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cli.main import main
from service import storage
from workers.data.format import decode_pcm, read_manifest
from workers.data.prepare import SKIPPED_NAME, prepare
from workers.data.video import ClipOptions, MediaError, NoAudioStreamError, UndecodableMediaError, read_video_clips

pytestmark = pytest.mark.integration

SOURCE_FPS = 25
SQUARE_SPEED = 80  # source pixels per second
SQUARE = 16  # source pixels
WIDTH, HEIGHT = 256, 64
TONE_ON_S = 1.3
# (video codec, audio codec, audio rate) per container.
CODECS = {
    "mp4": ("libx264", "aac", 44100),
    "mov": ("libx264", "aac", 44100),
    "mkv": ("libx264", "aac", 44100),
    "webm": ("libvpx", "libopus", 48000),
    "avi": ("mpeg4", "libmp3lame", 44100),
}
SMALL = ClipOptions(clip_seconds=0.5, fps=10, short_side=32, clips_per_video=5)


def write_video(path: Path, *, seconds: float = 3.0, audio: bool = True, tone_on_s: float = TONE_ON_S) -> Path:
    """A video of a square moving right at SQUARE_SPEED, with a stereo tone from `tone_on_s`."""
    vcodec, acodec, rate = CODECS[path.suffix[1:]]
    t = np.arange(round(seconds * rate)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) * (t >= tone_on_s)).astype(np.float32)
    with av.open(str(path), "w") as container:
        video = container.add_stream(vcodec, rate=SOURCE_FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        sound = container.add_stream(acodec, rate=rate, layout="stereo") if audio else None
        for i in range(round(seconds * SOURCE_FPS)):
            image = np.full((HEIGHT, WIDTH, 3), 60, np.uint8)
            x = round(SQUARE_SPEED * i / SOURCE_FPS)
            image[24 : 24 + SQUARE, x : x + SQUARE] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, SOURCE_FPS)
            container.mux(video.encode(frame))
            if sound is not None:  # interleaved, one video frame's worth at a time
                lo, hi = round(i * rate / SOURCE_FPS), round((i + 1) * rate / SOURCE_FPS)
                chunk = av.AudioFrame.from_ndarray(np.stack([tone[lo:hi]] * 2), format="fltp", layout="stereo")
                chunk.sample_rate, chunk.pts, chunk.time_base = rate, lo, Fraction(1, rate)
                container.mux(sound.encode(chunk))
        container.mux(video.encode(None))
        if sound is not None:
            container.mux(sound.encode(None))
    return path


def write_wav(path: Path, *, seconds: float, freq: float = 440.0, rate: int = 22050) -> Path:
    t = np.arange(round(seconds * rate)) / rate
    wave = (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)[None, :]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(wave, format="flt", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def square_x(jpeg: bytes) -> float:
    """Horizontal centre (pixels) of the bright square in a decoded frame."""
    gray = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L")).astype(np.float64)
    mask = gray > 160
    return float(mask.sum(axis=0) @ np.arange(gray.shape[1]) / mask.sum())


def shard_rows(dataset_uri: str) -> list[dict]:
    rows = []
    for shard in read_manifest(dataset_uri).shards:
        data = storage.read_bytes(storage.join(dataset_uri, shard.name))
        rows += pq.read_table(pa.BufferReader(data)).to_pylist()
    return rows


def test_clips_have_the_requested_frames_size_and_audio_length(tmp_path):
    clips = read_video_clips(str(write_video(tmp_path / "a.mp4")), options=SMALL, source="a.mp4", label=3)

    assert len(clips) == 5  # 3 s holds five 0.5 s clips without overlap
    assert [c.clip_id for c in clips] == [f"a.mp4#{k:03d}" for k in range(5)]
    for clip in clips:
        assert len(clip.frames) == 5  # 0.5 s x 10 fps
        assert (clip.width, clip.height) == (128, 32)  # short side 32, aspect 4:1 kept
        assert Image.open(io.BytesIO(clip.frames[0])).size == (128, 32)
        assert clip.fps == 10 and clip.sample_rate == 16000 and clip.label == 3
        assert len(decode_pcm(clip.audio)) == 8000  # 0.5 s x 16 kHz
    starts = [c.start_s for c in clips]
    assert starts == sorted(starts) and all(b - a >= 0.5 for a, b in itertools.pairwise(starts))


# AVI keeps no encoder delay: its audio lags by the MP3 priming (~25 ms) and the muxer
# shifts the video to match, so a player (and this reader) show them about a frame late.
TOLERANCE = {"mp4": (0.005, 1.0), "mov": (0.005, 1.0), "mkv": (0.005, 1.0), "webm": (0.005, 1.0), "avi": (0.04, 2.5)}


@pytest.mark.parametrize("ext", sorted(CODECS))
def test_frames_and_audio_come_from_the_same_moment(tmp_path, ext):
    clips = read_video_clips(str(write_video(tmp_path / f"v.{ext}")), options=SMALL, source=f"v.{ext}")
    onset_tolerance_s, position_tolerance_px = TOLERANCE[ext]
    scale = 32 / HEIGHT

    for clip in clips:
        for i, jpeg in enumerate(clip.frames):
            # The source frame on screen at this frame's time, and where its square is.
            shown = np.floor((clip.start_s + i / clip.fps) * SOURCE_FPS + 1e-6) / SOURCE_FPS
            expected = (SQUARE_SPEED * shown + SQUARE / 2 - 0.5) * scale
            assert square_x(jpeg) == pytest.approx(expected, abs=position_tolerance_px)

        wave = decode_pcm(clip.audio)
        loud = np.flatnonzero(np.abs(wave) > 0.2)
        if clip.start_s + 0.5 <= TONE_ON_S - onset_tolerance_s:
            assert loud.size == 0, f"tone heard in the clip at {clip.start_s:.2f} s, before it starts"
        elif clip.start_s >= TONE_ON_S:
            assert np.sqrt(np.mean(wave**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)  # the stereo tone's mean
        else:  # the clip where the tone starts hears it start at the right sample
            assert clip.start_s + loud[0] / 16000 == pytest.approx(TONE_ON_S, abs=onset_tolerance_s)
    assert any(c.start_s < TONE_ON_S < c.start_s + 0.5 for c in clips)


def test_a_video_without_audio_is_kept_only_when_allowed(tmp_path):
    path = str(write_video(tmp_path / "silent.mp4", audio=False))
    with pytest.raises(NoAudioStreamError, match=re.escape("silent.mp4: has no audio stream")):
        read_video_clips(path, options=SMALL, source="silent.mp4")

    options = ClipOptions(clip_seconds=0.5, fps=10, short_side=32, clips_per_video=5, allow_silent=True)
    clips = read_video_clips(path, options=options, source="silent.mp4")
    assert len(clips) == 5
    assert all(len(c.frames) == 5 and c.audio == b"" and c.sample_rate == 0 for c in clips)


def test_corrupt_truncated_and_too_short_files_raise_errors_naming_them(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.raises(UndecodableMediaError, match=re.escape("garbage.mp4: not a readable media file")):
        read_video_clips(str(garbage), options=SMALL, source="garbage.mp4")

    whole = write_video(tmp_path / "whole.mp4").read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UndecodableMediaError, match=re.escape("truncated.mp4")):
        read_video_clips(str(truncated), options=SMALL, source="truncated.mp4")

    # A truncated file whose container still opens gives the clips it still holds, whole.
    mkv = write_video(tmp_path / "cut.mkv").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(mkv[: len(mkv) // 2])
    cut = read_video_clips(str(tmp_path / "cut.mkv"), options=SMALL, source="cut.mkv")
    assert 1 <= len(cut) < 5 and all(len(c.frames) == 5 and len(c.audio) == 2 * 8000 for c in cut)
    (tmp_path / "cut.mkv").write_bytes(mkv[: len(mkv) // 20])
    with pytest.raises(UndecodableMediaError, match=r"cut.mkv: video decodes to 0\.\d+ s and audio to"):
        read_video_clips(str(tmp_path / "cut.mkv"), options=SMALL, source="cut.mkv")

    short = str(write_video(tmp_path / "short.mkv", seconds=0.4))
    with pytest.raises(MediaError, match=r"short.mkv: has 0\.4\d s of video and audio together, shorter than one clip"):
        read_video_clips(str(short), options=SMALL, source="short.mkv")


def _video_tree(root: Path) -> Path:
    src = root / "src"
    (src / "talking").mkdir(parents=True)
    (src / "quiet").mkdir()
    write_video(src / "talking" / "b.mkv")
    write_video(src / "talking" / "a.mp4")
    write_video(src / "quiet" / "silent.mp4", audio=False)
    whole = write_video(root / "whole.mp4").read_bytes()
    (src / "quiet" / "broken.mp4").write_bytes(whole[: len(whole) // 2])
    (src / "quiet" / "notes.txt").write_text("not media")
    return src


def test_prepare_writes_the_good_files_to_s3_in_order_and_reports_the_skipped(ray_session, s3_bucket, tmp_path):
    src = _video_tree(tmp_path)
    out = storage.join(s3_bucket, "sets", "videos")
    progress = []
    summary = prepare(
        str(src),
        out,
        clip_seconds=0.5,
        fps=10,
        short_side=32,
        clips_per_video=2,
        progress=lambda done, total: progress.append((done, total)),
    )

    assert (summary.num_clips, summary.files_ok, summary.files_skipped) == (4, 2, 2)
    assert progress[-1] == (4, 4)
    reasons = {s["file"]: s["reason"] for s in summary.skipped}
    assert set(reasons) == {"quiet/broken.mp4", "quiet/silent.mp4"}
    assert "not a readable media file" in reasons["quiet/broken.mp4"]
    assert "no audio stream" in reasons["quiet/silent.mp4"]
    assert json.loads(storage.read_bytes(storage.join(out, SKIPPED_NAME)))["skipped"] == summary.skipped

    manifest = read_manifest(out)
    assert manifest.num_clips == 4 and manifest.has_video and manifest.has_audio
    assert manifest.label_names == ["quiet", "talking"]
    rows = shard_rows(out)
    assert [r["clip_id"] for r in rows] == [
        "talking/a.mp4#000",
        "talking/a.mp4#001",
        "talking/b.mkv#000",
        "talking/b.mkv#001",
    ]
    assert all(r["label"] == 1 and len(r["frames"]) == 5 and len(r["audio"]) == 2 * 8000 for r in rows)


def test_prepare_keeps_silent_videos_when_allowed_and_records_ucf101_splits(ray_session, tmp_path):
    src = tmp_path / "UCF-101"
    (src / "ApplyEyeMakeup").mkdir(parents=True)
    (src / "Archery").mkdir()
    write_video(src / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c01.avi")
    write_video(src / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g01_c01.avi", audio=False)
    write_video(src / "Archery" / "v_Archery_g01_c01.avi", seconds=1.2)
    splits = tmp_path / "ucfTrainTestlist"
    splits.mkdir()
    (splits / "trainlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n")
    (splits / "testlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\nArchery/v_Archery_g01_c01.avi\r\n"
    )
    out = str(tmp_path / "ucf")
    summary = prepare(
        str(src),
        out,
        clip_seconds=1.0,
        fps=4,
        short_side=16,
        clips_per_video=2,
        allow_silent=True,
        splits_dir=str(splits),
    )

    assert summary.files_skipped == 0
    by_source = {}
    for row in shard_rows(out):
        by_source.setdefault(row["source"], []).append(row)
    assert {s: len(r) for s, r in by_source.items()} == {
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi": 2,
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi": 2,
        "Archery/v_Archery_g01_c01.avi": 1,  # 1.2 s holds one 1 s clip
    }
    silent = by_source["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"]
    assert all(r["audio"] == b"" and r["split"] == "test" and len(r["frames"]) == 4 for r in silent)
    assert all(r["split"] == "train" for r in by_source["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"])
    assert by_source["Archery/v_Archery_g01_c01.avi"][0]["label"] == 1
    assert read_manifest(out).splits == {"train": 2, "test": 3}


def test_cli_prepares_an_esc50_folder_and_an_hmdb51_folder(ray_session, tmp_path, capsys):
    esc = tmp_path / "ESC-50"
    (esc / "audio").mkdir(parents=True)
    (esc / "meta").mkdir()
    write_wav(esc / "audio" / "1-100038-A-14.wav", seconds=2.5)
    write_wav(esc / "audio" / "2-100648-A-43.wav", seconds=0.7, freq=880)
    write_wav(esc / "audio" / "3-unlisted-A-0.wav", seconds=1.0)
    (esc / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n"
        "1-100038-A-14.wav,1,14,chirping_birds,False,100038,A\n"
        "2-100648-A-43.wav,2,43,chainsaw,False,100648,A\n"
        "5-gone-A-1.wav,5,1,rooster,False,1,A\n"
    )
    out = str(tmp_path / "esc")
    code = main(
        ["data", "prepare", str(esc), out, "--labels", str(esc / "meta" / "esc50.csv"), "--clips-per-video", "3"]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "prepared 3 clips from 2 files" in printed
    assert "skipped audio/3-unlisted-A-0.wav: not listed in esc50.csv" in printed
    assert "skipped 5-gone-A-1.wav: listed in esc50.csv but not found" in printed
    manifest = read_manifest(out)
    assert manifest.label_names == ["chainsaw", "chirping_birds"]
    assert not manifest.has_video and manifest.has_audio
    rows = shard_rows(out)
    assert [(r["source"], r["label"], r["split"]) for r in rows] == [
        ("audio/1-100038-A-14.wav", 1, "fold1"),
        ("audio/1-100038-A-14.wav", 1, "fold1"),  # 2.5 s holds two 1 s clips
        ("audio/2-100648-A-43.wav", 0, "fold2"),  # 0.7 s, padded to one
    ]
    assert all(r["frames"] == [] and (r["height"], r["width"], r["fps"]) == (0, 0, 0) for r in rows)
    assert all(len(r["audio"]) == 2 * 16000 for r in rows)

    hmdb = tmp_path / "hmdb51"
    (hmdb / "brush_hair").mkdir(parents=True)
    for name in ("April_09_brush_hair_u_nm_np1_ba_goo_0.avi", "Brushing_Hair_brush_hair_h_cm_np2_le_goo_0.avi"):
        write_video(hmdb / "brush_hair" / name, seconds=1.2)
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    (splits / "brush_hair_test_split1.txt").write_text(
        "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \nBrushing_Hair_brush_hair_h_cm_np2_le_goo_0.avi 2 \n"
    )
    (splits / "brush_hair_test_split2.txt").write_text(
        "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 2 \nBrushing_Hair_brush_hair_h_cm_np2_le_goo_0.avi 0 \n"
    )
    out = str(tmp_path / "hmdb")
    args = ["data", "prepare", str(hmdb), out, "--splits", str(splits), "--split-index", "2", "--fps", "4"]
    assert main([*args, "--short-side", "16"]) == 0
    assert [(r["source"].split("/")[1][:5], r["split"]) for r in shard_rows(out)] == [
        ("April", "test"),
        ("Brush", "unused"),
    ]


def test_cli_fails_with_one_line_when_every_file_is_skipped(ray_session, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad.webm").write_bytes(b"\x1a\x45\xdf\xa3 broken")
    code = main(["data", "prepare", str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "no clips prepared" in err and "skipped.json" in err
    assert len(err.strip().splitlines()) == 1


def test_big_buck_bunny_becomes_clips_with_sound_and_the_requested_frames(ray_session, shared_data, tmp_path):
    src = tmp_path / "real-av"
    src.mkdir()
    shutil.copy(shared_data / "real-av" / "bigbuckbunny.mp4", src)
    out = str(tmp_path / "bunny")
    summary = prepare(str(src), out, clip_seconds=1.0, fps=8, short_side=64, clips_per_video=4)

    assert (summary.num_clips, summary.files_ok, summary.files_skipped) == (4, 1, 0)
    rows = shard_rows(out)
    for row in rows:
        assert len(row["frames"]) == 8 and row["fps"] == 8
        assert (row["width"], row["height"]) == (114, 64)  # 1280x720 to a short side of 64
        wave = decode_pcm(row["audio"])
        assert row["sample_rate"] == 16000 and wave.size == 16000  # 6-channel 48 kHz AAC -> mono 16 kHz
        assert np.sqrt(np.mean(wave**2)) > 1e-3, f"clip {row['clip_id']} is silent"
    assert [r["start_s"] for r in rows] == pytest.approx([0.16, 1.48, 2.80, 4.12], abs=0.01)


def test_a_stale_current_cluster_file_is_ignored_without_an_address(tmp_path):
    """A Ray head stopped with Ctrl-C leaves `<ray temp>/ray_current_cluster` behind; a
    command without `--address` or RAY_ADDRESS starts its own local Ray instead of failing
    on the dead cluster (a separate process: the file is read by `ray.init`)."""
    import os
    import subprocess
    import sys
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Unix socket paths are limited
    try:
        Path(ray_tmp, "ray").mkdir()
        Path(ray_tmp, "ray", "ray_current_cluster").write_text("127.0.0.1:9\n")  # nobody listens
        src = tmp_path / "src"
        src.mkdir()
        write_video(src / "a.mp4", seconds=1.0)
        env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(Path(__file__).parents[2])}
        env.pop("RAY_ADDRESS", None)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "cli",
                "data",
                "prepare",
                str(src),
                str(tmp_path / "out"),
                "--clips-per-video",
                "1",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "num_cpus" not in result.stderr
        assert read_manifest(str(tmp_path / "out")).num_clips == 1
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
