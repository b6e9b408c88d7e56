"""`ClipReader`: the deterministic, resumable clip-shard reader used inside each training worker.

How an epoch is planned (on clip indices only, before any byte is read):

1. The data set's clips (those of `split`, or all) are grouped into units: one unit per shard,
   or, when there are fewer shards than ranks, each shard cut into contiguous row ranges so
   every rank gets at least one unit.
2. The unit order of epoch e is a permutation drawn from (seed, e); units go to ranks
   round-robin (rank r takes positions r, r + W, r + 2W, ...).
3. A rank's rows, unit after unit, pass through a bounded shuffle buffer driven by an RNG from
   (seed, e, rank). The result is the rank's plan for the epoch: a list of clip indices.

Background threads then fetch shards (whole, checked against the manifest's sha256), decode
the planned rows in plan order and keep `prefetch_batches` batches ready. Because the plan
depends only on (seed, epoch, rank, world size), the cursor is just (epoch, planned positions
consumed) plus a bitmap of the clips consumed this epoch, whatever the threads hold in flight.

The stream is infinite: epoch e + 1 follows e inside the same batch if need be, and every
batch holds exactly `batch_size` clips. So every rank can produce any number of steps and
ranks never disagree on how many steps there are, even when their shares of an epoch differ
in size (units are whole shards) or when some rows are skipped; their epoch boundaries then
fall at slightly different steps. The clip's global index is its position in manifest order.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import itertools
import logging
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from service.config import Config
from workers.data.decode import DecodedClip, decode_row
from workers.data.format import DataError, read_manifest, read_shard, read_shard_columns, shard_uri

logger = logging.getLogger(__name__)

STATE_VERSION = 1
# Tags that keep the RNG streams of the unit order and of the shuffle buffer apart.
_UNIT_ORDER = 0
_ROW_BUFFER = 1
_POLL_S = 0.2  # how often blocked threads look at the stop flag, seconds
_FETCH_THREADS = 2  # the shard in use and the next one


@dataclass(frozen=True)
class _Item:
    """One planned position of one epoch."""

    epoch: int
    position: int
    index: int  # global clip index
    shard: int


@dataclass(kw_only=True)
class _Loaded:
    item: _Item
    clip: DecodedClip | None  # None when the row was skipped
    clip_id: str = ""
    reason: str = ""


@dataclass(kw_only=True)
class _Batch:
    items: list[_Item]  # every planned position the batch consumed, skipped rows included
    skipped: list[_Loaded]
    tensors: dict[str, Any]


def bounded_shuffle(stream: np.ndarray, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """`stream` passed through a shuffle buffer of `buffer_size` entries: each incoming element
    replaces a uniformly drawn buffered one, which is emitted; the rest drain in random order.

    An element moves at most a few buffer lengths from its place, which keeps each rank's
    reads within one or two shards at a time.
    """
    if len(stream) <= buffer_size:
        return stream[rng.permutation(len(stream))]
    values = stream.tolist()
    buffer = values[:buffer_size]
    out = np.empty_like(stream)
    picks = rng.integers(0, buffer_size, size=len(values) - buffer_size).tolist()
    for n, (incoming, j) in enumerate(zip(values[buffer_size:], picks)):
        out[n] = buffer[j]
        buffer[j] = incoming
    out[len(values) - buffer_size :] = np.asarray(buffer, dtype=stream.dtype)[rng.permutation(buffer_size)]
    return out


def _pack(mask: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.packbits(mask).tobytes(), 6)).decode("ascii")


def _unpack(text: str, length: int, what: str) -> np.ndarray:
    try:
        bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    except (ValueError, zlib.error) as err:
        raise ValueError(f"reader state: {what} is not a packed bitmap ({err})") from None
    if len(bits) * 8 < length:
        raise ValueError(f"reader state: {what} covers {len(bits) * 8} clips, the data set has {length}")
    return np.unpackbits(bits, count=length).astype(bool)


class _ShardCache:
    """Shards in memory while planned rows still need them, fetched once each.

    `expect` adds planned uses, `release` removes one; a shard is dropped when its count
    reaches zero, so memory holds the shards under the shuffle window plus one fetched ahead.
    """

    def __init__(self, fetch: Callable[[int], pa.Table], pool: ThreadPoolExecutor):
        self._fetch = fetch
        self._pool = pool
        self._lock = threading.Lock()
        self._futures: dict[int, Future] = {}
        self._uses: collections.Counter[int] = collections.Counter()

    def expect(self, uses: collections.Counter[int]) -> None:
        with self._lock:
            self._uses.update(uses)

    def prefetch(self, shard: int) -> Future:
        with self._lock:
            future = self._futures.get(shard)
            if future is None:
                future = self._futures[shard] = self._pool.submit(self._fetch, shard)
            return future

    def get(self, shard: int) -> pa.Table:
        return self.prefetch(shard).result()

    def release(self, shard: int) -> None:
        with self._lock:
            self._uses[shard] -= 1
            if self._uses[shard] <= 0:
                del self._uses[shard]
                self._futures.pop(shard, None)


class ClipReader:
    """Batches of decoded clips for one rank, forever, deterministic and resumable.

    Each batch is a dict:
      * `frames`: uint8 tensor [B, T, H, W, 3] (RGB; None for audio-only sets). T = `frames`:
        longer clips are cut to their centred window, shorter ones repeat their last frame.
        Clips of different sizes in one batch are centre-cropped to the smallest.
      * `audio`: float32 tensor [B, S] in [-1, 1] (None for video-only sets), S =
        round(seconds * sample_rate); the window is centred on the video window's centre,
        shorter audio is padded with silence, other sample rates are resampled.
      * `index`: int64 [B], the clip's position in manifest order; `label`: int64 [B], -1 when
        null; `clip_id`: list[str]; `epoch`: int, the epoch of the batch's last clip (the
        cursor's epoch after this batch).

    `state_dict()` is this rank's cursor; `load_state_dict(states)` takes every rank's saved
    cursor: with the same world size the rank continues at exactly the next clip; with another
    world size the earliest saved epoch continues over the clips no rank consumed yet,
    re-partitioned across the new ranks (no clip twice, none lost, in that epoch; progress a
    rank had already made in a later epoch is replayed).

    A row that cannot be decoded, or whose clip id is in `exclude_clips`, is skipped, counted
    in `num_skipped` and logged as a warning naming the clip; a missing shard or one that
    differs from the manifest raises `DataError` naming the shard URI from the next `next()`.
    Call `close()` (or use `with`) to stop the background threads. `clips`, when given,
    limits the reader to those clip indices (manifest order; `split` is then not used).
    `note`, when given, is told which rows are being decoded (`started(index, shard_name,
    row_in_shard, clip_id)` and `finished(index)`), from the decode threads: see
    `workers.distributed.crashes`.
    """

    def __init__(
        self,
        *,
        uri: str,
        rank: int,
        world_size: int,
        seed: int,
        batch_size: int,
        frames: int,
        seconds: float = 1.0,
        sample_rate: int = 16000,
        split: str | None = None,
        shuffle_buffer: int = 256,
        num_decode_threads: int = 2,
        prefetch_batches: int = 2,
        endpoint_url: str = "",
        exclude_clips: frozenset[str] = frozenset(),
        note: Any = None,
        clips: np.ndarray | None = None,
    ):
        for name, value, minimum in (
            ("world_size", world_size, 1),
            ("seed", seed, 0),
            ("batch_size", batch_size, 1),
            ("frames", frames, 1),
            ("sample_rate", sample_rate, 1),
            ("shuffle_buffer", shuffle_buffer, 1),
            ("num_decode_threads", num_decode_threads, 1),
            ("prefetch_batches", prefetch_batches, 1),
        ):
            if value < minimum:
                raise ValueError(f"ClipReader {name}: must be >= {minimum}, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ClipReader rank: must be in [0, {world_size}), got {rank}")
        if seconds <= 0:
            raise ValueError(f"ClipReader seconds: must be > 0, got {seconds}")
        if split is not None and not split:
            raise ValueError("ClipReader split: must be a split name or None (all rows), got ''")
        self.uri = uri
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.batch_size = batch_size
        self.frames = frames
        self.num_samples = round(seconds * sample_rate)
        self.sample_rate = sample_rate
        self.split = split
        self.shuffle_buffer = shuffle_buffer
        self.num_decode_threads = num_decode_threads
        self.prefetch_batches = prefetch_batches
        self.endpoint_url = endpoint_url
        self.exclude_clips = frozenset(exclude_clips)
        self.note = note
        self.clips = None if clips is None else np.unique(np.asarray(clips, dtype=np.int64))

        self.manifest = read_manifest(uri, endpoint_url=endpoint_url)
        self.has_video = self.manifest.has_video
        self.has_audio = self.manifest.has_audio
        self._offsets = np.cumsum([0] + [s.rows for s in self.manifest.shards])
        self._shard_indices = self._select_rows()
        self._in_split = np.zeros(self.manifest.num_clips, dtype=bool)
        for indices in self._shard_indices:
            self._in_split[indices] = True
        self.num_clips = int(self._in_split.sum())
        where = f"split {split!r} of {uri}" if split is not None else uri
        if self.num_clips == 0:
            raise DataError(f"no clips to read in {where}")
        if self.num_clips < world_size:
            raise DataError(f"{where} has {self.num_clips} clips, fewer than the {world_size} ranks reading it")
        shas = "".join(s.sha256 for s in self.manifest.shards)
        chosen = "" if self.clips is None else "|" + hashlib.sha256(self.clips.tobytes()).hexdigest()
        self._fingerprint = hashlib.sha256(f"{shas}|{split}{chosen}".encode()).hexdigest()[:16]
        self._units_by_world: dict[int, list[np.ndarray]] = {}

        self.num_skipped = 0
        self._epoch = 0
        self._position = 0
        self._consumed = np.zeros(self.manifest.num_clips, dtype=bool)
        self._excluded: np.ndarray | None = None  # clips taken out of this epoch's plan by a re-partition
        self._pipeline: _Pipeline | None = None
        self._failure: BaseException | None = None

    # --- planning -------------------------------------------------------------------------

    def _select_rows(self) -> list[np.ndarray]:
        """Per shard, the global indices of its rows in `split` (all rows when None), or of
        the rows `clips` names."""
        shards = self.manifest.shards
        whole = [np.arange(self._offsets[i], self._offsets[i + 1]) for i in range(len(shards))]
        if self.clips is not None:
            return [indices[np.isin(indices, self.clips)] for indices in whole]
        if self.split is None or self.manifest.splits.get(self.split) == self.manifest.num_clips:
            return whole
        if self.split not in self.manifest.splits:
            known = ", ".join(f"{name or '(none)'} {n}" for name, n in sorted(self.manifest.splits.items()))
            raise DataError(f"no clips to read in split {self.split!r} of {self.uri} (its splits: {known})")

        def rows_in_split(i: int) -> np.ndarray:
            column = read_shard_columns(self.uri, shards[i], ["split"], endpoint_url=self.endpoint_url)["split"]
            hits = pc.fill_null(pc.equal(column, self.split), False)
            return self._offsets[i] + np.flatnonzero(hits.to_numpy(zero_copy_only=False))

        with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
            return list(pool.map(rows_in_split, range(len(shards))))

    def _units(self, world_size: int) -> list[np.ndarray]:
        """The units dealt to ranks: whole shards, or shards cut into contiguous row ranges
        when there are too few shards for `world_size` ranks to get one each."""
        if world_size not in self._units_by_world:
            shards = [indices for indices in self._shard_indices if len(indices)]
            if sum(len(indices) for indices in shards) < world_size:
                raise DataError(f"{self.uri} has fewer clips than the {world_size} ranks reading it")
            pieces = -(-world_size // len(shards))
            while True:
                units = [part for indices in shards for part in np.array_split(indices, min(pieces, len(indices)))]
                if len(units) >= world_size:
                    break
                pieces += 1
            self._units_by_world[world_size] = units
        return self._units_by_world[world_size]

    def _share(self, epoch: int, rank: int, world_size: int) -> np.ndarray:
        """Rank `rank`'s clips of `epoch` in unit order, before the shuffle buffer."""
        units = self._units(world_size)
        order = np.random.default_rng([self.seed, epoch, _UNIT_ORDER]).permutation(len(units))
        return np.concatenate([units[u] for u in order[rank::world_size]])

    def _plan(self, epoch: int, excluded: np.ndarray | None) -> np.ndarray:
        """This rank's clip indices of `epoch` in the order it reads them."""
        share = self._share(epoch, self.rank, self.world_size)
        if excluded is not None:
            share = share[~excluded[share]]
        rng = np.random.default_rng([self.seed, epoch, _ROW_BUFFER, self.rank])
        return bounded_shuffle(share, self.shuffle_buffer, rng)

    def _shard_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._offsets, indices, side="right") - 1

    def _items(self, epoch: int, position: int, excluded: np.ndarray | None, cache: _ShardCache) -> Iterator[_Item]:
        """Planned positions from the cursor on, forever; tells the cache what is coming."""
        while True:
            plan = self._plan(epoch, excluded)[position:]
            shards = self._shard_of(plan)
            cache.expect(collections.Counter(shards.tolist()))
            _, first = np.unique(shards, return_index=True)
            arrival = shards[np.sort(first)].tolist()  # shards in the order the plan first needs them
            following = dict(itertools.pairwise(arrival))
            for offset, (index, shard) in enumerate(zip(plan.tolist(), shards.tolist())):
                if shard in following:  # first row of this shard: start fetching the next one
                    cache.prefetch(following.pop(shard))
                yield _Item(epoch=epoch, position=position + offset, index=index, shard=shard)
            epoch, position, excluded = epoch + 1, 0, None

    # --- loading (decode threads) ---------------------------------------------------------

    def _fetch(self, shard: int) -> pa.Table:
        return read_shard(self.uri, self.manifest.shards[shard], endpoint_url=self.endpoint_url)

    def _load(self, item: _Item, cache: _ShardCache) -> _Loaded:
        try:
            table = cache.get(item.shard)  # a missing or tampered shard raises here: fatal
            in_shard = item.index - int(self._offsets[item.shard])
            row = table.slice(in_shard, 1).to_pylist()[0]
            clip_id = str(row.get("clip_id"))
            if clip_id in self.exclude_clips:
                return _Loaded(item=item, clip=None, clip_id=clip_id, reason="excluded by data.exclude_clips")
            if self.note is not None:
                self.note.started(item.index, self.manifest.shards[item.shard].name, in_shard, clip_id)
            try:
                clip = decode_row(
                    row,
                    frames=self.frames,
                    num_samples=self.num_samples,
                    sample_rate=self.sample_rate,
                    video=self.has_video,
                    audio=self.has_audio,
                )
            except Exception as err:  # a bad row costs that row only, whatever went wrong in it
                return _Loaded(item=item, clip=None, clip_id=clip_id, reason=str(err))
            finally:
                if self.note is not None:
                    self.note.finished(item.index)
            return _Loaded(item=item, clip=clip, clip_id=clip.clip_id)
        finally:
            cache.release(item.shard)

    def _collate(self, loaded: list[_Loaded]) -> dict[str, Any]:
        clips = [x.clip for x in loaded]
        assert all(c is not None for c in clips)
        frames = None
        if self.has_video:
            height = min(c.frames.shape[1] for c in clips)
            width = min(c.frames.shape[2] for c in clips)
            frames = torch.from_numpy(np.stack([_centre_crop(c.frames, height, width) for c in clips]))
        audio = torch.from_numpy(np.stack([c.audio for c in clips])) if self.has_audio else None
        return {
            "frames": frames,
            "audio": audio,
            "index": torch.tensor([x.item.index for x in loaded], dtype=torch.int64),
            "label": torch.tensor([c.label for c in clips], dtype=torch.int64),
            "clip_id": [c.clip_id for c in clips],
            "epoch": loaded[-1].item.epoch,
        }

    # --- iteration and cursor -------------------------------------------------------------

    def __iter__(self) -> ClipReader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._failure is not None:
            raise self._failure
        if self._pipeline is None:
            self._pipeline = _Pipeline(self, self._epoch, self._position, self._excluded)
        batch = self._pipeline.next()
        if isinstance(batch, BaseException):
            self._failure = batch
            self._stop_pipeline()
            raise batch
        for item in batch.items:
            if item.epoch != self._epoch:
                self._epoch, self._position, self._excluded = item.epoch, 0, None
                self._consumed[:] = False
            assert item.position == self._position, (item, self._position)
            self._position += 1
            self._consumed[item.index] = True
        for skipped in batch.skipped:
            self.num_skipped += 1
            logger.warning(
                "skipped clip %s (row of %s): %s; %d skipped so far",
                skipped.clip_id,
                shard_uri(self.uri, self.manifest.shards[skipped.item.shard]),
                skipped.reason,
                self.num_skipped,
            )
        return batch.tensors

    @property
    def epoch(self) -> int:
        """The cursor's epoch: that of the last clip handed out (0 before the first batch)."""
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        """This rank's cursor: plain JSON-friendly values, a few hundred bytes for small sets
        (the consumed bitmap is compressed; one bit per clip at worst)."""
        return {
            "version": STATE_VERSION,
            "data": self._fingerprint,  # which shards (by sha256) and split the positions refer to
            "split": self.split,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": self._epoch,
            "position": self._position,
            "consumed": _pack(self._consumed),
            "excluded": None if self._excluded is None else _pack(self._excluded),
            "num_skipped": self.num_skipped,
        }

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Continue from every rank's saved cursor (`states[r]` is rank r's `state_dict()`)."""
        states = list(states)
        if not states:
            raise ValueError("ClipReader.load_state_dict: no saved cursors given")
        for r, state in enumerate(states):
            self._check_state(state, r, len(states))
        self._stop_pipeline()
        self._failure = None
        n = self.manifest.num_clips
        if len(states) == self.world_size:
            state = states[self.rank]
            excluded = None if state["excluded"] is None else _unpack(state["excluded"], n, "excluded")
            if state["position"] > len(self._plan(state["epoch"], excluded)):
                raise ValueError(f"reader state of rank {self.rank}: position {state['position']} is past its epoch")
            self._epoch, self._position, self._excluded = state["epoch"], state["position"], excluded
            self._consumed = _unpack(state["consumed"], n, "consumed")
            self.num_skipped = state["num_skipped"]
            return
        # Another world size: re-partition what is left of the earliest epoch any rank is in.
        epoch = min(state["epoch"] for state in states)
        remaining = np.zeros(n, dtype=bool)
        for state in states:
            if state["epoch"] != epoch:
                continue
            planned = np.zeros(n, dtype=bool)
            planned[self._share(epoch, state["rank"], len(states))] = True
            if state["excluded"] is not None:
                planned &= ~_unpack(state["excluded"], n, "excluded")
            remaining |= planned & ~_unpack(state["consumed"], n, "consumed")
        self._epoch, self._position = epoch, 0
        self._excluded = self._in_split & ~remaining
        self._consumed = np.zeros(n, dtype=bool)
        # The run's skip count survives on rank 0, so the sum over ranks stays right.
        self.num_skipped = sum(state["num_skipped"] for state in states) if self.rank == 0 else 0

    def _check_state(self, state: dict[str, Any], rank: int, world_size: int) -> None:
        keys = (
            *("version", "data", "split", "seed", "rank", "world_size"),
            *("epoch", "position", "consumed", "excluded", "num_skipped"),
        )
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"reader state of rank {rank}: missing {', '.join(missing)}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"reader state of rank {rank}: version {state['version']} is not {STATE_VERSION}")
        if state["rank"] != rank or state["world_size"] != world_size:
            raise ValueError(
                f"reader states: entry {rank} is rank {state['rank']} of {state['world_size']}, expected rank "
                f"{rank} of {world_size} (pass every rank's state, in rank order)"
            )
        if state["seed"] != self.seed:
            raise ValueError(
                f"reader seed: the cursor was saved with seed {state['seed']}, this reader has {self.seed}"
            )
        if state["data"] != self._fingerprint:
            raise DataError(
                f"the reader cursor of rank {rank} was saved for another data set or split "
                f"(split {state['split']!r}) than {self.uri} (split {self.split!r})"
            )

    # --- lifetime -------------------------------------------------------------------------

    def _stop_pipeline(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None

    def close(self) -> None:
        """Stop the background threads. The cursor stays valid; iterating again restarts them."""
        self._stop_pipeline()

    def __enter__(self) -> ClipReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def training_reader(
    cfg: Config,
    *,
    uri: str,
    rank: int = 0,
    world_size: int = 1,
    split: str | None = None,
    endpoint_url: str = "",
    note: Any = None,
) -> ClipReader:
    """The reader a training run of `cfg` gives one rank: the recipe's batch, frames, audio,
    shuffle buffer, decode threads, prefetch and `data.exclude_clips`."""
    return ClipReader(
        uri=uri,
        rank=rank,
        world_size=world_size,
        seed=cfg.train.seed,
        batch_size=cfg.train.batch_size,
        frames=cfg.model.video.frames,
        seconds=cfg.data.clip_seconds,
        sample_rate=cfg.data.sample_rate,
        split=split,
        shuffle_buffer=cfg.data.shuffle_buffer,
        num_decode_threads=cfg.data.num_decode_threads,
        prefetch_batches=cfg.data.prefetch_batches,
        endpoint_url=endpoint_url,
        exclude_clips=frozenset(clip for clip in cfg.data.exclude_clips.split(",") if clip.strip()),
        note=note,
    )


def first_seen(index: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Positions in a batch's `index` of clips `seen` (a bool per clip index) does not hold
    yet, which it then holds. A reader runs on into its next epochs, and a batch larger than
    an epoch holds a clip more than once: each counts once. For passes over every clip once
    (evaluation)."""
    positions = []
    for position, clip in enumerate(index.tolist()):
        if not seen[clip]:
            seen[clip] = True
            positions.append(position)
    return torch.tensor(positions, dtype=torch.int64)


def _centre_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    top = (frames.shape[1] - height) // 2
    left = (frames.shape[2] - width) // 2
    return frames[:, top : top + height, left : left + width]


class _Pipeline:
    """The background half of a reader: one thread keeps decode tasks in flight in plan order
    and assembles full batches into a bounded queue; a pool decodes, a small pool fetches."""

    def __init__(self, reader: ClipReader, epoch: int, position: int, excluded: np.ndarray | None):
        self._reader = reader
        self._stop = threading.Event()
        self._queue: queue.Queue[_Batch | BaseException] = queue.Queue(maxsize=reader.prefetch_batches)
        self._fetch_pool = ThreadPoolExecutor(max_workers=_FETCH_THREADS, thread_name_prefix="cmacc-fetch")
        self._decode_pool = ThreadPoolExecutor(max_workers=reader.num_decode_threads, thread_name_prefix="cmacc-decode")
        self._cache = _ShardCache(reader._fetch, self._fetch_pool)
        self._start = (epoch, position, excluded)
        self._thread = threading.Thread(target=self._run, name="cmacc-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._produce()
        except BaseException as err:
            if not self._stop.is_set():
                self._put(err)

    def _put(self, entry: _Batch | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        reader = self._reader
        items = reader._items(*self._start, self._cache)
        # Enough rows in flight to keep every decode thread busy across a batch boundary.
        window = max(reader.batch_size, 4 * reader.num_decode_threads)
        pending: collections.deque[Future] = collections.deque()
        consumed: list[_Item] = []
        good: list[_Loaded] = []
        skipped: list[_Loaded] = []
        epoch, read_in_epoch, good_in_epoch = self._start[0], 0, 0
        whole_epoch = self._start[1] == 0
        while not self._stop.is_set():
            while len(pending) < window:
                pending.append(self._decode_pool.submit(reader._load, next(items), self._cache))
            loaded = pending.popleft().result()
            if loaded.item.epoch != epoch:
                if whole_epoch and read_in_epoch and not good_in_epoch:
                    raise DataError(
                        f"none of the {read_in_epoch} clips planned for rank {reader.rank} in epoch {epoch} "
                        f"of {reader.uri} could be decoded; see the warnings for the reasons"
                    )
                epoch, read_in_epoch, good_in_epoch, whole_epoch = loaded.item.epoch, 0, 0, True
            read_in_epoch += 1
            consumed.append(loaded.item)
            if loaded.clip is None:
                skipped.append(loaded)
                continue
            good_in_epoch += 1
            good.append(loaded)
            if len(good) == reader.batch_size:
                if not self._put(_Batch(items=consumed, skipped=skipped, tensors=reader._collate(good))):
                    return
                consumed, good, skipped = [], [], []

    def next(self) -> _Batch | BaseException:
        """The next batch, or the error that stopped the pipeline."""
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return RuntimeError(f"the reader thread for {self._reader.uri} stopped without a reason")

    def close(self) -> None:
        self._stop.set()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self._thread.join()
        self._decode_pool.shutdown(wait=True)
        self._fetch_pool.shutdown(wait=True)
