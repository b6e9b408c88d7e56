"""The clip-shard format (docs/architecture.md, "Data"): Parquet shards plus `manifest.json`.

A data set is a folder URI holding `manifest.json` and `shard-00000.parquet`, ... with one
row per clip. The manifest is written last, so a folder without one is an unfinished set.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from service import storage
from service.errors import DataError
from service.storage import DEFAULT_RETRY_BUDGET_S

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.parquet")  # a file of the data set's own folder
DEFAULT_ROWS_PER_GROUP = 64
DEFAULT_TARGET_SHARD_BYTES = 256 * 2**20

SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("fps", pa.float32(), nullable=False),
        pa.field("frames", pa.list_(pa.binary()), nullable=False),  # one JPEG per frame
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("audio", pa.binary(), nullable=False),  # PCM s16le mono
        pa.field("sample_rate", pa.int32(), nullable=False),
        pa.field("label", pa.int32(), nullable=True),
        pa.field("split", pa.string(), nullable=True),
    ]
)


@dataclass(kw_only=True)
class Clip:
    """One row: a clip's frames as JPEG bytes and its audio as PCM s16le mono bytes."""

    clip_id: str
    source: str
    start_s: float
    fps: float
    frames: list[bytes]  # empty for audio-only sets
    height: int
    width: int
    audio: bytes  # empty for video-only sets
    sample_rate: int
    label: int | None = None
    split: str | None = None

    @property
    def num_bytes(self) -> int:
        return sum(len(f) for f in self.frames) + len(self.audio)


@dataclass(kw_only=True)
class ShardInfo:
    name: str
    rows: int
    bytes: int
    sha256: str

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ShardInfo:
        """A manifest's shard entry, its types checked; a name must be a file of the data set's
        own folder (no `/`, no `..`), so a manifest cannot point a reader elsewhere."""
        shard = cls(**raw)
        if not isinstance(shard.name, str) or not _SHARD_NAME.fullmatch(shard.name) or ".." in shard.name:
            raise TypeError(f"shard name {shard.name!r} is not a file name of the data set's folder")
        for field_name in ("rows", "bytes"):
            value = getattr(shard, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TypeError(f"shard {shard.name}: {field_name} {value!r} is not a count")
        if not isinstance(shard.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", shard.sha256):
            raise TypeError(f"shard {shard.name}: sha256 {shard.sha256!r} is not a hex digest")
        return shard


@dataclass(kw_only=True)
class Manifest:
    shards: list[ShardInfo]
    label_names: list[str]
    has_video: bool
    has_audio: bool
    made_by: dict[str, Any]  # generator, source, parameters, created
    splits: dict[str, int] = field(default_factory=dict)  # clips per split ("" = no split)
    format_version: int = FORMAT_VERSION

    @property
    def num_clips(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": self.format_version,
                "num_clips": self.num_clips,
                "modalities": {"video": self.has_video, "audio": self.has_audio},
                "label_names": self.label_names,
                "splits": self.splits,
                "made_by": self.made_by,
                "shards": [vars(s) for s in self.shards],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, uri: str) -> Manifest:
        try:
            raw = json.loads(text)
            if raw["format_version"] != FORMAT_VERSION:
                raise DataError(f"{uri}: format version {raw['format_version']} is not {FORMAT_VERSION}")
            label_names = raw["label_names"]
            modalities = raw["modalities"]
            splits = raw.get("splits", {})
            if not isinstance(label_names, list) or not all(isinstance(n, str) for n in label_names):
                raise TypeError(f"label_names {label_names!r} is not a list of names")
            if not all(isinstance(modalities[m], bool) for m in ("video", "audio")):
                raise TypeError(f"modalities {modalities!r}: video and audio must be true or false")
            if not isinstance(splits, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in splits.items()
            ):
                raise TypeError(f"splits {splits!r} is not a table of clip counts")
            return cls(
                shards=[ShardInfo.from_dict(s) for s in raw["shards"]],
                label_names=list(label_names),
                has_video=modalities["video"],
                has_audio=modalities["audio"],
                made_by=dict(raw["made_by"]),
                splits=dict(splits),
                format_version=raw["format_version"],
            )
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise DataError(f"{uri}: not a valid manifest ({type(err).__name__}: {err})") from None


def read_manifest(
    dataset_uri: str, *, endpoint_url: str = "", retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
) -> Manifest:
    """The manifest of a data set; a clear error naming the URI when there is none."""
    uri = storage.join(dataset_uri, MANIFEST_NAME)
    try:
        text = storage.read_bytes(uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s).decode()
    except FileNotFoundError:
        raise DataError(f"no data set at {dataset_uri}: {MANIFEST_NAME} is missing") from None
    except UnicodeDecodeError:
        raise DataError(f"{uri}: not a valid manifest (not UTF-8 text)") from None
    manifest = Manifest.from_json(text, uri)
    if manifest.num_clips == 0:
        raise DataError(f"data set {dataset_uri} holds no clips")
    return manifest


def shard_uri(dataset_uri: str, shard: ShardInfo) -> str:
    """The URI of one shard of the data set at `dataset_uri`."""
    return storage.join(dataset_uri, shard.name)


def check_shard_bytes(uri: str, shard: ShardInfo, data: bytes) -> None:
    """Raise `DataError` naming `uri` unless `data` has the size and sha256 the manifest lists."""
    if len(data) != shard.bytes:
        raise DataError(f"shard {uri} is {len(data)} bytes, the manifest says {shard.bytes}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        raise DataError(f"shard {uri} fails its checksum: sha256 {digest} differs from the manifest's {shard.sha256}")


def read_shard_bytes(
    dataset_uri: str, shard: ShardInfo, *, endpoint_url: str = "", retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
) -> bytes:
    """A shard's bytes, checked against the manifest; `DataError` naming its URI when it is
    missing or differs."""
    uri = shard_uri(dataset_uri, shard)
    try:
        data = storage.read_bytes(uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    except FileNotFoundError:
        raise DataError(f"shard {uri} is missing (listed in {MANIFEST_NAME})") from None
    check_shard_bytes(uri, shard, data)
    return data


def read_shard(
    dataset_uri: str, shard: ShardInfo, *, endpoint_url: str = "", retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
) -> pa.Table:
    """A whole shard as an Arrow table, fetched in one read and checked against the manifest
    (size, sha256, row count)."""
    uri = shard_uri(dataset_uri, shard)
    data = read_shard_bytes(dataset_uri, shard, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"shard {uri} is not a readable Parquet file: {err}") from None
    if table.num_rows != shard.rows:
        raise DataError(f"shard {uri} holds {table.num_rows} rows, the manifest says {shard.rows}")
    return table


def read_shard_columns(
    dataset_uri: str,
    shard: ShardInfo,
    columns: list[str],
    *,
    endpoint_url: str = "",
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
) -> pa.Table:
    """Some columns of a shard, read by range (only those column chunks travel); not hashed."""
    uri = shard_uri(dataset_uri, shard)
    fs, path = storage.filesystem(uri, endpoint_url=endpoint_url)

    def read() -> pa.Table:
        with fs.open(path, "rb") as f:
            # No Arrow thread may call back into this Python file object: neither decoding
            # threads (use_threads) nor pre-buffering I/O threads (pre_buffer). One still inside
            # such a call when the interpreter exits aborts the process after its output
            # ("terminate called without an active exception", exit 134).
            return pq.read_table(f, columns=columns, use_threads=False, pre_buffer=False)

    try:
        table = storage.retry("read columns of", uri, read, budget_s=retry_budget_s)
    except FileNotFoundError:
        raise DataError(f"shard {uri} is missing (listed in {MANIFEST_NAME})") from None
    except storage.StorageError as err:
        if isinstance(err.__cause__, pa.ArrowException):
            raise DataError(f"shard {uri} is not a readable Parquet file: {err.__cause__}") from None
        raise
    if table.num_rows != shard.rows:
        raise DataError(f"shard {uri} holds {table.num_rows} rows, the manifest says {shard.rows}")
    return table


def clip_from_row(row: dict[str, Any]) -> Clip:
    """A `Clip` from one row as `pyarrow.Table.to_pylist()` gives it."""
    return Clip(**{name: row[name] for name in SCHEMA.names})


def iter_clips(dataset_uri: str, *, endpoint_url: str = "") -> Iterator[Clip]:
    """Every clip of a data set in manifest order (each shard fetched whole and checked)."""
    manifest = read_manifest(dataset_uri, endpoint_url=endpoint_url)
    for shard in manifest.shards:
        table = read_shard(dataset_uri, shard, endpoint_url=endpoint_url)
        for batch in table.to_batches():
            for row in batch.to_pylist():
                yield clip_from_row(row)


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of one H x W x 3 uint8 RGB frame."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame, mode="RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_pcm(wave: np.ndarray) -> bytes:
    """PCM s16le bytes of a mono waveform in [-1, 1] (float) or already int16."""
    if wave.dtype != np.int16:
        wave = np.round(np.clip(wave, -1.0, 1.0) * 32767.0).astype(np.int16)
    return wave.astype("<i2").tobytes()


def decode_pcm(data: bytes) -> np.ndarray:
    """float32 waveform in [-1, 1] from PCM s16le bytes."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


class DatasetWriter:
    """Writes clips into Parquet shards at `uri`, then `manifest.json` on `close()`.

    Shards are built in a local temporary file, hashed, then uploaded whole, so a reader
    never sees half a shard. A shard closes when its clips exceed `target_shard_bytes`.
    """

    def __init__(
        self,
        uri: str,
        *,
        label_names: list[str],
        made_by: dict[str, Any],
        target_shard_bytes: int = DEFAULT_TARGET_SHARD_BYTES,
        rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
        endpoint_url: str = "",
    ):
        if storage.exists(storage.join(uri, MANIFEST_NAME), endpoint_url=endpoint_url):
            raise DataError(f"{uri} already holds a data set (manifest.json exists); choose another folder")
        self.uri = uri
        self.endpoint_url = endpoint_url
        self.label_names = list(label_names)
        self.made_by = {**made_by, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        self.target_shard_bytes = target_shard_bytes
        self.rows_per_group = rows_per_group
        self.shards: list[ShardInfo] = []
        self.splits: dict[str, int] = {}
        self.has_video = False
        self.has_audio = False
        self._group: list[Clip] = []
        self._writer: pq.ParquetWriter | None = None
        self._tmp_path = ""
        self._shard_rows = 0
        self._shard_bytes = 0
        self._ids: set[str] = set()

    def add(self, clip: Clip) -> None:
        if clip.clip_id in self._ids:
            raise DataError(f"duplicate clip_id {clip.clip_id!r} (from {clip.source})")
        if not clip.frames and not clip.audio:
            raise DataError(f"clip {clip.clip_id!r} has neither frames nor audio")
        if clip.label is not None and not 0 <= clip.label < max(len(self.label_names), 1):
            raise DataError(f"clip {clip.clip_id!r} has label {clip.label}, outside label_names")
        self._ids.add(clip.clip_id)
        self.has_video |= bool(clip.frames)
        self.has_audio |= bool(clip.audio)
        key = clip.split or ""
        self.splits[key] = self.splits.get(key, 0) + 1
        self._group.append(clip)
        self._shard_bytes += clip.num_bytes
        if len(self._group) >= self.rows_per_group:
            self._flush_group()
        if self._shard_bytes >= self.target_shard_bytes:
            self._finish_shard()

    def close(self) -> Manifest:
        """Finish the last shard and write the manifest. Returns the manifest."""
        self._finish_shard()
        if not self.shards:
            raise DataError(f"no clips were written to {self.uri}")
        manifest = Manifest(
            shards=self.shards,
            label_names=self.label_names,
            has_video=self.has_video,
            has_audio=self.has_audio,
            made_by=self.made_by,
            splits=self.splits,
        )
        storage.write_bytes(
            storage.join(self.uri, MANIFEST_NAME), manifest.to_json().encode(), endpoint_url=self.endpoint_url
        )
        return manifest

    def _flush_group(self) -> None:
        if not self._group:
            return
        if self._writer is None:
            fd, self._tmp_path = tempfile.mkstemp(suffix=".parquet", prefix="cmacc-shard-")
            os.close(fd)
            self._writer = pq.ParquetWriter(self._tmp_path, SCHEMA, compression="none")
        columns = {name: [getattr(c, name) for c in self._group] for name in SCHEMA.names}
        self._writer.write_table(pa.table(columns, schema=SCHEMA), row_group_size=len(self._group))
        self._shard_rows += len(self._group)
        self._group = []

    def _finish_shard(self) -> None:
        self._flush_group()
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        name = f"shard-{len(self.shards):05d}.parquet"
        try:
            with open(self._tmp_path, "rb") as f:
                data = f.read()
            storage.write_bytes(storage.join(self.uri, name), data, endpoint_url=self.endpoint_url)
        finally:
            os.remove(self._tmp_path)
        digest = hashlib.sha256(data).hexdigest()
        self.shards.append(ShardInfo(name=name, rows=self._shard_rows, bytes=len(data), sha256=digest))
        self._shard_rows = 0
        self._shard_bytes = 0
