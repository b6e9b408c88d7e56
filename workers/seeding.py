"""k-means++ seeding over factorised embeddings: the exact seeding (one pick after another)
and the parallel one (D^2 sampling in rounds), for the samplers of `workers.sampler`
(docs/architecture.md, "The method"; the module docstring of `workers.sampler` says how the
two differ and why).

Everything runs on the device of the inputs, draws its random numbers from the generator it
is given (so it is deterministic given the generator's state), and keeps its shapes fixed by
N and P alone, with no host synchronisation inside the loops.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from service.config import Seeding

SEEDINGS: tuple[str, ...] = get_args(Seeding)
PARALLEL_ROUNDS = 16  # rounds after the first pick: the dependent steps of the parallel seeding
PARALLEL_GROWTH = 1.5  # each round draws this many times the picks of the one before
UPDATE_CHUNK = 1024  # picks per matrix product when a round updates the nearest distances


def check_seeding(seeding: str, rounds: int = PARALLEL_ROUNDS) -> None:
    """Refuse an unknown `method.seeding` or a round count below 1, naming the setting."""
    if seeding not in SEEDINGS:
        raise ValueError(f"method.seeding: unknown seeding {seeding!r} (known: {', '.join(SEEDINGS)})")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"seeding rounds must be an integer >= 1, got {rounds!r}")


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


def seeding_round_sizes(num_picks: int, rounds: int | None, growth: float = PARALLEL_GROWTH) -> list[int]:
    """Picks per round of a seeding of `num_picks`: one pick per round for the exact seeding
    (`rounds=None`); otherwise a first pick alone, then `rounds` rounds that share the other
    picks in geometrically growing sizes (ratio `growth`, each at least 1, never more rounds
    than picks). Fixed by P alone, so a selection's shapes never depend on the data."""
    if num_picks <= 0:
        return []
    rest = num_picks - 1
    if rounds is None or rest <= rounds:
        return [1] * num_picks
    # Every round at least one pick; the picks beyond those shared in proportion to growth^r
    # (floors of the running total, so they add up), smallest rounds first.
    extra, total = rest - rounds, sum(growth**r for r in range(rounds))
    bounds = [int(extra * sum(growth**q for q in range(r + 1)) / total) for r in range(rounds)]
    bounds[-1] = extra
    sizes = sorted(1 + high - low for low, high in zip([0, *bounds[:-1]], bounds, strict=True))
    return [1, *sizes]


def clip_groups(ids: Tensor) -> Tensor:
    """Group index in [0, N) of each row's clip id [N] (rows of one clip share it), without a
    host sync (`torch.unique` would wait for its output size on CUDA)."""
    order = torch.argsort(ids, stable=True)  # N
    sorted_ids = ids[order]
    starts = torch.ones_like(sorted_ids, dtype=torch.long)
    starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    groups = torch.empty_like(order)
    groups[order] = torch.cumsum(starts, dim=0) - 1
    return groups


def _draw_round(
    weights: Tensor, available: Tensor, groups: Tensor, positions: Tensor, size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """`size` rows of distinct clips drawn without replacement with probability proportional
    to `weights` over the `available` rows (Gumbel top-k: the largest log w + Gumbel noise;
    rows of zero weight come after every row with weight, in random order, as `_draw`'s
    uniform fallback). Returns rows [size] and whether each is a real pick [size] (False once
    the available clips run out); nothing leaves the device."""
    n = weights.shape[0]
    noise = torch.rand(n, generator=generator, device=weights.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(noise.clamp_min(torch.finfo(torch.float64).tiny)))  # N
    log_weights = torch.log(weights.double())  # -inf where the weight is 0
    # 1e6 is beyond any log weight (float32/64 weights: |log w| < 800) plus Gumbel noise
    scores = torch.where(weights > 0, log_weights, -1e6) + gumbel
    scores = torch.where(available, scores, float("-inf"))  # N
    # One row per clip: the clip's best score (ties to the lowest row), so a round never
    # picks two keys of one clip and each clip is drawn with its rows' weight.
    best = torch.full((n,), float("-inf"), dtype=scores.dtype, device=scores.device)
    best = best.scatter_reduce(0, groups, scores, reduce="amax")
    first = torch.full((n,), n, dtype=torch.long, device=scores.device)
    first = first.scatter_reduce(0, groups, torch.where(scores == best[groups], positions, n), reduce="amin")
    scores = torch.where(positions == first[groups], scores, float("-inf"))
    top = scores.topk(min(size, n))
    rows, valid = top.indices, top.values > float("-inf")
    if size > n:  # more picks asked than rows: the rest are never made
        pad = size - n
        rows = torch.cat([rows, rows.new_zeros(pad)])
        valid = torch.cat([valid, valid.new_zeros(pad)])
    return rows, valid


def _nearest_sq_to_rows(factors: tuple[Tensor, ...], sq_norms: Tensor, rows: Tensor, valid: Tensor) -> Tensor:
    """min over the `valid` of `rows` [k] of every row's squared distance to them, [N] (+inf
    when none is valid), in the factorised embedding: one matrix product per factor.

    ||e_i - e_j||^2 = |e_i|^2 + |e_j|^2 - 2 e_i . e_j, and the minimum over j needs only
    |e_j|^2 - 2 e_i . e_j: in place on the N x k product, so the cost is the products and
    two passes over their result (this is where the parallel seeding spends its time)."""
    column_sq = torch.where(valid, sq_norms[rows], float("inf"))  # k: an invalid pick is never nearest
    cross = factors[0] @ factors[0][rows].T  # N x k
    for factor in factors[1:]:
        cross.mul_(factor @ factor[rows].T)  # e_i . e_j = prod_f (F_f[i] . F_f[j])
    closest = cross.mul_(-2).add_(column_sq[None, :]).amin(dim=1)  # N
    return (sq_norms + closest).clamp_min(0)


def kmeans_pp_seeding(
    *,
    factors: tuple[Tensor, ...],
    sq_norms: Tensor,
    ids: Tensor,
    available: Tensor,
    num_picks: int,
    first: Literal["largest", "drawn"],
    generator: torch.Generator,
    centres_sq: Tensor | None = None,
    rounds: int | None = None,
) -> Tensor:
    """k-means++ seeding (D^2 sampling) over embeddings given in factorised form.

    The embedding e_i of row i is the outer product of the rows factors[0][i], factors[1][i],
    ...: so e_i . e_j = prod_f (F_f[i] . F_f[j]) and |e_i|^2 = `sq_norms[i]` [N]. With
    factors (a, u) the embeddings are the gradient embeddings g; with (u,) the keys.

    `centres_sq` [N], when given, is each row's squared distance to the nearest of centres
    chosen before (not rows here): the seeding continues from them. `first="largest"` starts
    from the available row of largest norm; `"drawn"` draws the first pick like the next ones,
    with probability proportional to the squared distance to its nearest centre (uniform
    when there is none). Each next pick is drawn with probability proportional to the squared
    distance to its nearest pick or centre. Rows not `available` [N] (bool) are never picked;
    after a pick, every row with the same clip id (`ids` [N]) leaves the available set.

    `rounds=None` is the exact seeding, one pick per step. With `rounds` = R the picks after
    the first are drawn in R rounds (`seeding_round_sizes`), each without replacement from
    the weights at the round's start (Gumbel top-k), with one matrix product per round
    against its picks; when every round is a single pick this is the exact seeding, drawing
    the same random numbers. Returns the picked rows [P] in pick order, P <= `num_picks`
    (fewer when the available clips run out).
    """
    n = sq_norms.shape[0]
    device = sq_norms.device
    uniforms = torch.rand(num_picks, generator=generator, device=device, dtype=torch.float64)  # M
    positions = torch.arange(n, device=device)  # N
    available = available.clone()  # N
    groups = None if rounds is None else clip_groups(ids)  # N
    # N: squared distance to the nearest pick (or centre)
    nearest_sq = torch.zeros_like(sq_norms) if centres_sq is None else centres_sq.to(sq_norms.dtype)
    picks = torch.full((num_picks,), -1, dtype=torch.long, device=device)  # M
    t = 0
    sizes = seeding_round_sizes(num_picks, rounds)
    for index, size in enumerate(sizes):
        if size == 1:
            if t == 0 and first == "largest":
                row = torch.where(available, sq_norms, float("-inf")).argmax()
            else:
                # Before the first pick (and with no centres) every weight is 0: the draw is uniform.
                row = _draw(nearest_sq, available, uniforms[t], positions)
            picks[t] = torch.where(available.any(), row, -1)
            inner = factors[0] @ factors[0][row]  # N
            for factor in factors[1:]:
                inner = inner * (factor @ factor[row])
            sq = (sq_norms + sq_norms[row] - 2 * inner).clamp_min(0)  # N: squared distances to the new pick
            nearest_sq = sq if t == 0 and centres_sq is None else torch.minimum(nearest_sq, sq)
            available &= ids != ids[row]
        else:  # only after the first pick: nearest_sq holds real distances
            assert groups is not None
            rows, valid = _draw_round(nearest_sq, available, groups, positions, size, generator)  # size, size
            picks[t : t + size] = torch.where(valid, rows, -1)
            if index == len(sizes) - 1:
                break  # the last round's distances would be read by no later pick: a third of the work
            for start in range(0, size, UPDATE_CHUNK):  # N x chunk per product bounds the memory
                chunk, chunk_valid = rows[start : start + UPDATE_CHUNK], valid[start : start + UPDATE_CHUNK]
                nearest_sq = torch.minimum(nearest_sq, _nearest_sq_to_rows(factors, sq_norms, chunk, chunk_valid))
            taken = torch.zeros(n, dtype=torch.long, device=device)
            taken = taken.scatter_reduce(0, groups[rows], valid.long(), reduce="amax")  # N: clips picked now
            available &= taken[groups] == 0
        t += size
    return picks[picks >= 0]


def seeding_potential(factors: tuple[Tensor, ...], sq_norms: Tensor, available: Tensor, picks: Tensor) -> float:
    """The k-means potential of `picks` [P]: the sum over the `available` rows [N] of the
    squared distance (in the factorised embedding of `kmeans_pp_seeding`) to the nearest
    pick. What k-means++ seeding keeps small; measured, not used by the samplers."""
    nearest = torch.full_like(sq_norms, float("inf"))
    for start in range(0, picks.shape[0], UPDATE_CHUNK):
        chunk = picks[start : start + UPDATE_CHUNK]
        valid = torch.ones_like(chunk, dtype=torch.bool)
        nearest = torch.minimum(nearest, _nearest_sq_to_rows(factors, sq_norms, chunk, valid))
    return float(nearest[available].double().sum())
