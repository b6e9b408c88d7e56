"""Encoders, the EMA key update and the single-process trainer's step (docs/architecture.md, "The method")."""

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from service.config import from_dict
from workers.enqueue import LocalExchange, build_dictionary_set
from workers.models import build_encoders, make_key_encoder, momentum_update
from workers.step import NonFiniteLossError, check_finite, host_values, train_step
from workers.trainer import train
from workers.training import build_train_state, is_fused, lr_factor

pytestmark = pytest.mark.unit

BATCH = 4


def tiny_config(**method):
    return from_dict(
        {
            "model": {
                "video": {"width": 0.125, "frames": 4, "size": 16},
                "audio": {"width": 0.125, "n_mels": 16},
                "embed_dim": 8,
                "head_hidden": 16,
            },
            "method": {"dictionary_size": 16, "momentum": 0.9, **method},
            "optim": {"name": "sgd", "lr": 0.1, "warmup_steps": 2},
            "train": {"steps": 4, "batch_size": BATCH},
        }
    )


def make_batch(step, *, batch=BATCH, num_clips=12):
    generator = torch.Generator().manual_seed(step)
    index = (torch.arange(batch) + step * batch) % num_clips
    return {
        "video": torch.randn(batch, 3, 4, 16, 16, generator=generator),
        "audio": torch.randn(batch, 1, 16, 20, generator=generator),
        "index": index,
        "label": index % 3,
    }


def batches(start=0):
    step = start
    while True:
        yield make_batch(step)
        step += 1


# --- encoders -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["r3d_18", "r2plus1d_18"])
def test_encoders_give_unit_embeddings_and_pooled_features(arch):
    cfg = tiny_config()
    cfg.model.video.arch = arch
    model = build_encoders(cfg.model)
    batch = make_batch(0)
    z_v, z_a = model(batch["video"], batch["audio"])
    assert z_v.shape == (BATCH, 8) and z_a.shape == (BATCH, 8)
    torch.testing.assert_close(z_v.norm(dim=1), torch.ones(BATCH))
    torch.testing.assert_close(z_a.norm(dim=1), torch.ones(BATCH))
    assert model.video.features(batch["video"]).shape == (BATCH, 64)  # 512 x 0.125
    assert model.audio.features(batch["audio"]).shape == (BATCH, 64)


def test_width_multiplier_scales_every_stage():
    cfg = tiny_config()
    narrow = build_encoders(cfg.model)
    cfg.model.video.width = cfg.model.audio.width = 0.25
    wide = build_encoders(cfg.model)
    assert wide.video.backbone.out_features == 128 and narrow.video.backbone.out_features == 64
    narrow_params = sum(p.numel() for p in narrow.video.backbone.parameters())
    wide_params = sum(p.numel() for p in wide.video.backbone.parameters())
    assert 3.5 < wide_params / narrow_params < 4.1  # convolutions grow with width squared


# --- EMA ------------------------------------------------------------------------------------


class Wrapper(nn.Module):
    """Like DDP: the encoder under `module.`, so parameter names carry a prefix."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_momentum_update_matches_its_formula_and_copies_buffers():
    query = build_encoders(tiny_config().model)
    key = make_key_encoder(query)
    with torch.no_grad():
        for p in query.parameters():
            p.add_(torch.randn_like(p))
        for b in query.buffers():
            b.add_(1)
    before = [p.clone() for p in key.parameters()]
    momentum_update(key, Wrapper(query), 0.9)
    for k_new, k_old, q in zip(key.parameters(), before, query.parameters(), strict=True):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q)
        assert not k_new.requires_grad
    for k_buf, q_buf in zip(key.buffers(), query.buffers(), strict=True):
        assert torch.equal(k_buf, q_buf)


# --- the training step ----------------------------------------------------------------------


def test_lr_warms_up_then_follows_a_half_cosine():
    factors = [lr_factor(s, total_steps=10, warmup_steps=4, schedule="cosine") for s in range(10)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert factors[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    short = [lr_factor(s, total_steps=3, warmup_steps=10, schedule="cosine") for s in range(3)]
    assert short == [0.1, 0.2, pytest.approx(0.3)]  # a run shorter than the warm-up warms up throughout


def test_step_trains_the_query_encoder_and_moves_the_key_encoder_by_ema():
    cfg = tiny_config()
    state = build_train_state(cfg, device=torch.device("cpu"))
    exchange = LocalExchange(build_dictionary_set(cfg, device=torch.device("cpu")))
    query_before = [p.clone() for p in state.query.parameters()]
    key_before = [p.clone() for p in state.key.parameters()]
    out = train_step(state, make_batch(0), exchange=exchange, method=cfg.method)
    assert set(out.losses) == {"loss_va", "loss_av", "loss"}
    keys_v = out.exchanged.batch.keys_v
    assert keys_v.shape == (BATCH, 8) and not keys_v.requires_grad
    assert state.step == 1
    assert any(not torch.equal(a, b) for a, b in zip(query_before, state.query.parameters(), strict=True))
    for k_new, k_old, q in zip(state.key.parameters(), key_before, state.query.parameters(), strict=True):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q)


def test_non_finite_loss_stops_before_the_optimiser_step_with_weights_unchanged():
    cfg = tiny_config()
    state = build_train_state(cfg, device=torch.device("cpu"))
    exchange = LocalExchange(build_dictionary_set(cfg, device=torch.device("cpu")))
    batch = make_batch(0)
    batch["audio"][1] = float("nan")
    query_before = [p.clone() for p in state.query.parameters()]
    key_before = [p.clone() for p in state.key.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"step 0: the loss is not finite .* before the optimiser step"):
        train_step(state, batch, exchange=exchange, method=cfg.method)
    assert state.step == 0
    assert state.optimizer.state_dict()["state"] == {}  # the optimiser never stepped
    for a, b in zip(query_before, state.query.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(key_before, state.key.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimiser", ["sgd", "adamw"])
def test_a_deferred_non_finite_step_changes_nothing_on_the_device_and_is_raised_by_check_finite(optimiser):
    cfg = tiny_config()
    cfg.optim.name = optimiser
    state = build_train_state(cfg, device=torch.device("cpu"))
    assert is_fused(state.optimizer)  # optim.fused defaults to on, and CPU has the kernels
    exchange = LocalExchange(build_dictionary_set(cfg, device=torch.device("cpu")))
    step = dict(exchange=exchange, method=cfg.method)
    train_step(state, make_batch(0), defer_check=True, **step)  # one good step: optimiser state exists
    query_before = [p.clone() for p in state.query.parameters()]
    key_before = [p.clone() for p in state.key.parameters()]  # buffers: the forward passes update them
    optimiser_before = copy.deepcopy(state.optimizer.state_dict()["state"])
    batch = make_batch(1)
    batch["audio"][1] = float("nan")
    out = train_step(state, batch, defer_check=True, grad_clip=1.0, **step)  # no exception: nothing waited
    assert not bool(out.finite) and out.step == 1
    with pytest.raises(NonFiniteLossError, match=r"step 1: the loss or gradient norm is not finite"):
        check_finite(out)
    assert all(torch.equal(a, b) for a, b in zip(query_before, state.query.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(key_before, state.key.parameters(), strict=True))
    for slot, values in optimiser_before.items():
        for name, value in values.items():
            assert torch.equal(value, state.optimizer.state_dict()["state"][slot][name]), name
    good = train_step(state, make_batch(2), defer_check=True, **step)
    check_finite(good)  # finite: nothing raised
    assert any(not torch.equal(a, b) for a, b in zip(query_before, state.query.parameters(), strict=True))


def test_host_values_reads_every_tensor_of_every_record_at_once():
    records = [{"a": torch.tensor(1.5), "b": 2.0}, {"a": torch.tensor(float("nan")), "c": torch.tensor(3)}]
    resolved = host_values(records)
    assert resolved[0] == {"a": 1.5, "b": 2.0}
    assert math.isnan(resolved[1]["a"]) and resolved[1]["c"] == 3.0
    assert isinstance(records[0]["a"], torch.Tensor)  # the input is left as it was


@pytest.mark.parametrize("sampler", ["active", "random", "moco"])
def test_train_fills_the_dictionary_with_keys_of_past_clips(sampler):
    cfg = tiny_config(sampler=sampler, enqueue=2)
    result = train(cfg, batches(), num_steps=3)
    assert [m["step"] for m in result.metrics] == [1.0, 2.0, 3.0]
    assert all(
        math.isfinite(m["train/loss"]) and m["dict/select_ms"] >= 0 and m["train/clips_per_s"] > 0
        for m in result.metrics
    )
    ids = result.dictionaries.main.dictionary_a.ids
    real = set(ids[ids >= 0].tolist())
    if sampler == "moco":  # the current batch's M keys every step
        assert (ids >= 0).sum() == 3 * BATCH and real == set(range(12))
    else:  # an empty pool at step 1, then P = 2 a step from earlier batches (the current one excluded)
        assert (ids >= 0).sum() == 2 * 2 and real <= set(range(8))
    labels = result.dictionaries.main.dictionary_a.labels
    assert torch.equal(labels[ids >= 0], ids[ids >= 0] % 3)  # each key keeps its clip's label
    assert result.metrics[-1]["dict/entered_frac_a"] == (1.0 if sampler == "moco" else 2 / BATCH)  # P of the M arrivals


def test_resumed_training_equals_uninterrupted_training():
    cfg = tiny_config()
    whole = train(cfg, batches(), num_steps=4)

    first = train(cfg, batches(), num_steps=2)
    saved = {"train": first.state.state_dict(), "dictionaries": first.dictionaries.state_dict()}
    fresh = build_train_state(tiny_config(), device=torch.device("cpu"))
    fresh_dictionaries = build_dictionary_set(tiny_config(), device=torch.device("cpu"))
    torch.manual_seed(1234)  # a resumed run must not depend on the global generator
    fresh.load_state_dict(saved["train"])
    fresh_dictionaries.load_state_dict(saved["dictionaries"])
    resumed = train(cfg, batches(start=2), num_steps=4, state=fresh, dictionaries=fresh_dictionaries)

    assert [m["train/loss"] for m in resumed.metrics] == [m["train/loss"] for m in whole.metrics[2:]]
    for a, b in zip(whole.state.query.parameters(), resumed.state.query.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(whole.dictionaries.main.dictionary_v.keys, resumed.dictionaries.main.dictionary_v.keys)


def test_batchnorm_heads_give_unit_embeddings_that_stay_spread_across_the_batch():
    cfg = tiny_config()
    cfg.model.head_norm = "batch"
    model = build_encoders(cfg.model)
    batch = make_batch(0, batch=8)
    batch["video"] = batch["video"][:1].expand(8, -1, -1, -1, -1) + 0.01 * batch["video"]  # nearly one clip
    z_v, _ = model(batch["video"], batch["audio"])
    torch.testing.assert_close(z_v.norm(dim=1), torch.ones(8))
    cosines = z_v @ z_v.T
    assert cosines[~torch.eye(8, dtype=torch.bool)].mean() < 0.5  # the batch statistics spread them out
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.video.head)
    with pytest.raises(ValueError, match="head_norm"):
        from workers.models import ProjectionHead

        ProjectionHead(in_features=4, hidden=4, out_features=4, norm="layer")
