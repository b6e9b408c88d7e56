"""Describe a clip-shard data set (`cmacc data inspect`) and re-hash its shards (`--verify`).

The summary reads the manifest and a few small columns of each shard by range (labels, sizes,
rates), never the frames or audio, so it is quick even on a large set in object storage.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from workers.data.format import DataError, read_manifest, read_shard_bytes, read_shard_columns

UNLABELLED = "(unlabelled)"
_SUMMARY_COLUMNS = ["label", "height", "width", "fps", "sample_rate"]


@dataclass(kw_only=True)
class DatasetSummary:
    """What a data set holds; sizes in bytes, rates in frames per second and Hz."""

    uri: str
    format_version: int
    num_clips: int
    num_shards: int
    num_bytes: int
    has_video: bool
    has_audio: bool
    label_names: list[str]
    clips_per_label: dict[str, int]  # label name -> clips; UNLABELLED counts null labels
    splits: dict[str, int]  # split -> clips; "" = rows without a split
    frame_sizes: list[str]  # distinct "HxW" of the video frames
    fps: list[float]  # distinct frame rates
    sample_rates: list[int]  # distinct audio sample rates
    made_by: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        """Aligned `name  value` lines for a person."""
        made = self.made_by
        origin = f"made by {made.get('generator', '?')} ({made.get('source', '?')})"
        if made.get("created"):
            origin += f", created {made['created']}"
        modalities = [name for name, present in (("video", self.has_video), ("audio", self.has_audio)) if present]
        lines = [
            ("data set", self.uri),
            ("format", f"version {self.format_version}, {origin}"),
            ("clips", f"{self.num_clips} in {self.num_shards} shard(s), {self.num_bytes / 2**20:.1f} MiB"),
            ("modalities", " + ".join(modalities)),
        ]
        if self.has_video:
            rates = ", ".join(f"{f:g}" for f in self.fps)
            lines.append(("video", f"{', '.join(self.frame_sizes)} pixels at {rates} fps"))
        if self.has_audio:
            lines.append(("audio", f"mono PCM at {', '.join(str(r) for r in self.sample_rates)} Hz"))
        lines.append(("splits", ", ".join(f"{name or '(none)'} {n}" for name, n in sorted(self.splits.items()))))
        per_label = ", ".join(f"{name} {n}" for name, n in self.clips_per_label.items())
        lines.append(("labels", f"{len(self.label_names)} classes: {per_label}"))
        return "\n".join(f"{name:<11}{value}" for name, value in lines)


def summarize(uri: str, *, endpoint_url: str = "") -> DatasetSummary:
    """The summary of the data set at `uri`; `DataError` naming the URI if it is not one."""
    manifest = read_manifest(uri, endpoint_url=endpoint_url)

    def columns(i: int) -> dict[str, list]:
        table = read_shard_columns(uri, manifest.shards[i], _SUMMARY_COLUMNS, endpoint_url=endpoint_url)
        return table.to_pydict()

    with ThreadPoolExecutor(max_workers=min(8, len(manifest.shards))) as pool:
        parts = list(pool.map(columns, range(len(manifest.shards))))
    labels: collections.Counter[int | None] = collections.Counter()
    sizes: set[tuple[int, int]] = set()
    fps: set[float] = set()
    rates: set[int] = set()
    for part in parts:
        labels.update(part["label"])
        sizes.update(zip(part["height"], part["width"]))
        fps.update(round(f, 3) for f in part["fps"])
        rates.update(part["sample_rate"])

    def name(label: int | None) -> str:
        if label is None:
            return UNLABELLED
        return manifest.label_names[label] if 0 <= label < len(manifest.label_names) else f"label {label}"

    order = sorted(labels, key=lambda label: (label is None, label if label is not None else 0))
    return DatasetSummary(
        uri=uri,
        format_version=manifest.format_version,
        num_clips=manifest.num_clips,
        num_shards=len(manifest.shards),
        num_bytes=sum(s.bytes for s in manifest.shards),
        has_video=manifest.has_video,
        has_audio=manifest.has_audio,
        label_names=manifest.label_names,
        clips_per_label={name(label): labels[label] for label in order},
        splits=dict(manifest.splits),
        frame_sizes=[f"{h}x{w}" for h, w in sorted(sizes)] if manifest.has_video else [],
        fps=sorted(fps) if manifest.has_video else [],
        sample_rates=sorted(rates) if manifest.has_audio else [],
        made_by=manifest.made_by,
    )


def verify(uri: str, *, endpoint_url: str = "", progress: Callable[[int], None] | None = None) -> list[str]:
    """Re-read and re-hash every shard of the data set at `uri` against its manifest.

    Returns one message per missing or mismatching shard (each naming the shard URI); [] when
    all match. `progress(n)` is called with each shard's size in bytes once it is checked.
    """
    manifest = read_manifest(uri, endpoint_url=endpoint_url)
    problems = []
    for shard in manifest.shards:
        try:
            read_shard_bytes(uri, shard, endpoint_url=endpoint_url)
        except DataError as err:
            problems.append(str(err))
        if progress is not None:
            progress(shard.bytes)
    return problems
