"""Decode one clip-shard row into arrays: JPEG frames to uint8 RGB, PCM s16le to float32.

The reader calls `decode_row` from its decode threads.
Anything wrong with a row raises `CorruptClipError` naming the clip, which the reader counts
and skips; shard-level problems are `DataError`s raised elsewhere and stop the reader.
"""

from __future__ import annotations

import itertools
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
    [-1, 1]; either is None when the caller did not ask for that modality. With the decode on
    the device (`decode_row(..., on_device=True)`) `frames` is None and the clip carries its
    window's JPEGs instead: `jpegs` (checked on the host, not decoded), `frame_numbers` (T
    entries into `jpegs`: a short clip repeats its last frame) and `frame_size` (H, W)."""

    clip_id: str
    label: int  # -1 when the row has none
    frames: np.ndarray | None
    audio: np.ndarray | None
    jpegs: list[bytes] | None = None
    frame_numbers: np.ndarray | None = None
    frame_size: tuple[int, int] = (0, 0)


def check_frames(jpegs: Sequence[bytes], *, clip_id: str = "?") -> tuple[int, int]:
    """(height, width) shared by the frames of one clip, read from their headers on the host
    before any decoder runs: a frame that is empty, not a JPEG, cut short (no end-of-image
    marker), of another size than frame 0, or that claims more than MAX_FRAME_PIXELS raises
    `CorruptClipError`. Both decode paths call it, so they refuse the same rows the same way,
    and a decoder (libjpeg-turbo's or nvJPEG's) is never handed a picture it would allocate
    gigabytes for or a batch whose frames differ in size."""
    if not jpegs:
        raise CorruptClipError(f"clip {clip_id}: no frames")
    first: tuple[int, int] | None = None
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
        # A file cut short ends without EOI (FF D9); inside the compressed data every FF byte
        # is followed by 00 or a restart marker, so FF D9 only ever marks the end.
        if data.rfind(b"\xff\xd9") < 0:
            raise CorruptClipError(f"clip {clip_id}: frame {i} is not a decodable JPEG (cut short: no end marker)")
        if first is None:
            first = (height, width)
        elif (height, width) != first:
            raise CorruptClipError(f"clip {clip_id}: frame {i} is {(height, width)}, frame 0 is {first}")
    assert first is not None
    return first


def decode_frames(jpegs: Sequence[bytes], *, clip_id: str = "?") -> np.ndarray:
    """T x H x W x 3 uint8 RGB frames from one JPEG per frame; all frames must share a size.

    torchvision's libjpeg-turbo decoder takes the whole list in one call: 2.3x faster than
    PIL on 64 x 64 frames (measured 0.09 vs 0.21 ms per frame), with identical pixels.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    check_frames(jpegs, clip_id=clip_id)
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
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
    on_device: bool = False,
) -> DecodedClip:
    """Decode one row to `frames` frames and `num_samples` audio samples at `sample_rate` Hz.

    Video longer than `frames` is cut to its centred window and the audio window is centred
    on the same instant, so picture and sound stay aligned; shorter video repeats its last
    frame, shorter audio is padded with silence. Raises `CorruptClipError` for a bad row.
    `on_device`: the window's JPEGs are checked (`check_frames`) but left encoded, for
    `decode_batch` on the training device; the audio is the same either way.
    """
    clip_id = str(row.get("clip_id") or "?")
    encoded: dict[str, Any] = {}
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
        window_jpegs = list(jpegs[start : numbers[-1] + 1])
        if on_device:
            size = check_frames(window_jpegs, clip_id=clip_id)
        else:
            window = decode_frames(window_jpegs, clip_id=clip_id)
            size = window.shape[1:3]
        if tuple(size) != (height, width):
            raise CorruptClipError(f"clip {clip_id}: frames are {tuple(size)}, the row says {(height, width)}")
        if on_device:
            encoded = dict(jpegs=window_jpegs, frame_numbers=numbers - start, frame_size=(height, width))
        else:
            video_out = window[numbers - start]
        if fps > 0:
            centre_s = (start + len(window_jpegs) / 2) / fps
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
    return DecodedClip(
        clip_id=clip_id, label=-1 if label is None else int(label), frames=video_out, audio=audio_out, **encoded
    )


def centre_crop(frames: Any, height: int, width: int) -> Any:
    """The centred `height` x `width` window of axes 1 and 2 (a clip's T x H x W x 3 frames, or
    one decoded C x H x W frame): how a batch of clips of different sizes is made one size."""
    top = (frames.shape[1] - height) // 2
    left = (frames.shape[2] - width) // 2
    return frames[:, top : top + height, left : left + width]


# --- the decode on the training device ---------------------------------------------------------


def decode_on_device(setting: str, device: Any) -> bool:
    """Whether `data.decode = setting` decodes a worker's JPEG frames on `device` (True) or
    on its reader's CPU threads (False). `auto`: on CUDA when torchvision can decode there,
    the CPU elsewhere. `device`: on a CPU device the batched decode runs on the CPU through
    the same code; on CUDA it needs torchvision built with nvJPEG. Raises `ConfigError`
    naming `data.decode` where no decoder can run or for an unknown setting."""
    import torch

    from service.config import ConfigError

    device = torch.device(device)
    if setting == "cpu":
        return False
    if setting not in ("auto", "device"):
        raise ConfigError("data.decode", f"{setting!r} is not one of auto, cpu, device")
    if device.type == "cpu":
        return setting == "device"
    problem = device_decoder_problem(device)
    if setting == "auto":
        return problem == ""
    if problem:
        raise ConfigError("data.decode", f"'device', but no JPEG decoder runs on {device} here ({problem}); use cpu")
    return True


_DECODER_PROBLEMS: dict[str, str] = {}


def device_decoder_problem(device: Any) -> str:
    """Why torchvision cannot decode JPEG on `device` ("" when it can): one small picture is
    encoded on the CPU and decoded there, once per device and process."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"torchvision decodes JPEG on cpu and cuda only, not {device.type}"
    key = str(device)
    if key not in _DECODER_PROBLEMS:
        try:
            probe = encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
            decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)
            _DECODER_PROBLEMS[key] = ""
        except (RuntimeError, ValueError) as err:
            _DECODER_PROBLEMS[key] = str(err).splitlines()[0][:200] or type(err).__name__
    return _DECODER_PROBLEMS[key]


def decode_batch(encoded: dict[str, Any], *, device: Any, clip_ids: Sequence[str]) -> Any:
    """uint8 [B, T, H, W, 3] on `device` from a reader batch's encoded frames (`collate` of
    `workers.data.pipeline` with the decode on the device), all B x T' stored frames in one
    batched `torchvision.io.decode_jpeg` call (nvJPEG on CUDA, libjpeg-turbo on the CPU).

    `encoded`: `data` (uint8 [bytes], every frame's JPEG back to back, pinned on CUDA),
    `offsets` (int64 [N + 1]), `first_frame` (int64 [B + 1]: clip b owns frames first_frame[b]
    to first_frame[b + 1]), `frame_index` (int64 [B, T] into the N frames), `size` (int64
    [B, 2]: each clip's H, W from its headers) and `rows` (each clip's shard file and row, for
    errors). Clips of different sizes are centre-cropped to the smallest, as the CPU path's
    batches are. The headers were checked on the host (`check_frames`); a frame that still
    does not decode raises `CorruptClipError` naming its shard, row and clip.

    On CUDA, call it on a stream of its own after a host wait for that stream (see
    `workers.data.prefetch`): nvJPEG's batched hardware decoder writes its output when it is
    called, whatever is still queued on the stream it is given.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = encoded["data"]
    offsets = encoded["offsets"].tolist()
    frames = [data[start:end] for start, end in itertools.pairwise(offsets)]
    device = torch.device(device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    if stream is not None:
        # nvJPEG's batched hardware decoder writes its output when it is called, not when the
        # work queued before it on the stream has run (torchcodec PR #1634, torchvision PR
        # #9606; a device-side wait does not order it either). Memory the caching allocator
        # hands the decoder may have been freed by kernels still queued on this stream (the
        # previous batch's transforms), so the host waits for this stream first. The decode
        # runs on the prefetch's side stream, so this waits for that stream only, never for
        # the training step.
        stream.synchronize()
    try:
        decoded = decode_jpeg(frames, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:
        raise _batch_error(encoded, frames, clip_ids, device, str(err)) from None
    if stream is not None:
        # The outputs may come from the decoder's own stream's memory pool: marked as used by
        # ours, they are not handed to the next decode while our kernels still read them.
        for frame in decoded:
            frame.record_stream(stream)
    first_frame = encoded["first_frame"].tolist()
    sizes = encoded["size"].tolist()
    clip_of = np.repeat(np.arange(len(sizes)), np.diff(first_frame))
    for i, frame in enumerate(decoded):
        b = int(clip_of[i])
        if list(frame.shape[1:]) != sizes[b]:
            raise CorruptClipError(
                f"clip {clip_ids[b]} ({_row(encoded, b)}): frame {i - first_frame[b]} decoded to "
                f"{tuple(frame.shape[1:])} on {device}, its header says {tuple(sizes[b])}"
            )
    height = min(size[0] for size in sizes)
    width = min(size[1] for size in sizes)
    crops = [centre_crop(frame, height, width) for frame in decoded]  # C x H x W: axes 1 and 2, as T x H x W x 3
    frame_index = encoded["frame_index"]
    batch, num_frames = frame_index.shape
    order = frame_index.reshape(-1).tolist()
    if device.type == "cpu":
        # numpy for the copy, as in `decode_frames`: torch's goes through the intra-op thread
        # pool, which spins against the reader's threads on a busy CPU.
        stacked = np.stack([crops[i].numpy() for i in order]).reshape(batch, num_frames, 3, height, width)
        return torch.from_numpy(np.ascontiguousarray(stacked.transpose(0, 1, 3, 4, 2)))
    video = torch.stack([crops[i] for i in order])  # B*T x 3 x H x W
    return video.view(batch, num_frames, 3, height, width).permute(0, 1, 3, 4, 2)  # B x T x H x W x 3


def _row(encoded: dict[str, Any], b: int) -> str:
    shard, row = encoded["rows"][b]
    return f"{shard} row {row}"


def _batch_error(
    encoded: dict[str, Any], frames: list[Any], clip_ids: Sequence[str], device: Any, why: str
) -> CorruptClipError:
    """The error naming the first frame of a batch that does not decode on its own."""
    from torchvision.io import ImageReadMode, decode_jpeg

    first_frame = encoded["first_frame"].tolist()
    for i, frame in enumerate(frames):
        try:
            decode_jpeg([frame], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as err:
            b = int(np.searchsorted(first_frame, i, side="right") - 1)
            return CorruptClipError(
                f"clip {clip_ids[b]} ({_row(encoded, b)}): frame {i - first_frame[b]} is not a decodable JPEG on "
                f"{device} ({str(err).splitlines()[0]}); data.exclude_clips={clip_ids[b]} trains on without it"
            )
    return CorruptClipError(f"a batch of clips {', '.join(clip_ids[:3])}... does not decode on {device}: {why}")
