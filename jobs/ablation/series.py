"""What an ablation report reads from each run's metrics, and how it titles each series."""

PROBE_FIGURES = ("video/linear", "video/knn", "audio/linear", "audio/knn")
# What the queries meet in a dictionary (workers/diagnostics.py): these can move.
INSTRUMENT_SERIES = (
    ("fn_mass", "softmax mass on same-label keys (false negatives)"),
    ("top10_same_label", "share of the 10 nearest keys with the query's label"),
    ("hardness", "largest cosine of a query to a key"),
    ("neg_share", "the dictionary's share of the negative mass"),
    ("same_source_mass", "softmax mass on keys of the query's recording"),
)
# What a dictionary holds. same_label_frac is blind: about 1/C for any dictionary when the
# batch labels are balanced; it stays for comparison with earlier reports.
HOLDING_SERIES = (
    ("entered_frac", "fraction of arrivals that entered"),
    ("picked_from_batch_share", "share of the picks that were batch keys"),
    ("label_entropy", "label entropy of the keys (nats)"),
    ("same_label_frac", "same-label fraction (blind: ~1/C)"),
    ("key_cos", "mean pairwise cosine of the keys"),
    ("effective_rank", "effective rank of the keys"),
    ("key_age", "mean key age (steps)"),
)
DICT_SERIES = tuple((f"dict/{name}", title) for name, title in INSTRUMENT_SERIES + HOLDING_SERIES)
SHADOW_SERIES = (
    *INSTRUMENT_SERIES,
    ("picked_from_batch_share", "share of the picks that were batch keys"),
    ("label_entropy", "label entropy of the keys (nats)"),
    ("key_age", "mean key age (steps)"),
)
TRAINING_SERIES = (("train/loss", "loss (nats)"), ("dict/select_ms", "selection (ms)"))
