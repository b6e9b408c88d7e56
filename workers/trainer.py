"""Single-process CM-ACC training (docs/architecture.md, "The method"): builders, one step, a loop.

* `train_step` is the per-step math on one batch: queries, keys (no gradient), the
  cross-modal loss against the dictionaries, a non-finite check before the optimiser step,
  the optimiser step and the EMA update of the key encoders. It knows nothing of
  distribution: the distributed trainer calls it on every rank with the query encoder
  wrapped in DDP.
* `update_dictionaries` is the sampler's part of the step: choose what enters each
  dictionary from its candidate pool, enqueue it, push the batch's keys into the pools. In
  one process it runs right after `train_step`; in a cluster the dictionary actor runs it.
* `train` runs S steps over an iterable of batches and returns the state and per-step metrics.
* `step_metrics` names what a step measured; both trainers log under these names.

A batch is a mapping with `video` float [B, 3, T, H, W], `audio` float [B, 1, n_mels, frames],
`index` int64 [B] (clip ids) and `label` int64 [B]. bf16 autocast and channels_last_3d on
CUDA, float32 on CPU (`train.precision` may force either).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from service.config import Config, MethodConfig, ModelConfig, OptimConfig, TrainConfig
from workers.diagnostics import step_statistics
from workers.dictionary import EMPTY_ID, CandidatePool, NegativeDictionary
from workers.loss import cross_modal_nce
from workers.models import AudioVisualEncoder, build_encoders, make_key_encoder, momentum_update
from workers.sampler import Sampler
from workers.tensors import synchronize


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) is NaN or infinite; raised before the optimiser step."""


# --- builders -------------------------------------------------------------------------------


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on `device`; None = plain float32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def use_channels_last(train: TrainConfig, device: torch.device) -> bool:
    """NDHWC video tensors and weights (`train.channels_last`): on CUDA only, where cuDNN's 3D
    convolutions are fastest that way."""
    return train.channels_last and device.type == "cuda"


def use_compile(train: TrainConfig, device: torch.device) -> bool:
    """`train.compile`: "auto" compiles on CUDA (about 40 s once, then faster steps), not on
    CPU (where compiling takes longer than a short run)."""
    return train.compile == "on" or (train.compile == "auto" and device.type == "cuda")


def prepare_video(video: Tensor, *, channels_last: bool) -> Tensor:
    return video.contiguous(memory_format=torch.channels_last_3d) if channels_last else video


def build_model(
    cfg: ModelConfig, *, device: torch.device, channels_last: bool | None = None
) -> tuple[AudioVisualEncoder, AudioVisualEncoder]:
    """Query encoders (f_v, f_a with heads) and their EMA key encoders (h_v, h_a), on `device`;
    NDHWC weights with `channels_last` (default: on CUDA).

    Seed torch's global generator first for a reproducible initialisation.
    """
    query = build_encoders(cfg).to(device)
    if device.type == "cuda" if channels_last is None else channels_last:
        query = query.to(memory_format=torch.channels_last_3d)
    key = make_key_encoder(query)
    return query, key


def fused_available(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu")  # torch's fused SGD and AdamW kernels


def build_optimizer(
    cfg: OptimConfig, params: Iterable[nn.Parameter], *, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """SGD or AdamW; with `optim.fused` their fused kernels (one kernel for all parameters,
    and an on-device skip of a non-finite step: `train_step`)."""
    fused = True if cfg.fused and fused_available(device or torch.device("cpu")) else None
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    raise ValueError(f"optim.name: unknown optimiser {cfg.name!r}")


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.defaults.get("fused"))


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based).

    Linear warm-up from 1/warmup to 1 over the first `warmup_steps` steps (a run no longer
    than the warm-up warms up throughout and never reaches the peak), then constant or a
    half cosine from 1 towards 0 over the remaining steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine (or constant) schedule of `optim.*` over `total_steps` steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps=total_steps, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule),
    )


@dataclass(kw_only=True)
class TrainState:
    """What `train_step` changes: encoders, optimiser, schedule and the step count."""

    query: nn.Module  # AudioVisualEncoder, or the distributed trainer's DDP wrapper around one
    key: AudioVisualEncoder
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "query": self.query.state_dict(),
            "key": self.key.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.query.load_state_dict(state["query"])
        self.key.load_state_dict(state["key"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])


def build_train_state(cfg: Config, *, device: torch.device) -> TrainState:
    """Encoders initialised from `train.seed`, optimiser and schedule over `train.steps`."""
    torch.manual_seed(cfg.train.seed)
    query, key = build_model(cfg.model, device=device, channels_last=use_channels_last(cfg.train, device))
    optimizer = build_optimizer(cfg.optim, query.parameters(), device=device)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=cfg.train.steps)
    if use_compile(cfg.train, device):  # in place: parameter names and checkpoints are unchanged
        query.compile()
        key.compile()
    return TrainState(query=query, key=key, optimizer=optimizer, scheduler=scheduler)


@dataclass(kw_only=True)
class Dictionaries:
    """Both negative dictionaries, both candidate pools and the sampler with its random state:
    in one process the trainer holds them, in a cluster the dictionary actor."""

    dictionary_v: NegativeDictionary
    dictionary_a: NegativeDictionary
    pool_v: CandidatePool
    pool_a: CandidatePool
    sampler: Sampler
    num_enqueue: int  # P: keys a pool sampler enqueues per modality and step

    def state_dict(self) -> dict[str, Any]:
        parts = ("dictionary_v", "dictionary_a", "pool_v", "pool_a", "sampler")
        return {name: getattr(self, name).state_dict() for name in parts}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, part_state in state.items():
            getattr(self, name).load_state_dict(part_state)


def build_dictionaries(cfg: Config, *, device: torch.device) -> Dictionaries:
    """Dictionaries of `method.dictionary_size` random unit keys, empty pools of N =
    `cfg.pool_capacity` candidates and the `method.sampler` seeded from `train.seed`, which
    enqueues P = `cfg.enqueue_per_step` keys per step."""
    method, dim = cfg.method, cfg.model.embed_dim
    pool_size = cfg.pool_capacity
    init = torch.Generator().manual_seed(cfg.train.seed)
    return Dictionaries(
        dictionary_v=NegativeDictionary(size=method.dictionary_size, dim=dim, device=device, generator=init),
        dictionary_a=NegativeDictionary(size=method.dictionary_size, dim=dim, device=device, generator=init),
        pool_v=CandidatePool(size=pool_size, dim=dim, device=device),
        pool_a=CandidatePool(size=pool_size, dim=dim, device=device),
        sampler=Sampler(
            name=method.sampler,
            temperature=method.temperature,
            num_pseudo_classes=method.pseudo_classes,
            seed=cfg.train.seed,
            device=device,
        ),
        num_enqueue=cfg.enqueue_per_step,
    )


# --- one step -------------------------------------------------------------------------------


@dataclass(kw_only=True)
class StepOutput:
    """A step's loss parts (0-dim tensors, nats, on the device: reading them is a host sync,
    so the distributed loop reads them every `train.log_every` steps), its finiteness and the
    batch's embeddings for the dictionary update."""

    step: int  # the step taken (0-based)
    losses: dict[str, Tensor]
    lr: float
    finite: Tensor  # 0-dim bool: every rank's loss (and gradient norm) finite; False = nothing was updated
    queries_v: Tensor  # M x d, detached
    queries_a: Tensor  # M x d, detached
    keys_v: Tensor  # M x d
    keys_a: Tensor  # M x d


def non_finite_error(step: int, what: str, losses: Mapping[str, Tensor]) -> NonFiniteLossError:
    parts = ", ".join(f"{name}={float(v.detach()):.4g}" for name, v in losses.items())
    return NonFiniteLossError(
        f"step {step}: the {what} is not finite ({parts}); stopped before the optimiser step, weights unchanged"
    )


def check_finite(out: StepOutput) -> None:
    """Raise NonFiniteLossError when the step was not finite (a host sync: the distributed
    loop calls it once the step's results are on the host anyway)."""
    if not bool(out.finite):
        raise non_finite_error(out.step, "loss or gradient norm", out.losses)


def _check_finite_now(
    value: Tensor,
    *,
    what: str,
    step: int,
    losses: Mapping[str, Tensor],
    all_finite: Callable[[bool], bool] | None = None,
) -> None:
    # A host sync in the middle of the step: the price of stopping before a bad update when
    # the optimiser cannot skip one on the device (optim.fused = false).
    finite = bool(torch.isfinite(value))
    if all_finite is not None:  # every rank must stop together, or DDP's all-reduce would hang
        finite = all_finite(finite)
    if not finite:
        raise non_finite_error(step, what, losses)


def train_step(
    state: TrainState,
    batch: Mapping[str, Tensor],
    *,
    dictionary_v: NegativeDictionary,
    dictionary_a: NegativeDictionary,
    method: MethodConfig,
    grad_clip: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
    all_finite: Callable[[bool], bool] | None = None,
    all_finite_on_device: Callable[[Tensor], Tensor] | None = None,
    defer_check: bool = False,
) -> StepOutput:
    """One CM-ACC step on a batch already on the device (steps 1 to 3 of the method).

    A non-finite loss (or, with `grad_clip`, gradient norm) changes no weight. By default the
    step raises NonFiniteLossError before the optimiser step. With `defer_check` and a fused
    optimiser nothing waits for the host: the verdict stays on the device, the optimiser and
    the EMA skip the update there (fused kernels' `found_inf`; an EMA weight of 0), and the
    caller raises later with `check_finite(out)`. In a data-parallel run `all_finite` (host
    bools) or `all_finite_on_device` (0-dim tensors) combine every rank's verdict, so that all
    ranks stop at the same step. `channels_last` (default: on CUDA) makes the clips NDHWC.
    """
    video, audio, clip_ids = batch["video"], batch["audio"], batch["index"]
    device = video.device
    video = prepare_video(video, channels_last=device.type == "cuda" if channels_last is None else channels_last)
    deferred = defer_check and is_fused(state.optimizer)
    state.optimizer.zero_grad(set_to_none=True)
    autocast = nullcontext() if amp_dtype is None else torch.autocast(device_type=device.type, dtype=amp_dtype)
    with autocast:
        queries_v, queries_a = state.query(video, audio)  # M x d each, L2-normalised
        with torch.no_grad():
            keys_v, keys_a = state.key(video, audio)  # M x d each, positives of the other modality
    losses = cross_modal_nce(
        queries_v=queries_v,
        keys_a=keys_a,
        dictionary_a=dictionary_a.keys,
        queries_a=queries_a,
        keys_v=keys_v,
        dictionary_v=dictionary_v.keys,
        temperature=method.temperature,
        in_batch_negatives=method.in_batch_negatives,
        clip_ids=clip_ids,
        dictionary_ids_a=dictionary_a.ids,
        dictionary_ids_v=dictionary_v.ids,
    )
    if not deferred:
        _check_finite_now(losses["loss"], what="loss", step=state.step, losses=losses, all_finite=all_finite)
    losses["loss"].backward()
    finite = torch.isfinite(losses["loss"].detach())
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(state.query.parameters(), grad_clip)
        if deferred:
            finite = finite & torch.isfinite(grad_norm)
        else:
            _check_finite_now(grad_norm, what="gradient norm", step=state.step, losses=losses, all_finite=all_finite)
    if deferred and all_finite_on_device is not None:
        finite = all_finite_on_device(finite)
    lr = state.optimizer.param_groups[0]["lr"]
    if deferred:
        state.optimizer.found_inf = (~finite).float()  # read by the fused kernels: skip when 1
        state.optimizer.step()
        del state.optimizer.found_inf
        momentum_update(state.key, state.query, method.momentum, apply=finite)
    else:
        state.optimizer.step()
        momentum_update(state.key, state.query, method.momentum)
    state.scheduler.step()
    state.step += 1
    return StepOutput(
        step=state.step - 1,
        losses={name: value.detach() for name, value in losses.items()},
        lr=lr,
        finite=finite,
        queries_v=queries_v.detach().float(),
        queries_a=queries_a.detach().float(),
        keys_v=keys_v.float(),
        keys_a=keys_a.float(),
    )


def step_metrics(out: StepOutput, *, num_clips: int, compute_s: float) -> dict[str, Any]:
    """The metrics of one step under their logged names: loss parts (nats; 0-dim tensors as
    the step left them, `host_values` reads them), the learning rate the step used and the
    clips per second of its compute (`compute_s`: from the batch on the device to the
    dictionaries updated)."""
    return {
        "train/loss": out.losses["loss"],
        "train/loss_va": out.losses["loss_va"],
        "train/loss_av": out.losses["loss_av"],
        "train/lr": out.lr,
        "train/clips_per_s": num_clips / max(compute_s, 1e-9),
    }


def host_values(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """`records` with every 0-dim tensor replaced by its float: one host copy for all."""
    places = [(i, name) for i, record in enumerate(records) for name, v in record.items() if isinstance(v, Tensor)]
    if not places:
        return records
    values = torch.stack([records[i][name].detach().float().reshape(()) for i, name in places]).tolist()
    out = [dict(record) for record in records]
    for (i, name), value in zip(places, values, strict=True):
        out[i][name] = value
    return out


def update_dictionaries(
    dictionaries: Dictionaries,
    *,
    queries_v: Tensor,
    queries_a: Tensor,
    keys_v: Tensor,
    keys_a: Tensor,
    clip_ids: Tensor,
    labels: Tensor | None = None,
    step: int = -1,
) -> dict[str, float]:
    """Step 4 of the method (docs/architecture.md) for one (global) batch of M clips.

    For each modality: the sampler picks P keys from the candidate pool (pseudo-classes: the
    other modality's queries; the batch's clips excluded), they enter the dictionary and are
    taken out of the pool (a key enters a dictionary at most once), and then the batch's M
    keys join the pool, so a batch is a candidate from the next step on and a key that is
    not picked within N / M steps leaves unpicked. `moco` enqueues the batch's M keys instead.
    queries_v, queries_a, keys_v, keys_a: [M, d]; clip_ids, labels: [M] (labels -1 when
    unknown); `step`: the training step of the batch (the keys' arrival, for their age).
    Returns the keys that arrived (`arrived`, M) and entered per modality (`entered_v`,
    `entered_a`).
    """
    labels = torch.full_like(clip_ids, EMPTY_ID) if labels is None else labels
    steps = torch.full_like(clip_ids, step)
    moco = dictionaries.sampler.name == "moco"
    counts = {"arrived": float(clip_ids.shape[0])}
    for modality, keys, other_queries in (("v", keys_v, queries_a), ("a", keys_a, queries_v)):
        pool: CandidatePool = getattr(dictionaries, f"pool_{modality}")
        dictionary: NegativeDictionary = getattr(dictionaries, f"dictionary_{modality}")
        pool_keys, pool_ids = pool.candidates()
        selection = dictionaries.sampler.select(
            pool_keys=pool_keys,
            pool_ids=pool_ids,
            queries=other_queries,
            batch_keys=keys,
            batch_ids=clip_ids,
            exclude_ids=torch.cat([clip_ids, clip_ids.new_tensor([EMPTY_ID])]),
            num_picks=dictionaries.num_enqueue,
        )
        if moco:
            dictionary.enqueue(selection.keys, selection.ids, labels, steps)
        else:
            rows = selection.indices
            dictionary.enqueue(selection.keys, selection.ids, pool.labels[rows], pool.steps[rows])
            pool.take(rows)
            pool.push(keys, clip_ids, labels, steps)
        counts[f"entered_{modality}"] = float(min(selection.ids.shape[0], dictionary.size))  # moco: M may exceed K
    return counts


# --- the loop -------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TrainResult:
    state: TrainState
    dictionaries: Dictionaries
    metrics: list[dict[str, float]] = field(default_factory=list)  # one entry per step


def _to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def train(
    cfg: Config,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    device: torch.device | str = "cpu",
    num_steps: int | None = None,
    state: TrainState | None = None,
    dictionaries: Dictionaries | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Run CM-ACC steps until `state.step` reaches `num_steps` (default `train.steps`).

    Builds a fresh state and dictionaries unless given (pass both to continue a run). Each
    step's metrics (`step`, `step_metrics`, `data/wait_s`, `dict/select_ms`, and every
    `train.log_every` steps and at the end the `workers.diagnostics` statistics under the
    names the distributed loop logs) are appended to the result and passed to `on_step`.
    A batch's `label` (-1 when unknown) only feeds the statistics.
    Raises NonFiniteLossError on a non-finite loss and ValueError when `batches` runs out.
    """
    device = torch.device(device)
    state = state or build_train_state(cfg, device=device)
    dictionaries = dictionaries or build_dictionaries(cfg, device=device)
    total = num_steps or cfg.train.steps
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    result = TrainResult(state=state, dictionaries=dictionaries)
    iterator = iter(batches)
    state.query.train()
    state.key.train()
    while state.step < total:
        started = time.perf_counter()
        try:
            batch = _to_device(next(iterator), device)
        except StopIteration:
            raise ValueError(f"the batches ran out after step {state.step} of {total}") from None
        loaded = time.perf_counter()
        step = state.step
        out = train_step(
            state,
            batch,
            dictionary_v=dictionaries.dictionary_v,
            dictionary_a=dictionaries.dictionary_a,
            method=cfg.method,
            grad_clip=cfg.optim.grad_clip,
            amp_dtype=amp_dtype,
        )
        synchronize(device)
        select_started = time.perf_counter()
        labels = batch.get("label")
        counts = update_dictionaries(
            dictionaries,
            queries_v=out.queries_v,
            queries_a=out.queries_a,
            keys_v=out.keys_v,
            keys_a=out.keys_a,
            clip_ids=batch["index"],
            labels=labels,
            step=step,
        )
        synchronize(device)
        finished = time.perf_counter()
        metrics = {
            "step": float(state.step),
            **step_metrics(out, num_clips=batch["index"].shape[0], compute_s=finished - loaded),
            "data/wait_s": loaded - started,
            "dict/select_ms": 1000 * (finished - select_started),
        }
        metrics = host_values([metrics])[0]
        if state.step % cfg.train.log_every == 0 or state.step == total:
            metrics.update(
                step_statistics(
                    queries_v=out.queries_v,
                    queries_a=out.queries_a,
                    keys_v=out.keys_v,
                    keys_a=out.keys_a,
                    labels=labels if labels is not None else torch.full_like(batch["index"], -1),
                    dictionary_v=dictionaries.dictionary_v,
                    dictionary_a=dictionaries.dictionary_a,
                    step=step,
                    **counts,
                )
            )
        result.metrics.append(metrics)
        if on_step is not None:
            on_step(metrics)
    return result
