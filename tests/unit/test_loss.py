"""The cross-modal InfoNCE against a per-sample loop written from the paper's formula."""

import math

import pytest
import torch
from torch.nn import functional as F

from workers.loss import cross_modal_nce

pytestmark = pytest.mark.unit

TAU = 0.07


def unit_rows(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def reference_direction(queries, keys, dictionary, *, in_batch, clip_ids=None, dictionary_ids=None):
    """mean_i -log( exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum over negatives n of exp(q_i.n/tau)) )."""
    total = 0.0
    for i in range(queries.shape[0]):
        positive = math.exp(float(queries[i] @ keys[i]) / TAU)
        negatives = 0.0
        for j in range(dictionary.shape[0]):
            if clip_ids is not None and int(dictionary_ids[j]) == int(clip_ids[i]):
                continue
            negatives += math.exp(float(queries[i] @ dictionary[j]) / TAU)
        if in_batch:
            negatives += sum(math.exp(float(queries[i] @ keys[j]) / TAU) for j in range(keys.shape[0]) if j != i)
        total += -math.log(positive / (positive + negatives))
    return total / queries.shape[0]


def make(m=6, k=10, d=8):
    return {
        "queries_v": unit_rows(m, d, 0),
        "keys_a": unit_rows(m, d, 1),
        "dictionary_a": unit_rows(k, d, 2),
        "queries_a": unit_rows(m, d, 3),
        "keys_v": unit_rows(m, d, 4),
        "dictionary_v": unit_rows(k, d, 5),
    }


@pytest.mark.parametrize("in_batch", [False, True])
def test_loss_equals_the_per_sample_loop(in_batch):
    t = make()
    out = cross_modal_nce(**t, temperature=TAU, in_batch_negatives=in_batch)
    want_va = reference_direction(t["queries_v"], t["keys_a"], t["dictionary_a"], in_batch=in_batch)
    want_av = reference_direction(t["queries_a"], t["keys_v"], t["dictionary_v"], in_batch=in_batch)
    assert out["loss_va"].item() == pytest.approx(want_va, rel=1e-5)
    assert out["loss_av"].item() == pytest.approx(want_av, rel=1e-5)
    assert out["loss"].item() == pytest.approx(want_va + want_av, rel=1e-5)


def test_dictionary_entries_of_the_querys_own_clip_are_not_negatives():
    t = make()
    clip_ids = torch.arange(6)
    dictionary_ids_a = torch.tensor([0, 9, 2, 2, -1, 7, 5, -1, 11, 12])
    dictionary_ids_v = torch.tensor([1, 1, 3, 4, -1, 8, 8, -1, 11, 0])
    out = cross_modal_nce(
        **t,
        temperature=TAU,
        clip_ids=clip_ids,
        dictionary_ids_a=dictionary_ids_a,
        dictionary_ids_v=dictionary_ids_v,
    )
    want_va = reference_direction(
        t["queries_v"],
        t["keys_a"],
        t["dictionary_a"],
        in_batch=False,
        clip_ids=clip_ids,
        dictionary_ids=dictionary_ids_a,
    )
    want_av = reference_direction(
        t["queries_a"],
        t["keys_v"],
        t["dictionary_v"],
        in_batch=False,
        clip_ids=clip_ids,
        dictionary_ids=dictionary_ids_v,
    )
    assert out["loss_va"].item() == pytest.approx(want_va, rel=1e-5)
    assert out["loss_av"].item() == pytest.approx(want_av, rel=1e-5)


def test_gradient_reaches_the_queries_only_through_their_own_direction():
    t = make()
    t["queries_v"].requires_grad_(True)
    t["queries_a"].requires_grad_(True)
    out = cross_modal_nce(**t, temperature=TAU)
    (grad_v,) = torch.autograd.grad(out["loss_va"], [t["queries_v"]])
    assert grad_v.abs().sum() > 0
    assert torch.autograd.grad(out["loss_va"], [t["queries_a"]], allow_unused=True) == (None,)


def test_loss_is_float32_under_bf16_autocast():
    t = {name: value.float() for name, value in make(m=16, k=64, d=32).items()}
    exact = cross_modal_nce(**t, temperature=TAU)["loss"]
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = cross_modal_nce(**t, temperature=TAU)["loss"]
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(exact.item(), rel=1e-6)
