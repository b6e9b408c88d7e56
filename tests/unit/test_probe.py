"""Frozen-feature probes: linear and weighted k-NN against references, determinism, reports."""

import math

import pytest
import torch

from service.config import EvalConfig, from_dict
from workers.models import build_encoders
from workers.probe import evaluate_features, extract_features, knn_probe, linear_probe, score

pytestmark = pytest.mark.unit


def clusters(n_per_class, num_classes, dim, *, seed, spread=1.0):
    """Gaussian clusters around random centres; labels 0..num_classes-1."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(num_classes, dim, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def test_score_reports_top1_per_class_and_the_confusion_matrix():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predictions = torch.tensor([0, 1, 1, 1, 0, 2])
    result = score(predictions, labels, num_classes=4)
    assert result.top1 == pytest.approx(4 / 6)
    assert result.per_class[:3] == [0.5, pytest.approx(2 / 3), 1.0]
    assert math.isnan(result.per_class[3])  # no test clip of class 3
    assert result.confusion.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert result.to_dict()["confusion"][1] == [1, 2, 0, 0]


def test_linear_probe_separates_clusters_and_is_deterministic():
    train_x, train_y = clusters(40, 5, 16, seed=0)
    test_x, test_y = clusters(20, 5, 16, seed=0)
    kwargs = {"num_classes": 5, "epochs": 100, "lr": 0.1, "weight_decay": 1e-4}
    first = linear_probe(train_x, train_y, test_x, test_y, **kwargs)
    again = linear_probe(train_x, train_y, test_x, test_y, **kwargs)
    assert first.top1 > 0.95
    assert first.top1 == again.top1 and torch.equal(first.confusion, again.confusion)
    assert int(first.confusion.sum()) == len(test_y)


def test_linear_probe_is_at_chance_on_noise():
    train_x, test_x = torch.randn(400, 16), torch.randn(400, 16)
    train_y, test_y = torch.arange(400) % 4, torch.arange(400) % 4
    result = linear_probe(train_x, train_y, test_x, test_y, num_classes=4, epochs=100, lr=0.1, weight_decay=1e-4)
    assert result.top1 < 0.35


def reference_knn(train_x, train_y, test_x, *, num_classes, k, temperature):
    predictions = []
    for x in test_x:
        sims = [float(torch.dot(x, t) / (x.norm() * t.norm())) for t in train_x]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[int(train_y[i])] += math.exp(sims[i] / temperature)
        predictions.append(max(range(num_classes), key=lambda c: votes[c]))
    return predictions


def test_knn_equals_the_brute_force_reference():
    train_x, train_y = clusters(15, 4, 8, seed=1, spread=3.0)
    test_x, test_y = clusters(10, 4, 8, seed=2, spread=3.0)
    result = knn_probe(train_x, train_y, test_x, test_y, num_classes=4, k=7, chunk=16)
    want = reference_knn(train_x, train_y, test_x, num_classes=4, k=7, temperature=0.07)
    expected = score(torch.tensor(want), test_y, num_classes=4)
    assert torch.equal(result.confusion, expected.confusion)


def test_features_are_pooled_backbone_by_default_and_extraction_restores_train_mode():
    cfg = from_dict(
        {
            "model": {
                "video": {"width": 0.125, "frames": 4, "size": 16},
                "audio": {"width": 0.125, "n_mels": 16},
                "embed_dim": 8,
                "head_hidden": 16,
            }
        }
    )
    torch.manual_seed(0)
    model = build_encoders(cfg.model)
    generator = torch.Generator().manual_seed(0)
    clips = [
        {
            "video": torch.randn(3, 3, 4, 16, 16, generator=generator),
            "audio": torch.randn(3, 1, 16, 20, generator=generator),
            "label": torch.tensor([0, 1, 2]),
        }
        for _ in range(2)
    ]
    backbone = extract_features(model, clips)
    assert model.training
    assert backbone["video"].shape == (6, 64) and backbone["audio"].shape == (6, 64)
    assert backbone["label"].tolist() == [0, 1, 2, 0, 1, 2]
    head = extract_features(model, clips, head=True)
    torch.testing.assert_close(head["video"].norm(dim=1), torch.ones(6))
    again = extract_features(model, clips)
    assert torch.equal(backbone["video"], again["video"])  # eval mode: batch statistics do not leak in

    results = evaluate_features(backbone, again, num_classes=3, cfg=EvalConfig(knn_k=3, linear_epochs=5))
    assert set(results) == {"video", "audio"} and set(results["video"]) == {"linear", "knn"}
