"""How a reader plans an epoch, on clip indices only, before any byte is read: small named
algorithms, each a pure function of its arguments (docs/architecture.md, "Data").

1. `deal_units`: the data set's clips (per shard, those the reader reads) are grouped into
   units: one unit per shard or, when there are fewer shards than ranks, each shard cut into
   contiguous row ranges so that every rank gets at least one unit.
2. `rank_share`: the unit order of epoch e is a permutation drawn from (seed, e); units go to
   ranks round-robin (rank r takes positions r, r + W, r + 2W, ...).
3. `bounded_shuffle`: a rank's rows, unit after unit, pass through a bounded shuffle buffer
   driven by an RNG from (seed, e, rank). The result is the rank's plan for the epoch.
4. `deal_remaining`: after a change of world size, the clips of the interrupted epoch that
   no rank consumed, in the new world's unit order, cut into W' contiguous blocks whose
   sizes differ by at most one: every new rank gets its fair part of what is left.

A plan depends only on (seed, stream, epoch, rank, world size), so a reader's cursor is just
(epoch, planned positions consumed). `stream` keeps independent streams over the same data
apart (the training batches are stream 0; the fresh candidate pool's extra clips stream 1).

A `uniform` planner (the fresh pool's extra clips) deals single clips instead of shards: the
epoch's order is a uniform permutation of every clip, rank r reads positions r, r + W, ... of
it, and no shuffle buffer follows. Any window of its plan is then a uniform draw from the
whole set, whatever shards and rows the training stream reads at the same step; the reads
are scattered over the shards (`workers.data.pipeline.ShardCache` keeps a bounded set).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from service.errors import DataError

# Tags that keep the RNG streams of the unit order and of the shuffle buffer apart.
UNIT_ORDER = 0
ROW_BUFFER = 1


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


def deal_units(shard_indices: list[np.ndarray], world_size: int, *, where: str) -> list[np.ndarray]:
    """The units dealt to ranks: whole shards (their clip indices), or shards cut into
    contiguous row ranges when there are too few shards for `world_size` ranks to get one each.
    DataError naming `where` when there are fewer clips than ranks."""
    shards = [indices for indices in shard_indices if len(indices)]
    if sum(len(indices) for indices in shards) < world_size:
        raise DataError(f"{where} has fewer clips than the {world_size} ranks reading it")
    pieces = -(-world_size // len(shards))
    while True:
        units = [part for indices in shards for part in np.array_split(indices, min(pieces, len(indices)))]
        if len(units) >= world_size:
            return units
        pieces += 1


def _rng(seed: int, epoch: int, tag: int, *more: int, stream: int = 0) -> np.random.Generator:
    # Stream 0 keeps the keys it always had, so the training order of existing runs is unchanged.
    keys = [seed, epoch, tag, *more] if stream == 0 else [seed, epoch, tag, *more, 1_000 + stream]
    return np.random.default_rng(keys)


def rank_share(
    units: list[np.ndarray], *, seed: int, epoch: int, rank: int, world_size: int, stream: int = 0
) -> np.ndarray:
    """Rank `rank`'s clips of `epoch` in unit order, before the shuffle buffer."""
    order = _rng(seed, epoch, UNIT_ORDER, stream=stream).permutation(len(units))
    return np.concatenate([units[u] for u in order[rank::world_size]])


def shuffle_share(
    share: np.ndarray, *, seed: int, epoch: int, rank: int, buffer_size: int, stream: int = 0
) -> np.ndarray:
    """A rank's share of an epoch in the order it reads it."""
    return bounded_shuffle(share, buffer_size, _rng(seed, epoch, ROW_BUFFER, rank, stream=stream))


@dataclass(kw_only=True)
class EpochPlanner:
    """The plans of one data set's clips (`shard_indices`: per shard, the global indices of the
    clips read) for any epoch, rank and world size. Units are computed once per world size."""

    shard_indices: list[np.ndarray]
    seed: int
    shuffle_buffer: int
    stream: int = 0
    uniform: bool = False  # single clips as units, no shuffle buffer: each window a uniform draw
    where: str = "the data set"  # names the data in errors
    _units: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False)
    _clips: np.ndarray | None = field(default=None, repr=False)

    def units(self, world_size: int) -> list[np.ndarray]:
        if world_size not in self._units:
            self._units[world_size] = deal_units(self.shard_indices, world_size, where=self.where)
        return self._units[world_size]

    def share(self, epoch: int, rank: int, world_size: int) -> np.ndarray:
        """Rank `rank`'s clips of `epoch` (unit order)."""
        if self.uniform:
            if self._clips is None:
                self._clips = np.concatenate([np.asarray(i, dtype=np.int64) for i in self.shard_indices])
                if len(self._clips) < world_size:
                    raise DataError(f"{self.where} has fewer clips than the {world_size} ranks reading it")
            order = _rng(self.seed, epoch, UNIT_ORDER, stream=self.stream).permutation(len(self._clips))
            return self._clips[order[rank::world_size]]
        return rank_share(
            self.units(world_size), seed=self.seed, epoch=epoch, rank=rank, world_size=world_size, stream=self.stream
        )

    def epoch_order(self, epoch: int, world_size: int) -> np.ndarray:
        """Every clip of `epoch` in unit order: rank 0's share, then rank 1's, ..."""
        return np.concatenate([self.share(epoch, r, world_size) for r in range(world_size)])

    def plan(self, epoch: int, rank: int, world_size: int, only: np.ndarray | None = None) -> np.ndarray:
        """Rank `rank`'s clip indices of `epoch` in the order it reads them: its share, or,
        in an epoch re-partitioned after a change of world size, exactly the clips `only` (a
        bool per clip index) marks, in the epoch's unit order (`deal_remaining`)."""
        if only is None:
            share = self.share(epoch, rank, world_size)
        else:
            order = self.epoch_order(epoch, world_size)
            share = order[only[order]]
        if self.uniform:  # already a uniform order
            return share
        return shuffle_share(
            share, seed=self.seed, epoch=epoch, rank=rank, buffer_size=self.shuffle_buffer, stream=self.stream
        )


def deal_remaining(planner: EpochPlanner, remaining: np.ndarray, *, epoch: int, world_size: int) -> list[np.ndarray]:
    """Per new rank, the bool mask (per clip index) of the clips of `epoch` it reads: the
    clips `remaining` marks, in the epoch's unit order for `world_size` ranks, dealt in
    contiguous blocks of equal size (to one clip), which keeps each rank's reads in few shards."""
    order = planner.epoch_order(epoch, world_size)
    left = order[remaining[order]]
    masks = []
    for block in np.array_split(left, world_size):
        mask = np.zeros(len(remaining), dtype=bool)
        mask[block] = True
        masks.append(mask)
    return masks
