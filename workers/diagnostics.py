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
  that entered, label entropy, the same-label fraction a query meets (false negatives),
  mean pairwise cosine and effective rank of the keys (redundancy), mean key age in steps.
"""

from __future__ import annotations

import math

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


def dictionary_metrics(
    dictionary: NegativeDictionary, *, modality: str, step: int, query_labels: Tensor
) -> dict[str, float]:
    """What one dictionary holds at `step` (the step the current batch was trained at), over
    its keys that came from clips; `query_labels` [M] are the current batch's labels."""
    real = dictionary.ids >= 0
    keys = dictionary.keys[real]
    labels = dictionary.labels[real].cpu().numpy()
    arrival = dictionary.steps[real]
    arrival = arrival[arrival >= 0]
    m = modality
    return {
        f"dict/filled_{m}": float(real.float().mean()),
        f"dict/label_entropy_{m}": label_entropy(labels),
        f"dict/same_label_frac_{m}": same_label_fraction(query_labels.cpu().numpy(), labels),
        f"dict/key_cos_{m}": mean_pairwise_cosine(keys),
        f"dict/effective_rank_{m}": effective_rank(keys),
        f"dict/key_age_{m}": float((step - arrival).double().mean()) if arrival.numel() else float("nan"),
    }


def step_statistics(
    *,
    queries_v: Tensor,
    queries_a: Tensor,
    keys_v: Tensor,
    keys_a: Tensor,
    labels: Tensor,
    dictionary_v: NegativeDictionary,
    dictionary_a: NegativeDictionary,
    step: int,
    arrived: float,
    entered_v: float,
    entered_a: float,
) -> dict[str, float]:
    """Every statistic of one step, as both trainers log it every `train.log_every` steps:
    the batch's embeddings ([M, d] each, `labels` [M]), both dictionaries at `step` (the
    step the batch was trained at), and the fraction of the arrivals that entered
    (`dict/entered_frac_{v,a}`: `entered_*` of `arrived` keys; P / M for a pool sampler in
    steady state; NaN when nothing arrived)."""
    out = embedding_metrics(queries_v=queries_v, queries_a=queries_a, keys_v=keys_v, keys_a=keys_a)
    for modality, dictionary, entered in (("v", dictionary_v, entered_v), ("a", dictionary_a, entered_a)):
        out.update(dictionary_metrics(dictionary, modality=modality, step=step, query_labels=labels))
        out[f"dict/entered_frac_{modality}"] = entered / arrived if arrived else math.nan
    return out
