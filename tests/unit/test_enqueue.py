"""Step 4 with the fresh candidate pool, shadow dictionaries and the instruments that measure
what a dictionary holds (docs/architecture.md, "The method" and "Metrics")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from service.config import ConfigError, from_dict
from workers.diagnostics import dictionary_instruments, same_label_fraction
from workers.dictionary import NegativeDictionary
from workers.enqueue import Arrivals, DictionarySet, build_dictionaries, build_dictionary_set, update_dictionaries
from workers.trainer import train

pytestmark = pytest.mark.unit

M, D, K = 4, 8, 16


def config(**method):
    return from_dict(
        {
            "model": {
                "video": {"width": 0.125, "frames": 4, "size": 16},
                "audio": {"width": 0.125, "n_mels": 16},
                "embed_dim": D,
                "head_hidden": 16,
            },
            "method": {"dictionary_size": K, "momentum": 0.9, "pool": "fresh", **method},
            "optim": {"name": "sgd", "lr": 0.1},
            "train": {"steps": 12, "batch_size": M, "log_every": 1},
        }
    )


def unit(rows: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, D, generator=generator), dim=1)


def arrivals(step: int, *, extra: int, num_clips: int = 1000) -> Arrivals:
    """A global batch of M clips and `extra` further candidates, all distinct clips."""
    g = torch.Generator().manual_seed(step)
    ids = torch.arange(M + extra) + step * (M + extra) % num_clips
    return Arrivals(
        step=step,
        queries_v=unit(M, g),
        queries_a=unit(M, g),
        keys_v=unit(M, g),
        keys_a=unit(M, g),
        clip_ids=ids[:M],
        labels=ids[:M] % 3,
        sources=ids[:M],
        extra_keys_v=unit(extra, g),
        extra_keys_a=unit(extra, g),
        extra_ids=ids[M:],
        extra_labels=ids[M:] % 3,
        extra_sources=ids[M:],
    )


def make_batch(step: int, *, extra: int = 0):
    g = torch.Generator().manual_seed(step)
    index = (torch.arange(M) + step * M) % 40

    def clips(rows, index):
        return {
            "video": torch.randn(rows, 3, 4, 16, 16, generator=g),
            "audio": torch.randn(rows, 1, 16, 20, generator=g),
            "index": index,
            "label": index % 3,
            "source": index,
        }

    batch = clips(M, index)
    if extra:
        batch["extra"] = clips(extra, 40 + (torch.arange(extra) + step * extra) % 40)
    return batch


def batches(*, extra: int):
    step = 0
    while True:
        yield make_batch(step, extra=extra)
        step += 1


# --- the fresh pool -------------------------------------------------------------------------


def test_the_fresh_pool_defaults_to_n_2m_and_p_m_and_reads_no_extra_clips_for_moco():
    cfg = config()
    assert (cfg.pool_capacity, cfg.enqueue_per_step, cfg.num_extra_clips) == (2 * M, M, M)
    moco = config(sampler="moco")
    assert (moco.pool_capacity, moco.num_extra_clips) == (M, 0)
    with_shadows = config(sampler="moco", shadow_samplers="random")  # the shadows need candidates
    assert with_shadows.num_extra_clips == M
    stream = config(pool="stream")
    assert (stream.pool_capacity, stream.enqueue_per_step, stream.num_extra_clips) == (4 * M, 1, 0)


@pytest.mark.parametrize("sampler", ["active", "random", "hardness", "active-aware"])
def test_a_fresh_pool_enqueues_exactly_m_keys_a_step_and_keys_stay_about_k_over_2m_steps_old(sampler):
    cfg = config(sampler=sampler)
    dictionaries = build_dictionaries(cfg, device=torch.device("cpu"))
    ages = []
    for step in range(20):
        dictionary = dictionaries.dictionary_v
        before = dictionary.pointer
        counts = update_dictionaries(dictionaries, arrivals(step, extra=M))
        assert counts["entered_v"] == counts["entered_a"] == M  # P = M of the N = 2M candidates
        assert dictionary.pointer == (before + M) % K
        if step >= K // M:  # the random initial keys are all gone: every key came from a clip
            assert (dictionary.ids >= 0).all()
            ages.append(float((step + 1 - dictionary.steps).double().mean()))  # seen by the next step's loss
    assert abs(np.mean(ages) - (K / (2 * M) + 0.5)) < 1e-9  # turnover every K / M steps, as moco's


def test_random_from_a_fresh_pool_is_uniform_over_the_n_candidates():
    cfg = config(sampler="random", pool_size=4 * M)  # N = 4M: the batch and 3M extra clips
    dictionaries = build_dictionaries(cfg, device=torch.device("cpu"))
    trials, n = 2000, 4 * M
    hits = np.zeros(n)
    batch = arrivals(0, extra=3 * M)
    for _ in range(trials):
        before = dictionaries.dictionary_a.pointer
        update_dictionaries(dictionaries, batch)
        slots = (before + torch.arange(M)) % K
        picked = dictionaries.dictionary_a.ids[slots].numpy()
        hits[picked - int(batch.clip_ids[0])] += 1
    expected = trials * M / n
    chi2 = float(((hits - expected) ** 2 / expected).sum())
    assert hits.min() > 0 and chi2 < 45.0, (hits, chi2)  # 15 degrees of freedom: p < 0.001 above 37.7


def test_the_batch_enters_under_moco_and_extra_clips_never_enter_the_loss():
    moco = build_dictionaries(config(sampler="moco", shadow_samplers="random"), device=torch.device("cpu"))
    batch = arrivals(3, extra=M)
    update_dictionaries(moco, batch)
    assert set(moco.dictionary_v.ids[moco.dictionary_v.ids >= 0].tolist()) == set(batch.clip_ids.tolist())
    # The step's loss reads the batch's keys and the dictionaries only: extra clips are neither
    # positives nor negatives. They share the key encoders' forward with the batch (one
    # population of candidates), so with BatchNorm on batch statistics they move the positives'
    # normalisation; with the statistics fixed (eval mode) they change no loss.
    from workers.enqueue import LocalExchange
    from workers.step import train_step
    from workers.training import build_train_state

    cfg = config(sampler="random")
    losses = {}
    for fixed_statistics in (False, True):
        for extra in (0, M):
            torch.manual_seed(0)
            state = build_train_state(cfg, device=torch.device("cpu"))
            if fixed_statistics:
                state.key.eval()
            exchange = LocalExchange(build_dictionary_set(cfg, device=torch.device("cpu")))
            out = train_step(state, make_batch(0, extra=extra), exchange=exchange, method=cfg.method)
            losses[fixed_statistics, extra] = float(out.losses["loss"])
            assert out.exchanged.batch.extra_keys_v.shape == (extra, D)
    assert losses[True, 0] == losses[True, M]
    assert losses[False, 0] != losses[False, M]


def test_the_batch_and_the_extra_clips_are_encoded_as_one_population():
    # A clip's candidate key does not depend on which half it came in: swapping the batch and
    # the extra clips gives every clip the same key (two forwards, one per half, would give
    # each half its own BatchNorm statistics and so keys of their own).
    from workers.step import key_forward
    from workers.training import build_train_state

    torch.manual_seed(0)
    state = build_train_state(config(sampler="random"), device=torch.device("cpu"))
    first = make_batch(0)
    second = make_batch(7)
    keys = {}
    for batch, extra in ((first, second), (second, first)):
        keys_v, keys_a, extra_v, extra_a = key_forward(state, batch["video"], batch["audio"], extra, False)
        for ids, kv, ka in ((batch["index"], keys_v, keys_a), (extra["index"], extra_v, extra_a)):
            for clip, v, a in zip(ids.tolist(), kv, ka, strict=True):
                keys.setdefault(clip, []).append((v.float(), a.float()))
    assert len(keys) == 2 * M
    for (v1, a1), (v2, a2) in keys.values():
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a1, a2, rtol=1e-5, atol=1e-5)
    alone_v, _, _, _ = key_forward(state, first["video"], first["audio"], None, False)  # a forward of its own
    joint_v = torch.stack([keys[clip][0][0] for clip in first["index"].tolist()])
    assert not torch.allclose(alone_v.float(), joint_v, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("extra", [M, 3 * M])
def test_random_picks_batch_and_extra_keys_in_proportion_to_their_numbers(extra):
    # N = M + E candidates, P = M picks: a uniform draw takes M / N of its picks from the batch.
    dictionaries = build_dictionaries(config(sampler="random", pool_size=M + extra), device=torch.device("cpu"))
    trials = 1500
    picked = from_batch = 0.0
    for step in range(trials):
        counts = update_dictionaries(dictionaries, arrivals(step, extra=extra))
        for m in "va":
            picked += counts[f"picked_{m}"]
            from_batch += counts[f"picked_from_batch_{m}"]
    expected = M / (M + extra)
    # The picks of one step are a draw without replacement: the share's standard error over
    # 2 x trials steps is below sqrt(p (1 - p) / (2 trials M)); allow 4 of them.
    assert picked == 2 * trials * M
    assert abs(from_batch / picked - expected) < 4 * math.sqrt(expected * (1 - expected) / picked)


def test_the_picked_from_batch_share_is_one_for_moco_and_zero_for_the_stream_pool():
    from workers.diagnostics import entry_metrics

    moco = update_dictionaries(
        build_dictionaries(config(sampler="moco"), device=torch.device("cpu")), arrivals(0, extra=0)
    )
    assert entry_metrics(moco)["dict/picked_from_batch_share_v"] == 1.0
    stream = build_dictionaries(config(sampler="random", pool="stream"), device=torch.device("cpu"))
    for step in range(4):
        counts = update_dictionaries(stream, arrivals(step, extra=0))
    metrics = entry_metrics(counts, "shadow/random")
    assert metrics["shadow/random/picked_from_batch_share_a"] == 0.0 and counts["picked_a"] == 1
    assert metrics["shadow/random/entered_frac_a"] == 1 / M


def test_the_trainer_logs_the_picked_from_batch_share_of_the_run_and_of_each_shadow():
    result = train(config(sampler="random", shadow_samplers="moco,active"), batches(extra=M), num_steps=3)
    last = result.metrics[-1]
    assert 0.0 <= last["dict/picked_from_batch_share_v"] <= 1.0
    assert last["shadow/moco/picked_from_batch_share_a"] == 1.0
    assert 0.0 <= last["shadow/active/picked_from_batch_share_v"] <= 1.0


# --- shadows ----------------------------------------------------------------------------------


def test_shadows_leave_the_trained_run_unchanged_and_keep_dictionaries_of_their_own():
    plain = train(config(sampler="random"), batches(extra=M), num_steps=6)
    shadowed = train(config(sampler="random", shadow_samplers="active,moco,hardness"), batches(extra=M), num_steps=6)
    for a, b in zip(plain.state.query.parameters(), shadowed.state.query.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(plain.dictionaries.main.dictionary_v.keys, shadowed.dictionaries.main.dictionary_v.keys)
    assert [m["train/loss"] for m in plain.metrics] == [m["train/loss"] for m in shadowed.metrics]
    shadows = shadowed.dictionaries.shadows
    assert set(shadows) == {"active", "moco", "hardness"}
    assert not torch.equal(shadows["active"].dictionary_v.ids, shadows["moco"].dictionary_v.ids)
    last = shadowed.metrics[-1]
    for name in ("active", "moco", "hardness"):  # each shadow's instruments, measured on the same batch
        assert math.isfinite(last[f"shadow/{name}/fn_mass_v"]) and math.isfinite(last[f"shadow/{name}/hardness_a"])
    assert "shadow/active/fn_mass_v" not in plain.metrics[-1]


def test_a_dictionary_set_state_round_trips_with_its_shadows_and_refuses_other_shadows():
    cfg = config(shadow_samplers="active,random")
    first = build_dictionary_set(cfg, device=torch.device("cpu"))
    for step in range(3):
        first.update(arrivals(step, extra=M))
    second = build_dictionary_set(cfg, device=torch.device("cpu"))
    second.load_state_dict(first.state_dict())
    for name in ("active", "random"):
        assert torch.equal(first.shadows[name].dictionary_a.keys, second.shadows[name].dictionary_a.keys)
    batch = arrivals(3, extra=M)
    first.update(batch)
    second.update(batch)  # the samplers' random states came along too
    assert torch.equal(first.shadows["random"].dictionary_v.ids, second.shadows["random"].dictionary_v.ids)
    other: DictionarySet = build_dictionary_set(config(shadow_samplers="active"), device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"method\.shadow_samplers"):
        other.load_state_dict(first.state_dict())


# --- instruments ------------------------------------------------------------------------------


def own_and_other_class_dictionaries(queries: torch.Tensor, labels: torch.Tensor):
    """Two dictionaries the queries meet: one holding only keys of the queries' own classes
    (near each query: the false negatives MoCo meets in redundant data), one only of other
    classes (as far from the queries as the first is near)."""
    g = torch.Generator().manual_seed(5)
    size = 10 * queries.shape[0]  # ten keys near each query
    own, other = NegativeDictionary(size=size, dim=D), NegativeDictionary(size=size, dim=D)
    rows = torch.arange(size) % queries.shape[0]
    near = F.normalize(queries[rows] + 0.2 * torch.randn(size, D, generator=g), dim=1)
    own.enqueue(near, ids=100 + torch.arange(size), labels=labels[rows])
    other.enqueue(near, ids=200 + torch.arange(size), labels=(labels[rows] + 1) % 3)
    return own, other


def test_fn_mass_tells_a_dictionary_of_the_querys_class_from_one_of_other_classes_where_same_label_frac_cannot():
    g = torch.Generator().manual_seed(0)
    queries = unit(6, g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])  # balanced batch labels
    own, other = own_and_other_class_dictionaries(queries, labels)

    def measure(dictionary):
        return dictionary_instruments(
            dictionary,
            modality="a",
            queries=queries,
            clip_ids=torch.arange(6),
            labels=labels,
            sources=None,
            batch_keys=unit(6, g),
            temperature=0.1,
            in_batch_negatives=False,
        )

    on_own, on_other = measure(own), measure(other)
    assert on_own["dict/fn_mass_a"] > 0.8 and on_other["dict/fn_mass_a"] < 0.1
    assert on_own["dict/top10_same_label_a"] > 0.9 and on_other["dict/top10_same_label_a"] < 0.1
    assert on_own["dict/hardness_a"] == on_other["dict/hardness_a"]  # the same keys: equally hard
    assert on_own["dict/neg_share_a"] == pytest.approx(1.0)  # no in-batch negatives
    # The plain same-label fraction weighs each class's share of the dictionary by its share
    # of the batch: with balanced labels it is 1/3 for both, blind to the difference.
    blind = [same_label_fraction(labels.numpy(), d.labels.numpy()) for d in (own, other)]
    assert blind[0] == pytest.approx(1 / 3) and blind[1] == pytest.approx(1 / 3)


def test_neg_share_and_same_source_mass_count_the_in_batch_negatives_and_the_querys_recording():
    g = torch.Generator().manual_seed(1)
    queries, keys = unit(4, g), unit(4, g)
    dictionary = NegativeDictionary(size=4, dim=D)
    dictionary.enqueue(queries.clone(), ids=torch.tensor([10, 11, 12, 13]), sources=torch.tensor([7, 7, 8, 8]))
    out = dictionary_instruments(
        dictionary,
        modality="v",
        queries=queries,
        clip_ids=torch.tensor([0, 1, 2, 3]),
        labels=torch.full((4,), -1),
        sources=torch.tensor([7, 9, 9, 9]),
        batch_keys=keys,
        temperature=1.0,
        in_batch_negatives=True,
    )
    # Reference: softmax over 4 dictionary keys and the 3 other clips' keys of the batch.
    logits = torch.cat(
        [queries @ dictionary.keys.T, (queries @ keys.T).masked_fill(torch.eye(4, dtype=torch.bool), -math.inf)], 1
    )
    weights = torch.softmax(logits.double(), dim=1)
    assert out["dict/neg_share_v"] == pytest.approx(float(weights[:, :4].sum(1).mean()))
    expected_source = float(weights[0, :2].sum() / 4)  # only query 0 has keys of its recording (source 7)
    assert out["dict/same_source_mass_v"] == pytest.approx(expected_source)
    assert math.isnan(out["dict/fn_mass_v"])  # no query carries a label


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "field"),
    [
        ({"pool": "fresh", "pool_size": M - 1}, "method.pool_size"),
        ({"shadow_samplers": "active,greedy"}, "method.shadow_samplers"),
        ({"shadow_samplers": "random,random"}, "method.shadow_samplers"),
        ({"pool": "deep"}, "method.pool"),
    ],
)
def test_bad_pool_and_shadow_settings_are_refused_naming_the_field(method, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        config(**method)
