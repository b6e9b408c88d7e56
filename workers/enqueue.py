"""Step 4 of the method: which keys enter each dictionary (docs/architecture.md, "The method").

* `Arrivals`: what one global batch brings to step 4: its queries and keys, its clip ids,
  labels and sources, and, with the fresh pool, the keys of the extra clips.
* `Dictionaries`: both negative dictionaries, the stream pool's candidate pools and one
  sampler with its random state. `update_dictionaries` is step 4 on one `Dictionaries`.
* `DictionarySet`: the run's dictionaries and its shadow dictionaries
  (`method.shadow_samplers`: one `Dictionaries` per named sampler, fed the same candidates
  every step, never read by the loss), so samplers compare on one model and one stream of
  arrivals. In one process the trainer holds it (`LocalExchange`); on a cluster the
  dictionary actor does (`workers.actor`).

Candidate pools (`method.pool`):

* `fresh` (the paper's): the candidates of a modality are the batch's M keys plus the keys
  of E = N - M extra clips drawn at random from the training set (a second reader stream),
  encoded this step by the key encoders. A pool sampler picks P (default M) of the N, so
  every sampler turns the dictionary over every K / P steps, `moco` alike; nothing is kept
  between steps.
* `stream`: the most recent arrivals not yet entered, at most N (default 4M), with P < M
  (default M / 4) so that the sampler chooses. A clip of the current batch is never picked
  and a key enters a dictionary at most once.

Either way one selection takes at most one key per clip, and `moco` enqueues the batch's M
keys. Keys enter after the step's loss, so a query never meets its own positive.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.config import Config
from workers.dictionary import EMPTY_ID, CandidatePool, NegativeDictionary
from workers.sampler import Sampler
from workers.tensors import to_numpy, to_torch

NEEDS_DICTIONARY = ("active-dict", "active-aware", "hardness")  # samplers that read the dictionary's keys


@dataclass(kw_only=True)
class Arrivals:
    """One global batch's part in step 4 ([M, d] embeddings, [M] columns; the fresh pool's
    extra clips [E, d] and [E], E = 0 without them). `step`: the training step of the batch
    (the keys' arrival). Labels and sources are -1 where unknown."""

    step: int
    queries_v: Tensor
    queries_a: Tensor
    keys_v: Tensor
    keys_a: Tensor
    clip_ids: Tensor
    labels: Tensor
    sources: Tensor
    extra_keys_v: Tensor
    extra_keys_a: Tensor
    extra_ids: Tensor
    extra_labels: Tensor
    extra_sources: Tensor

    @property
    def num_clips(self) -> int:
        return int(self.clip_ids.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """Every tensor as a numpy array (what crosses the Ray object store)."""
        return {f.name: to_numpy(getattr(self, f.name)) for f in fields(self) if f.name != "step"}

    @classmethod
    def from_arrays(cls, step: int, arrays: Mapping[str, Any], device: torch.device | str = "cpu") -> Arrivals:
        """From numpy arrays (or tensors) by field name. Only the batch's embeddings and clip
        ids are required: labels and sources default to unknown (-1), the extra clips to none."""
        given = {name: torch.as_tensor(to_torch(value, device), device=device) for name, value in arrays.items()}
        ids = given["clip_ids"]
        unknown = torch.full_like(ids, EMPTY_ID)
        none_rows = given["keys_v"].new_zeros(0, given["keys_v"].shape[1])
        defaults = {"labels": unknown, "sources": unknown, "extra_keys_v": none_rows, "extra_keys_a": none_rows}
        extra_ids = given.get("extra_ids", ids.new_zeros(0))
        defaults.update({"extra_ids": extra_ids, "extra_labels": torch.full_like(extra_ids, EMPTY_ID)})
        defaults["extra_sources"] = defaults["extra_labels"]
        return cls(step=step, **{**defaults, **given})


@dataclass(kw_only=True)
class Exchanged:
    """What step 4 gave a rank: the global batch (`batch`; every rank has it), how many of
    its keys entered each dictionary and how many of its picks were batch keys (`counts`:
    `update_dictionaries`'; each shadow's in `shadow_counts`, where the shadows are kept), the
    statistics measured before the update (`statistics`, at log steps), and on a cluster the
    deltas applied, the digests of the batches submitted, a stop request and an error that
    ends the run."""

    batch: Arrivals
    counts: dict[str, float]
    shadow_counts: dict[str, dict[str, float]] = field(default_factory=dict)  # by shadow sampler, where kept
    statistics: dict[str, float] = field(default_factory=dict)
    select_ms: float = float("nan")
    deltas: list[Any] = field(default_factory=list)
    digests: dict[int, float] = field(default_factory=dict)
    stop_requested: bool = False
    error: str = ""


@dataclass(kw_only=True)
class Dictionaries:
    """Both negative dictionaries, the stream pool's candidate pools (None with the fresh
    pool) and a sampler with its random state, which enqueues P = `num_enqueue` keys a step."""

    dictionary_v: NegativeDictionary
    dictionary_a: NegativeDictionary
    pool_v: CandidatePool | None
    pool_a: CandidatePool | None
    sampler: Sampler
    num_enqueue: int

    def dictionary(self, modality: str) -> NegativeDictionary:
        return self.dictionary_v if modality == "v" else self.dictionary_a

    def parts(self) -> tuple[str, ...]:
        pools = ("pool_v", "pool_a") if self.pool_v is not None else ()
        return ("dictionary_v", "dictionary_a", *pools, "sampler")

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).state_dict() for name in self.parts()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = set(self.parts()) - set(state)
        if missing:
            raise ValueError(f"dictionary state lacks {', '.join(sorted(missing))} (saved with another method.pool?)")
        for name in self.parts():
            getattr(self, name).load_state_dict(state[name])


def sampler_seed(seed: int, sampler: str, *, shadow: bool) -> int:
    """The run's sampler draws from `train.seed`; each shadow from its own stream."""
    return seed if not shadow else (seed * 1_000_003 + zlib.crc32(sampler.encode())) % 2**63


def build_dictionaries(cfg: Config, *, device: torch.device, sampler: str | None = None) -> Dictionaries:
    """Dictionaries of `method.dictionary_size` random unit keys (the same on every device
    for a seed), empty stream pools of N = `cfg.pool_capacity` (none with the fresh pool) and
    the sampler `sampler` (default `method.sampler`; another name makes a shadow, seeded
    apart; `name:seeding` a shadow with that k-means++ seeding instead of `method.seeding`),
    which enqueues P = `cfg.enqueue_per_step` keys a step."""
    method, dim = cfg.method, cfg.model.embed_dim
    name, _, seeding = (sampler or method.sampler).partition(":")
    init = torch.Generator().manual_seed(cfg.train.seed)
    stream = method.pool == "stream"
    pool_size = cfg.pool_capacity
    return Dictionaries(
        dictionary_v=NegativeDictionary(size=method.dictionary_size, dim=dim, device=device, generator=init),
        dictionary_a=NegativeDictionary(size=method.dictionary_size, dim=dim, device=device, generator=init),
        pool_v=CandidatePool(size=pool_size, dim=dim, device=device) if stream else None,
        pool_a=CandidatePool(size=pool_size, dim=dim, device=device) if stream else None,
        sampler=Sampler(
            name=name,
            temperature=method.temperature,
            num_pseudo_classes=method.pseudo_classes,
            seed=sampler_seed(cfg.train.seed, sampler or name, shadow=sampler is not None),
            device=device,
            seeding=seeding or method.seeding,
            in_batch_negatives=method.in_batch_negatives,
        ),
        num_enqueue=cfg.enqueue_per_step if name != "moco" else cfg.global_batch_size,
    )


def update_dictionaries(dictionaries: Dictionaries, arrivals: Arrivals) -> dict[str, float]:
    """Step 4 for one global batch on one `Dictionaries`: per modality the sampler picks the
    keys that enter (pseudo-classes: the other modality's queries), they enter the
    dictionary, and with the stream pool they leave the pool and the batch's keys join it.
    Returns the keys that arrived (`arrived`, M) and, per modality m, the keys that entered
    (`entered_m`), the keys picked (`picked_m`: the selection, M for `moco`) and how many of
    those were keys of the batch (`picked_from_batch_m`: with the fresh pool the batch's M of
    the N candidates, the rest are extra clips; 0 with the stream pool, whose candidates
    arrived in earlier steps)."""
    a = arrivals
    counts = {"arrived": float(a.num_clips)}
    steps = torch.full_like(a.clip_ids, a.step)
    for modality, keys, extra_keys, other_queries in (
        ("v", a.keys_v, a.extra_keys_v, a.queries_a),
        ("a", a.keys_a, a.extra_keys_a, a.queries_v),
    ):
        dictionary: NegativeDictionary = getattr(dictionaries, f"dictionary_{modality}")
        pool: CandidatePool | None = getattr(dictionaries, f"pool_{modality}")
        sampler = dictionaries.sampler
        if sampler.name == "moco":  # the batch itself: plain cross-modal MoCo
            dictionary.enqueue(keys, a.clip_ids, a.labels, steps, a.sources)
            counts[f"entered_{modality}"] = float(min(a.num_clips, dictionary.size))
            counts[f"picked_{modality}"] = counts[f"picked_from_batch_{modality}"] = float(a.num_clips)
            continue
        if pool is None:  # fresh: the batch's keys and the extra clips' keys, all encoded now
            candidates = torch.cat([keys, extra_keys])  # N x d
            ids = torch.cat([a.clip_ids, a.extra_ids])
            labels = torch.cat([a.labels, a.extra_labels])
            sources = torch.cat([a.sources, a.extra_sources])
            arrived = torch.cat([steps, torch.full_like(a.extra_ids, a.step)])
            exclude = ids.new_tensor([EMPTY_ID])
        else:  # stream: the recent arrivals not entered yet; the current batch's clips excluded
            candidates, ids = pool.candidates()
            labels, arrived, sources = (getattr(pool, name)[: ids.shape[0]] for name in ("labels", "steps", "sources"))
            exclude = torch.cat([a.clip_ids, a.clip_ids.new_tensor([EMPTY_ID])])
        selection = sampler.select(
            pool_keys=candidates,
            pool_ids=ids,
            queries=other_queries,
            batch_keys=keys,
            batch_ids=a.clip_ids,
            exclude_ids=exclude,
            num_picks=dictionaries.num_enqueue,
            dictionary_keys=dictionary.oldest_first() if sampler.name in NEEDS_DICTIONARY else None,
            dictionary_ids=dictionary.oldest_first("ids") if sampler.name == "hardness" else None,
        )
        rows = selection.indices
        dictionary.enqueue(selection.keys, selection.ids, labels[rows], arrived[rows], sources[rows])
        if pool is not None:
            pool.take(rows)
            pool.push(keys, a.clip_ids, a.labels, steps, a.sources)
        counts[f"entered_{modality}"] = float(min(selection.ids.shape[0], dictionary.size))
        counts[f"picked_{modality}"] = float(rows.shape[0])
        # With the fresh pool the batch's rows lead the candidates; the stream pool holds none.
        counts[f"picked_from_batch_{modality}"] = float((rows < a.num_clips).sum()) if pool is None else 0.0
    return counts


@dataclass(kw_only=True)
class DictionarySet:
    """The run's dictionaries (`main`) and its shadows, by sampler name."""

    main: Dictionaries
    shadows: dict[str, Dictionaries] = field(default_factory=dict)

    def update(self, arrivals: Arrivals) -> dict[str, dict[str, float]]:
        """Step 4 for every member, the shadows on the same candidates; the counts of each
        (`update_dictionaries`), the run's under "main", each shadow's under its sampler."""
        counts = {"main": update_dictionaries(self.main, arrivals)}
        for name, shadow in self.shadows.items():
            counts[name] = update_dictionaries(shadow, arrivals)
        return counts

    def views(self) -> dict[str, tuple[NegativeDictionary, NegativeDictionary]]:
        """(D_v, D_a) of every member: "dict" for the run's, "shadow/<sampler>" for each shadow."""
        out = {"dict": (self.main.dictionary_v, self.main.dictionary_a)}
        out.update({f"shadow/{name}": (s.dictionary_v, s.dictionary_a) for name, s in self.shadows.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**self.main.state_dict(), "shadows": {name: s.state_dict() for name, s in self.shadows.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.main.load_state_dict({name: part for name, part in state.items() if name != "shadows"})
        saved = dict(state.get("shadows") or {})
        if set(saved) != set(self.shadows):
            raise ValueError(
                f"the state holds shadows {sorted(saved) or 'none'}, this run has {sorted(self.shadows) or 'none'} "
                "(method.shadow_samplers)"
            )
        for name, shadow in self.shadows.items():
            shadow.load_state_dict(saved[name])


def build_dictionary_set(cfg: Config, *, device: torch.device) -> DictionarySet:
    """The run's dictionaries and one shadow per name in `method.shadow_samplers`."""
    return DictionarySet(
        main=build_dictionaries(cfg, device=device),
        shadows={name: build_dictionaries(cfg, device=device, sampler=name) for name in cfg.shadow_samplers},
    )


class LocalExchange:
    """Step 4 in this process (the single-process trainer): the dictionaries the loss reads
    are the set's own, updated right after each step."""

    def __init__(self, dictionaries: DictionarySet, *, measure: Any = None):
        self.dictionaries = dictionaries
        self.measure = measure  # measure(batch, views) -> statistics, before the update

    @property
    def dictionary_v(self) -> NegativeDictionary:
        return self.dictionaries.main.dictionary_v

    @property
    def dictionary_a(self) -> NegativeDictionary:
        return self.dictionaries.main.dictionary_a

    def exchange(self, arrivals: Arrivals, *, measure: bool = False) -> Exchanged:
        statistics = self.measure(arrivals, self.dictionaries.views()) if measure and self.measure else {}
        started = time.perf_counter()
        counts = self.dictionaries.update(arrivals)
        if arrivals.keys_v.is_cuda:
            torch.cuda.synchronize(arrivals.keys_v.device)
        return Exchanged(
            batch=arrivals,
            counts=counts.pop("main"),
            shadow_counts=counts,
            statistics=statistics,
            select_ms=1000 * (time.perf_counter() - started),
        )
