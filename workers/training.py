"""What a training run is built from (docs/architecture.md, "The method"): the encoders, the
optimiser and its schedule, and `TrainState`, everything a step changes. Named builders, so
that the single-process trainer, the distributed worker and the benchmarks build alike.

bf16 autocast and channels_last_3d on CUDA, float32 on CPU (`train.precision` and
`train.channels_last` may force either); `train.compile` compiles on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from service.config import Config, ModelConfig, OptimConfig, TrainConfig
from workers.models import AudioVisualEncoder, build_encoders, make_key_encoder


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
    if device.type == "cuda" if channels_last is None else channels_last:  # the 3D convolutions only
        query.video.to(memory_format=torch.channels_last_3d)
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
