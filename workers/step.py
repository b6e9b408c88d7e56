"""One training step of CM-ACC, end to end: read this module first (docs/architecture.md,
"A training step").

`train_step` does what the paper's step does, in the order it happens, calling into the
parts: the encoders (`workers.models`), the cross-modal InfoNCE (`workers.loss`), the
optimiser and the EMA (`workers.training`, `workers.models`), and the dictionary exchange
(step 4: `workers.enqueue`, which picks what enters with `workers.sampler`). The same
function runs in one process (the exchange updates the dictionaries in place) and on every
Ray Train worker (the query encoders in DDP; the exchange gathers the global batch, sends it
to the dictionary actor and applies the deltas due: `workers.distributed.exchange`).

A batch is a mapping with `video` float [B, 3, T, H, W], `audio` float [B, 1, n_mels, frames],
`index` int64 [B] (clip ids), `label` int64 [B] and `source` int64 [B] (-1 when unknown),
and with the fresh candidate pool `extra`: the same fields for E' clips that are only
candidates for the dictionaries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from service.config import MethodConfig
from workers.dictionary import NegativeDictionary
from workers.enqueue import Arrivals, Exchanged
from workers.loss import cross_modal_nce
from workers.models import momentum_update
from workers.training import TrainState, is_fused, prepare_video


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) is NaN or infinite; raised before the optimiser step."""


class DictionaryExchange(Protocol):
    """Step 4 as a step sees it: the dictionaries the loss reads, and `exchange`, which takes
    this rank's arrivals and returns what entered (after measuring, when asked, what the
    batch met in the dictionaries before they change)."""

    @property
    def dictionary_v(self) -> NegativeDictionary: ...

    @property
    def dictionary_a(self) -> NegativeDictionary: ...

    def exchange(self, arrivals: Arrivals, *, measure: bool = False) -> Exchanged: ...


@dataclass(kw_only=True)
class StepOutput:
    """A step's loss parts (0-dim tensors, nats, on the device: reading them is a host sync,
    so the distributed loop reads them every `train.log_every` steps), its finiteness, the
    learning rate it used and what its dictionary exchange gave."""

    step: int  # the step taken (0-based)
    losses: dict[str, Tensor]
    lr: float
    finite: Tensor  # 0-dim bool: every rank's loss (and gradient norm) finite; False = nothing was updated
    exchanged: Exchanged


def train_step(
    state: TrainState,
    batch: Mapping[str, Any],
    *,
    exchange: DictionaryExchange,
    method: MethodConfig,
    grad_clip: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
    all_finite: Callable[[bool], bool] | None = None,
    all_finite_on_device: Callable[[Tensor], Tensor] | None = None,
    defer_check: bool = False,
    measure: bool = False,
) -> StepOutput:
    """One CM-ACC step on a batch already on the device: steps 1 to 4 of the method.

    A non-finite loss (or, with `grad_clip`, gradient norm) changes no weight. By default the
    step raises NonFiniteLossError before the optimiser step. With `defer_check` and a fused
    optimiser nothing waits for the host: the verdict stays on the device, the optimiser and
    the EMA skip the update there, and the caller raises later with `check_finite(out)`. In a
    data-parallel run `all_finite` (host bools) or `all_finite_on_device` (0-dim tensors)
    combine every rank's verdict, so that all ranks stop at the same step. `measure`: the
    exchange measures what the batch met in the dictionaries (log steps).
    """
    video, audio, clip_ids = batch["video"], batch["audio"], batch["index"]
    video = prepare_video(video, channels_last=video.is_cuda if channels_last is None else channels_last)
    autocast = nullcontext() if amp_dtype is None else torch.autocast(device_type=video.device.type, dtype=amp_dtype)

    # 1. Queries from the query encoders f_v, f_a; positive keys from the key encoders h_v, h_a.
    state.optimizer.zero_grad(set_to_none=True)
    with autocast:
        queries_v, queries_a = state.query(video, audio)  # M x d each, L2-normalised
        with torch.no_grad():  # M x d each: positives of the other modality; E x d: extra candidates
            keys_v, keys_a, extra_v, extra_a = key_forward(state, video, audio, batch.get("extra"), channels_last)

    # 2. Cross-modal InfoNCE, both directions, against the dictionaries D_a, D_v.
    losses = cross_modal_nce(
        queries_v=queries_v,
        keys_a=keys_a,
        dictionary_a=exchange.dictionary_a.keys,
        queries_a=queries_a,
        keys_v=keys_v,
        dictionary_v=exchange.dictionary_v.keys,
        temperature=method.temperature,
        in_batch_negatives=method.in_batch_negatives,
        clip_ids=clip_ids,
        dictionary_ids_a=exchange.dictionary_a.ids,
        dictionary_ids_v=exchange.dictionary_v.ids,
    )

    # 3. Update: the optimiser step on f_v, f_a and their heads, then the EMA of h_v, h_a.
    deferred = defer_check and is_fused(state.optimizer)
    lr = state.optimizer.param_groups[0]["lr"]
    finite = optimiser_step(
        state,
        losses,
        grad_clip=grad_clip,
        deferred=deferred,
        all_finite=all_finite,
        all_finite_on_device=all_finite_on_device,
    )
    momentum_update(state.key, state.query, method.momentum, apply=finite if deferred else None)
    state.scheduler.step()
    state.step += 1

    # 4. The dictionary exchange: the sampler picks which keys enter D_v and D_a.
    arrivals = Arrivals(
        step=state.step - 1,
        queries_v=queries_v.detach().float(),
        queries_a=queries_a.detach().float(),
        keys_v=keys_v.float(),
        keys_a=keys_a.float(),
        clip_ids=clip_ids,
        labels=batch["label"],
        sources=batch.get("source", torch.full_like(clip_ids, -1)),
        extra_keys_v=extra_v,
        extra_keys_a=extra_a,
        **extra_columns(batch.get("extra"), like=clip_ids),
    )
    exchanged = exchange.exchange(arrivals, measure=measure)
    return StepOutput(
        step=state.step - 1,
        losses={name: value.detach() for name, value in losses.items()},
        lr=lr,
        finite=finite,
        exchanged=exchanged,
    )


# --- the parts of a step ----------------------------------------------------------------------


def key_forward(
    state: TrainState, video: Tensor, audio: Tensor, extra: Mapping[str, Any] | None, channels_last: bool | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The key encoders' keys of the batch [M, d] (the positives) and of the fresh pool's
    extra clips [E, d] (candidates only; float32), in ONE forward of the M + E clips: every
    candidate of the dictionaries is normalised alike (the key encoders' BatchNorm runs on
    batch statistics), so a sampler cannot tell the two halves apart by how they were encoded.
    The positives are then normalised with the extra clips' statistics too: they equal a
    forward of the batch alone exactly when E = 0 (the stream pool, `moco` without shadows)."""
    if extra is None or extra["index"].numel() == 0:
        keys_v, keys_a = state.key(video, audio)
        empty = keys_v.new_zeros(0, keys_v.shape[1], dtype=torch.float32)
        return keys_v, keys_a, empty, empty
    both = torch.cat([video, extra["video"]])
    both = prepare_video(both, channels_last=both.is_cuda if channels_last is None else channels_last)
    m = video.shape[0]
    keys_v, keys_a = state.key(both, torch.cat([audio, extra["audio"]]))
    return keys_v[:m], keys_a[:m], keys_v[m:].float(), keys_a[m:].float()


def extra_columns(extra: Mapping[str, Any] | None, *, like: Tensor) -> dict[str, Tensor]:
    """The extra clips' ids, labels and sources (empty without them)."""
    if extra is None:
        empty = like.new_zeros(0)
        return {"extra_ids": empty, "extra_labels": empty, "extra_sources": empty}
    sources = extra.get("source", torch.full_like(extra["index"], -1))
    return {"extra_ids": extra["index"], "extra_labels": extra["label"], "extra_sources": sources}


def optimiser_step(
    state: TrainState,
    losses: Mapping[str, Tensor],
    *,
    grad_clip: float,
    deferred: bool,
    all_finite: Callable[[bool], bool] | None,
    all_finite_on_device: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """Backward, optional clipping and the optimiser step; the step's finiteness (0-dim bool).
    Deferred: a non-finite step is skipped on the device (the fused kernels' `found_inf`).
    Else it raises NonFiniteLossError before the optimiser step (a host sync)."""
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
    if deferred:
        state.optimizer.found_inf = (~finite).float()  # read by the fused kernels: skip when 1
        state.optimizer.step()
        del state.optimizer.found_inf
    else:
        state.optimizer.step()
    return finite


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
