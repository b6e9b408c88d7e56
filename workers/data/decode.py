"""Decode one clip-shard row into arrays: JPEG frames to uint8 RGB, PCM s16le to float32.

The reader calls `decode_row` from its decode threads.
Anything wrong with a row raises `CorruptClipError` naming the clip, which the reader counts
and skips; shard-level problems are `DataError`s raised elsewhere and stop the reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.data.format import DataError, decode_pcm


class CorruptClipError(DataError):
    """One row cannot be decoded (bad JPEG, odd PCM length, inconsistent sizes)."""


# What one row may ask of a decode thread before anything is decoded. A JPEG header is a few
# bytes that say how large the picture is, and the decoder allocates that much: a 1 kB file
# claiming 60000 x 60000 pixels asks for 10.8 GB. The caps are far above any training frame
# (the paper stores 128 x 171) and far below what a worker can hold.
MAX_FRAME_PIXELS = 4096 * 4096
MAX_SAMPLE_RATE = 384_000  # Hz; resampling cost grows with the rate

# JPEG start-of-frame markers (they carry the size): C0-CF except DHT (C4), JPG (C8), DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xDA)})


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) a JPEG's header claims, read from its start-of-frame segment without
    decoding anything. ValueError when the bytes are not a JPEG or the header is cut short."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no start-of-image marker)")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS:
            if pos + 9 > len(data):
                break
            return int.from_bytes(data[pos + 5 : pos + 7], "big"), int.from_bytes(data[pos + 7 : pos + 9], "big")
        if marker == 0xDA or length < 2:  # image data before any frame header, or a broken length
            raise ValueError("no frame header before the image data")
        pos += 2 + length
    raise ValueError("the header ends before its frame size")


@dataclass(kw_only=True)
class DecodedClip:
    """One row ready for batching. `frames` is T x H x W x 3 uint8 RGB, `audio` float32 in
    [-1, 1]; either is None when the caller did not ask for that modality."""

    clip_id: str
    label: int  # -1 when the row has none
    frames: np.ndarray | None
    audio: np.ndarray | None


def decode_frames(jpegs: Sequence[bytes], *, clip_id: str = "?") -> np.ndarray:
    """T x H x W x 3 uint8 RGB frames from one JPEG per frame; all frames must share a size.

    torchvision's libjpeg-turbo decoder takes the whole list in one call: 2.3x faster than
    PIL on 64 x 64 frames (measured 0.09 vs 0.21 ms per frame), with identical pixels.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not jpegs:
        raise CorruptClipError(f"clip {clip_id}: no frames")
    tensors = []
    for i, data in enumerate(jpegs):
        if not data:
            raise CorruptClipError(f"clip {clip_id}: frame {i} is empty")
        try:
            height, width = jpeg_size(data)
        except ValueError as err:
            raise CorruptClipError(f"clip {clip_id}: frame {i} is not a decodable JPEG ({err})") from None
        if height * width > MAX_FRAME_PIXELS or height == 0 or width == 0:
            raise CorruptClipError(
                f"clip {clip_id}: frame {i} claims {height} x {width} pixels; frames of 1 to "
                f"{MAX_FRAME_PIXELS} pixels are decoded (MAX_FRAME_PIXELS)"
            )
        tensors.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB)
    except RuntimeError:
        raise CorruptClipError(f"clip {clip_id}: frame {_first_bad_frame(tensors)} is not a decodable JPEG") from None
    for i, frame in enumerate(decoded):
        if frame.shape != decoded[0].shape:
            raise CorruptClipError(
                f"clip {clip_id}: frame {i} is {tuple(frame.shape[1:])}, frame 0 is {tuple(decoded[0].shape[1:])}"
            )
    # numpy, not torch, for the copy into T x H x W x 3: torch's copy goes through its
    # intra-op thread pool, which the training step shares; on a busy 2-core machine it took
    # 8 ms per 8 x 64 x 64 clip against 0.27 ms for numpy.
    return np.ascontiguousarray(np.stack([frame.numpy() for frame in decoded]).transpose(0, 2, 3, 1))


def _first_bad_frame(tensors: list) -> int:
    """The number of the first frame that does not decode on its own (for the error message)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    for i, data in enumerate(tensors):
        try:
            decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError:
            return i
    return -1


def decode_audio(pcm: bytes, *, clip_id: str = "?") -> np.ndarray:
    """float32 mono waveform in [-1, 1] from PCM s16le bytes."""
    if not pcm:
        raise CorruptClipError(f"clip {clip_id}: no audio")
    if len(pcm) % 2:
        raise CorruptClipError(f"clip {clip_id}: audio has an odd number of bytes ({len(pcm)}), not PCM s16le")
    return decode_pcm(pcm)


def frame_window(num_stored: int, frames: int) -> tuple[int, np.ndarray]:
    """The centred window of `frames` frame numbers out of `num_stored`: (start, numbers).

    A clip with fewer frames repeats its last one, so the result always has `frames` entries.
    """
    start = max((num_stored - frames) // 2, 0)
    return start, np.minimum(np.arange(start, start + frames), num_stored - 1)


def fit_audio(wave: np.ndarray, num_samples: int, *, centre: int) -> np.ndarray:
    """Exactly `num_samples` samples of `wave`, a window centred on sample `centre` (moved to
    fit inside the wave); a shorter wave is padded with silence at the end."""
    if len(wave) <= num_samples:
        return np.pad(wave, (0, num_samples - len(wave)))
    start = min(max(centre - num_samples // 2, 0), len(wave) - num_samples)
    return wave[start : start + num_samples]


def resample(wave: np.ndarray, orig_hz: int, new_hz: int) -> np.ndarray:
    """`wave` resampled from `orig_hz` to `new_hz` (band-limited sinc interpolation)."""
    import torch
    import torchaudio.functional

    return torchaudio.functional.resample(torch.from_numpy(wave), orig_hz, new_hz).numpy()


def decode_row(
    row: dict[str, Any],
    *,
    frames: int,
    num_samples: int,
    sample_rate: int,
    video: bool,
    audio: bool,
) -> DecodedClip:
    """Decode one row to `frames` frames and `num_samples` audio samples at `sample_rate` Hz.

    Video longer than `frames` is cut to its centred window and the audio window is centred
    on the same instant, so picture and sound stay aligned; shorter video repeats its last
    frame, shorter audio is padded with silence. Raises `CorruptClipError` for a bad row.
    """
    clip_id = str(row.get("clip_id") or "?")
    try:
        fps = float(row["fps"])
        rate = int(row["sample_rate"])
        height, width = int(row["height"]), int(row["width"])
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptClipError(f"clip {clip_id}: unreadable row fields ({type(err).__name__}: {err})") from None
    video_out = None
    centre_s = None
    if video:
        jpegs = row["frames"]
        start, numbers = frame_window(len(jpegs), frames)
        # Only the frames of the window are decoded.
        window = decode_frames(jpegs[start : numbers[-1] + 1], clip_id=clip_id)
        if window.shape[1:3] != (height, width):
            raise CorruptClipError(f"clip {clip_id}: frames are {window.shape[1:3]}, the row says {(height, width)}")
        video_out = window[numbers - start]
        if fps > 0:
            centre_s = (start + len(window) / 2) / fps
    audio_out = None
    if audio:
        if not 0 < rate <= MAX_SAMPLE_RATE:
            raise CorruptClipError(f"clip {clip_id}: sample_rate is {rate}; 1 to {MAX_SAMPLE_RATE} Hz are read")
        wave = decode_audio(row["audio"], clip_id=clip_id)
        if rate != sample_rate:
            wave = resample(wave, rate, sample_rate)
        centre = round(centre_s * sample_rate) if centre_s is not None else len(wave) // 2
        audio_out = np.ascontiguousarray(fit_audio(wave, num_samples, centre=centre), dtype=np.float32)
    label = row.get("label")
    return DecodedClip(clip_id=clip_id, label=-1 if label is None else int(label), frames=video_out, audio=audio_out)
