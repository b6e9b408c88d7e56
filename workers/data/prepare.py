"""A folder of real media files -> a clip-shard data set, one Ray task per file.

Video files (mp4, avi, mkv, webm, mov) become audio-visual clips (`workers.data.video`),
audio files (wav, flac, ogg, mp3) audio-only clips (`workers.data.audio_folders`). Files
are labelled by class folder or CSV, optionally given their official UCF101/HMDB51 split,
decoded in parallel, and written in the sorted order of their paths, so the same folder
always gives the same data set. A file that cannot become clips is skipped, never fatal:
`skipped.json` in OUT and the returned summary say which and why.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from service import storage
from workers import ray_init
from workers.data.audio_folders import AUDIO_EXTENSIONS, FOLDERS, label_files, read_audio_clips
from workers.data.format import DEFAULT_TARGET_SHARD_BYTES, Clip, DataError, DatasetWriter
from workers.data.splits import read_splits
from workers.data.video import VIDEO_EXTENSIONS, ClipOptions, MediaError, read_video_clips

SKIPPED_NAME = "skipped.json"
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + AUDIO_EXTENSIONS


@dataclass(kw_only=True)
class FileJob:
    """One media file to prepare."""

    path: str  # absolute local path
    source: str  # path relative to SRC, with '/': the clips' `source` and id prefix
    label: int | None
    split: str | None


@dataclass(kw_only=True)
class FileResult:
    """What one task made of its file: clips, or the reason it was skipped."""

    source: str
    clips: list[Clip] = field(default_factory=list)
    skipped_reason: str | None = None


@dataclass(kw_only=True)
class PrepareSummary:
    """The outcome of `prepare`."""

    out: str
    num_clips: int
    files_ok: int
    skipped: list[dict[str, str]]  # {"file": relative path, "reason": why}
    label_names: list[str]
    splits: dict[str, int]  # clips per split ("" = none)
    seconds: float  # wall time of the whole preparation

    @property
    def files_skipped(self) -> int:
        return len(self.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "files_skipped": self.files_skipped}


def find_media(src: str) -> list[str]:
    """Relative paths ('/'-separated, sorted) of the media files under a local folder;
    hidden files and folders are ignored."""
    if not os.path.isdir(src):
        raise DataError(f"{src}: not a folder")
    found = []
    for root, dirs, names in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith(".") and name.lower().endswith(MEDIA_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), src).replace(os.sep, "/"))
    return sorted(found)


def prepare_file(job: FileJob, options: ClipOptions) -> FileResult:
    """The clips of one file, or why it was skipped (the body of each Ray task)."""
    read = read_audio_clips if job.path.lower().endswith(AUDIO_EXTENSIONS) else read_video_clips
    try:
        clips = read(job.path, options=options, source=job.source, label=job.label, split=job.split)
    except MediaError as err:
        return FileResult(source=job.source, skipped_reason=err.reason)
    except Exception as err:
        # One strange file must not cost the other thousands their preparation; it is
        # reported with the full error instead.
        return FileResult(source=job.source, skipped_reason=f"unexpected {type(err).__name__}: {err}")
    return FileResult(source=job.source, clips=clips)


def _results_in_order(ray: Any, jobs: list[FileJob], options: ClipOptions) -> Iterator[FileResult]:
    """Results of `prepare_file` over `jobs`, in job order, with a bounded number of tasks
    in flight (so finished clips wait in the object store only briefly)."""
    # A decoder that crashes its worker process is retried once, then the file is skipped.
    task = ray.remote(num_cpus=1, max_retries=1)(prepare_file)
    options_ref = ray.put(options)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: deque = deque()
    queued = iter(jobs)
    for job in queued:
        pending.append((job, task.remote(job, options_ref)))
        if len(pending) >= window:
            break
    while pending:
        job, ref = pending.popleft()
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as err:
            result = FileResult(source=job.source, skipped_reason=f"its task failed ({type(err).__name__})")
        next_job = next(queued, None)
        if next_job is not None:
            pending.append((next_job, task.remote(next_job, options_ref)))
        yield result


def _plan(
    src: str, *, labels: str, splits_dir: str | None, split_index: int
) -> tuple[list[FileJob], list[str], list[dict[str, str]]]:
    """Jobs for the labelled files, the label names, and the files skipped before decoding."""
    files = find_media(src)
    if not files:
        raise DataError(f"{src}: no media files ({', '.join(e.lstrip('.') for e in MEDIA_EXTENSIONS)})")
    table = label_files(files, labels=labels)
    split_table = read_splits(splits_dir, split_index=split_index) if splits_dir else None
    csv_name = os.path.basename(labels)
    skipped = [{"file": f, "reason": f"not listed in {csv_name}"} for f in table.unlisted]
    skipped += [{"file": f, "reason": f"listed in {csv_name} but not found under {src}"} for f in table.missing]
    jobs = []
    for f in files:
        if f not in table.labels:
            continue
        split = split_table.split_of(f) if split_table is not None else table.splits.get(f)
        jobs.append(FileJob(path=os.path.join(src, f), source=f, label=table.labels[f], split=split))
    return jobs, table.label_names, skipped


def prepare(
    src: str,
    out: str,
    *,
    labels: str = FOLDERS,
    clip_seconds: float = 1.0,
    fps: float = 16.0,
    short_side: int = 128,
    clips_per_video: int = 4,
    allow_silent: bool = False,
    splits_dir: str | None = None,
    split_index: int = 1,
    target_shard_bytes: int = DEFAULT_TARGET_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> PrepareSummary:
    """Prepare the media files under the local folder `src` into a data set at `out` (any URI).

    `labels` is `"folders"` (class = first sub-folder) or the path of a CSV
    `filename,label[,fold]`; `splits_dir` holds UCF101 or HMDB51 split files (`split_index`
    picks which; they override CSV folds). Clips are `clip_seconds` long: `fps` frames per
    second resized to a short side of `short_side` pixels, and 16 kHz mono audio; at most
    `clips_per_video` per file. Runs on the Ray already initialised, else on a local one
    started (and stopped) here with every CPU. `progress(done, total)` counts files.
    """
    import ray

    started = time.perf_counter()
    options = ClipOptions(
        clip_seconds=clip_seconds,
        fps=fps,
        short_side=short_side,
        clips_per_video=clips_per_video,
        allow_silent=allow_silent,
    )
    jobs, label_names, skipped = _plan(
        os.path.abspath(src), labels=labels, splits_dir=splits_dir, split_index=split_index
    )
    params = {
        "labels": labels if labels == FOLDERS else os.path.basename(labels),
        **{k: v for k, v in asdict(options).items() if k != "jpeg_quality"},
        "splits": None if splits_dir is None else os.path.basename(os.path.normpath(splits_dir)),
        "split_index": split_index,
    }
    writer = DatasetWriter(
        out,
        label_names=label_names,
        made_by={"generator": "prepare", "source": os.path.abspath(src), "params": params},
        target_shard_bytes=target_shard_bytes,
    )
    own_ray = not ray.is_initialized()
    if own_ray:
        ray_init.init(None, num_cpus=os.cpu_count() or 1, include_dashboard=False, configure_logging=False)
    files_ok = num_clips = 0
    try:
        for done, result in enumerate(_results_in_order(ray, jobs, options), start=1):
            if result.skipped_reason is not None:
                skipped.append({"file": result.source, "reason": result.skipped_reason})
            else:
                files_ok += 1
                for clip in result.clips:
                    writer.add(clip)
                num_clips += len(result.clips)
            if progress is not None:
                progress(done, len(jobs))
    finally:
        if own_ray:
            ray.shutdown()

    skipped.sort(key=lambda s: s["file"])
    storage.write_bytes(
        storage.join(out, SKIPPED_NAME),
        json.dumps({"source": os.path.abspath(src), "skipped": skipped}, indent=2).encode(),
    )
    if num_clips == 0:
        raise DataError(
            f"no clips prepared from {src}: all {len(skipped)} files were skipped (see {storage.join(out, SKIPPED_NAME)})"
        )
    manifest = writer.close()
    return PrepareSummary(
        out=out,
        num_clips=num_clips,
        files_ok=files_ok,
        skipped=skipped,
        label_names=label_names,
        splits=manifest.splits,
        seconds=time.perf_counter() - started,
    )
