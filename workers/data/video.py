"""Real video files (mp4, avi, mkv, webm, mov) -> aligned audio-visual clips, with PyAV.

One pass decodes the file from its start to the end of its last clip:

* frames are resampled to the target fps by sample-and-hold (frame `i` of a clip shows
  whatever the source displayed at `start + i / fps`) and resized to a short side;
* audio is downmixed to mono and resampled to 16 kHz by libswresample (`AudioResampler`);
* both are cut from the same presentation clock, so a clip's audio window starts at the
  time of its first frame and lasts exactly as long as its frames.

Clips are evenly spaced over the span where the file has both picture and sound, and
never overlap: a file gets `min(clips_per_video, span // clip_seconds)` clips.

PyAV is imported inside functions: the training machines never decode media files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.data.format import Clip, DataError, encode_jpeg, encode_pcm

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
AUDIO_RATE = 16000  # Hz, the sample rate of every prepared clip
# Container headers round durations and codecs shave a few milliseconds off the ends
# (encoder delay, a last frame without a duration): a clip may pad up to this fraction of
# its frames or audio (holding the nearest frame, adding silence) before it is dropped.
MAX_PADDED_FRACTION = 0.1
_TIME_EPS_S = 1e-6  # float rounding of presentation times


class MediaError(DataError):
    """A media file cannot become clips; the message names the file and says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class NoAudioStreamError(MediaError):
    """A video file has no audio stream and silent files were not allowed."""


class UndecodableMediaError(MediaError):
    """A file is corrupt, truncated or not a media file at all."""


@dataclass(kw_only=True, frozen=True)
class ClipOptions:
    """How files are cut into clips (shared by video and audio files)."""

    clip_seconds: float = 1.0  # length of a clip's video and audio window, seconds
    fps: float = 16.0  # frames stored per second of video
    short_side: int = 128  # pixels of the shorter frame side after resizing (aspect kept)
    clips_per_video: int = 4  # at most this many clips per file, evenly spaced
    allow_silent: bool = False  # keep video files without audio as video-only clips
    sample_rate: int = AUDIO_RATE  # Hz of the stored mono audio
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        checks = (
            (self.clip_seconds > 0, "clip_seconds", "must be > 0 seconds"),
            (self.fps > 0, "fps", "must be > 0 frames per second"),
            (self.short_side >= 8, "short_side", "must be >= 8 pixels"),
            (self.clips_per_video >= 1, "clips_per_video", "must be >= 1"),
            (self.sample_rate >= 1000, "sample_rate", "must be >= 1000 Hz"),
            (1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be in 1..100"),
            (self.num_frames >= 1, "fps", "times clip_seconds must give at least one frame"),
        )
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

    @property
    def num_frames(self) -> int:
        """Frames per clip."""
        return round(self.clip_seconds * self.fps)

    @property
    def num_samples(self) -> int:
        """Audio samples per clip."""
        return round(self.clip_seconds * self.sample_rate)


def clip_starts(span_start_s: float, span_end_s: float, *, clip_seconds: float, max_clips: int) -> list[float]:
    """Start times (seconds) of up to `max_clips` non-overlapping clips spread evenly over a span:
    the centres of equal segments of the span. Empty when the span is shorter than a clip."""
    span = span_end_s - span_start_s
    num_clips = min(max_clips, math.floor(span / clip_seconds + _TIME_EPS_S))
    if num_clips <= 0:
        return []
    gap = (span - num_clips * clip_seconds) / num_clips
    return [span_start_s + gap / 2 + k * (clip_seconds + gap) for k in range(num_clips)]


def import_av() -> Any:
    """PyAV, or a clear error on machines without it."""
    try:
        import av
    except ImportError as err:
        raise DataError(f"decoding media files needs PyAV (`pip install av`): {err}") from None
    return av


def open_media(path: str) -> Any:
    """An open PyAV input container; `UndecodableMediaError` when the file is not media."""
    av = import_av()
    try:
        return av.open(path)
    except FileNotFoundError:
        raise MediaError(path, "no such file") from None
    except (av.error.FFmpegError, OSError) as err:
        raise UndecodableMediaError(path, f"not a readable media file ({_describe(err)})") from None


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _stream_span(stream: Any, container: Any) -> tuple[float, float] | None:
    """(start, end) seconds of a stream by its header, else the container's; None if unknown."""
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else None
    if start is None and container.start_time is not None:
        start = container.start_time / 1e6
    start = start or 0.0
    if stream.duration is not None and stream.duration > 0:
        return start, start + float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return start, start + container.duration / 1e6
    return None


def _demuxed_span(path: str, stream_index: int) -> tuple[float, float]:
    """(start, end) seconds of a stream from its packets: for headers that omit durations."""
    with open_media(path) as container:
        stream = container.streams[stream_index]
        first, last = math.inf, -math.inf
        for packet in container.demux(stream):
            when = packet.pts if packet.pts is not None else packet.dts
            if when is None:
                continue
            start = float(when * packet.time_base)
            first = min(first, start)
            last = max(last, start + float((packet.duration or 0) * packet.time_base))
    if first > last:
        raise UndecodableMediaError(path, f"stream #{stream_index} holds no timed packets")
    return first, last


def _output_size(path: str, stream: Any, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter display side = `short_side`, display aspect kept."""
    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        raise UndecodableMediaError(path, "its video stream has no frame size")
    sar = stream.sample_aspect_ratio
    display_width = width * (float(sar) if sar else 1.0)
    if display_width >= height:
        return max(1, round(short_side * display_width / height)), short_side
    return short_side, max(1, round(short_side * height / display_width))


class _FramePicker:
    """Sample-and-hold resampling of a decoded frame sequence onto sorted target times.

    Target `t` gets the last frame shown at or before `t`. Frames are converted (resized
    to RGB) only when picked, once each, so skipped source frames cost only their decode.
    """

    def __init__(self, targets: list[float], *, width: int, height: int):
        self.targets = targets
        self.width = width
        self.height = height
        self.picked: list[np.ndarray | None] = [None] * len(targets)
        self.next_target = 0
        self.first_time = math.inf
        self.end_time = -math.inf  # end of the last decoded frame's display
        self._previous: Any = None
        self._previous_time = 0.0
        self._previous_rgb: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return self.next_target >= len(self.targets)

    def feed(self, frame: Any, time_s: float, duration_s: float) -> None:
        if self._previous is None:
            self.first_time = time_s
        elif time_s > self._previous_time + _TIME_EPS_S:
            # Targets before this frame's time were showing the previous frame.
            self._assign_until(time_s - _TIME_EPS_S)
        else:
            return  # a frame that does not advance time (duplicate timestamp) shows nothing new
        self._previous, self._previous_time, self._previous_rgb = frame, time_s, None
        self.end_time = time_s + duration_s

    def finish(self) -> None:
        """Hold the last frame for the remaining targets up to where its display ends."""
        if self._previous is not None:
            self._assign_until(self.end_time)

    def _assign_until(self, limit_s: float) -> None:
        """Give the targets before `limit_s` the previous frame."""
        while self.next_target < len(self.targets) and self.targets[self.next_target] < limit_s:
            if self._previous_rgb is None:
                self._previous_rgb = self._previous.to_ndarray(
                    format="rgb24", width=self.width, height=self.height, interpolation="AREA"
                )
            self.picked[self.next_target] = self._previous_rgb
            self.next_target += 1


class MonoAudio:
    """Audio frames -> one mono float32 waveform at `rate`, with the time of its first sample."""

    def __init__(self, *, rate: int):
        av = import_av()
        self.rate = rate
        # With 16-bit output libswresample scales its downmix so the channel weights sum to at
        # most 1: stereo becomes (L + R) / 2 and 5.1 cannot clip. Clips store 16-bit PCM anyway.
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        self._chunks: list[np.ndarray] = []
        self.start_time: float | None = None
        self.num_samples = 0

    @property
    def end_time(self) -> float:
        return -math.inf if self.start_time is None else self.start_time + self.num_samples / self.rate

    def feed(self, frame: Any) -> None:
        self._add(self._resampler.resample(frame))

    def finish(self) -> np.ndarray:
        """Flush the resampler's delay line and return the whole waveform."""
        self._add(self._resampler.resample(None))
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._chunks)

    def _add(self, frames: list[Any]) -> None:
        for out in frames:
            if self.start_time is None:
                # The resampler stamps its output with the input's presentation time,
                # already compensated for its own filter delay.
                self.start_time = float(out.time) if out.time is not None else 0.0
            samples = out.to_ndarray().reshape(-1).astype(np.float32) / 32768.0
            self._chunks.append(samples)
            self.num_samples += samples.size


def audio_window(
    wave: np.ndarray, *, wave_start_s: float, rate: int, start_s: float, num_samples: int
) -> tuple[np.ndarray, float]:
    """`num_samples` of `wave` from time `start_s`, zero-padded where the wave has none;
    also the fraction of the window that had to be padded."""
    first = round((start_s - wave_start_s) * rate)
    out = np.zeros(num_samples, dtype=np.float32)
    lo, hi = max(first, 0), min(first + num_samples, wave.size)
    if hi > lo:
        out[lo - first : hi - first] = wave[lo:hi]
    return out, 1.0 - max(hi - lo, 0) / num_samples


def _plan_clips(path: str, container: Any, streams: list[Any], options: ClipOptions) -> tuple[float, list[float]]:
    """The file's first presentation time and the start times of its clips (seconds, on
    the streams' clock), over the span where every stream in `streams` has content."""
    spans = [_stream_span(s, container) or _demuxed_span(path, s.index) for s in streams]
    span_start = max(s[0] for s in spans)
    span_end = min(s[1] for s in spans)
    starts = clip_starts(span_start, span_end, clip_seconds=options.clip_seconds, max_clips=options.clips_per_video)
    if not starts:
        what = "video" if len(streams) == 1 else "video and audio together"
        raise MediaError(
            path,
            f"has {max(span_end - span_start, 0):.2f} s of {what}, shorter than one clip ({options.clip_seconds} s)",
        )
    return min(s[0] for s in spans), starts


def _decode(
    path: str, container: Any, streams: list[Any], picker: _FramePicker, mono: MonoAudio | None, end_s: float
) -> int:
    """Feed the decoded frames of `streams` to the picker and the audio, from the start of
    the file until both have everything up to `end_s`. Returns the video frames decoded."""
    av = import_av()
    video = streams[0]
    source_frame_s = 1.0 / float(video.average_rate or video.guessed_rate or 25)
    frames_seen = 0
    try:
        for packet in container.demux(*streams):
            for frame in packet.decode():
                if isinstance(frame, av.AudioFrame):
                    mono.feed(frame)
                    continue
                # Some AVI files stamp no time on frames: count them at the stream's rate.
                time_s = float(frame.time) if frame.time is not None else frames_seen * source_frame_s
                duration = getattr(frame, "duration", None)  # PyAV < 14 has no frame durations
                duration_s = float(duration * frame.time_base) if duration else source_frame_s
                picker.feed(frame, time_s, duration_s)
                frames_seen += 1
            if picker.done and (mono is None or mono.end_time >= end_s):
                break
    except av.error.FFmpegError as err:
        raise UndecodableMediaError(path, f"decoding failed ({_describe(err)})") from None
    picker.finish()
    if frames_seen == 0:
        raise UndecodableMediaError(path, "no video frame could be decoded")
    return frames_seen


def read_video_clips(
    path: str,
    *,
    options: ClipOptions,
    source: str,
    label: int | None = None,
    split: str | None = None,
) -> list[Clip]:
    """The clips of one video file, in time order.

    `source` names the file in the data set (e.g. its path relative to the prepared
    folder) and prefixes the clip ids; `start_s` counts from the file's first presentation
    time. Raises `NoAudioStreamError` for a file without audio unless
    `options.allow_silent`, `UndecodableMediaError` for a corrupt or truncated file and
    `MediaError` for one too short for a single clip. A clip the file cannot fill (more than
    `MAX_PADDED_FRACTION` of it missing) is left out.
    """
    with open_media(path) as container:
        if not container.streams.video:
            raise MediaError(path, "has no video stream")
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        if audio is None and not options.allow_silent:
            raise NoAudioStreamError(path, "has no audio stream (allow silent files to keep it as video-only clips)")
        streams = [video] if audio is None else [video, audio]
        # Ray runs one file per CPU, so more decoder threads per file would only contend.
        video.codec_context.thread_count = 1
        width, height = _output_size(path, video, options.short_side)
        origin, starts = _plan_clips(path, container, streams, options)
        targets = [s + i / options.fps for s in starts for i in range(options.num_frames)]
        picker = _FramePicker(targets, width=width, height=height)
        mono = MonoAudio(rate=options.sample_rate) if audio is not None else None
        _decode(path, container, streams, picker, mono, starts[-1] + options.clip_seconds)
        wave = mono.finish() if mono is not None else None
    if wave is not None and wave.size == 0:
        raise UndecodableMediaError(path, "no audio sample could be decoded")

    clips = []
    for k, start in enumerate(starts):
        frames = _clip_frames(picker, k, options.num_frames)
        pcm = b""
        if wave is not None:
            window, padded = audio_window(
                wave,
                wave_start_s=mono.start_time,
                rate=options.sample_rate,
                start_s=start,
                num_samples=options.num_samples,
            )
            pcm = encode_pcm(window) if padded <= MAX_PADDED_FRACTION else None
        if frames is None or pcm is None:
            continue
        clips.append(
            Clip(
                clip_id=f"{source}#{k:03d}",
                source=source,
                start_s=start - origin,
                fps=float(options.fps),
                frames=[encode_jpeg(f, quality=options.jpeg_quality) for f in frames],
                height=height,
                width=width,
                audio=pcm,
                sample_rate=options.sample_rate if wave is not None else 0,
                label=label,
                split=split,
            )
        )
    if not clips:
        decoded = f"video decodes to {max(picker.end_time, 0):.2f} s"
        if mono is not None:
            decoded += f" and audio to {max(mono.end_time, 0):.2f} s"
        raise UndecodableMediaError(
            path,
            f"{decoded}, short of every clip its header promises up to {starts[-1] + options.clip_seconds:.2f} s (truncated or corrupt)",
        )
    return clips


def _clip_frames(picker: _FramePicker, k: int, num_frames: int) -> list[np.ndarray] | None:
    """Frames of clip `k`. Targets before the first decoded frame show that frame; targets
    past the last one hold it. None when more than `MAX_PADDED_FRACTION` of the clip's
    frames had to be filled that way."""
    targets = picker.targets[k * num_frames : (k + 1) * num_frames]
    frames = picker.picked[k * num_frames : (k + 1) * num_frames]
    early = sum(1 for t in targets if t < picker.first_time - _TIME_EPS_S)
    late = sum(1 for f in frames if f is None)
    if early + late > MAX_PADDED_FRACTION * num_frames:
        return None
    held, last = [], None
    for f in frames:
        last = f if f is not None else last
        held.append(last)
    return held
