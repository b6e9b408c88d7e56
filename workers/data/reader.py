"""`ClipReader`: the deterministic, resumable clip-shard reader used inside each training worker.

It ties three parts together: the epoch plan (`workers.data.plan`: which clips a rank reads
in which order, from (seed, stream, epoch, rank, world size) alone), the cursor
(`workers.data.cursor`: how far the rank got, as a checkpoint keeps it) and the decode
pipeline (`workers.data.pipeline`: background threads fetch shards whole, checked against
the manifest's sha256, decode the planned rows in plan order and keep `prefetch_batches`
batches ready).

The stream is infinite: epoch e + 1 follows e inside the same batch if need be, and every
batch holds exactly `batch_size` clips. So every rank can produce any number of steps and
ranks never disagree on how many steps there are, even when their shares of an epoch differ
in size (units are whole shards) or when some rows are skipped; their epoch boundaries then
fall at slightly different steps. The clip's global index is its position in manifest order.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from service.config import Config
from service.storage import DEFAULT_RETRY_BUDGET_S
from workers.data.cursor import Cursor, check_state, resume_cursor
from workers.data.decode import decode_on_device
from workers.data.format import DataError, read_manifest, read_shard_columns, shard_uri
from workers.data.pipeline import DecodePipeline, Item, RowDecoder, ShardCache
from workers.data.plan import EpochPlanner

logger = logging.getLogger(__name__)


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
        null; `source`: int64 [B], the clip's source file as an id (`pipeline.source_id`);
        `clip_id`: list[str]; `epochs`: list[int], each clip's epoch; `epoch`: int, the epoch of
        the batch's last clip (the cursor's epoch after this batch).
      * with `decode="device"`: `frames` is None and `jpeg` holds the batch's frames still
        encoded, their headers checked (`pipeline.encode_batch`); the worker decodes them on
        its device in one call (`decode.decode_batch`, through `transforms.Transforms`) into
        exactly the `frames` the CPU path gives (with the CPU's decoder).

    `state_dict()` is this rank's cursor; `load_state_dict(states)` takes every rank's saved
    cursor: with the same world size the rank continues at exactly the next clip; with another
    world size the earliest saved epoch continues over the clips no rank consumed yet,
    re-partitioned across the new ranks (`workers.data.cursor`).

    A row that cannot be decoded, or whose clip id is in `exclude_clips`, is skipped, counted
    in `num_skipped` and logged as a warning naming the clip; a missing shard or one that
    differs from the manifest raises `DataError` naming the shard URI from the next `next()`.
    Call `close()` (or use `with`) to stop the background threads. `clips`, when given,
    limits the reader to those clip indices (manifest order; `split` is then not used).
    `stream` keeps independent streams over the same data apart (same seed, other order).
    `uniform`: every window of the stream is a uniform draw from the whole set (the epoch a
    uniform permutation of single clips, `plan.EpochPlanner`), read through a shard cache of
    at most `cache_mb` MiB (the fresh pool's extra clips). `note`: see `pipeline.RowDecoder`.
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
        retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
        exclude_clips: frozenset[str] = frozenset(),
        note: Any = None,
        clips: np.ndarray | None = None,
        stream: int = 0,
        decode: str = "cpu",
        uniform: bool = False,
        cache_mb: float = 1024.0,
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
            ("stream", stream, 0),
        ):
            if value < minimum:
                raise ValueError(f"ClipReader {name}: must be >= {minimum}, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ClipReader rank: must be in [0, {world_size}), got {rank}")
        if seconds <= 0:
            raise ValueError(f"ClipReader seconds: must be > 0, got {seconds}")
        if cache_mb <= 0:
            raise ValueError(f"ClipReader cache_mb: must be > 0, got {cache_mb}")
        if decode not in ("cpu", "device"):
            raise ValueError(f"ClipReader decode: must be 'cpu' or 'device', got {decode!r}")
        if split is not None and not split:
            raise ValueError("ClipReader split: must be a split name or None (all rows), got ''")
        self.uri = uri
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.batch_size = batch_size
        self.split = split
        self.stream = stream
        self.decode = decode
        self.uniform = uniform
        self.cache_bytes = round(cache_mb * 2**20) if uniform else None
        self.num_decode_threads = num_decode_threads
        self.prefetch_batches = prefetch_batches
        self.endpoint_url = endpoint_url
        self.retry_budget_s = retry_budget_s
        self.clips = None if clips is None else np.unique(np.asarray(clips, dtype=np.int64))

        self.manifest = read_manifest(uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
        self.has_video = self.manifest.has_video
        self.has_audio = self.manifest.has_audio
        self.decoder = RowDecoder(
            uri=uri,
            manifest=self.manifest,
            frames=frames,
            num_samples=round(seconds * sample_rate),
            sample_rate=sample_rate,
            endpoint_url=endpoint_url,
            retry_budget_s=retry_budget_s,
            exclude_clips=frozenset(exclude_clips),
            note=note,
            on_device=decode == "device",
        )
        shard_indices = self._select_rows()
        self._in_split = np.zeros(self.manifest.num_clips, dtype=bool)
        for indices in shard_indices:
            self._in_split[indices] = True
        self.num_clips = int(self._in_split.sum())
        where = f"split {split!r} of {uri}" if split is not None else uri
        if self.num_clips == 0:
            raise DataError(f"no clips to read in {where}")
        if self.num_clips < world_size:
            raise DataError(f"{where} has {self.num_clips} clips, fewer than the {world_size} ranks reading it")
        shas = "".join(s.sha256 for s in self.manifest.shards)
        chosen = "" if self.clips is None else "|" + hashlib.sha256(self.clips.tobytes()).hexdigest()
        extra = "" if stream == 0 else f"|stream {stream}"
        which = f"{shas}|{split}{chosen}{extra}"
        self._shard_plan_fingerprint = hashlib.sha256(which.encode()).hexdigest()[:16]
        # A uniform plan orders the clips otherwise: a cursor saved on the shard plan is not its.
        self._fingerprint = (
            hashlib.sha256(f"{which}|uniform".encode()).hexdigest()[:16] if uniform else self._shard_plan_fingerprint
        )
        self.planner = EpochPlanner(
            shard_indices=shard_indices,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            stream=stream,
            uniform=uniform,
            where=uri,
        )
        self.cursor = Cursor.start(self.manifest.num_clips)
        if uniform:
            self._warn_if_the_cache_is_small()
        self._pipeline: DecodePipeline | None = None
        self._failure: BaseException | None = None

    # --- planning -------------------------------------------------------------------------

    def _warn_if_the_cache_is_small(self) -> None:
        """A uniform stream reads every shard throughout an epoch: when the set is larger than
        the cache, a clip's shard is often gone again and is read whole once more."""
        total = sum(shard.bytes for shard in self.manifest.shards)
        assert self.cache_bytes is not None
        if total <= self.cache_bytes:
            return
        miss = 1 - self.cache_bytes / total
        per_batch = self.batch_size * miss * total / len(self.manifest.shards)
        logger.warning(
            "the uniform stream %d of %s reads clips from all %d shards (%.0f MiB) through a cache of %.0f MiB: "
            "about %.0f%% of its clips will read their shard again, about %.0f MiB per batch of %d; raise "
            "data.extra_cache_mb, write the set in smaller shards, or use method.pool=stream (docs/scaling.md)",
            self.stream,
            self.uri,
            len(self.manifest.shards),
            total / 2**20,
            self.cache_bytes / 2**20,
            100 * miss,
            per_batch / 2**20,
            self.batch_size,
        )

    def _select_rows(self) -> list[np.ndarray]:
        """Per shard, the global indices of its rows in `split` (all rows when None), or of
        the rows `clips` names."""
        shards = self.manifest.shards
        offsets = self.decoder.offsets
        whole = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(shards))]
        if self.clips is not None:
            return [indices[np.isin(indices, self.clips)] for indices in whole]
        if self.split is None or self.manifest.splits.get(self.split) == self.manifest.num_clips:
            return whole
        if self.split not in self.manifest.splits:
            known = ", ".join(f"{name or '(none)'} {n}" for name, n in sorted(self.manifest.splits.items()))
            raise DataError(f"no clips to read in split {self.split!r} of {self.uri} (its splits: {known})")

        def rows_in_split(i: int) -> np.ndarray:
            column = read_shard_columns(
                self.uri, shards[i], ["split"], endpoint_url=self.endpoint_url, retry_budget_s=self.retry_budget_s
            )["split"]
            hits = pc.fill_null(pc.equal(column, self.split), False)
            return offsets[i] + np.flatnonzero(hits.to_numpy(zero_copy_only=False))

        with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
            return list(pool.map(rows_in_split, range(len(shards))))

    def _shard_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.decoder.offsets, indices, side="right") - 1

    def _items(self, epoch: int, position: int, only: np.ndarray | None, cache: ShardCache) -> Iterator[Item]:
        """Planned positions from the cursor on, forever; tells the cache what is coming."""
        while True:
            plan = self.planner.plan(epoch, self.rank, self.world_size, only)[position:]
            shards = self._shard_of(plan)
            cache.expect(collections.Counter(shards.tolist()))
            _, first = np.unique(shards, return_index=True)
            arrival = shards[np.sort(first)].tolist()  # shards in the order the plan first needs them
            # A scattered (uniform) plan needs every shard at once: the decode window fetches them.
            following = {} if self.uniform else dict(itertools.pairwise(arrival))
            for offset, (index, shard) in enumerate(zip(plan.tolist(), shards.tolist())):
                if shard in following:  # first row of this shard: start fetching the next one
                    cache.prefetch(following.pop(shard))
                yield Item(epoch=epoch, position=position + offset, index=index, shard=shard)
            epoch, position, only = epoch + 1, 0, None

    # --- iteration and cursor -------------------------------------------------------------

    def __iter__(self) -> ClipReader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._failure is not None:
            raise self._failure
        if self._pipeline is None:
            start = (self.cursor.epoch, self.cursor.position, self.cursor.only)
            self._pipeline = DecodePipeline(
                self.decoder,
                lambda cache: self._items(*start, cache),
                batch_size=self.batch_size,
                num_decode_threads=self.num_decode_threads,
                prefetch_batches=self.prefetch_batches,
                start_epoch=self.cursor.epoch,
                whole_epoch=self.cursor.position == 0,
                rank=self.rank,
                cache_bytes=self.cache_bytes,
            )
        batch = self._pipeline.next()
        if isinstance(batch, BaseException):
            self._failure = batch
            self._stop_pipeline()
            raise batch
        for item in batch.items:
            self.cursor.advance(item.epoch, item.position, item.index)
        for skipped in batch.skipped:
            self.cursor.num_skipped += 1
            logger.warning(
                "skipped clip %s (row of %s): %s; %d skipped so far",
                skipped.clip_id,
                shard_uri(self.uri, self.manifest.shards[skipped.item.shard]),
                skipped.reason,
                self.cursor.num_skipped,
            )
        return batch.tensors

    @property
    def epoch(self) -> int:
        """The cursor's epoch: that of the last clip handed out (0 before the first batch)."""
        return self.cursor.epoch

    @property
    def num_skipped(self) -> int:
        return self.cursor.num_skipped

    def state_dict(self) -> dict[str, Any]:
        """This rank's cursor (`workers.data.cursor`)."""
        return self.cursor.to_state(
            fingerprint=self._fingerprint, split=self.split, seed=self.seed, rank=self.rank, world_size=self.world_size
        )

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Continue from every rank's saved cursor (`states[r]` is rank r's `state_dict()`)."""
        states = list(states)
        if not states:
            raise ValueError("ClipReader.load_state_dict: no saved cursors given")
        where = f"{self.uri} (split {self.split!r})"
        if self.uniform and all(state.get("data") == self._shard_plan_fingerprint for state in states):
            # Saved by a version whose extra stream followed the shard plan: its positions mean
            # other clips here. The stream starts over (candidates only: nothing else changes).
            logger.warning(
                "the reader cursor of %s was saved on the shard plan; this uniform stream starts over", where
            )
            self._stop_pipeline()
            self._failure = None
            self.cursor = Cursor.start(self.manifest.num_clips)
            return
        for r, state in enumerate(states):
            check_state(
                state, rank=r, world_size=len(states), seed=self.seed, fingerprint=self._fingerprint, where=where
            )
        self._stop_pipeline()
        self._failure = None
        self.cursor = resume_cursor(
            states, planner=self.planner, rank=self.rank, world_size=self.world_size, in_split=self._in_split
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
    batch_size: int | None = None,
    split: str | None = None,
    endpoint_url: str = "",
    note: Any = None,
    stream: int = 0,
    device: torch.device | str = "cpu",
) -> ClipReader:
    """The reader a training run of `cfg` gives one rank: `batch_size` clips a step (default
    the run's per-rank batch), the recipe's frames, audio, shuffle buffer, decode threads,
    prefetch, `data.exclude_clips` and the run's storage retry budget. `stream` 1 is the
    fresh candidate pool's extra clips: a uniform stream, its shard cache bounded by
    `data.extra_cache_mb`. `data.decode` on the rank's `device` says whether
    the JPEG frames are decoded here or handed on encoded (`decode.decode_on_device`)."""
    return ClipReader(
        uri=uri,
        rank=rank,
        world_size=world_size,
        seed=cfg.train.seed,
        batch_size=batch_size or cfg.train.batch_size,
        frames=cfg.model.video.frames,
        seconds=cfg.data.clip_seconds,
        sample_rate=cfg.data.sample_rate,
        split=split,
        shuffle_buffer=cfg.data.shuffle_buffer,
        num_decode_threads=cfg.data.num_decode_threads,
        prefetch_batches=cfg.data.prefetch_batches,
        endpoint_url=endpoint_url,
        retry_budget_s=cfg.storage.retry_budget_s,
        exclude_clips=frozenset(clip for clip in cfg.data.exclude_clips.split(",") if clip.strip()),
        note=note,
        stream=stream,
        decode="device" if decode_on_device(cfg.data.decode, device) else "cpu",
        uniform=stream != 0,
        cache_mb=cfg.data.extra_cache_mb,
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
