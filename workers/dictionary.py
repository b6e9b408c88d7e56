"""The negative dictionaries D_a, D_v and the candidate pools U_a, U_v (docs/architecture.md, "The method").

Both are ring buffers of L2-normalised keys [size, d] with, per key, the clip id, the clip's
label (-1 when unknown), the step its key was encoded at (its arrival; -1 for none) and the
clip's source file as an id (-1 when unknown):

* `NegativeDictionary` (K keys): the negatives of the loss. Enqueueing n keys overwrites the
  n oldest. It starts full of random unit vectors with clip id -1 (no clip), as MoCo does: the
  loss has K negatives from the first step, and the random ones are pushed out as real keys
  arrive (after K / P steps with P keys entering a step).
* `CandidatePool` (N keys): the last N keys from the key encoder (FIFO of recent batches),
  from which the sampler picks what enters the dictionary; a key that entered is marked
  taken (clip id -1), so the pool holds the recent arrivals that have not entered. It
  starts empty.

Labels, arrival steps and sources are not used by training: they make the dictionaries
measurable (false negatives, key age, near-duplicates; `workers/diagnostics.py`).

Plain classes with `state_dict` / `load_state_dict`: the trainer owns them in one process,
the dictionary actor in a cluster.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

EMPTY_ID = -1  # clip id of a slot that holds no clip's key
COLUMNS = ("ids", "labels", "steps", "sources")  # what a ring keeps per key besides the key


class _KeyRing:
    """A ring buffer of `size` keys of dimension `dim` with their clip ids."""

    def __init__(self, *, size: int, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.size = size
        self.dim = dim
        self.keys = torch.zeros(size, dim, device=device, dtype=dtype)  # size x d
        self.ids = torch.full((size,), EMPTY_ID, device=device, dtype=torch.long)  # size
        self.labels = torch.full((size,), EMPTY_ID, device=device, dtype=torch.long)  # size
        self.steps = torch.full((size,), EMPTY_ID, device=device, dtype=torch.long)  # size: arrival step
        self.sources = torch.full((size,), EMPTY_ID, device=device, dtype=torch.long)  # size: source file id
        self.pointer = 0  # slot the next key is written to (the oldest key)

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def _write(
        self,
        keys: Tensor,
        ids: Tensor,
        labels: Tensor | None = None,
        steps: Tensor | None = None,
        sources: Tensor | None = None,
    ) -> Tensor:
        """Write keys [n, d], ids [n] and optionally labels, arrival steps and sources [n]
        (else -1) over the n oldest slots; returns their slots [n].

        With n > size only the last `size` keys are kept (the newest win).
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be [n, {self.dim}], got {list(keys.shape)}")
        columns = {"ids": ids, "labels": labels, "steps": steps, "sources": sources}
        for name, column in columns.items():
            if column is not None and column.shape != keys.shape[:1]:
                raise ValueError(f"{name} must be [{keys.shape[0]}], got {list(column.shape)}")
        columns = {name: torch.full_like(ids, EMPTY_ID) if c is None else c for name, c in columns.items()}
        if keys.shape[0] > self.size:
            keys = keys[-self.size :]
            columns = {name: c[-self.size :] for name, c in columns.items()}
        num_keys = keys.shape[0]
        slots = (self.pointer + torch.arange(num_keys, device=self.device)) % self.size  # n
        self.keys[slots] = keys.detach().to(self.keys.dtype)
        for name, column in columns.items():
            getattr(self, name)[slots] = column.to(self.device, torch.long)
        self.pointer = (self.pointer + num_keys) % self.size
        return slots

    def oldest_first(self, column: str = "keys") -> Tensor:
        """The keys [size, d] (or another column, e.g. "ids") in ring order, the oldest (the
        next to be replaced) first."""
        return getattr(self, column).roll(-self.pointer, dims=0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "keys": self.keys.clone(),
            **{name: getattr(self, name).clone() for name in COLUMNS},
            "pointer": self.pointer,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state; one saved before labels, steps or sources were kept has them
        unknown (-1)."""
        keys, ids = state["keys"], state["ids"]
        if tuple(keys.shape) != (self.size, self.dim) or tuple(ids.shape) != (self.size,):
            raise ValueError(
                f"state holds keys {list(keys.shape)} and ids {list(ids.shape)}; "
                f"this buffer is [{self.size}, {self.dim}] and [{self.size}]"
            )
        self.keys.copy_(keys)
        self.ids.copy_(ids)
        for name in COLUMNS[1:]:
            column = state.get(name)
            getattr(self, name).copy_(column if column is not None else torch.full_like(self.ids, EMPTY_ID))
        self.pointer = int(state["pointer"])


class NegativeDictionary(_KeyRing):
    """K x d ring buffer of negative keys with clip ids (D_a or D_v).

    Initialised with K random unit vectors (standard normal, normalised, drawn from
    `generator`) and clip id -1; `enqueue` replaces the oldest keys.
    """

    def __init__(
        self,
        *,
        size: int,
        dim: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ):
        super().__init__(size=size, dim=dim, device=device)
        noise = torch.randn(size, dim, generator=generator)  # K x d, drawn on the CPU: same on every device
        self.keys.copy_(F.normalize(noise, dim=1))

    def enqueue(
        self,
        keys: Tensor,
        ids: Tensor,
        labels: Tensor | None = None,
        steps: Tensor | None = None,
        sources: Tensor | None = None,
    ) -> Tensor:
        """Put keys [n, d] with clip ids [n] (labels, arrival steps and sources [n] when known)
        in place of the n oldest; returns their slots [n]."""
        return self._write(keys, ids, labels, steps, sources)


class CandidatePool(_KeyRing):
    """FIFO of the last N keys from the key encoder with clip ids (U_a or U_v); starts empty."""

    def __init__(self, *, size: int, dim: int, device: torch.device | str = "cpu"):
        super().__init__(size=size, dim=dim, device=device)
        self.num_filled = 0

    def push(
        self,
        keys: Tensor,
        ids: Tensor,
        labels: Tensor | None = None,
        steps: Tensor | None = None,
        sources: Tensor | None = None,
    ) -> None:
        """Add keys [n, d] with clip ids [n] (labels, arrival steps and sources [n] when known);
        the oldest leave once N are held."""
        self._write(keys, ids, labels, steps, sources)
        self.num_filled = min(self.size, self.num_filled + keys.shape[0])

    def take(self, rows: Tensor) -> None:
        """Mark candidate rows [P] as taken: they entered a dictionary and never enter again."""
        self.ids[rows] = EMPTY_ID

    def candidates(self) -> tuple[Tensor, Tensor]:
        """The keys [n, d] and clip ids [n] held now (n <= N), in slot order."""
        # Slots fill from 0 upwards before the ring wraps, so the filled ones are a prefix.
        return self.keys[: self.num_filled], self.ids[: self.num_filled]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_filled": self.num_filled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.num_filled = int(state["num_filled"])
