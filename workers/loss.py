"""Cross-modal InfoNCE of CM-ACC (docs/architecture.md, "The method", step 2).

    L_va = CE([q_v . k_a, q_v . D_a] / tau, target 0)   video queries against audio keys
    L_av = CE([q_a . k_v, q_a . D_v] / tau, target 0)   audio queries against video keys
    L    = L_va + L_av

The dictionaries are arguments: the loss owns no queue. All embeddings are L2-normalised, so
every dot product is a cosine similarity.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def _info_nce(
    *,
    queries: Tensor,
    keys: Tensor,
    dictionary: Tensor,
    temperature: float,
    in_batch_negatives: bool,
    clip_ids: Tensor | None,
    dictionary_ids: Tensor | None,
) -> Tensor:
    """Mean InfoNCE of `queries` [M, d] whose positives are the same rows of `keys` [M, d]."""
    negatives = queries @ dictionary.T  # M x K
    if clip_ids is not None and dictionary_ids is not None:
        # A dictionary entry of the query's own clip is a second positive, not a negative.
        same_clip = clip_ids[:, None] == dictionary_ids[None, :]  # M x K
        negatives = negatives.masked_fill(same_clip, float("-inf"))
    if in_batch_negatives:
        # Row i holds q_i . k_j for every j: the diagonal is the positive, the rest negatives.
        batch = queries @ keys.T  # M x M
        logits = torch.cat([batch, negatives], dim=1) / temperature  # M x (M + K)
        targets = torch.arange(queries.shape[0], device=queries.device)
    else:
        positives = (queries * keys).sum(dim=1, keepdim=True)  # M x 1
        logits = torch.cat([positives, negatives], dim=1) / temperature  # M x (1 + K)
        targets = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    return F.cross_entropy(logits, targets)


def cross_modal_nce(
    *,
    queries_v: Tensor,
    keys_a: Tensor,
    dictionary_a: Tensor,
    queries_a: Tensor,
    keys_v: Tensor,
    dictionary_v: Tensor,
    temperature: float,
    in_batch_negatives: bool = False,
    clip_ids: Tensor | None = None,
    dictionary_ids_a: Tensor | None = None,
    dictionary_ids_v: Tensor | None = None,
) -> dict[str, Tensor]:
    """Cross-modal InfoNCE in both directions; returns `loss_va`, `loss_av` and `loss` (nats).

    Shapes: queries_v, queries_a [M, d] (with gradient); keys_a, keys_v [M, d] (key encoders,
    no gradient); dictionary_a, dictionary_v [K, d]. `in_batch_negatives` adds the other M-1
    keys of the batch as negatives. With `clip_ids` [M] and the dictionaries' ids [K], entries
    of a query's own clip are left out of its negatives.

    Computed in float32 even under bf16 autocast: dividing by tau ~ 0.07 magnifies bf16's
    rounding of the cosine similarities fourteen-fold.
    """
    with torch.autocast(device_type=queries_v.device.type, enabled=False):
        loss_va = _info_nce(
            queries=queries_v.float(),
            keys=keys_a.float(),
            dictionary=dictionary_a.float(),
            temperature=temperature,
            in_batch_negatives=in_batch_negatives,
            clip_ids=clip_ids,
            dictionary_ids=dictionary_ids_a,
        )
        loss_av = _info_nce(
            queries=queries_a.float(),
            keys=keys_v.float(),
            dictionary=dictionary_v.float(),
            temperature=temperature,
            in_batch_negatives=in_batch_negatives,
            clip_ids=clip_ids,
            dictionary_ids=dictionary_ids_v,
        )
    return {"loss_va": loss_va, "loss_av": loss_av, "loss": loss_va + loss_av}
