"""Frozen-feature evaluation (docs/architecture.md, "Evaluation"): a linear probe and weighted k-NN per modality.

Features are the pooled backbone output by default (the head output optionally), extracted
with the encoders in eval mode and no gradient. Both probes train on one labelled split and
report on another: top-1 accuracy, per-class accuracy and the confusion matrix. Everything
runs in float32 on the CPU with no random numbers, so the same features give the same result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from service.config import EvalConfig
from workers.models import AudioVisualEncoder

MODALITIES = ("video", "audio")
KNN_TEMPERATURE = 0.07  # similarity weights exp(sim / 0.07), as in InstDisc and DINO's k-NN


@dataclass(kw_only=True)
class ProbeResult:
    """Accuracies are fractions in [0, 1]; `per_class[c]` is NaN when class c has no test clip
    (None in `to_dict`).

    `confusion[t, p]` counts test clips of true class t predicted as p; `support[c]` is the
    number of test clips of class c. `top5` (the true class among the five best scored) is
    None with 5 classes or fewer, where it says nothing.
    """

    top1: float
    per_class: list[float]
    confusion: Tensor  # num_classes x num_classes, int64
    top5: float | None = None

    @property
    def support(self) -> list[int]:
        return self.confusion.sum(dim=1).tolist()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"top1": self.top1}
        if self.top5 is not None:
            out["top5"] = self.top5
        out.update(per_class=_json_floats(self.per_class), support=self.support, confusion=self.confusion.tolist())
        return out


def _json_floats(values: list[float]) -> list[float | None]:
    """NaN (a class with no test clip) as None: JSON has no NaN."""
    return [None if math.isnan(v) else v for v in values]


def score(predictions: Tensor, labels: Tensor, *, num_classes: int, scores: Tensor | None = None) -> ProbeResult:
    """Top-1, per-class accuracy and confusion matrix of predictions [n] against labels [n];
    with the class scores [n, num_classes] and more than 5 classes, top-5 as well."""
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    confusion = confusion.view(num_classes, num_classes)
    support = confusion.sum(dim=1)  # num_classes
    per_class = torch.where(support > 0, confusion.diag() / support.clamp_min(1), float("nan"))
    top5 = None
    if scores is not None and num_classes > 5:
        best = scores.topk(5, dim=1).indices  # n x 5
        top5 = float((best == labels[:, None]).any(dim=1).float().mean())
    return ProbeResult(
        top1=float((predictions == labels).float().mean()),
        per_class=per_class.tolist(),
        confusion=confusion,
        top5=top5,
    )


def combine(results: list[ProbeResult], fold_names: list[str]) -> dict[str, Any]:
    """One probe over the folds of a protocol, JSON-ready: top-1 (and top-5) as the mean over
    folds with their standard deviation, the confusion matrix summed over folds (each clip is
    held out once, so it sums to the clips scored) with per-class accuracy from it, and each
    fold's own figures. A single fold gives that fold's result."""
    if len(results) == 1:
        return results[0].to_dict()
    confusion = torch.stack([r.confusion for r in results]).sum(dim=0)
    support = confusion.sum(dim=1)
    per_class = torch.where(support > 0, confusion.diag() / support.clamp_min(1), float("nan"))
    top1 = torch.tensor([r.top1 for r in results], dtype=torch.float64)
    out: dict[str, Any] = {"top1": float(top1.mean()), "top1_std": float(top1.std(unbiased=False))}
    if all(r.top5 is not None for r in results):
        top5 = torch.tensor([r.top5 for r in results], dtype=torch.float64)
        out.update(top5=float(top5.mean()), top5_std=float(top5.std(unbiased=False)))
    out.update(
        per_class=_json_floats(per_class.tolist()),
        support=support.tolist(),
        confusion=confusion.tolist(),
        folds=[
            {"name": name, **{k: v for k, v in r.to_dict().items() if k in ("top1", "top5")}}
            for name, r in zip(fold_names, results, strict=True)
        ],
    )
    return out


@torch.no_grad()
def extract_features(
    model: AudioVisualEncoder,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    head: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Frozen features of a labelled clip set: {"video": [n, F], "audio": [n, F], "label": [n]}.

    Batches hold `video`, `audio` and `label` as in training; a modality that is None in the
    batches (an audio-only or video-only set) is left out. `head=False` gives the pooled
    backbone output (F = 512 x width), `head=True` the L2-normalised head output (F = d).
    Returned on the CPU in float32; the model is in eval mode meanwhile and restored after.
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {}
    try:
        for batch in batches:
            for name in (m for m in MODALITIES if batch.get(m) is not None):
                parts.setdefault(name, [])
                encoder = getattr(model, name)
                x = batch[name].to(device)
                z = encoder(x) if head else encoder.features(x)
                parts[name].append(z.float().cpu())
            parts.setdefault("label", []).append(batch["label"].cpu().long())
    finally:
        model.train(was_training)
    return {name: torch.cat(values) for name, values in parts.items()}


def standardise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Zero mean, unit variance per feature, with the training split's statistics."""
    mean = train.mean(dim=0)
    std = train.std(dim=0).clamp_min(1e-6)  # a dead unit stays 0 rather than dividing by 0
    return (train - mean) / std, (test - mean) / std


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    epochs: int,
    lr: float,
    weight_decay: float,
) -> ProbeResult:
    """Multinomial logistic regression on standardised features, trained full-batch.

    `epochs` full-batch steps of Adam at learning rate `lr` on the mean cross-entropy plus
    `weight_decay` / 2 x |W|^2; weights start at zero, so no random numbers are involved.
    """
    x_train, x_test = standardise(train_features.float(), test_features.float())
    weight = torch.zeros(num_classes, x_train.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(x_train @ weight.T + bias, train_labels) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = x_test @ weight.T + bias
    return score(logits.argmax(dim=1), test_labels, num_classes=num_classes, scores=logits)


def knn_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    k: int,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> ProbeResult:
    """Weighted k-NN on cosine similarity: each of the k nearest training clips votes for its
    class with weight exp(similarity / temperature); the class with the most weight wins."""
    train = F.normalize(train_features.float(), dim=1)  # n_train x F
    test = F.normalize(test_features.float(), dim=1)  # n_test x F
    k = min(k, train.shape[0])
    all_votes = []
    for start in range(0, test.shape[0], chunk):  # chunks bound the n_test x n_train memory
        similarity = test[start : start + chunk] @ train.T  # c x n_train
        top_sim, top_rows = similarity.topk(k, dim=1)  # c x k
        votes = torch.zeros(top_sim.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_rows], torch.exp(top_sim / temperature))
        all_votes.append(votes)
    votes = torch.cat(all_votes)
    return score(votes.argmax(dim=1), test_labels, num_classes=num_classes, scores=votes)


def evaluate_features(
    train: Mapping[str, Tensor],
    test: Mapping[str, Tensor],
    *,
    num_classes: int,
    cfg: EvalConfig,
    probes: tuple[str, ...] = ("linear", "knn"),
) -> dict[str, dict[str, ProbeResult]]:
    """`probes` on each modality the features have: {"video": {"linear": ..., "knn": ...},
    "audio": ...}. `train` and `test` are `extract_features` outputs.
    """
    results: dict[str, dict[str, ProbeResult]] = {}
    for name in (m for m in MODALITIES if m in train):
        args = (train[name], train["label"], test[name], test["label"])
        results[name] = {}
        if "linear" in probes:
            results[name]["linear"] = linear_probe(
                *args,
                num_classes=num_classes,
                epochs=cfg.linear_epochs,
                lr=cfg.linear_lr,
                weight_decay=cfg.linear_weight_decay,
            )
        if "knn" in probes:
            results[name]["knn"] = knn_probe(*args, num_classes=num_classes, k=cfg.knn_k)
    return results
