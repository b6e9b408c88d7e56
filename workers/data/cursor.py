"""A reader's cursor: where one rank is in the data, as a checkpoint keeps it.

Because a rank's plan of an epoch depends only on (seed, stream, epoch, rank, world size)
(`workers.data.plan`), the cursor is (epoch, planned positions consumed) plus a bitmap of the
clips consumed this epoch, whatever the decode threads hold in flight. A cursor saved by W
ranks continues on W ranks at exactly the next clip, and on W' != W ranks over the clips of
the interrupted epoch that no rank consumed, dealt evenly over the new ranks: none twice,
none lost, each rank a share of equal size (to one clip).
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import DataError
from workers.data.plan import EpochPlanner, deal_remaining

# Version 2: a re-partitioned epoch is stored as the clips the rank reads (`only`); version 1
# stored the clips taken out of its share (`excluded`) and is read by converting it.
STATE_VERSION = 2
STATE_KEYS = (
    *("version", "data", "split", "seed", "rank", "world_size"),
    *("epoch", "position", "consumed", "only", "num_skipped"),
)
V1_KEYS = tuple("excluded" if key == "only" else key for key in STATE_KEYS)


def pack_bits(mask: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.packbits(mask).tobytes(), 6)).decode("ascii")


def unpack_bits(text: str, length: int, what: str) -> np.ndarray:
    try:
        bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    except (ValueError, zlib.error) as err:
        raise ValueError(f"reader state: {what} is not a packed bitmap ({err})") from None
    if len(bits) * 8 < length:
        raise ValueError(f"reader state: {what} covers {len(bits) * 8} clips, the data set has {length}")
    return np.unpackbits(bits, count=length).astype(bool)


@dataclass(kw_only=True)
class Cursor:
    """One rank's position: `epoch`, `position` (planned positions of the epoch consumed),
    `consumed` (a bool per clip index, this epoch), `only` (in an epoch re-partitioned over
    a new world size, the clips this rank reads in it; None otherwise) and `num_skipped`
    (rows skipped so far)."""

    epoch: int
    position: int
    consumed: np.ndarray
    only: np.ndarray | None = None
    num_skipped: int = 0

    @classmethod
    def start(cls, num_clips: int) -> Cursor:
        return cls(epoch=0, position=0, consumed=np.zeros(num_clips, dtype=bool))

    def advance(self, epoch: int, position: int, index: int) -> None:
        """One planned position handed out (the clip `index` of `epoch`)."""
        if epoch != self.epoch:
            self.epoch, self.position, self.only = epoch, 0, None
            self.consumed[:] = False
        assert position == self.position, (epoch, position, self.position)
        self.position += 1
        self.consumed[index] = True

    def to_state(self, *, fingerprint: str, split: str | None, seed: int, rank: int, world_size: int) -> dict[str, Any]:
        """Plain JSON-friendly values, a few hundred bytes for small sets (the consumed bitmap
        is compressed; one bit per clip at worst)."""
        return {
            "version": STATE_VERSION,
            "data": fingerprint,  # which shards (by sha256) and split the positions refer to
            "split": split,
            "seed": seed,
            "rank": rank,
            "world_size": world_size,
            "epoch": self.epoch,
            "position": self.position,
            "consumed": pack_bits(self.consumed),
            "only": None if self.only is None else pack_bits(self.only),
            "num_skipped": self.num_skipped,
        }


def check_state(state: dict[str, Any], *, rank: int, world_size: int, seed: int, fingerprint: str, where: str) -> None:
    """Refuse a saved cursor that is not entry `rank` of `world_size`, or was saved with
    another seed or for other data."""
    keys = V1_KEYS if state.get("version") == 1 else STATE_KEYS
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"reader state of rank {rank}: missing {', '.join(missing)}")
    if state["version"] not in (1, STATE_VERSION):
        raise ValueError(f"reader state of rank {rank}: version {state['version']} is not {STATE_VERSION}")
    if state["rank"] != rank or state["world_size"] != world_size:
        raise ValueError(
            f"reader states: entry {rank} is rank {state['rank']} of {state['world_size']}, expected rank "
            f"{rank} of {world_size} (pass every rank's state, in rank order)"
        )
    if state["seed"] != seed:
        raise ValueError(f"reader seed: the cursor was saved with seed {state['seed']}, this reader has {seed}")
    if state["data"] != fingerprint:
        raise DataError(
            f"the reader cursor of rank {rank} was saved for another data set or split "
            f"(split {state['split']!r}) than {where}"
        )


def reads_of(state: dict[str, Any], *, planner: EpochPlanner, num_clips: int) -> np.ndarray | None:
    """The `only` mask of a checked state: stored (version 2), or converted from version 1's
    `excluded` (the rank's share without those clips); None for an epoch not re-partitioned."""
    if state["version"] != 1:
        return None if state["only"] is None else unpack_bits(state["only"], num_clips, "only")
    if state["excluded"] is None:
        return None
    only = np.zeros(num_clips, dtype=bool)
    only[planner.share(state["epoch"], state["rank"], state["world_size"])] = True
    return only & ~unpack_bits(state["excluded"], num_clips, "excluded")


def resume_cursor(
    states: list[dict[str, Any]],
    *,
    planner: EpochPlanner,
    rank: int,
    world_size: int,
    in_split: np.ndarray,
) -> Cursor:
    """Rank `rank` of `world_size`'s cursor from every rank's saved one (`states[r]`, already
    checked). The same world size: rank `rank`'s own, continuing at exactly the next clip.
    Another: the earliest saved epoch continues over the clips of `in_split` that no rank
    consumed yet, dealt evenly over the new ranks (`plan.deal_remaining`: no clip twice, none
    lost, in that epoch; progress a rank had made in a later epoch is replayed)."""
    n = len(in_split)
    if len(states) == world_size:
        state = states[rank]
        only = reads_of(state, planner=planner, num_clips=n)
        if state["position"] > len(planner.plan(state["epoch"], rank, world_size, only)):
            raise ValueError(f"reader state of rank {rank}: position {state['position']} is past its epoch")
        return Cursor(
            epoch=state["epoch"],
            position=state["position"],
            consumed=unpack_bits(state["consumed"], n, "consumed"),
            only=only,
            num_skipped=state["num_skipped"],
        )
    epoch = min(state["epoch"] for state in states)
    remaining = np.zeros(n, dtype=bool)
    for state in states:
        if state["epoch"] != epoch:
            continue
        planned = reads_of(state, planner=planner, num_clips=n)
        if planned is None:
            planned = np.zeros(n, dtype=bool)
            planned[planner.share(epoch, state["rank"], len(states))] = True
        remaining |= planned & ~unpack_bits(state["consumed"], n, "consumed")
    return Cursor(
        epoch=epoch,
        position=0,
        consumed=np.zeros(n, dtype=bool),
        only=deal_remaining(planner, remaining & in_split, epoch=epoch, world_size=world_size)[rank],
        # The run's skip count survives on rank 0, so the sum over ranks stays right.
        num_skipped=sum(state["num_skipped"] for state in states) if rank == 0 else 0,
    )
