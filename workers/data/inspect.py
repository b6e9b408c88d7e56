"""Describe a clip-shard data set (`cmacc data inspect`), check it before a run starts
(`check`), and re-hash its shards (`--verify`).

The summary reads the manifest and a few small columns of each shard by range (labels, sizes,
rates), never the frames or audio, so it is quick even on a large set in object storage.
`check` reads less still: each shard's size and its Parquet footer (the schema and the row
count), against the manifest, in parallel; `pretrain`, `submit`, `ablate` and `eval` run it
before any Ray worker starts.
"""

from __future__ import annotations

import collections
import struct
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from service import storage
from workers.data.format import (
    MANIFEST_NAME,
    SCHEMA,
    DataError,
    ShardInfo,
    read_manifest,
    read_shard_bytes,
    read_shard_columns,
    shard_uri,
)

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


CHECK_THREADS = 32  # shards checked at once: each check is two small requests (size, footer)
CHECK_TIMEOUT_S = 120.0  # the whole check's bound; shards left unchecked are checked as they are read
_TAIL_BYTES = 64 * 1024  # read from a shard's end: the footer of a clip shard fits in it
_MAGIC = b"PAR1"


def check(
    uri: str,
    *,
    endpoint_url: str = "",
    retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S,
    timeout_s: float = CHECK_TIMEOUT_S,
    threads: int = CHECK_THREADS,
) -> int:
    """Check the data set at `uri` as `cmacc data inspect` does, reading only each shard's size
    and Parquet footer: the manifest parses, every listed shard is a file of the listed size
    with a Parquet footer, the clip schema and the listed row count. Raises DataError naming
    the first damaged shard (in manifest order) and what is wrong; returns the shards checked.
    Stops after `timeout_s` with a warning (the rest are checked as the readers fetch them)."""
    manifest = read_manifest(uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    shards = manifest.shards
    pool = ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards))), thread_name_prefix="cmacc-data-check")
    try:
        futures = [pool.submit(check_shard, uri, shard, endpoint_url, retry_budget_s) for shard in shards]
        done, pending = wait(futures, timeout=timeout_s, return_when=FIRST_EXCEPTION)
        failed = [i for i, future in enumerate(futures) if future in done and future.exception() is not None]
        if failed:
            for future in pending:
                future.cancel()
            raise futures[min(failed)].exception()  # the first damaged shard of the manifest
        if pending:
            for future in pending:
                future.cancel()
            print(
                f"cmacc: warning: the data check of {uri} stopped after {timeout_s:g} s with {len(done)} of "
                f"{len(shards)} shards checked; the others are checked as they are read",
                file=sys.stderr,
                flush=True,
            )
        return len(done)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def check_shard(dataset_uri: str, shard: ShardInfo, endpoint_url: str = "", retry_budget_s: float = 0.0) -> None:
    """One shard's size, footer, schema and row count against the manifest; DataError naming
    the shard's URI when one differs. An intact shard costs one range read (its last bytes,
    where the manifest's size puts them); only a damaged one is looked at further."""
    uri = shard_uri(dataset_uri, shard)
    metadata = read_footer(uri, shard.bytes, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    wrong = schema_difference(metadata.schema.to_arrow_schema())
    if wrong:
        raise DataError(f"shard {uri} does not have the clip schema: {wrong}")
    if metadata.num_rows != shard.rows:
        raise DataError(f"shard {uri} holds {metadata.num_rows} rows, the manifest says {shard.rows}")


def read_footer(uri: str, size: int, *, endpoint_url: str = "", retry_budget_s: float = 0.0) -> pq.FileMetaData:
    """The Parquet footer of the file at `uri`, which should be `size` bytes long: one range
    read of its end (two for a footer over `_TAIL_BYTES`). DataError saying what is wrong
    when the file is missing, a folder, of another size or without a footer."""
    not_parquet = f"shard {uri} is not a readable Parquet file"
    start = max(0, size - _TAIL_BYTES)
    try:
        tail = storage.read_range(uri, start, size - start, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    except OSError:  # missing, a folder, a range past its end: said precisely below
        tail = b""
    if len(tail) != size - start or tail[-4:] != _MAGIC:
        raise _what_is_wrong(uri, size, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    (length,) = struct.unpack("<I", tail[-8:-4])
    if length + 12 > size:
        raise DataError(f"{not_parquet}: its footer claims {length} bytes, more than the file holds")
    if length + 8 > len(tail):
        tail = storage.read_range(
            uri, size - length - 8, length + 8, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s
        )
    footer = tail[-(length + 8) :]
    try:
        return pq.read_metadata(pa.BufferReader(_MAGIC + footer))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{not_parquet}: its footer does not parse ({err})") from None


def _what_is_wrong(uri: str, size: int, *, endpoint_url: str, retry_budget_s: float) -> DataError:
    """The error for a shard whose end is not a Parquet footer where the manifest puts it."""
    fs, path = storage.filesystem(uri, endpoint_url=endpoint_url)
    if fs.isdir(path):
        return DataError(f"shard {uri} is a folder, not a Parquet file")
    try:
        found = storage.size(uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    except FileNotFoundError:
        return DataError(f"shard {uri} is missing (listed in {MANIFEST_NAME})")
    if found != size:
        return DataError(f"shard {uri} is {found} bytes, the manifest says {size} (truncated or replaced?)")
    return DataError(f"shard {uri} is not a readable Parquet file: no Parquet footer at its end (other bytes)")


def schema_difference(found: pa.Schema) -> str:
    """What separates a shard's schema from the clip schema ("" when it has every column, typed
    as the format says)."""
    for field in SCHEMA:
        if field.name not in found.names:
            return f"column {field.name!r} is missing"
        kind = found.field(field.name).type
        if kind != field.type:
            return f"column {field.name!r} is {kind}, the format says {field.type}"
    return ""
