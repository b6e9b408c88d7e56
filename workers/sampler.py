"""What enters a negative dictionary each step (docs/architecture.md, "The method").

One interface, `select(name, ...)`, for the eight samplers of `method.sampler`. Each step M
keys arrive per modality (the global batch) and a pool sampler picks P of a candidate pool of
N keys (`method.pool`, docs/architecture.md "The method"):

* fresh (the paper's): the candidates are the batch's M keys and the keys of E = N - M extra
  clips drawn at random, all encoded this step in one key-encoder forward (N = 2M and P = M
  by default): every sampler turns the dictionary over at `moco`'s rate and only which keys
  enter differs. Nothing is excluded but repeats of a clip.
* stream: the candidates are the recent arrivals that have not entered (N = 4M by default)
  and P < M (M / 4 by default), so most arrivals never enter; the current batch's clips are
  excluded (`exclude_ids`), so a query never meets its own positive as a negative.

`dictionary_keys` [K, d] are the keys of the dictionary the picks enter, oldest first: its
first P rows are the keys the picks replace.

* `active` (CM-ACC): for each pool candidate key u and pseudo-classes Q (queries of the
  other modality), p = softmax(Q u / tau), y = argmax p, a = p - onehot(y). The gradient
  embedding g = a (outer) u is never built; with |g|^2 = |a|^2 |u|^2,
      ||g_i - g_j||^2 = |a_i|^2 |u_i|^2 + |a_j|^2 |u_j|^2 - 2 (a_i . a_j)(u_i . u_j).
  k-means++ seeding over the g's: the first pick is the largest |g|, each next one is drawn
  with probability proportional to its squared distance to the nearest pick (D^2 sampling).
* `active-dict`: `active` with the C pseudo-classes drawn from the dictionary's K keys, not
  the queries: a candidate is then uncertain between the negatives it would sit among.
* `active-aware`: `active` whose seeding counts the K - P keys that stay in the dictionary
  as picks already made, so every pick (the first too) is D^2-drawn against them: it
  spreads the dictionary, not only one step's picks. With no key staying it is `active`.
* `hardness` (the prototype's signal): h_n = sum_i w_in q_i over C queries q_i of the batch,
  w_in the softmax weight n would get as one more negative of q_i in the cross-modal
  InfoNCE: exp(q_i.n/tau) over the sum of exp(q_i.x/tau) for x the positive k_i, every
  negative the loss counts (the dictionary's keys but those of q_i's own clip and, with
  `method.in_batch_negatives`, the batch's other keys) and n itself; 0 when n is a key of
  q_i's own clip, which the loss would leave out. h_n is tau x M times the loss's gradient
  in n (`tests/unit/test_sampler.py` checks it through `workers.loss`), so |h| is how hard n
  pushes the queries. k-means++ seeding over the h's (first the largest |h|) spreads the
  hard picks.
* `uncertainty`: the P candidates with the largest |g|.
* `diversity`: k-means++ seeding over the keys themselves (first pick uniform).
* `random`: P candidates drawn uniformly from the pool: the fair control for the others.
* `moco`: the current batch's M keys, no pool (plain cross-modal MoCo, the paper's baseline).

Rules shared by the pool samplers: candidates whose clip id is in `exclude_ids` are never
picked (the stream pool's current batch); one selection takes at most one key per clip id, so
picks are distinct keys of distinct clips. Across steps, with the stream pool,
`update_dictionaries` takes a picked key out of its pool, so a key enters a dictionary at
most once.

Everything runs on the device of the inputs, with a `torch.Generator` on that device, and is
deterministic given the generator's state. The seeding loop (one iteration per pick) has no
host synchronisation inside: every random number is drawn before it, each draw inverts a
cumulative sum on the device, and a pick that could not be made is marked -1 and dropped
after the loop, so the loop's work and shapes are fixed (CUDA-graph and compile friendly).

Two seedings (`method.seeding`) make the k-means++ picks of `active`, `active-dict`,
`active-aware`, `hardness` and `diversity`:

* `exact`: one pick after another, as above: P dependent steps, each reading the whole
  candidate matrix (N x (C + d)) for one matrix-vector product.
* `parallel`: D^2 sampling in rounds (k-means||, Bahmani et al. 2012, without its
  reclustering): the first pick as in `exact`, then a fixed number of rounds
  (`workers.seeding.PARALLEL_ROUNDS`), each drawing a batch of picks at once without replacement from the
  D^2 weights (Gumbel top-k: the largest log w_i + Gumbel noise) and updating every
  candidate's nearest squared distance with one matrix product against the new picks. The
  same N x P x (C + d) multiply-adds as `exact`, but as matrix products, in about 17
  dependent steps instead of P. The round sizes are fixed by P alone (no host sync), grow
  geometrically (early picks are few, so later rounds see where the first ones went), and
  when every round is a single pick the picks are `exact`'s, random number for random number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch
from torch import Tensor

from service.config import Sampler as SamplerName
from workers.seeding import PARALLEL_ROUNDS, check_seeding, kmeans_pp_seeding

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


def pseudo_class_rows(num_rows: int, num_classes: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """Rows of the C = `num_classes` pseudo-classes among B = `num_rows`: drawn without
    replacement, or all B in order (no random number drawn) when C >= B. Returns [min(C, B)]."""
    if num_classes >= num_rows:
        return torch.arange(num_rows, device=device)
    return torch.randperm(num_rows, generator=generator, device=device)[:num_classes]


def draw_pseudo_classes(queries: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """C = `num_classes` rows of queries [B, d] drawn without replacement; all rows if C >= B."""
    if num_classes >= queries.shape[0]:
        return queries
    return queries[pseudo_class_rows(queries.shape[0], num_classes, generator, queries.device)]  # C x d


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


def nearest_sq_to_centres(
    a: Tensor, candidates: Tensor, centres: Tensor, pseudo_classes: Tensor, temperature: float, chunk: int = 4096
) -> Tensor:
    """min over centres c of ||g(u) - g(c)||^2 per candidate u, [N], for a [N, C] of the
    candidates u [N, d] and centre keys [K', d] (their a from the same pseudo-classes).
    Chunked over the centres so that memory stays N x `chunk`; +inf when K' = 0."""
    nearest = torch.full((candidates.shape[0],), float("inf"), dtype=candidates.dtype, device=candidates.device)
    for start in range(0, centres.shape[0], chunk):
        block = centres[start : start + chunk]  # chunk x d
        a_block = gradient_embedding_factors(block, pseudo_classes, temperature)  # chunk x C
        nearest = torch.minimum(nearest, factorised_sq_distances(a, candidates, a_block, block).amin(dim=1))
    return nearest


def hardness_embeddings(
    candidates: Tensor,
    queries: Tensor,
    positives: Tensor,
    dictionary_keys: Tensor,
    temperature: float,
    *,
    batch_keys: Tensor | None = None,
    query_ids: Tensor | None = None,
    dictionary_ids: Tensor | None = None,
    candidate_ids: Tensor | None = None,
) -> Tensor:
    """h_n = sum_i w_in q_i for candidates n [N, d], queries q [C, d], their positives k [C, d]
    (row-aligned) and the dictionary D [K, d]; returns h [N, d]. w_in is the softmax weight of
    n as one more negative of q_i, counting what the loss counts: exp(l_in) / (exp(l_ik) +
    sum_m exp(l_im) + exp(l_in)) with l = q.x / tau, m over the negatives of q_i, computed as
    sigmoid(l_in - logsumexp_i) (no overflow at any tau).

    The negatives are D's keys; with `query_ids` [C] and `dictionary_ids` [K] those of q_i's
    own clip are left out (as the loss masks them), and with `candidate_ids` [N] a candidate
    of q_i's own clip gets w_in = 0. `batch_keys` [M, d] (the loss's in-batch negatives, when
    `method.in_batch_negatives` is on): every batch key is a logit of q_i, the positives among
    them, so `positives` must be rows of it.
    """
    negatives = queries @ dictionary_keys.T / temperature  # C x K
    if query_ids is not None and dictionary_ids is not None:
        negatives = negatives.masked_fill(query_ids[:, None] == dictionary_ids[None, :], float("-inf"))
    if batch_keys is None:
        positive = (queries * positives).sum(dim=1, keepdim=True) / temperature  # C x 1
        logits = torch.cat([positive, negatives], dim=1)  # C x (1 + K)
    else:
        logits = torch.cat([queries @ batch_keys.T / temperature, negatives], dim=1)  # C x (M + K)
    log_rest = torch.logsumexp(logits, dim=1)  # C: the denominator without n
    weights = torch.sigmoid(candidates @ queries.T / temperature - log_rest)  # N x C
    if query_ids is not None and candidate_ids is not None:
        weights = weights.masked_fill(candidate_ids[:, None] == query_ids[None, :], 0.0)
    return weights @ queries  # N x d


def _first_per_clip(order: Tensor, ids: Tensor) -> Tensor:
    """Boolean mask over `order` [N] keeping the first row of each clip id; no Python loop."""
    unique_ids, group = torch.unique(ids[order], return_inverse=True)  # U, N
    positions = torch.arange(order.shape[0], device=order.device)
    first = torch.full((unique_ids.shape[0],), order.shape[0], device=order.device, dtype=torch.long)
    first = first.scatter_reduce(0, group, positions, reduce="amin")  # U: earliest position of each id
    keep = torch.zeros(order.shape[0], dtype=torch.bool, device=order.device)
    keep[first] = True
    return keep


DICTIONARY_SAMPLERS = ("active-dict", "active-aware", "hardness")  # the samplers that read `dictionary_keys`
SEEDING_SAMPLERS = ("active", "active-dict", "active-aware", "hardness", "diversity")  # k-means++ seeding


def _check_inputs(
    pool_keys: Tensor, pool_ids: Tensor, queries: Tensor, batch_keys: Tensor, batch_ids: Tensor, dictionary_keys: Tensor
) -> None:
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
    if dictionary_keys.ndim != 2 or dictionary_keys.shape[1] != pool_keys.shape[1]:
        raise ValueError(f"dictionary keys must be [K, d] with the pool's d, got {list(dictionary_keys.shape)}")


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
    dictionary_keys: Tensor | np.ndarray | None = None,
    dictionary_ids: Tensor | np.ndarray | None = None,
    in_batch_negatives: bool = False,
    seeding: str = "exact",
    rounds: int = PARALLEL_ROUNDS,
) -> Selection:
    """Choose the keys that enter one modality's dictionary this step.

    pool_keys [N, d] and pool_ids [N]: the candidate pool U of this modality. queries [B, d]:
    the current batch's queries of the OTHER modality (pseudo-classes for `active`,
    `active-aware`, `uncertainty` and `hardness`; C = `num_pseudo_classes` of them are drawn,
    0 = min(B, 256); `active-dict` draws them from the K dictionary keys instead). batch_keys
    [M, d] and batch_ids [M]: this modality's keys of the current batch (what `moco`
    enqueues, all of them; for `hardness` row i is the positive of queries row i, B = M).
    exclude_ids [E]: clip ids that must not be picked. `num_picks`: P, how many the pool
    samplers pick. tau = `temperature`. `generator` lives on the tensors' device.
    dictionary_keys [K, d]: the dictionary the picks enter, oldest first (its first P rows
    are the keys the picks replace); `active-dict`, `active-aware` and `hardness` need it.
    `hardness` weighs a candidate against the negatives the loss counts: D's keys, those of a
    query's own clip left out when `dictionary_ids` [K] (D's clip ids, oldest first) are
    given, and the batch's keys when `in_batch_negatives` (`method.in_batch_negatives`).
    `seeding`: how the seeding samplers make their k-means++ picks, "exact" (one after
    another) or "parallel" (in `rounds` rounds after the first pick); see the module.
    """
    if name not in SAMPLER_NAMES:
        raise ValueError(f"method.sampler: unknown sampler {name!r} (known: {', '.join(SAMPLER_NAMES)})")
    check_seeding(seeding, rounds)
    seeding_rounds = rounds if seeding == "parallel" else None
    if name in DICTIONARY_SAMPLERS and dictionary_keys is None:
        raise ValueError(f"method.sampler: {name!r} needs dictionary_keys, the dictionary its picks enter")
    if dictionary_keys is None:
        dictionary_keys = pool_keys.new_zeros(0, pool_keys.shape[-1])  # unused by the other samplers
    dictionary_keys = torch.as_tensor(dictionary_keys, device=pool_keys.device).to(pool_keys.dtype)
    _check_inputs(pool_keys, pool_ids, queries, batch_keys, batch_ids, dictionary_keys)
    if name == "hardness" and queries.shape[0] != batch_keys.shape[0]:
        raise ValueError(
            f"hardness: queries {list(queries.shape)} and batch keys {list(batch_keys.shape)} must be row-aligned"
        )
    if name == "active-dict" and dictionary_keys.shape[0] == 0:
        raise ValueError("active-dict: the dictionary is empty, no pseudo-classes to draw")
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
    if name in ("diversity", "hardness"):
        if name == "diversity":
            embeddings = pool_keys  # N x d
        else:
            num_classes = resolve_pseudo_classes(num_pseudo_classes, queries.shape[0])
            classes = pseudo_class_rows(queries.shape[0], num_classes, generator, pool_keys.device)  # C
            batch = batch_keys.to(pool_keys.dtype)  # M x d: row i is the positive of query i
            embeddings = hardness_embeddings(
                pool_keys,
                queries.to(pool_keys.dtype)[classes],
                batch[classes],
                dictionary_keys,
                temperature,
                batch_keys=batch if in_batch_negatives else None,
                query_ids=batch_ids[classes],
                dictionary_ids=None
                if dictionary_ids is None
                else torch.as_tensor(dictionary_ids, device=pool_ids.device),
                candidate_ids=pool_ids,
            )  # N x d
        rows = kmeans_pp_seeding(
            factors=(embeddings,),
            sq_norms=(embeddings * embeddings).sum(dim=1),
            ids=pool_ids,
            available=available,
            num_picks=num_picks,
            first="drawn" if name == "diversity" else "largest",
            generator=generator,
            rounds=seeding_rounds,
        )
        return Selection(keys=pool_keys[rows], ids=pool_ids[rows], indices=rows)

    classes_from = dictionary_keys if name == "active-dict" else queries.to(pool_keys.dtype)  # B x d or K x d
    num_classes = resolve_pseudo_classes(num_pseudo_classes, classes_from.shape[0])
    pseudo_classes = draw_pseudo_classes(classes_from, num_classes, generator)  # C x d
    a = gradient_embedding_factors(pool_keys, pseudo_classes, temperature)  # N x C
    gradient_norms_sq = gradient_embedding_norms(a, pool_keys)  # N
    if name == "uncertainty":
        order = torch.argsort(torch.where(available, gradient_norms_sq, float("-inf")), descending=True, stable=True)
        keep = _first_per_clip(order, pool_ids) & available[order]
        rows = order[keep][:num_picks]
        return Selection(keys=pool_keys[rows], ids=pool_ids[rows], indices=rows)
    staying = dictionary_keys[num_picks:] if name == "active-aware" else dictionary_keys[:0]  # K - P x d
    centres_sq = None  # active, active-dict, and active-aware when no key stays
    if staying.shape[0] > 0:
        centres_sq = nearest_sq_to_centres(a, pool_keys, staying, pseudo_classes, temperature)  # N
    rows = kmeans_pp_seeding(
        factors=(a, pool_keys),
        sq_norms=gradient_norms_sq,
        ids=pool_ids,
        available=available,
        num_picks=num_picks,
        first="largest" if centres_sq is None else "drawn",
        generator=generator,
        centres_sq=centres_sq,
        rounds=seeding_rounds,
    )
    return Selection(keys=pool_keys[rows], ids=pool_ids[rows], indices=rows)


class Sampler:
    """A named sampler with its own random state: what the trainer (or the dictionary actor)
    holds. `select` accepts torch tensors or numpy arrays and works on `device` with the
    k-means++ seeding `seeding` ("exact" or "parallel")."""

    def __init__(
        self,
        *,
        name: str,
        temperature: float,
        num_pseudo_classes: int = 0,
        seed: int = 0,
        device: torch.device | str = "cpu",
        seeding: str = "exact",
        in_batch_negatives: bool = False,
    ):
        if name not in SAMPLER_NAMES:
            raise ValueError(f"method.sampler: unknown sampler {name!r} (known: {', '.join(SAMPLER_NAMES)})")
        check_seeding(seeding)
        self.name = name
        self.seeding = seeding
        self.temperature = temperature
        self.num_pseudo_classes = num_pseudo_classes
        self.in_batch_negatives = in_batch_negatives  # the loss's negatives, which `hardness` weighs against
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
        dictionary_keys: Tensor | np.ndarray | None = None,
        dictionary_ids: Tensor | np.ndarray | None = None,
    ) -> Selection:
        """`select(self.name, ...)` with this sampler's temperature, classes, loss negatives
        and generator."""

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
            dictionary_keys=None if dictionary_keys is None else tensor(dictionary_keys),
            dictionary_ids=None if dictionary_ids is None else tensor(dictionary_ids),
            in_batch_negatives=self.in_batch_negatives,
            seeding=self.seeding,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["name"] != self.name:
            raise ValueError(f"state is of sampler {state['name']!r}, this sampler is {self.name!r}")
        self.generator.set_state(state["generator"])
