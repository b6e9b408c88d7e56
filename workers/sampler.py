"""What enters a negative dictionary each step (docs/architecture.md, "The method").

One interface, `select(name, ...)`, for the five samplers of `method.sampler`. Each step M
keys arrive per modality (the global batch); the pool samplers pick P <= M (default M / 4)
of the candidate pool (the recent arrivals that have not entered), so most arrivals never enter and the
sampler decides which do:

* `active` (CM-ACC): for each pool candidate key u and pseudo-classes Q (queries of the
  other modality), p = softmax(Q u / tau), y = argmax p, a = p - onehot(y). The gradient
  embedding g = a (outer) u is never built; with |g|^2 = |a|^2 |u|^2,
      ||g_i - g_j||^2 = |a_i|^2 |u_i|^2 + |a_j|^2 |u_j|^2 - 2 (a_i . a_j)(u_i . u_j).
  k-means++ seeding over the g's: the first pick is the largest |g|, each next one is drawn
  with probability proportional to its squared distance to the nearest pick (D^2 sampling).
* `uncertainty`: the P candidates with the largest |g|.
* `diversity`: k-means++ seeding over the keys themselves (first pick uniform).
* `random`: P candidates drawn uniformly from the pool: the fair control for the three above.
* `moco`: the current batch's M keys, no pool (plain cross-modal MoCo, the paper's baseline).

Rules shared by the pool samplers: candidates whose clip id is in `exclude_ids` (the current
batch) are never picked, so a query never meets its own positive as a negative; and one
selection takes at most one key per clip id, so picks are distinct keys of distinct clips.
Across steps, `update_dictionaries` takes a picked key out of its pool, so a key enters a
dictionary at most once.

Everything runs on the device of the inputs, with a `torch.Generator` on that device, and is
deterministic given the generator's state. The seeding loop (one iteration per pick) has no
host synchronisation inside: every random number is drawn before it, each draw inverts a
cumulative sum on the device, and a pick that could not be made is marked -1 and dropped
after the loop, so the loop's work and shapes are fixed (CUDA-graph and compile friendly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from service.config import Sampler as SamplerName

SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
MAX_DEFAULT_PSEUDO_CLASSES = 256


@dataclass(kw_only=True)
class Selection:
    """What to enqueue: keys [P, d], their clip ids [P], and the candidate rows picked [P].

    `indices` are rows of the pool for the pool samplers and rows of the batch for `moco`.
    P <= the number of picks asked for (fewer when fewer distinct clips are available).
    """

    keys: Tensor
    ids: Tensor
    indices: Tensor

    def numpy(self) -> dict[str, np.ndarray]:
        """The selection as numpy arrays (what crosses the Ray object store)."""
        return {name: getattr(self, name).detach().cpu().numpy() for name in ("keys", "ids", "indices")}


def resolve_pseudo_classes(requested: int, num_queries: int) -> int:
    """Number of pseudo-classes C: `requested`, or min(num_queries, 256) when it is 0."""
    if requested == 0:
        return min(num_queries, MAX_DEFAULT_PSEUDO_CLASSES)
    return min(requested, num_queries)


def draw_pseudo_classes(queries: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """C = `num_classes` rows of queries [B, d] drawn without replacement; all rows if C >= B."""
    if num_classes >= queries.shape[0]:
        return queries
    rows = torch.randperm(queries.shape[0], generator=generator, device=queries.device)[:num_classes]
    return queries[rows]  # C x d


def gradient_embedding_factors(candidates: Tensor, pseudo_classes: Tensor, temperature: float) -> Tensor:
    """a = p - onehot(argmax p) with p = softmax(Q u / tau), for candidates u [N, d] and Q [C, d].

    Returns a [N, C]. The gradient embedding of candidate i is g_i = a_i (outer) u_i.
    """
    p = torch.softmax(candidates @ pseudo_classes.T / temperature, dim=1)  # N x C
    y = p.argmax(dim=1)  # N
    return p - torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)  # N x C


def gradient_embedding_norms(a: Tensor, candidates: Tensor) -> Tensor:
    """|g|^2 = |a|^2 |u|^2 per candidate, for a [N, C] and u [N, d]; returns [N]."""
    return (a * a).sum(dim=1) * (candidates * candidates).sum(dim=1)


def factorised_sq_distances(a_i: Tensor, u_i: Tensor, a_j: Tensor, u_j: Tensor) -> Tensor:
    """||g_i - g_j||^2 for all pairs, [N_i, N_j], from a [N, C] and u [N, d]; g never built."""
    sq_i = gradient_embedding_norms(a_i, u_i)  # N_i
    sq_j = gradient_embedding_norms(a_j, u_j)  # N_j
    cross = (a_i @ a_j.T) * (u_i @ u_j.T)  # N_i x N_j: g_i . g_j = (a_i . a_j)(u_i . u_j)
    return (sq_i[:, None] + sq_j[None, :] - 2 * cross).clamp_min(0)


def _draw(weights: Tensor, available: Tensor, uniform: Tensor, positions: Tensor) -> Tensor:
    """Index drawn with probability proportional to `weights` over `available` rows.

    Falls back to uniform over the available rows when their weights are all zero (every
    candidate coincides with a pick). The draw is the first row whose cumulative weight
    exceeds uniform x total. Returns a 0-dim index tensor; nothing leaves the device.
    """
    weights = torch.where(available, weights, 0)  # N
    weights = torch.where(weights.sum() > 0, weights, available.to(weights.dtype))
    cumulative = torch.cumsum(weights.double(), dim=0)  # N; float64 keeps the tail of a long sum exact
    row = torch.searchsorted(cumulative, (uniform * cumulative[-1]).reshape(1), right=True)[0]
    # uniform x total can round up to the total: never step past the last row with weight.
    last = torch.where(weights > 0, positions, 0).max()
    return torch.minimum(row, last)


def kmeans_pp_seeding(
    *,
    factors: tuple[Tensor, ...],
    sq_norms: Tensor,
    ids: Tensor,
    available: Tensor,
    num_picks: int,
    first: Literal["largest", "random"],
    generator: torch.Generator,
) -> Tensor:
    """k-means++ seeding (D^2 sampling) over embeddings given in factorised form.

    The embedding e_i of row i is the outer product of the rows factors[0][i], factors[1][i],
    ...: so e_i . e_j = prod_f (F_f[i] . F_f[j]) and |e_i|^2 = `sq_norms[i]` [N]. With
    factors (a, u) the embeddings are the gradient embeddings g; with (u,) the keys.

    `first="largest"` starts from the available row of largest norm, `"random"` from a uniform
    draw. Each next pick is drawn with probability proportional to the squared distance to
    its nearest pick. Rows not `available` [N] (bool) are never picked; after a pick, every
    row with the same clip id (`ids` [N]) leaves the available set. Returns the picked rows
    [P] in pick order, P <= `num_picks` (fewer when the available clips run out).
    """
    n = sq_norms.shape[0]
    device = sq_norms.device
    uniforms = torch.rand(num_picks, generator=generator, device=device, dtype=torch.float64)  # M
    positions = torch.arange(n, device=device)  # N
    available = available.clone()  # N
    nearest_sq = torch.zeros_like(sq_norms)  # N: squared distance to the nearest pick
    picks = torch.full((num_picks,), -1, dtype=torch.long, device=device)  # M
    for t in range(num_picks):
        if t == 0 and first == "largest":
            row = torch.where(available, sq_norms, float("-inf")).argmax()
        else:
            # Before the first pick every weight is 0, so the draw is uniform over the available rows.
            row = _draw(nearest_sq, available, uniforms[t], positions)
        picks[t] = torch.where(available.any(), row, -1)
        inner = factors[0] @ factors[0][row]  # N
        for factor in factors[1:]:
            inner = inner * (factor @ factor[row])
        sq = (sq_norms + sq_norms[row] - 2 * inner).clamp_min(0)  # N: squared distances to the new pick
        nearest_sq = sq if t == 0 else torch.minimum(nearest_sq, sq)
        available &= ids != ids[row]
    return picks[picks >= 0]


def _first_per_clip(order: Tensor, ids: Tensor) -> Tensor:
    """Boolean mask over `order` [N] keeping the first row of each clip id; no Python loop."""
    unique_ids, group = torch.unique(ids[order], return_inverse=True)  # U, N
    positions = torch.arange(order.shape[0], device=order.device)
    first = torch.full((unique_ids.shape[0],), order.shape[0], device=order.device, dtype=torch.long)
    first = first.scatter_reduce(0, group, positions, reduce="amin")  # U: earliest position of each id
    keep = torch.zeros(order.shape[0], dtype=torch.bool, device=order.device)
    keep[first] = True
    return keep


def _check_inputs(pool_keys: Tensor, pool_ids: Tensor, queries: Tensor, batch_keys: Tensor, batch_ids: Tensor) -> None:
    if pool_keys.ndim != 2 or pool_ids.shape != pool_keys.shape[:1]:
        raise ValueError(f"pool keys must be [N, d] and ids [N], got {list(pool_keys.shape)}, {list(pool_ids.shape)}")
    if batch_keys.ndim != 2 or batch_ids.shape != batch_keys.shape[:1]:
        raise ValueError(
            f"batch keys must be [M, d] and ids [M], got {list(batch_keys.shape)}, {list(batch_ids.shape)}"
        )
    if queries.ndim != 2 or queries.shape[1] != pool_keys.shape[1] or batch_keys.shape[1] != pool_keys.shape[1]:
        raise ValueError(
            f"queries {list(queries.shape)}, pool keys {list(pool_keys.shape)} and batch keys "
            f"{list(batch_keys.shape)} must share d"
        )


def select(
    name: str,
    *,
    pool_keys: Tensor,
    pool_ids: Tensor,
    queries: Tensor,
    batch_keys: Tensor,
    batch_ids: Tensor,
    exclude_ids: Tensor,
    num_picks: int,
    temperature: float,
    num_pseudo_classes: int,
    generator: torch.Generator,
) -> Selection:
    """Choose the keys that enter one modality's dictionary this step.

    pool_keys [N, d] and pool_ids [N]: the candidate pool U of this modality. queries [B, d]:
    the current batch's queries of the OTHER modality (pseudo-classes for `active` and
    `uncertainty`; C = `num_pseudo_classes` of them are drawn, 0 = min(B, 256)). batch_keys
    [M, d] and batch_ids [M]: this modality's keys of the current batch (what `moco`
    enqueues, all of them). exclude_ids [E]: clip ids that must not be picked. `num_picks`:
    P, how many the pool samplers pick. tau = `temperature`. `generator` lives on the
    tensors' device.
    """
    if name not in SAMPLER_NAMES:
        raise ValueError(f"method.sampler: unknown sampler {name!r} (known: {', '.join(SAMPLER_NAMES)})")
    _check_inputs(pool_keys, pool_ids, queries, batch_keys, batch_ids)
    if name == "moco":
        rows = torch.arange(batch_keys.shape[0], device=batch_keys.device)
        return Selection(keys=batch_keys, ids=batch_ids, indices=rows)

    if pool_keys.shape[0] == 0:  # the first step: nothing has reached the pool yet
        rows = torch.zeros(0, dtype=torch.long, device=pool_keys.device)
        return Selection(keys=pool_keys, ids=pool_ids, indices=rows)
    available = ~torch.isin(pool_ids, exclude_ids)  # N
    if name == "random":
        order = torch.randperm(pool_ids.shape[0], generator=generator, device=pool_ids.device)  # N
        keep = _first_per_clip(order, pool_ids) & available[order]
        rows = order[keep][:num_picks]
        return Selection(keys=pool_keys[rows], ids=pool_ids[rows], indices=rows)
    if name == "diversity":
        rows = kmeans_pp_seeding(
            factors=(pool_keys,),
            sq_norms=(pool_keys * pool_keys).sum(dim=1),
            ids=pool_ids,
            available=available,
            num_picks=num_picks,
            first="random",
            generator=generator,
        )
        return Selection(keys=pool_keys[rows], ids=pool_ids[rows], indices=rows)

    num_classes = resolve_pseudo_classes(num_pseudo_classes, queries.shape[0])
    pseudo_classes = draw_pseudo_classes(queries.to(pool_keys.dtype), num_classes, generator)  # C x d
    a = gradient_embedding_factors(pool_keys, pseudo_classes, temperature)  # N x C
    gradient_norms_sq = gradient_embedding_norms(a, pool_keys)  # N
    if name == "uncertainty":
        order = torch.argsort(torch.where(available, gradient_norms_sq, float("-inf")), descending=True, stable=True)
        keep = _first_per_clip(order, pool_ids) & available[order]
        rows = order[keep][:num_picks]
    else:
        rows = kmeans_pp_seeding(
            factors=(a, pool_keys),
            sq_norms=gradient_norms_sq,
            ids=pool_ids,
            available=available,
            num_picks=num_picks,
            first="largest",
            generator=generator,
        )
    return Selection(keys=pool_keys[rows], ids=pool_ids[rows], indices=rows)


class Sampler:
    """A named sampler with its own random state: what the trainer (or the dictionary actor)
    holds. `select` accepts torch tensors or numpy arrays and works on `device`."""

    def __init__(
        self,
        *,
        name: str,
        temperature: float,
        num_pseudo_classes: int = 0,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        if name not in SAMPLER_NAMES:
            raise ValueError(f"method.sampler: unknown sampler {name!r} (known: {', '.join(SAMPLER_NAMES)})")
        self.name = name
        self.temperature = temperature
        self.num_pseudo_classes = num_pseudo_classes
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def select(
        self,
        *,
        pool_keys: Tensor | np.ndarray,
        pool_ids: Tensor | np.ndarray,
        queries: Tensor | np.ndarray,
        batch_keys: Tensor | np.ndarray,
        batch_ids: Tensor | np.ndarray,
        exclude_ids: Tensor | np.ndarray,
        num_picks: int,
    ) -> Selection:
        """`select(self.name, ...)` with this sampler's temperature, classes and generator."""

        def tensor(x: Tensor | np.ndarray) -> Tensor:
            return torch.as_tensor(x, device=self.device)

        return select(
            self.name,
            pool_keys=tensor(pool_keys),
            pool_ids=tensor(pool_ids),
            queries=tensor(queries),
            batch_keys=tensor(batch_keys),
            batch_ids=tensor(batch_ids),
            exclude_ids=tensor(exclude_ids),
            num_picks=num_picks,
            temperature=self.temperature,
            num_pseudo_classes=self.num_pseudo_classes,
            generator=self.generator,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["name"] != self.name:
            raise ValueError(f"state is of sampler {state['name']!r}, this sampler is {self.name!r}")
        self.generator.set_state(state["generator"])
