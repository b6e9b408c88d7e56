"""The torch.distributed calls of the training loop; each is the identity with one worker.

Python objects (the actor's deltas, verdicts, notes) travel over a gloo group on the host:
over NCCL, `broadcast_object_list` would stage them through GPU memory and make every rank
wait for its device, every step. Tensors use the default group (NCCL on GPUs)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_HOST_GROUP: Any = None


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def host_group() -> Any:
    """The gloo group of all ranks for Python objects; made on first use (collectively: every
    rank makes its first object collective at the same point of the loop)."""
    global _HOST_GROUP
    world = dist.group.WORLD
    if _HOST_GROUP is None or _HOST_GROUP[0] is not world:  # none yet, or made for an earlier world
        _HOST_GROUP = (world, world if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    return _HOST_GROUP[1]


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
    dist.broadcast_object_list(box, src=0, group=host_group())
    return box[0]


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on every rank (a host bool: waits for it)."""
    return bool(all_ranks_true_on_device(torch.tensor(flag, device=device)))


def all_ranks_true_on_device(flag: torch.Tensor) -> torch.Tensor:
    """0-dim bool: True when `flag` is True on every rank, without waiting for the host."""
    if world_size() == 1:
        return flag
    value = flag.to(torch.int32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value[0].bool()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if world_size() == 1:
        return [obj]
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, obj, group=host_group())
    return everyone
