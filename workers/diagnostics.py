"""What training and the dictionaries look like, measured: statistics both trainers log every
`train.log_every` steps under the same names (docs/architecture.md, "Metrics"). Nothing here
changes training.

* Embeddings of a batch (collapse and correspondence): `embed/std_*` is the spread across
  the batch (mean over dimensions of the standard deviation; 1/sqrt(d) for directions
  spread uniformly, 0 when every clip maps to one point), `embed/cos_*` the mean pairwise
  cosine similarity (0 spread out, 1 collapsed), and `embed/pos_cos_*` / `embed/neg_cos_*`
  the mean cosine of a query with its own clip's key of the other modality and with the
  other clips' keys: learning shows as a gap between them.
* Dictionaries (per modality, over the keys that came from clips): fraction of arrivals
  that entered, label entropy, mean pairwise cosine and effective rank of the keys
  (redundancy), mean key age in steps.
* What the queries meet in a dictionary (`dictionary_instruments`, per modality of the
  dictionary: D_a is met by the video queries): the softmax mass over the negatives that
  falls on keys of the query's own label (`fn_mass`: false negatives, weighted as the loss
  weighs them), the share of its 10 nearest keys with its label (`top10_same_label`), its
  largest cosine to a key (`hardness`), the dictionary's share of the negative mass against
  the in-batch negatives (`neg_share`), and the mass on keys from the query's own source
  file (`same_source_mass`: near-duplicates of one recording). `same_label_frac` (the
  share of known-label keys with the query's label, averaged over queries) is kept, but it
  is blind: with balanced batch labels it is about 1/C for ANY dictionary, even one holding
  a single class, because it weighs each class's share of the dictionary by its share of
  the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workers.dictionary import NegativeDictionary


def label_entropy(labels: np.ndarray) -> float:
    """Entropy (nats) of the label distribution of the keys whose label is known (labels >= 0);
    NaN when none is."""
    known = labels[labels >= 0]
    if known.size == 0:
        return float("nan")
    p = np.bincount(known) / known.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def same_label_fraction(query_labels: np.ndarray, dictionary_labels: np.ndarray) -> float:
    """Mean over labelled queries of the fraction of known-label negatives sharing its label
    (the false negatives a query meets); NaN when either side has no known label."""
    known = dictionary_labels[dictionary_labels >= 0]
    queries = query_labels[query_labels >= 0]
    if known.size == 0 or queries.size == 0:
        return float("nan")
    counts = np.bincount(known, minlength=int(max(known.max(), queries.max())) + 1)
    return float((counts[queries] / known.size).mean())


def mean_pairwise_cosine(x: Tensor) -> float:
    """Mean cosine similarity over pairs of distinct rows of x [n, d] (rows normalised here)."""
    n = x.shape[0]
    if n < 2:
        return float("nan")
    unit = torch.nn.functional.normalize(x.double(), dim=1)
    total = unit.sum(dim=0)
    return float((total @ total - n) / (n * (n - 1)))


def effective_rank(x: Tensor) -> float:
    """exp of the entropy of the normalised singular values of x [n, d] (Roy and Vetterli):
    1 when all rows lie on one line, d when they fill every direction equally."""
    if x.shape[0] < 2:
        return float("nan")
    singular = torch.linalg.svdvals(x.double())
    p = singular / singular.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def embedding_metrics(*, queries_v: Tensor, queries_a: Tensor, keys_v: Tensor, keys_a: Tensor) -> dict[str, float]:
    """Collapse and correspondence of one batch's embeddings (each [M, d], L2-normalised)."""
    out = {}
    for name, x in (("qv", queries_v), ("qa", queries_a), ("kv", keys_v), ("ka", keys_a)):
        out[f"embed/std_{name}"] = float(x.double().std(dim=0).mean())
        out[f"embed/cos_{name}"] = mean_pairwise_cosine(x)
    for direction, queries, keys in (("va", queries_v, keys_a), ("av", queries_a, keys_v)):
        similarity = queries.double() @ keys.double().T  # M x M: row i, own clip on the diagonal
        n = similarity.shape[0]
        positive = similarity.diagonal().mean()
        out[f"embed/pos_cos_{direction}"] = float(positive)
        out[f"embed/neg_cos_{direction}"] = float(
            (similarity.sum() - similarity.diagonal().sum()) / max(n * (n - 1), 1)
        )
    return out


def dictionary_instruments(
    dictionary: NegativeDictionary,
    *,
    modality: str,
    queries: Tensor,
    clip_ids: Tensor,
    labels: Tensor,
    sources: Tensor | None,
    batch_keys: Tensor,
    temperature: float,
    in_batch_negatives: bool,
    prefix: str = "dict",
) -> dict[str, float]:
    """What the queries [M, d] of a batch (their clip ids, labels and sources [M]) meet in
    `dictionary` (the one of `modality`, which the other modality's queries meet), weighed
    as the loss weighs it: softmax over the negatives at `temperature`, the dictionary's keys
    (a query's own clip left out) plus, with `in_batch_negatives`, the other clips' keys of
    the batch (`batch_keys` [M, d], row i the positive of query i). Mean over queries (over
    labelled ones for the label measures; over queries with a known source for the source
    one). NaN where nothing can be measured."""
    m = modality
    q = queries.double()
    keys = dictionary.keys.to(q.device, torch.float64)  # K x d
    ids, key_labels = dictionary.ids.to(q.device), dictionary.labels.to(q.device)
    cos_dict = q @ keys.T  # M x K
    own = clip_ids[:, None].to(q.device) == ids[None, :]  # M x K: a query's own clip is no negative
    logits = (cos_dict / temperature).masked_fill(own, float("-inf"))
    if in_batch_negatives:
        batch = (q @ batch_keys.double().T) / temperature  # M x M, the diagonal is the positive
        batch = batch.masked_fill(torch.eye(batch.shape[0], dtype=torch.bool, device=q.device), float("-inf"))
        logits = torch.cat([logits, batch], dim=1)
    weights = torch.softmax(logits, dim=1)[:, : keys.shape[0]]  # M x K: each key's share of the negative mass
    query_labels = labels.to(q.device)
    labelled = query_labels >= 0
    same_label = (key_labels[None, :] == query_labels[:, None]) & (key_labels[None, :] >= 0)  # M x K
    out = {
        f"{prefix}/neg_share_{m}": float(weights.sum(dim=1).mean()),
        f"{prefix}/hardness_{m}": float(cos_dict.masked_fill(own, float("-inf")).max(dim=1).values.mean()),
        f"{prefix}/fn_mass_{m}": float((weights * same_label).sum(dim=1)[labelled].mean())
        if labelled.any()
        else math.nan,
    }
    from_clips = (ids >= 0) & (key_labels >= 0)
    nearest = math.nan
    if labelled.any() and from_clips.any():
        count = min(10, int(from_clips.sum()))
        ranked = cos_dict.masked_fill(own | ~from_clips[None, :], float("-inf")).topk(count, dim=1).indices  # M x 10
        nearest = float(same_label.gather(1, ranked).double().mean(dim=1)[labelled].mean())
    out[f"{prefix}/top10_same_label_{m}"] = nearest
    if sources is not None:
        query_sources = sources.to(q.device)
        key_sources = dictionary.sources.to(q.device)
        same_source = (key_sources[None, :] == query_sources[:, None]) & (key_sources[None, :] >= 0)
        known = query_sources >= 0
        out[f"{prefix}/same_source_mass_{m}"] = (
            float((weights * same_source).sum(dim=1)[known].mean()) if known.any() else math.nan
        )
    return out


def dictionary_metrics(
    dictionary: NegativeDictionary, *, modality: str, step: int, query_labels: Tensor, prefix: str = "dict"
) -> dict[str, float]:
    """What one dictionary holds at `step` (the step the current batch was trained at), over
    its keys that came from clips; `query_labels` [M] are the current batch's labels."""
    real = dictionary.ids >= 0
    keys = dictionary.keys[real]
    labels = dictionary.labels[real].cpu().numpy()
    arrival = dictionary.steps[real]
    arrival = arrival[arrival >= 0]
    m, p = modality, prefix
    return {
        f"{p}/filled_{m}": float(real.float().mean()),
        f"{p}/label_entropy_{m}": label_entropy(labels),
        f"{p}/same_label_frac_{m}": same_label_fraction(query_labels.cpu().numpy(), labels),
        f"{p}/key_cos_{m}": mean_pairwise_cosine(keys),
        f"{p}/effective_rank_{m}": effective_rank(keys),
        f"{p}/key_age_{m}": float((step - arrival).double().mean()) if arrival.numel() else float("nan"),
    }


def step_statistics(
    batch: Any,
    views: Mapping[str, tuple[NegativeDictionary, NegativeDictionary]],
    *,
    temperature: float,
    in_batch_negatives: bool,
) -> dict[str, float]:
    """Every statistic of one step, as both trainers log it every `train.log_every` steps,
    measured on the current batch (`workers.enqueue.Arrivals`: its [M, d] embeddings, labels,
    sources) against the dictionaries as its loss met them (before they take its keys).
    `views`: (D_v, D_a) by metric prefix ("dict" for the run's, "shadow/<sampler>" for each
    shadow). The mean key age is counted from the batch's step."""
    out = embedding_metrics(
        queries_v=batch.queries_v, queries_a=batch.queries_a, keys_v=batch.keys_v, keys_a=batch.keys_a
    )
    for prefix, (dictionary_v, dictionary_a) in views.items():
        # D_a meets the video queries (their positives: the audio keys), D_v the audio queries.
        for modality, dictionary, queries, keys in (
            ("v", dictionary_v, batch.queries_a, batch.keys_v),
            ("a", dictionary_a, batch.queries_v, batch.keys_a),
        ):
            out.update(
                dictionary_metrics(
                    dictionary, modality=modality, step=batch.step, query_labels=batch.labels, prefix=prefix
                )
            )
            out.update(
                dictionary_instruments(
                    dictionary,
                    modality=modality,
                    queries=queries,
                    clip_ids=batch.clip_ids,
                    labels=batch.labels,
                    sources=batch.sources,
                    batch_keys=keys,
                    temperature=temperature,
                    in_batch_negatives=in_batch_negatives,
                    prefix=prefix,
                )
            )
    return out


def entry_metrics(counts: Mapping[str, float], prefix: str = "dict") -> dict[str, float]:
    """What step 4 did to one member's dictionaries (`workers.enqueue.update_dictionaries`'
    counts), per modality m: `{prefix}/entered_frac_m`, the fraction of the arrivals
    (`counts["arrived"]`) that entered (P / M in steady state), and
    `{prefix}/picked_from_batch_share_m`, the share of the picks that were keys of the batch
    rather than of the fresh pool's extra clips (M / N for `random`; 1 for `moco`; 0 with the
    stream pool). NaN where nothing arrived or was picked."""
    out = {}
    arrived = counts.get("arrived", 0.0)
    for m in "va":
        picked = counts.get(f"picked_{m}", 0.0)
        out[f"{prefix}/entered_frac_{m}"] = counts.get(f"entered_{m}", 0.0) / arrived if arrived else math.nan
        out[f"{prefix}/picked_from_batch_share_{m}"] = (
            counts.get(f"picked_from_batch_{m}", 0.0) / picked if picked else math.nan
        )
    return out
