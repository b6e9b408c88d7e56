"""Labelled audio (wav, flac, ogg, mp3) -> audio-only clips, and the labels of media files.

Labels come from class sub-folders (`SRC/<class>/<file>`, files directly in SRC are
unlabelled) or from a CSV `filename,label[,fold]` as in ESC-50 (`meta/esc50.csv` works
as it is: its `category` column is the label and `fold` becomes the split `fold1`...).
The same labelling serves video folders (UCF101 and HMDB51 are class folders too).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

import numpy as np

from workers.data.format import Clip, DataError, encode_pcm
from workers.data.video import (
    ClipOptions,
    MediaError,
    MonoAudio,
    UndecodableMediaError,
    audio_window,
    clip_starts,
    import_av,
    open_media,
)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
FOLDERS = "folders"
# Header names understood in a label CSV, in order of preference (ESC-50 has `category`
# names and `target` numbers for the same classes; names make the better label names).
_FILENAME_COLUMNS = ("filename", "file", "path")
_LABEL_COLUMNS = ("label", "category", "class", "target")
_FOLD_COLUMNS = ("fold", "split")


@dataclass(kw_only=True)
class LabelTable:
    """Labels of the media files found under a folder (paths relative to it, with '/')."""

    label_names: list[str]
    labels: dict[str, int | None]  # file -> label index, None = unlabelled
    splits: dict[str, str | None] = field(default_factory=dict)  # file -> split from the CSV
    unlisted: list[str] = field(default_factory=list)  # files the CSV does not name
    missing: list[str] = field(default_factory=list)  # CSV names with no file


def decode_audio(path: str, *, rate: int) -> tuple[np.ndarray, float]:
    """The first audio stream of a file as one mono float32 waveform at `rate` Hz, and the
    time (seconds) of its first sample."""
    av = import_av()
    with open_media(path) as container:
        if not container.streams.audio:
            raise MediaError(path, "has no audio stream")
        stream = container.streams.audio[0]
        mono = MonoAudio(rate=rate)
        try:
            for frame in container.decode(stream):
                mono.feed(frame)
        except av.error.FFmpegError as err:
            raise UndecodableMediaError(path, f"decoding failed ({type(err).__name__}: {err})") from None
        wave = mono.finish()
    if wave.size == 0:
        raise UndecodableMediaError(path, "no audio sample could be decoded")
    return wave, mono.start_time or 0.0


def read_audio_clips(
    path: str,
    *,
    options: ClipOptions,
    source: str,
    label: int | None = None,
    split: str | None = None,
) -> list[Clip]:
    """Audio-only clips of one file: up to `options.clips_per_video` non-overlapping windows
    of `options.clip_seconds`, evenly spaced; a file shorter than one clip becomes one clip
    padded with silence at the end (short recordings such as spoken words are whole events)."""
    wave, start = decode_audio(path, rate=options.sample_rate)
    end = start + wave.size / options.sample_rate
    starts = clip_starts(start, end, clip_seconds=options.clip_seconds, max_clips=options.clips_per_video) or [start]
    clips = []
    for k, clip_start in enumerate(starts):
        window, _ = audio_window(
            wave, wave_start_s=start, rate=options.sample_rate, start_s=clip_start, num_samples=options.num_samples
        )
        clips.append(
            Clip(
                clip_id=f"{source}#{k:03d}",
                source=source,
                start_s=clip_start - start,
                fps=0.0,
                frames=[],
                height=0,
                width=0,
                audio=encode_pcm(window),
                sample_rate=options.sample_rate,
                label=label,
                split=split,
            )
        )
    return clips


def folder_labels(files: list[str]) -> LabelTable:
    """Class = the first folder of each relative path; files directly in the root are unlabelled."""
    classes = sorted({f.split("/", 1)[0] for f in files if "/" in f})
    index = {name: i for i, name in enumerate(classes)}
    labels = {f: index[f.split("/", 1)[0]] if "/" in f else None for f in files}
    return LabelTable(label_names=classes, labels=labels)


def _column(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def _fold_split(value: str) -> str | None:
    value = value.strip()
    if not value:
        return None
    return f"fold{int(value)}" if value.isdigit() else value


def _sorted_names(names: set[str]) -> list[str]:
    """Label names sorted numerically when they are all integers ("2" before "10")."""
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def csv_labels(csv_path: str, files: list[str]) -> LabelTable:
    """Labels (and folds as splits) of `files` from a CSV `filename,label[,fold]`.

    A header row is optional; with one, the columns are found by name (`filename`, then
    `label` or `category` or `class` or `target`, then `fold` or `split`). A CSV name
    matches a file by its relative path or, when that is unique, by its base name.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as err:
        raise DataError(f"{csv_path}: cannot read the label CSV ({err.strerror or err})") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{csv_path}: the label CSV is empty")
    name_col, label_col, fold_col, first = 0, 1, 2, 0
    if _column(rows[0], _FILENAME_COLUMNS) is not None:
        header, first = rows[0], 1
        name_col = _column(header, _FILENAME_COLUMNS)
        label_col = _column(header, _LABEL_COLUMNS)
        fold_col = _column(header, _FOLD_COLUMNS)
        if label_col is None:
            raise DataError(f"{csv_path}: the header names no label column (one of {', '.join(_LABEL_COLUMNS)})")

    by_path = {f.lower(): f for f in files}
    by_name: dict[str, list[str]] = {}
    for f in files:
        by_name.setdefault(os.path.basename(f).lower(), []).append(f)

    entries: dict[str, tuple[str, str | None]] = {}
    missing = []
    for line, row in enumerate(rows[first:], start=first + 1):
        if len(row) <= max(name_col, label_col):
            raise DataError(f"{csv_path}:{line}: expected filename,label[,fold], got {','.join(row)!r}")
        name = row[name_col].strip().replace("\\", "/")
        label = row[label_col].strip()
        fold = _fold_split(row[fold_col]) if fold_col is not None and fold_col < len(row) else None
        match = by_path.get(name.lower())
        if match is None:
            candidates = by_name.get(os.path.basename(name).lower(), [])
            if len(candidates) > 1:
                raise DataError(f"{csv_path}:{line}: {name!r} matches several files: {', '.join(candidates)}")
            match = candidates[0] if candidates else None
        if match is None:
            missing.append(name)
            continue
        if match in entries and entries[match] != (label, fold):
            raise DataError(f"{csv_path}:{line}: {name!r} is listed twice with different labels")
        entries[match] = (label, fold)

    names = _sorted_names({label for label, _ in entries.values()})
    index = {n: i for i, n in enumerate(names)}
    return LabelTable(
        label_names=names,
        labels={f: index[label] for f, (label, _) in entries.items()},
        splits={f: fold for f, (_, fold) in entries.items()},
        unlisted=[f for f in files if f not in entries],
        missing=missing,
    )


def label_files(files: list[str], *, labels: str) -> LabelTable:
    """Labels of `files` (relative paths) from class folders (`labels="folders"`) or a CSV path."""
    if labels == FOLDERS:
        return folder_labels(files)
    return csv_labels(labels, files)
