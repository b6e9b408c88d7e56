"""The parallel k-means++ seeding (`method.seeding = "parallel"`) against the exact one: the
quality of its picks where quality can be told, the selection rules, determinism and the
settings (docs/architecture.md, "The method"; workers/sampler.py)."""

import statistics

import pytest
import torch
from torch.nn import functional as F

from jobs.bench.cli import parse_seedings
from service.config import ConfigError, from_dict
from service.errors import UsageError
from workers.enqueue import build_dictionary_set
from workers.sampler import (
    SEEDING_SAMPLERS,
    Sampler,
    gradient_embedding_factors,
    gradient_embedding_norms,
    select,
)
from workers.seeding import PARALLEL_ROUNDS, _draw_round, clip_groups, seeding_potential, seeding_round_sizes

pytestmark = pytest.mark.unit

TAU = 0.07


def clustered_keys(n, d, seed, *, head=0.9, tails=30, spread=0.3):
    """Unit keys in clusters: `head` of them in one cluster (the redundant one), the rest
    spread over `tails` small clusters, each point its centre plus noise of `spread`."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(tails + 1, d, generator=g)
    num_head = int(head * n)
    which = torch.cat(
        [torch.zeros(num_head, dtype=torch.long), torch.randint(1, tails + 1, (n - num_head,), generator=g)]
    )
    return F.normalize(centres[which] + spread * torch.randn(n, d, generator=g), dim=1)


def pick(name, keys, queries, *, num_picks, seed, seeding="exact", ids=None, exclude=None, dictionary=None):
    n = keys.shape[0]
    ids = torch.arange(n) if ids is None else ids
    exclude = torch.tensor([-1]) if exclude is None else exclude
    return select(
        name,
        pool_keys=keys,
        pool_ids=ids,
        queries=queries,
        batch_keys=queries,
        batch_ids=torch.arange(n, n + queries.shape[0]) + 10**6,
        exclude_ids=exclude,
        num_picks=num_picks,
        temperature=TAU,
        num_pseudo_classes=0,
        generator=torch.Generator().manual_seed(seed),
        dictionary_keys=dictionary,
        seeding=seeding,
    )


@pytest.mark.parametrize(("name", "n", "d", "num_picks"), [("diversity", 1024, 32, 128), ("active", 512, 16, 64)])
def test_on_a_redundant_clustered_set_parallel_closes_most_of_the_gap_from_random_to_exact(name, n, d, num_picks):
    potentials = {"exact": [], "parallel": [], "random": []}
    for seed in range(10):
        keys = clustered_keys(n, d, seed)
        queries = clustered_keys(16, d, seed + 100)  # C = 16 pseudo-classes, all queries (no draw)
        if name == "diversity":
            factors = (keys,)
        else:
            factors = (gradient_embedding_factors(keys, queries, TAU), keys)
        sq_norms = (factors[0] ** 2).sum(1) if name == "diversity" else gradient_embedding_norms(*factors)
        everyone = torch.ones(n, dtype=torch.bool)
        for seeding in ("exact", "parallel", "random"):
            if seeding == "random":  # the yardstick: as many picks, drawn uniformly
                rows = pick("random", keys, queries, num_picks=num_picks, seed=seed)
            else:
                rows = pick(name, keys, queries, num_picks=num_picks, seed=seed, seeding=seeding)
            assert rows.indices.shape == (num_picks,)
            potentials[seeding].append(seeding_potential(factors, sq_norms, everyone, rows.indices))
    exact, parallel, random = (statistics.median(potentials[s]) for s in ("exact", "parallel", "random"))
    assert random >= 1.3 * exact, (random, exact)  # the set tells k-means++ from random picks
    assert (random - parallel) / (random - exact) >= 0.9, (exact, parallel, random)


@pytest.mark.parametrize("name", SEEDING_SAMPLERS)
@pytest.mark.parametrize("num_picks", [60, 500])  # 500 > the 90 available clips: every one once
def test_parallel_picks_one_key_per_clip_never_an_excluded_one(name, num_picks):
    n, d = 400, 16
    keys = clustered_keys(n, d, 3)
    ids = torch.arange(n) % 100  # every clip four times
    exclude = torch.arange(0, 100, 10)  # 10 clips of the current batch
    dictionary = clustered_keys(600, d, 4)
    got = pick(
        name,
        keys,
        clustered_keys(32, d, 5),
        num_picks=num_picks,
        seed=1,
        seeding="parallel",
        ids=ids,
        exclude=exclude,
        dictionary=dictionary,
    )
    picked = got.ids.tolist()
    assert len(picked) == len(set(picked)) == min(num_picks, 90)
    assert not set(picked) & set(exclude.tolist())
    assert torch.equal(got.keys, keys[got.indices]) and torch.equal(got.ids, ids[got.indices])


def test_parallel_is_deterministic_given_the_generator_and_its_state_continues():
    keys, queries = clustered_keys(1000, 16, 6), clustered_keys(32, 16, 7)
    first = pick("active", keys, queries, num_picks=200, seed=1, seeding="parallel").indices.tolist()
    assert first == pick("active", keys, queries, num_picks=200, seed=1, seeding="parallel").indices.tolist()
    assert first != pick("active", keys, queries, num_picks=200, seed=2, seeding="parallel").indices.tolist()
    exact = pick("active", keys, queries, num_picks=200, seed=1, seeding="exact").indices.tolist()
    assert first != exact and first[0] == exact[0]  # rounds of many picks: other draws, the same first pick

    arrays = {
        "pool_keys": keys,
        "pool_ids": torch.arange(1000),
        "queries": queries,
        "batch_keys": queries,
        "batch_ids": torch.arange(32) + 5000,
        "exclude_ids": torch.arange(32) + 5000,
    }
    sampler = Sampler(name="active", temperature=TAU, seed=3, seeding="parallel")
    saved = sampler.state_dict()
    want = [sampler.select(**arrays, num_picks=100).indices.tolist() for _ in range(2)]
    resumed = Sampler(name="active", temperature=TAU, seed=99, seeding="parallel")
    resumed.load_state_dict(saved)
    assert [resumed.select(**arrays, num_picks=100).indices.tolist() for _ in range(2)] == want


def test_round_sizes_are_fixed_by_p_grow_and_add_up():
    assert seeding_round_sizes(12, None) == [1] * 12
    assert seeding_round_sizes(12, 16) == [1] * 12  # fewer picks than rounds: one at a time
    assert seeding_round_sizes(0, 16) == []
    for num_picks in (18, 100, 2048, 8192):
        sizes = seeding_round_sizes(num_picks, PARALLEL_ROUNDS)
        assert sum(sizes) == num_picks and len(sizes) == PARALLEL_ROUNDS + 1 and min(sizes) >= 1
        assert sizes[1:] == sorted(sizes[1:])  # later rounds, when the picks already spread, are the larger


def test_a_round_draws_in_proportion_to_the_weights_and_zero_weights_last():
    weights = torch.tensor([0.0, 1.0, 2.0, 0.0, 5.0, 2.0])  # row 0 is unavailable, row 3 has no weight
    available = torch.tensor([False, True, True, True, True, True])
    ids = torch.tensor([0, 1, 2, 3, 4, 2])  # rows 2 and 5 are one clip: weight 4 together
    groups, positions = clip_groups(ids), torch.arange(6)
    generator = torch.Generator().manual_seed(0)
    first, counts = torch.zeros(6), torch.zeros(6)
    for _ in range(4000):
        rows, valid = _draw_round(weights, available, groups, positions, 5, generator)
        assert valid.tolist() == [True] * 4 + [False]  # 4 available clips
        first[rows[0]] += 1
        counts[rows[valid]] += 1
        assert rows[3] == 3  # the row of zero weight only after every row with weight
        assert not ({2, 5} <= set(rows[valid].tolist()))  # one row of a clip
    # the first pick: 1 : (2 + 2) : 5 over rows 1, clip {2, 5}, 4
    share = first / 4000
    assert share[0] == share[3] == 0
    assert abs(share[1] - 0.1) < 0.02 and abs(share[2] + share[5] - 0.4) < 0.03 and abs(share[4] - 0.5) < 0.03
    assert abs(counts[2] - counts[5]) < 0.1 * 4000  # the clip's rows equally likely


def test_clip_groups_share_an_index_exactly_within_a_clip():
    ids = torch.tensor([7, 3, 7, 9, 3, 3, 11])
    groups = clip_groups(ids)
    assert groups.min() >= 0 and groups.max() < len(ids)
    for i in range(len(ids)):
        for j in range(len(ids)):
            assert (groups[i] == groups[j]) == (ids[i] == ids[j])


def test_bad_seeding_settings_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"method\.seeding: 'greedy' is not one of exact, parallel"):
        from_dict({"method": {"seeding": "greedy"}})
    assert from_dict({"method": {"seeding": "exact"}}).method.seeding == "exact"
    with pytest.raises(ValueError, match=r"method\.seeding: unknown seeding 'fast'"):
        Sampler(name="active", temperature=TAU, seeding="fast")
    keys = clustered_keys(40, 8, 0)
    with pytest.raises(ValueError, match=r"method\.seeding: unknown seeding 'fast'"):
        pick("active", keys, keys[:4], num_picks=4, seed=0, seeding="fast")
    with pytest.raises(ValueError, match=r"seeding rounds must be an integer >= 1, got 0"):
        select(
            "active",
            pool_keys=keys,
            pool_ids=torch.arange(40),
            queries=keys[:4],
            batch_keys=keys[:4],
            batch_ids=torch.arange(4) + 100,
            exclude_ids=torch.arange(4) + 100,
            num_picks=4,
            temperature=TAU,
            num_pseudo_classes=0,
            generator=torch.Generator(),
            seeding="parallel",
            rounds=0,
        )
    assert parse_seedings("exact, parallel") == ["exact", "parallel"]
    for bad in ("fast", "exact,exact", ""):
        with pytest.raises(UsageError, match=r"--seeding expects distinct names of exact, parallel"):
            parse_seedings(bad)


def test_the_run_and_its_shadows_seed_as_configured():
    cfg = from_dict(
        {
            "method": {
                "seeding": "exact",
                "dictionary_size": 64,
                "shadow_samplers": "active:parallel,active:exact,hardness",
            }
        }
    )
    built = build_dictionary_set(cfg, device=torch.device("cpu"))
    assert built.main.sampler.seeding == "exact"
    seedings = {name: (shadow.sampler.name, shadow.sampler.seeding) for name, shadow in built.shadows.items()}
    assert seedings == {
        "active:parallel": ("active", "parallel"),
        "active:exact": ("active", "exact"),
        "hardness": ("hardness", "exact"),  # a plain name takes method.seeding
    }
    assert from_dict({}).method.seeding == "parallel"  # the default (jobs/recipes say why)
    with pytest.raises(ConfigError, match=r"method\.shadow_samplers: unknown seeding in 'active:fast'"):
        from_dict({"method": {"shadow_samplers": "active:fast"}})
    with pytest.raises(ConfigError, match=r"method\.shadow_samplers: unknown sampler 'greedy:exact'"):
        from_dict({"method": {"shadow_samplers": "greedy:exact"}})
