"""The decode pipeline behind a reader: planned rows in, full batches of decoded clips out.

* `ShardCache` keeps a shard in memory while planned rows still need it, fetched once
  (whole, checked against the manifest's sha256) by a small pool.
* `RowDecoder` turns one planned row into a decoded clip (or a skipped row with its reason)
  and a list of them into a batch of tensors.
* `DecodePipeline` is the background half: one thread keeps decode tasks in flight in plan
  order and assembles full batches into a bounded queue; a pool decodes.

Nothing here decides what is read: the plan (`workers.data.plan`) does, and the reader's
cursor (`workers.data.cursor`) counts what was handed out.
"""

from __future__ import annotations

import collections
import hashlib
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from service.storage import DEFAULT_RETRY_BUDGET_S
from workers.data.decode import DecodedClip, centre_crop, decode_row
from workers.data.format import DataError, Manifest, read_shard

POLL_S = 0.2  # how often blocked threads look at the stop flag, seconds


def put_unless_stopped(target: queue.Queue, entry: Any, stop: threading.Event) -> bool:
    """Put `entry` into the bounded `target`, waiting while it is full; False (nothing put)
    once `stop` is set, so a producer never blocks past its consumer's end."""
    while not stop.is_set():
        try:
            target.put(entry, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


FETCH_THREADS = 2  # the shard in use and the next one


@dataclass(frozen=True)
class Item:
    """One planned position of one epoch."""

    epoch: int
    position: int
    index: int  # global clip index
    shard: int


@dataclass(kw_only=True)
class Loaded:
    item: Item
    clip: DecodedClip | None  # None when the row was skipped
    clip_id: str = ""
    source: str = ""
    reason: str = ""
    row: tuple[str, int] = ("", -1)  # shard file and row in it, for errors raised after the batch left the reader


@dataclass(kw_only=True)
class Batch:
    items: list[Item]  # every planned position the batch consumed, skipped rows included
    skipped: list[Loaded]
    tensors: dict[str, Any]


def source_id(source: str) -> int:
    """A clip's source file as a 63-bit integer (the same source always maps to the same id),
    so that keys from one recording can be recognised in a dictionary."""
    return int.from_bytes(hashlib.blake2b(source.encode(), digest_size=8).digest(), "big") >> 1


class ShardCache:
    """Shards in memory while planned rows still need them, fetched once each.

    `expect` adds planned uses, `release` removes one; a shard is dropped when its count
    reaches zero, so memory holds the shards under the shuffle window plus one fetched ahead.

    With `max_bytes` (a reader whose plan scatters its rows over every shard: the fresh pool's
    uniform extra stream) the counts are not kept: the least recently used shards are dropped
    once the resident ones (by their manifest `sizes`) exceed `max_bytes`, the one in use
    always kept; a shard needed again after that is fetched again.
    """

    def __init__(
        self,
        fetch: Callable[[int], pa.Table],
        pool: ThreadPoolExecutor,
        *,
        max_bytes: int | None = None,
        sizes: list[int] | None = None,
    ):
        self._fetch = fetch
        self._pool = pool
        self._lock = threading.Lock()
        self._futures: dict[int, Future] = {}  # insertion order = least recently used first
        self._uses: collections.Counter[int] = collections.Counter()
        self._max_bytes = max_bytes
        self._sizes = sizes or []
        self.fetches = 0  # shard reads started (what a bounded cache costs)

    def expect(self, uses: collections.Counter[int]) -> None:
        if self._max_bytes is not None:
            return
        with self._lock:
            self._uses.update(uses)

    def prefetch(self, shard: int) -> Future:
        with self._lock:
            future = self._futures.pop(shard, None)
            if future is None:
                future = self._pool.submit(self._fetch, shard)
                self.fetches += 1
            self._futures[shard] = future  # now the most recently used
            if self._max_bytes is not None:
                self._evict()
            return future

    def _evict(self) -> None:
        resident = sum(self._sizes[shard] for shard in self._futures)
        while resident > self._max_bytes and len(self._futures) > 1:
            oldest = next(iter(self._futures))
            del self._futures[oldest]
            resident -= self._sizes[oldest]

    def get(self, shard: int) -> pa.Table:
        return self.prefetch(shard).result()

    def release(self, shard: int) -> None:
        if self._max_bytes is not None:
            return
        with self._lock:
            self._uses[shard] -= 1
            if self._uses[shard] <= 0:
                del self._uses[shard]
                self._futures.pop(shard, None)


@dataclass(kw_only=True)
class RowDecoder:
    """Reads and decodes the rows of one data set as a reader's batches need them.

    Frames are cut to `frames` (the centred window; shorter clips repeat their last frame),
    audio to `num_samples` at `sample_rate`, centred on the video window's centre. A row
    whose clip id is in `exclude_clips`, or that cannot be decoded, is skipped with its
    reason. `on_device`: the frames' headers are checked here and the JPEGs handed on
    encoded, for the worker to decode the whole batch on its device (`decode.decode_batch`).
    `note`, when given, is told which rows are being decoded (`started(index,
    shard_name, row_in_shard, clip_id)` and `finished(index)`: `workers.distributed.crashes`).
    """

    uri: str
    manifest: Manifest
    frames: int
    num_samples: int
    sample_rate: int
    endpoint_url: str = ""
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    exclude_clips: frozenset[str] = frozenset()
    note: Any = None
    on_device: bool = False

    def __post_init__(self) -> None:
        self.offsets = np.cumsum([0] + [s.rows for s in self.manifest.shards])

    def fetch(self, shard: int) -> pa.Table:
        return read_shard(
            self.uri, self.manifest.shards[shard], endpoint_url=self.endpoint_url, retry_budget_s=self.retry_budget_s
        )

    def load(self, item: Item, cache: ShardCache) -> Loaded:
        try:
            table = cache.get(item.shard)  # a missing or tampered shard raises here: fatal
            in_shard = item.index - int(self.offsets[item.shard])
            row = table.slice(in_shard, 1).to_pylist()[0]
            clip_id = str(row.get("clip_id"))
            source = str(row.get("source") or "")
            if clip_id in self.exclude_clips:
                return Loaded(item=item, clip=None, clip_id=clip_id, reason="excluded by data.exclude_clips")
            if self.note is not None:
                self.note.started(item.index, self.manifest.shards[item.shard].name, in_shard, clip_id)
            try:
                clip = decode_row(
                    row,
                    frames=self.frames,
                    num_samples=self.num_samples,
                    sample_rate=self.sample_rate,
                    video=self.manifest.has_video,
                    audio=self.manifest.has_audio,
                    on_device=self.on_device,
                )
            except Exception as err:  # a bad row costs that row only, whatever went wrong in it
                return Loaded(item=item, clip=None, clip_id=clip_id, reason=str(err))
            finally:
                if self.note is not None:
                    self.note.finished(item.index)
            where = (self.manifest.shards[item.shard].name, in_shard)
            return Loaded(item=item, clip=clip, clip_id=clip.clip_id, source=source, row=where)
        finally:
            cache.release(item.shard)

    def collate(self, loaded: list[Loaded]) -> dict[str, Any]:
        clips = [x.clip for x in loaded]
        assert all(c is not None for c in clips)
        frames, encoded = None, None
        if self.manifest.has_video and self.on_device:
            encoded = encode_batch(clips, rows=[x.row for x in loaded])
        elif self.manifest.has_video:
            height = min(c.frames.shape[1] for c in clips)
            width = min(c.frames.shape[2] for c in clips)
            frames = torch.from_numpy(np.stack([centre_crop(c.frames, height, width) for c in clips]))
        audio = torch.from_numpy(np.stack([c.audio for c in clips])) if self.manifest.has_audio else None
        batch = {
            "frames": frames,
            "audio": audio,
            "index": torch.tensor([x.item.index for x in loaded], dtype=torch.int64),
            "label": torch.tensor([c.label for c in clips], dtype=torch.int64),
            "source": torch.tensor([source_id(x.source) for x in loaded], dtype=torch.int64),
            "clip_id": [c.clip_id for c in clips],
            "epoch": loaded[-1].item.epoch,
            "epochs": [x.item.epoch for x in loaded],
        }
        if encoded is not None:
            batch["jpeg"] = encoded
        return batch


def encode_batch(clips: list[DecodedClip], *, rows: list[tuple[str, int]]) -> dict[str, Any]:
    """The encoded frames of a batch as `decode.decode_batch` takes them: every clip's window
    of JPEGs back to back in one uint8 tensor (one host-to-device copy, one pin), with the
    offsets, which frames each clip owns, each clip's T frame numbers and size."""
    jpegs = [data for c in clips for data in c.jpegs]
    counts = [len(c.jpegs) for c in clips]
    first_frame = np.concatenate([[0], np.cumsum(counts)])
    lengths = np.fromiter((len(data) for data in jpegs), dtype=np.int64, count=len(jpegs))
    data = np.frombuffer(b"".join(jpegs), dtype=np.uint8)
    frame_index = np.stack([first + c.frame_numbers for first, c in zip(first_frame[:-1], clips)])
    return {
        "data": torch.from_numpy(data.copy()),
        "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])),
        "first_frame": torch.from_numpy(first_frame.astype(np.int64)),
        "frame_index": torch.from_numpy(frame_index.astype(np.int64)),
        "size": torch.tensor([c.frame_size for c in clips], dtype=torch.int64),
        "rows": rows,
    }


class DecodePipeline:
    """The background half of a reader: one thread keeps decode tasks in flight in plan order
    and assembles full batches of `batch_size` good clips into a bounded queue; a pool decodes,
    a small pool fetches. `items(cache)` yields the planned positions from the cursor on
    (and tells the cache what is coming); `cache_bytes` bounds the shard cache (`ShardCache`'s
    `max_bytes`, for scattered plans); `whole_epoch`: the first epoch starts at its
    beginning (so an epoch of which no clip decodes can be told)."""

    def __init__(
        self,
        decoder: RowDecoder,
        items: Callable[[ShardCache], Iterator[Item]],
        *,
        batch_size: int,
        num_decode_threads: int,
        prefetch_batches: int,
        start_epoch: int,
        whole_epoch: bool,
        rank: int,
        cache_bytes: int | None = None,
    ):
        self._decoder = decoder
        self._batch_size = batch_size
        self._num_decode_threads = num_decode_threads
        self._rank = rank
        self._stop = threading.Event()
        self._queue: queue.Queue[Batch | BaseException] = queue.Queue(maxsize=prefetch_batches)
        self._fetch_pool = ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="cmacc-fetch")
        self._decode_pool = ThreadPoolExecutor(max_workers=num_decode_threads, thread_name_prefix="cmacc-decode")
        sizes = [shard.bytes for shard in decoder.manifest.shards]
        self._cache = ShardCache(decoder.fetch, self._fetch_pool, max_bytes=cache_bytes, sizes=sizes)
        self._items = items(self._cache)
        self._start_epoch, self._whole_epoch = start_epoch, whole_epoch
        self._thread = threading.Thread(target=self._run, name="cmacc-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._produce()
        except BaseException as err:
            if not self._stop.is_set():
                self._put(err)

    def _put(self, entry: Batch | BaseException) -> bool:
        return put_unless_stopped(self._queue, entry, self._stop)

    def _produce(self) -> None:
        decoder = self._decoder
        # Enough rows in flight to keep every decode thread busy across a batch boundary.
        window = max(self._batch_size, 4 * self._num_decode_threads)
        pending: collections.deque[Future] = collections.deque()
        consumed: list[Item] = []
        good: list[Loaded] = []
        skipped: list[Loaded] = []
        epoch, read_in_epoch, good_in_epoch, whole_epoch = self._start_epoch, 0, 0, self._whole_epoch
        while not self._stop.is_set():
            while len(pending) < window:
                pending.append(self._decode_pool.submit(decoder.load, next(self._items), self._cache))
            loaded = pending.popleft().result()
            if loaded.item.epoch != epoch:
                if whole_epoch and read_in_epoch and not good_in_epoch:
                    raise DataError(
                        f"none of the {read_in_epoch} clips planned for rank {self._rank} in epoch {epoch} "
                        f"of {decoder.uri} could be decoded; see the warnings for the reasons"
                    )
                epoch, read_in_epoch, good_in_epoch, whole_epoch = loaded.item.epoch, 0, 0, True
            read_in_epoch += 1
            consumed.append(loaded.item)
            if loaded.clip is None:
                skipped.append(loaded)
                continue
            good_in_epoch += 1
            good.append(loaded)
            if len(good) == self._batch_size:
                if not self._put(Batch(items=consumed, skipped=skipped, tensors=decoder.collate(good))):
                    return
                consumed, good, skipped = [], [], []

    def next(self) -> Batch | BaseException:
        """The next batch, or the error that stopped the pipeline."""
        while True:
            try:
                return self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return RuntimeError(f"the reader thread for {self._decoder.uri} stopped without a reason")

    def close(self) -> None:
        self._stop.set()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self._thread.join()
        self._decode_pool.shutdown(wait=True)
        self._fetch_pool.shutdown(wait=True)
