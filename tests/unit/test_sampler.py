"""The samplers against slow, obviously correct references written here (docs/architecture.md, "The method")."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from workers.sampler import (
    Sampler,
    factorised_sq_distances,
    gradient_embedding_factors,
    gradient_embedding_norms,
    hardness_embeddings,
    resolve_pseudo_classes,
    select,
)

pytestmark = pytest.mark.unit

TAU = 0.07
NEW_SAMPLERS = ("active-dict", "active-aware", "hardness")  # the samplers that read the dictionary


def unit_rows(n, d, seed, dtype=torch.float64):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=1)


def make_inputs(*, n=40, d=8, batch=12, seed=0, dtype=torch.float64):
    """A pool with some repeated clip ids and a batch whose clips partly overlap the pool."""
    ids = torch.arange(n) % (n - 5)  # the last 5 rows repeat the clips of the first 5
    batch_ids = torch.tensor([3, 7, 11, 100, 101, 102, 103, 104, 105, 106, 107, 108])[:batch]
    return {
        "pool_keys": unit_rows(n, d, seed, dtype),
        "pool_ids": ids,
        "queries": unit_rows(batch, d, seed + 1, dtype),
        "batch_keys": unit_rows(batch, d, seed + 2, dtype),
        "batch_ids": batch_ids,
        "exclude_ids": batch_ids,
    }


def make_dictionary(*, k=20, d=8, seed=0, dtype=torch.float64):
    """The dictionary's keys [K, d], oldest first."""
    return unit_rows(k, d, seed + 3, dtype)


def run(name, inputs, *, num_picks, seed, num_pseudo_classes=0, dictionary_keys=None):
    return select(
        name,
        **inputs,
        num_picks=num_picks,
        temperature=TAU,
        num_pseudo_classes=num_pseudo_classes,
        generator=torch.Generator().manual_seed(seed),
        dictionary_keys=dictionary_keys,
    )


# --- references -----------------------------------------------------------------------------


def materialised_gradient_embeddings(candidates, pseudo_classes, tau):
    """g = (p - onehot(y)) (outer) u for every candidate, one at a time."""
    rows = []
    for u in candidates:
        p = torch.softmax(pseudo_classes @ u / tau, dim=0)
        a = p.clone()
        a[int(p.argmax())] -= 1.0
        rows.append(torch.outer(a, u).flatten())
    return torch.stack(rows)


def reference_kmeans_pp(embeddings, ids, excluded, num_picks, uniforms, *, first_largest, centres=()):
    """k-means++ seeding by the book on materialised embeddings, with Python loops.

    `centres`: embeddings of centres chosen before, counted like picks. Draw t takes the
    first row whose running sum of weights exceeds uniforms[t] x total (the inverse-CDF
    draw the sampler uses), so both consume the same random numbers.
    """
    n = embeddings.shape[0]
    available = [int(ids[i]) not in excluded for i in range(n)]
    picks = []
    for t in range(num_picks):
        if not any(available):
            break
        if t == 0 and first_largest:
            norms = [float(embeddings[i] @ embeddings[i]) if available[i] else -1.0 for i in range(n)]
            row = max(range(n), key=lambda i: norms[i])
        else:
            chosen = [embeddings[j] for j in picks] + list(centres)
            weights = []
            for i in range(n):
                if not available[i] or not chosen:
                    weights.append(0.0)
                else:
                    weights.append(min(float(((embeddings[i] - c) ** 2).sum()) for c in chosen))
            if sum(weights) == 0:
                weights = [1.0 if available[i] else 0.0 for i in range(n)]
            target = float(uniforms[t]) * sum(weights)
            running, row = 0.0, None
            for i in range(n):
                running += weights[i]
                if running > target:
                    row = i
                    break
        picks.append(row)
        available = [available[i] and int(ids[i]) != int(ids[row]) for i in range(n)]
    return picks


def reference_active(inputs, *, num_picks, seed, num_pseudo_classes, classes_from=None, staying=None):
    """`active`; with `classes_from` the pseudo-classes come from those rows (`active-dict`),
    with `staying` keys their gradient embeddings are centres already chosen (`active-aware`)."""
    generator = torch.Generator().manual_seed(seed)
    classes = inputs["queries"] if classes_from is None else classes_from
    num_classes = resolve_pseudo_classes(num_pseudo_classes, classes.shape[0])
    if num_classes < classes.shape[0]:  # the sampler draws its pseudo-classes first
        classes = classes[torch.randperm(classes.shape[0], generator=generator)[:num_classes]]
    uniforms = torch.rand(num_picks, generator=generator, dtype=torch.float64)
    g = materialised_gradient_embeddings(inputs["pool_keys"], classes, TAU)
    centres = () if staying is None else materialised_gradient_embeddings(staying, classes, TAU)
    excluded = set(inputs["exclude_ids"].tolist())
    return reference_kmeans_pp(
        g, inputs["pool_ids"], excluded, num_picks, uniforms, first_largest=len(centres) == 0, centres=centres
    )


def reference_hardness_embeddings(candidates, queries, positives, dictionary, tau):
    """h_n = sum_i w_in q_i with the softmax weights written out, one candidate and query at a time."""
    rows = []
    for n in candidates:
        h = torch.zeros_like(n)
        for q, k in zip(queries, positives, strict=True):
            denominator = torch.exp(q @ k / tau) + torch.exp(dictionary @ q / tau).sum() + torch.exp(q @ n / tau)
            h += torch.exp(q @ n / tau) / denominator * q
        rows.append(h)
    return torch.stack(rows)


def reference_hardness(inputs, dictionary, *, num_picks, seed, num_pseudo_classes):
    generator = torch.Generator().manual_seed(seed)
    queries, positives = inputs["queries"], inputs["batch_keys"]
    num_classes = resolve_pseudo_classes(num_pseudo_classes, queries.shape[0])
    if num_classes < queries.shape[0]:  # the same rows of queries and of their positives
        rows = torch.randperm(queries.shape[0], generator=generator)[:num_classes]
        queries, positives = queries[rows], positives[rows]
    uniforms = torch.rand(num_picks, generator=generator, dtype=torch.float64)
    h = reference_hardness_embeddings(inputs["pool_keys"], queries, positives, dictionary, TAU)
    excluded = set(inputs["exclude_ids"].tolist())
    return reference_kmeans_pp(h, inputs["pool_ids"], excluded, num_picks, uniforms, first_largest=True)


# --- the gradient embedding -----------------------------------------------------------------


def test_gradient_embedding_is_the_gradient_of_the_pseudo_label_loss():
    candidates, pseudo_classes = unit_rows(6, 5, 0), unit_rows(4, 5, 1)
    a = gradient_embedding_factors(candidates, pseudo_classes, TAU)
    for i, u in enumerate(candidates):
        q = pseudo_classes.clone().requires_grad_(True)
        logits = q @ u / TAU
        F.cross_entropy(logits[None], logits.argmax()[None]).backward()
        # d CE / d Q = (p - onehot(y)) u^T / tau
        torch.testing.assert_close(q.grad * TAU, torch.outer(a[i], u))


def test_factorised_distances_equal_distances_between_materialised_embeddings():
    candidates, pseudo_classes = unit_rows(30, 16, 2), unit_rows(10, 16, 3)
    candidates = candidates * torch.linspace(0.5, 2.0, 30, dtype=torch.float64)[:, None]  # not only unit norms
    a = gradient_embedding_factors(candidates, pseudo_classes, TAU)
    g = materialised_gradient_embeddings(candidates, pseudo_classes, TAU)
    torch.testing.assert_close(factorised_sq_distances(a, candidates, a, candidates), torch.cdist(g, g) ** 2)
    torch.testing.assert_close(gradient_embedding_norms(a, candidates), (g * g).sum(dim=1))


# --- active ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("num_pseudo_classes", [0, 5])
def test_active_picks_equal_the_brute_force_reference(seed, num_pseudo_classes):
    inputs = make_inputs(seed=seed)
    got = run("active", inputs, num_picks=12, seed=seed, num_pseudo_classes=num_pseudo_classes)
    want = reference_active(inputs, num_picks=12, seed=seed, num_pseudo_classes=num_pseudo_classes)
    assert got.indices.tolist() == want
    torch.testing.assert_close(got.keys, inputs["pool_keys"][want])
    assert got.ids.tolist() == inputs["pool_ids"][want].tolist()


def test_active_first_pick_is_the_largest_gradient_embedding():
    inputs = make_inputs(seed=5)
    got = run("active", inputs, num_picks=4, seed=0)
    g = materialised_gradient_embeddings(inputs["pool_keys"], inputs["queries"], TAU)
    norms = (g * g).sum(dim=1)
    norms[torch.isin(inputs["pool_ids"], inputs["exclude_ids"])] = -1
    assert int(got.indices[0]) == int(norms.argmax())


def test_active_picks_distinct_clips_never_excluded_ones():
    inputs = make_inputs(n=64, d=16, seed=7, dtype=torch.float32)
    got = run("active", inputs, num_picks=30, seed=7)
    assert len(got.ids) == 30
    assert len(set(got.indices.tolist())) == 30
    assert len(set(got.ids.tolist())) == 30
    assert not set(got.ids.tolist()) & set(inputs["exclude_ids"].tolist())


def test_when_clips_run_out_every_available_clip_is_picked_once():
    inputs = make_inputs(seed=8)
    available = set(inputs["pool_ids"].tolist()) - set(inputs["exclude_ids"].tolist())
    for name in (*NEW_SAMPLERS, "active", "diversity", "uncertainty", "random"):
        got = run(name, inputs, num_picks=100, seed=8, dictionary_keys=make_dictionary(k=120, seed=8))  # 20 stay
        assert sorted(got.ids.tolist()) == sorted(available), name


def test_selection_is_deterministic_given_the_generator_and_varies_with_it():
    inputs = make_inputs(n=200, d=16, seed=9, dtype=torch.float32)
    first = run("active", inputs, num_picks=20, seed=1)
    again = run("active", inputs, num_picks=20, seed=1)
    other = run("active", inputs, num_picks=20, seed=2)
    assert first.indices.tolist() == again.indices.tolist()
    assert first.indices.tolist() != other.indices.tolist()


def test_an_empty_pool_selects_nothing():
    inputs = make_inputs()
    inputs["pool_keys"], inputs["pool_ids"] = inputs["pool_keys"][:0], inputs["pool_ids"][:0]
    for name in (*NEW_SAMPLERS, "active", "diversity", "uncertainty", "random"):
        got = run(name, inputs, num_picks=5, seed=0, dictionary_keys=make_dictionary())
        assert got.keys.shape == (0, 8) and got.ids.shape == (0,)


# --- baselines ------------------------------------------------------------------------------


def test_moco_enqueues_the_whole_current_batch():
    inputs = make_inputs()
    got = run("moco", inputs, num_picks=3, seed=0)  # no pool, no choice: all M keys of the batch
    assert torch.equal(got.keys, inputs["batch_keys"])
    assert torch.equal(got.ids, inputs["batch_ids"])


def test_random_draws_uniformly_from_the_pool_distinct_clips_never_excluded_ones():
    inputs = make_inputs(n=64, d=16, seed=7, dtype=torch.float32)
    excluded = set(inputs["exclude_ids"].tolist())
    available = set(inputs["pool_ids"].tolist()) - excluded
    got = run("random", inputs, num_picks=10, seed=3)
    assert len(got.ids) == 10 and len(set(got.ids.tolist())) == 10
    assert set(got.ids.tolist()) <= available
    assert torch.equal(got.keys, inputs["pool_keys"][got.indices])
    again = run("random", inputs, num_picks=10, seed=3)
    assert got.indices.tolist() == again.indices.tolist()
    counts = torch.zeros(64)
    for seed in range(400):  # every available row is about equally likely
        counts[run("random", inputs, num_picks=10, seed=seed).indices] += 1
    rows = torch.tensor([i for i, c in enumerate(inputs["pool_ids"].tolist()) if c not in excluded])
    assert counts[rows].min() > 0
    assert counts.sum() == 4000
    duplicated = inputs["pool_ids"][rows].bincount().gt(1)[inputs["pool_ids"][rows]]
    single = counts[rows][~duplicated]  # rows whose clip appears once: chance 10 / available clips
    expected = 400 * 10 / len(available)
    assert (single - expected).abs().max() < 0.35 * expected


def test_uncertainty_is_the_top_m_by_gradient_embedding_norm():
    inputs = make_inputs(seed=4)
    inputs["pool_ids"] = torch.arange(40)  # distinct clips: plain top-M
    got = run("uncertainty", inputs, num_picks=10, seed=0)
    g = materialised_gradient_embeddings(inputs["pool_keys"], inputs["queries"], TAU)
    norms = (g * g).sum(dim=1)
    norms[torch.isin(inputs["pool_ids"], inputs["exclude_ids"])] = -1
    assert got.indices.tolist() == norms.topk(10).indices.tolist()


def test_uncertainty_takes_one_key_per_clip():
    inputs = make_inputs(seed=4)
    got = run("uncertainty", inputs, num_picks=33, seed=0)
    assert len(set(got.ids.tolist())) == len(got.ids)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diversity_is_kmeans_pp_on_the_keys(seed):
    inputs = make_inputs(seed=seed)
    got = run("diversity", inputs, num_picks=12, seed=seed)
    uniforms = torch.rand(12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    excluded = set(inputs["exclude_ids"].tolist())
    want = reference_kmeans_pp(inputs["pool_keys"], inputs["pool_ids"], excluded, 12, uniforms, first_largest=False)
    assert got.indices.tolist() == want


def test_unknown_sampler_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"method\.sampler: unknown sampler 'greedy'"):
        run("greedy", make_inputs(), num_picks=3, seed=0)


# --- the dictionary-aware samplers ----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_pseudo_classes", [0, 5])
def test_active_dict_picks_equal_the_brute_force_reference(seed, num_pseudo_classes):
    inputs, dictionary = make_inputs(seed=seed), make_dictionary(seed=seed)
    got = run(
        "active-dict",
        inputs,
        num_picks=12,
        seed=seed,
        num_pseudo_classes=num_pseudo_classes,
        dictionary_keys=dictionary,
    )
    want = reference_active(
        inputs, num_picks=12, seed=seed, num_pseudo_classes=num_pseudo_classes, classes_from=dictionary
    )
    assert got.indices.tolist() == want
    torch.testing.assert_close(got.keys, inputs["pool_keys"][want])


def test_active_dict_does_not_read_the_queries():
    inputs, dictionary = make_inputs(seed=3), make_dictionary(seed=3)
    got = run("active-dict", inputs, num_picks=10, seed=3, dictionary_keys=dictionary)
    inputs["queries"] = unit_rows(12, 8, 99)
    again = run("active-dict", inputs, num_picks=10, seed=3, dictionary_keys=dictionary)
    assert got.indices.tolist() == again.indices.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_pseudo_classes", [0, 5])
def test_active_aware_picks_equal_the_brute_force_reference(seed, num_pseudo_classes):
    inputs, dictionary = make_inputs(seed=seed), make_dictionary(seed=seed)
    got = run(
        "active-aware",
        inputs,
        num_picks=8,
        seed=seed,
        num_pseudo_classes=num_pseudo_classes,
        dictionary_keys=dictionary,
    )
    want = reference_active(  # the 12 keys that stay (all but the 8 oldest) are centres already chosen
        inputs, num_picks=8, seed=seed, num_pseudo_classes=num_pseudo_classes, staying=dictionary[8:]
    )
    assert got.indices.tolist() == want
    torch.testing.assert_close(got.keys, inputs["pool_keys"][want])


@pytest.mark.parametrize("num_picks", [5, 9])
def test_active_aware_is_active_when_no_key_stays(num_picks):
    inputs, dictionary = make_inputs(seed=6), make_dictionary(k=5, seed=6)
    got = run("active-aware", inputs, num_picks=num_picks, seed=6, num_pseudo_classes=5, dictionary_keys=dictionary)
    want = run("active", inputs, num_picks=num_picks, seed=6, num_pseudo_classes=5)
    assert got.indices.tolist() == want.indices.tolist()


def test_active_aware_never_picks_a_copy_of_a_key_that_stays():
    inputs, dictionary = make_inputs(seed=4), make_dictionary(seed=4)
    inputs["pool_ids"] = torch.arange(40) + 1000  # distinct clips, none excluded
    inputs["pool_keys"][:10] = dictionary[10:]  # rows 0-9: copies of keys that stay (P = 10 of K = 20 leave)
    for seed in range(5):
        got = run("active-aware", inputs, num_picks=10, seed=seed, dictionary_keys=dictionary)
        assert len(got.indices) == 10 and min(got.indices.tolist()) >= 10, seed


def test_hardness_embedding_is_tau_times_the_infonce_gradient_in_the_candidate():
    candidates, queries, positives, dictionary = (unit_rows(n, 6, seed) for n, seed in ((5, 0), (4, 1), (4, 2), (7, 3)))
    h = hardness_embeddings(candidates, queries, positives, dictionary, TAU)
    torch.testing.assert_close(h, reference_hardness_embeddings(candidates, queries, positives, dictionary, TAU))
    for i in range(5):
        n = candidates[i].clone().requires_grad_(True)
        logits = torch.cat(
            [(queries * positives).sum(1, keepdim=True), queries @ dictionary.T, (queries @ n)[:, None]], 1
        )
        F.cross_entropy(logits / TAU, torch.zeros(4, dtype=torch.long), reduction="sum").backward()
        torch.testing.assert_close(n.grad * TAU, h[i])


def loss_gradient_hardness(candidates, candidate_ids, queries, keys, batch_ids, dictionary, dictionary_ids, in_batch):
    """tau x M x the gradient of the cross-modal InfoNCE (`workers.loss`, the function the step
    calls) in each candidate n put into the dictionary its queries meet: the brute force."""
    from workers.loss import cross_modal_nce

    rows = []
    for n, n_id in zip(candidates, candidate_ids, strict=True):
        n = n.clone().requires_grad_(True)
        losses = cross_modal_nce(
            queries_v=queries,
            keys_a=keys,
            dictionary_a=dictionary,
            queries_a=queries,
            keys_v=keys,
            dictionary_v=torch.cat([dictionary, n[None]]),
            temperature=TAU,
            in_batch_negatives=in_batch,
            clip_ids=batch_ids,
            dictionary_ids_a=dictionary_ids,
            dictionary_ids_v=torch.cat([dictionary_ids, n_id[None]]),
        )
        (gradient,) = torch.autograd.grad(losses["loss_av"], n)
        rows.append(gradient * TAU * queries.shape[0])
    return torch.stack(rows)


@pytest.mark.parametrize("in_batch", [False, True])
def test_hardness_weighs_a_candidate_against_every_negative_the_loss_counts(in_batch):
    # The batch's clips 0-5; the dictionary holds keys of clips 2 and 3 (left out of their own
    # queries' negatives); candidates 0 and 1 are keys of batch clips (weight 0 for their own
    # query), the others of clips outside the batch. C = M: every query is a pseudo-class.
    m, d = 6, 8
    queries, keys, dictionary = unit_rows(m, d, 1), unit_rows(m, d, 2), unit_rows(10, d, 3)
    batch_ids = torch.arange(m)
    dictionary_ids = torch.tensor([2, 50, 51, 3, 52, 53, -1, -1, 54, 55])
    candidates, candidate_ids = unit_rows(9, d, 4), torch.tensor([0, 1, 60, 61, 62, 63, 64, 65, 66])
    candidates[0] = keys[0]  # a batch key as its own query's candidate: the loss would mask it
    h = hardness_embeddings(
        candidates,
        queries,
        keys,
        dictionary,
        TAU,
        batch_keys=keys if in_batch else None,
        query_ids=batch_ids,
        dictionary_ids=dictionary_ids,
        candidate_ids=candidate_ids,
    )
    want = loss_gradient_hardness(
        candidates, candidate_ids, queries, keys, batch_ids, dictionary, dictionary_ids, in_batch
    )
    torch.testing.assert_close(h, want)
    # The sampler's first pick is the candidate the loss's gradient says is hardest.
    for seed in range(3):
        got = select(
            "hardness",
            pool_keys=candidates,
            pool_ids=candidate_ids,
            queries=queries,
            batch_keys=keys,
            batch_ids=batch_ids,
            exclude_ids=torch.tensor([-1]),
            num_picks=4,
            temperature=TAU,
            num_pseudo_classes=0,
            generator=torch.Generator().manual_seed(seed),
            dictionary_keys=dictionary,
            dictionary_ids=dictionary_ids,
            in_batch_negatives=in_batch,
        )
        assert got.indices[0] == want.norm(dim=1).argmax()


def test_in_batch_negatives_and_own_clip_masking_change_the_hardness_weights():
    # One query: |h_n| is then n's softmax weight as its negative.
    m, d = 6, 8
    queries, keys, dictionary = unit_rows(m, d, 1), unit_rows(m, d, 2), unit_rows(10, d, 3)
    candidates = unit_rows(5, d, 4)
    plain = hardness_embeddings(candidates, queries[:1], keys[:1], dictionary, TAU)
    with_batch = hardness_embeddings(candidates, queries[:1], keys[:1], dictionary, TAU, batch_keys=keys)
    assert (with_batch.norm(dim=1) < plain.norm(dim=1)).all()  # more negatives share the mass
    own = hardness_embeddings(
        keys[:2], queries[:1], keys[:1], dictionary, TAU, query_ids=torch.tensor([0]), candidate_ids=torch.arange(2)
    )
    assert own[0].norm() == 0 and own[1].norm() > 0  # a query's own positive is no negative of it


def test_hardness_embedding_is_finite_at_a_tiny_temperature():
    candidates, queries, positives, dictionary = (
        unit_rows(n, 6, s, torch.float32) for n, s in ((9, 0), (4, 1), (4, 2), (7, 3))
    )
    h = hardness_embeddings(candidates, queries, positives, dictionary, 1e-4)  # exp(1 / tau) overflows float32
    assert torch.isfinite(h).all()
    assert (h.norm(dim=1) <= queries.norm(dim=1).sum() + 1e-5).all()  # weights in [0, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_pseudo_classes", [0, 5])
def test_hardness_picks_equal_the_brute_force_reference(seed, num_pseudo_classes):
    inputs, dictionary = make_inputs(seed=seed), make_dictionary(seed=seed)
    got = run(
        "hardness", inputs, num_picks=12, seed=seed, num_pseudo_classes=num_pseudo_classes, dictionary_keys=dictionary
    )
    want = reference_hardness(inputs, dictionary, num_picks=12, seed=seed, num_pseudo_classes=num_pseudo_classes)
    assert got.indices.tolist() == want
    torch.testing.assert_close(got.keys, inputs["pool_keys"][want])


@pytest.mark.parametrize("name", NEW_SAMPLERS)
def test_new_samplers_pick_distinct_clips_never_excluded_ones(name):
    inputs = make_inputs(n=64, d=16, seed=7, dtype=torch.float32)
    dictionary = make_dictionary(k=64, d=16, seed=7, dtype=torch.float32)  # 34 stay
    got = run(name, inputs, num_picks=30, seed=7, dictionary_keys=dictionary)
    assert len(got.ids) == 30
    assert len(set(got.indices.tolist())) == 30
    assert len(set(got.ids.tolist())) == 30
    assert not set(got.ids.tolist()) & set(inputs["exclude_ids"].tolist())
    torch.testing.assert_close(got.keys, inputs["pool_keys"][got.indices])


@pytest.mark.parametrize("name", NEW_SAMPLERS)
def test_new_samplers_without_the_dictionary_are_rejected_by_name(name):
    with pytest.raises(ValueError, match=f"'{name}' needs dictionary_keys"):
        run(name, make_inputs(), num_picks=3, seed=0)
    arrays = {key: value.numpy() for key, value in make_inputs().items()}
    with pytest.raises(ValueError, match=f"'{name}' needs dictionary_keys"):
        Sampler(name=name, temperature=TAU).select(**arrays, num_picks=3)


# --- the Sampler object ---------------------------------------------------------------------


def test_sampler_accepts_numpy_and_its_state_dict_continues_the_random_stream():
    inputs = make_inputs(n=100, d=16, seed=11, dtype=torch.float32)
    arrays = {name: value.numpy() for name, value in inputs.items()}
    sampler = Sampler(name="active", temperature=TAU, num_pseudo_classes=4, seed=3)
    sampler.select(**arrays, num_picks=8)
    saved = sampler.state_dict()
    expected = [sampler.select(**arrays, num_picks=8).numpy()["indices"] for _ in range(2)]

    resumed = Sampler(name="active", temperature=TAU, num_pseudo_classes=4, seed=999)
    resumed.load_state_dict(saved)
    got = [resumed.select(**inputs, num_picks=8).numpy()["indices"] for _ in range(2)]
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(want, have)


@pytest.mark.parametrize("name", NEW_SAMPLERS)
def test_sampler_passes_a_numpy_dictionary_on(name):
    inputs, dictionary = make_inputs(seed=12), make_dictionary(seed=12)
    arrays = {key: value.numpy() for key, value in inputs.items()}
    sampler = Sampler(name=name, temperature=TAU, num_pseudo_classes=5, seed=4)
    got = sampler.select(**arrays, num_picks=6, dictionary_keys=dictionary.numpy())
    want = run(name, inputs, num_picks=6, seed=4, num_pseudo_classes=5, dictionary_keys=dictionary)
    assert got.indices.tolist() == want.indices.tolist()


# --- the parallel seeding where its rounds are single picks ---------------------------------


@pytest.mark.parametrize("rounds", [11, 16])  # P - 1 = 11 picks after the first: every round is one pick
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parallel_active_with_single_pick_rounds_equals_the_reference(seed, rounds):
    inputs = make_inputs(seed=seed)
    got = select(
        "active",
        **inputs,
        num_picks=12,
        temperature=TAU,
        num_pseudo_classes=5,
        generator=torch.Generator().manual_seed(seed),
        seeding="parallel",
        rounds=rounds,
    )
    assert got.indices.tolist() == reference_active(inputs, num_picks=12, seed=seed, num_pseudo_classes=5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parallel_diversity_with_single_pick_rounds_equals_the_reference(seed):
    inputs = make_inputs(seed=seed)
    got = select(
        "diversity",
        **inputs,
        num_picks=12,
        temperature=TAU,
        num_pseudo_classes=0,
        generator=torch.Generator().manual_seed(seed),
        seeding="parallel",
        rounds=11,
    )
    uniforms = torch.rand(12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    excluded = set(inputs["exclude_ids"].tolist())
    want = reference_kmeans_pp(inputs["pool_keys"], inputs["pool_ids"], excluded, 12, uniforms, first_largest=False)
    assert got.indices.tolist() == want


@pytest.mark.parametrize("seed", [0, 1])
def test_parallel_active_aware_and_hardness_with_single_pick_rounds_equal_their_references(seed):
    inputs, dictionary = make_inputs(seed=seed), make_dictionary(seed=seed)

    def parallel(name, num_picks):
        return select(
            name,
            **inputs,
            num_picks=num_picks,
            temperature=TAU,
            num_pseudo_classes=5,
            generator=torch.Generator().manual_seed(seed),
            dictionary_keys=dictionary,
            seeding="parallel",
            rounds=num_picks,
        ).indices.tolist()

    want = reference_active(inputs, num_picks=8, seed=seed, num_pseudo_classes=5, staying=dictionary[8:])
    assert parallel("active-aware", 8) == want
    want = reference_hardness(inputs, dictionary, num_picks=12, seed=seed, num_pseudo_classes=5)
    assert parallel("hardness", 12) == want
