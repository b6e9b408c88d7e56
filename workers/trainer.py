"""Single-process CM-ACC training (docs/architecture.md, "The method"): S steps of
`workers.step.train_step` over an iterable of batches, with the dictionaries (and their
shadows) updated in this process right after each step.

The distributed trainer (`workers.distributed.loop`) runs the same step on every Ray Train
worker; both log under the same metric names. A batch is what `workers.step` describes;
with the fresh candidate pool each batch carries its `extra` clips.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from service.config import Config
from workers.diagnostics import entry_metrics, step_statistics
from workers.enqueue import DictionarySet, LocalExchange, build_dictionary_set
from workers.step import host_values, step_metrics, train_step
from workers.tensors import synchronize
from workers.training import TrainState, autocast_dtype, build_train_state


@dataclass(kw_only=True)
class TrainResult:
    state: TrainState
    dictionaries: DictionarySet
    metrics: list[dict[str, float]] = field(default_factory=list)  # one entry per step


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's tensors (and its `extra` clips') on `device`; other values as they are."""
    out: dict[str, Any] = {}
    for name, value in batch.items():
        if isinstance(value, Tensor):
            out[name] = value.to(device, non_blocking=True)
        elif isinstance(value, Mapping):
            out[name] = to_device(value, device)
        else:
            out[name] = value
    return out


def local_exchange(cfg: Config, dictionaries: DictionarySet) -> LocalExchange:
    """Step 4 in this process, measuring what each batch met at log steps."""
    measure = partial(
        step_statistics, temperature=cfg.method.temperature, in_batch_negatives=cfg.method.in_batch_negatives
    )
    return LocalExchange(dictionaries, measure=measure)


def train(
    cfg: Config,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device | str = "cpu",
    num_steps: int | None = None,
    state: TrainState | None = None,
    dictionaries: DictionarySet | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Run CM-ACC steps until `state.step` reaches `num_steps` (default `train.steps`).

    Builds a fresh state and dictionaries unless given (pass both to continue a run). Each
    step's metrics (`step`, `step_metrics`, `data/wait_s`, `dict/select_ms`, and every
    `train.log_every` steps and at the end the `workers.diagnostics` statistics under the
    names the distributed loop logs) are appended to the result and passed to `on_step`.
    Raises NonFiniteLossError on a non-finite loss and ValueError when `batches` runs out.
    """
    device = torch.device(device)
    state = state or build_train_state(cfg, device=device)
    dictionaries = dictionaries or build_dictionary_set(cfg, device=device)
    exchange = local_exchange(cfg, dictionaries)
    total = num_steps or cfg.train.steps
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    result = TrainResult(state=state, dictionaries=dictionaries)
    iterator = iter(batches)
    state.query.train()
    state.key.train()
    while state.step < total:
        started = time.perf_counter()
        try:
            batch = to_device(next(iterator), device)
        except StopIteration:
            raise ValueError(f"the batches ran out after step {state.step} of {total}") from None
        loaded = time.perf_counter()
        measure = (state.step + 1) % cfg.train.log_every == 0 or state.step + 1 == total
        out = train_step(
            state,
            batch,
            exchange=exchange,
            method=cfg.method,
            grad_clip=cfg.optim.grad_clip,
            amp_dtype=amp_dtype,
            measure=measure,
        )
        synchronize(device)
        finished = time.perf_counter()
        exchanged = out.exchanged
        metrics = {
            "step": float(state.step),
            **step_metrics(out, num_clips=exchanged.batch.num_clips, compute_s=finished - loaded),
            "data/wait_s": loaded - started,
            "dict/select_ms": exchanged.select_ms,
        }
        metrics = host_values([metrics])[0]
        if measure:
            metrics.update(exchanged.statistics)
            metrics.update(entry_metrics(exchanged.counts))
            for name, counts in exchanged.shadow_counts.items():
                metrics.update(entry_metrics(counts, f"shadow/{name}"))
        result.metrics.append(metrics)
        if on_step is not None:
            on_step(metrics)
    return result
