"""What the dictionaries hold, measured: statistics both trainers log (docs/architecture.md,
"Metrics"). Pure numpy on labels the trainer knows; nothing here changes training.
"""

from __future__ import annotations

import numpy as np


def label_entropy(labels: np.ndarray) -> float:
    """Entropy (nats) of the label distribution of the dictionary keys whose label is known
    (labels >= 0); NaN when none is."""
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
