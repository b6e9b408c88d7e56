"""The torch.distributed calls of the training loop; each is the identity with one worker."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows [B, ...] in rank order -> [W x B, ...]."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_from_rank0(obj: Any) -> Any:
    """`obj` of rank 0 on every rank (small Python objects and numpy arrays)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on every rank."""
    value = torch.tensor([1 if flag else 0], device=device)
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if world_size() == 1:
        return [obj]
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, obj)
    return everyone
