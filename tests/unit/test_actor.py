"""The dictionary actor's plain class, without Ray: deltas rebuild the actor's dictionaries."""

import numpy as np
import pytest
import torch

from service import config
from workers.actor import DictionaryService
from workers.distributed.replicas import Replicas, build_replicas

pytestmark = pytest.mark.unit

DIM = 8
BATCH = 6


def make_cfg(sampler: str = "active"):
    return config.from_dict(
        {
            "model": {"embed_dim": DIM},
            "method": {"sampler": sampler, "dictionary_size": 20, "pool_size": 24},
            "train": {"batch_size": BATCH, "seed": 5},
        }
    )


def global_batch(step: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(100 + step)

    def unit(n: int) -> np.ndarray:
        return torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=1).numpy()

    return {
        "queries_v": unit(BATCH),
        "queries_a": unit(BATCH),
        "keys_v": unit(BATCH),
        "keys_a": unit(BATCH),
        "clip_ids": np.arange(step * BATCH, (step + 1) * BATCH) % 17,  # clips recur across steps
    }


@pytest.mark.parametrize("sampler", ["active", "uncertainty", "diversity", "random", "moco"])
def test_replicas_that_apply_every_delta_equal_the_actor(sampler):
    cfg = make_cfg(sampler)
    service = DictionaryService(config=cfg.to_dict())
    replicas = build_replicas(cfg, device=torch.device("cpu"))
    for step in range(8):
        delta = service.submit(step=step, **global_batch(step))
        assert delta.version == step + 1 and delta.step == step
        replicas.apply(delta)
    for modality in "va":
        actor = getattr(service.dictionaries.main, f"dictionary_{modality}")
        replica = getattr(replicas, f"dictionary_{modality}")
        assert torch.equal(actor.keys, replica.keys)
        assert torch.equal(actor.ids, replica.ids)
        assert actor.pointer == replica.pointer
    assert replicas.version == service.version == 8


def test_a_clip_of_the_current_batch_never_enters_through_the_sampler():
    service = DictionaryService(config=make_cfg().to_dict())
    for step in range(6):
        batch = global_batch(step)
        delta = service.submit(step=step, **batch)
        assert not np.isin(delta.entered_v.ids, batch["clip_ids"]).any()
        assert not np.isin(delta.entered_a.ids, batch["clip_ids"]).any()


def test_state_round_trip_continues_identically():
    cfg = make_cfg()
    first = DictionaryService(config=cfg.to_dict())
    for step in range(4):
        first.submit(step=step, **global_batch(step))
    second = DictionaryService(config=cfg.to_dict())
    second.load_state_dict(first.state_dict())
    for step in range(4, 8):
        a = first.submit(step=step, **global_batch(step))
        b = second.submit(step=step, **global_batch(step))
        for m in "va":
            for part in ("slots", "keys", "ids"):
                np.testing.assert_array_equal(getattr(a.entered(m), part), getattr(b.entered(m), part))


def test_deltas_after_serves_a_replica_that_resumes_behind():
    cfg = make_cfg()
    service = DictionaryService(config=cfg.to_dict())
    replicas = build_replicas(cfg, device=torch.device("cpu"))
    for step in range(3):
        replicas.apply(service.submit(step=step, **global_batch(step)))
    for step in range(3, 6):
        service.submit(step=step, **global_batch(step))
    behind = service.deltas_after(replicas.version)
    assert [d.version for d in behind] == [4, 5, 6]
    for delta in behind:
        replicas.apply(delta)
    assert torch.equal(replicas.dictionary_a.keys, service.dictionaries.main.dictionary_a.keys)


def test_reseed_takes_the_replica_and_keeps_counting_versions():
    cfg = make_cfg()
    service = DictionaryService(config=cfg.to_dict())
    replicas: Replicas = build_replicas(cfg, device=torch.device("cpu"))
    for step in range(3):
        replicas.apply(service.submit(step=step, **global_batch(step)))
    restarted = DictionaryService(config=cfg.to_dict())  # what Ray builds after a crash
    restarted.reseed(members=replicas.members(), version=replicas.version)
    assert restarted.version == 3
    assert torch.equal(restarted.dictionaries.main.dictionary_v.keys, replicas.dictionary_v.keys)
    replicas.apply(restarted.submit(step=3, **global_batch(3)))
    assert replicas.version == 4
    assert torch.equal(restarted.dictionaries.main.dictionary_v.keys, replicas.dictionary_v.keys)


def test_stop_request_rides_on_the_next_delta():
    service = DictionaryService(config=make_cfg().to_dict())
    assert not service.submit(step=0, **global_batch(0)).stop_requested
    service.request_stop()
    assert service.submit(step=1, **global_batch(1)).stop_requested


def test_a_resumed_run_does_not_inherit_the_stop_request_of_the_run_that_saved_it():
    """The deltas a checkpoint keeps are replayed after a resume; the stop that ended the
    saved run must not end the resumed one."""
    stopped = DictionaryService(config=make_cfg().to_dict())
    stopped.submit(step=0, **global_batch(0))
    stopped.request_stop()
    stopped.submit(step=1, **global_batch(1))
    resumed = DictionaryService(config=make_cfg().to_dict())
    resumed.load_state_dict(stopped.state_dict())
    assert [d.stop_requested for d in resumed.deltas_after(0)] == [False, False]
    assert not resumed.submit(step=2, **global_batch(2)).stop_requested


@pytest.mark.parametrize("sampler", ["active", "uncertainty", "diversity", "random"])
def test_a_key_enters_a_dictionary_at_most_once(sampler):
    service = DictionaryService(config=make_cfg(sampler).to_dict())
    seen: set[bytes] = set()
    for step in range(10):
        delta = service.submit(step=step, **global_batch(step))
        for key in np.concatenate([delta.entered_v.keys, delta.entered_a.keys]):
            assert key.tobytes() not in seen
            seen.add(key.tobytes())
    assert len(seen) > 0


def labelled_stream(step: int, *, batch: int, num_classes: int) -> dict[str, np.ndarray]:
    """A global batch of fresh clips (ids never recur) with balanced labels."""
    g = torch.Generator().manual_seed(1000 + step)

    def unit(n: int) -> np.ndarray:
        return torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=1).numpy()

    ids = np.arange(step * batch, (step + 1) * batch)
    return {
        "queries_v": unit(batch),
        "queries_a": unit(batch),
        "keys_v": unit(batch),
        "keys_a": unit(batch),
        "clip_ids": ids,
        "labels": ids % num_classes,
    }


@pytest.mark.parametrize("sampler", ["active", "uncertainty", "diversity", "random"])
def test_in_steady_state_the_fraction_of_arrivals_that_enter_is_p_over_m(sampler):
    batch, enqueue = 16, 4
    cfg = config.from_dict(
        {
            "model": {"embed_dim": DIM},
            "method": {"sampler": sampler, "dictionary_size": 32, "enqueue": enqueue},
            "train": {"batch_size": batch, "seed": 1},
        }
    )
    assert (cfg.enqueue_per_step, cfg.pool_capacity) == (enqueue, 4 * batch)
    service = DictionaryService(config=cfg.to_dict())
    entered = []
    for step in range(12):
        delta = service.submit(step=step, **labelled_stream(step, batch=batch, num_classes=4))
        entered.append((len(delta.entered_v.slots), len(delta.entered_a.slots)))
    assert entered[0] == (0, 0)  # nothing has reached the pool before the first batch
    assert all(pair == (enqueue, enqueue) for pair in entered[1:])  # P of the M arrivals enter each step
    ages = service.dictionaries.main.dictionary_v.steps
    assert (ages >= 0).all() and (ages <= 10).all()  # each entered key came from an earlier step


def test_random_from_the_pool_meets_same_label_negatives_at_chance():
    from workers.diagnostics import same_label_fraction

    batch, num_classes = 32, 4
    cfg = config.from_dict(
        {
            "model": {"embed_dim": DIM},
            "method": {"sampler": "random", "dictionary_size": 64, "enqueue": 8},
            "train": {"batch_size": batch, "seed": 2},
        }
    )
    service = DictionaryService(config=cfg.to_dict())
    fractions = []
    for step in range(60):
        arrays = labelled_stream(step, batch=batch, num_classes=num_classes)
        service.submit(step=step, **arrays)
        if step >= 20:  # the dictionary is full of real keys (64 / 8 = 8 steps after the first)
            labels = service.dictionaries.main.dictionary_a.labels.numpy()
            fractions.append(same_label_fraction(arrays["labels"], labels))
    assert abs(np.mean(fractions) - 1 / num_classes) < 0.03


def test_a_delta_carries_each_members_pick_counts_through_its_stored_form():
    cfg = config.from_dict(
        {
            "model": {"embed_dim": DIM},
            "method": {"sampler": "random", "pool": "fresh", "dictionary_size": 20, "shadow_samplers": "moco"},
            "train": {"batch_size": BATCH, "seed": 5},
        }
    )
    service = DictionaryService(config=cfg.to_dict())
    g = torch.Generator().manual_seed(3)
    extra = torch.nn.functional.normalize(torch.randn(BATCH, DIM, generator=g), dim=1).numpy()
    delta = service.submit(
        step=0, **global_batch(0), extra_keys_v=extra, extra_keys_a=extra, extra_ids=np.arange(100, 100 + BATCH)
    )
    main, moco = delta.counts["main"], delta.counts["moco"]
    assert main["picked_v"] == BATCH and 0 <= main["picked_from_batch_v"] <= BATCH  # P = M of the N = 2M
    assert moco["picked_a"] == moco["picked_from_batch_a"] == BATCH  # moco enqueues its batch
    assert type(delta).from_dict(delta.to_dict()).counts == delta.counts
    assert delta.without_shadows().counts == {"main": main}
