"""Moving arrays between torch and numpy, and tensor files read without running code: the
one copy of these helpers.

Numpy arrays, not tensors, cross the Ray object store (zero-copy); arrays that come out of
it are read-only, so turning them back into tensors takes a copy.

Checkpoint files (`train.pt`, `actor.pt`) hold tensors and plain values only (dicts,
lists, numbers, strings), so they load through `torch.load(weights_only=True)`, which
builds nothing but those: a file crafted to run code when unpickled is refused
(docs/architecture.md, "Checkpoints").
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import numpy as np
import torch

from service.errors import CheckpointError


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA; nothing to wait for on the CPU): before
    reading a clock that times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_numpy(tree: Any) -> Any:
    """Tensors in a nested dict (or a single tensor) as numpy arrays on the host."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().numpy()
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    return tree


def to_torch(tree: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """Numpy arrays in a nested dict (or a single array) as tensors that own their memory,
    on `device` (default: the CPU) and, when given, of `dtype`."""
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.array(tree)).to(device=device or "cpu", dtype=dtype)
    if isinstance(tree, dict):
        return {k: to_torch(v, device, dtype) for k, v in tree.items()}
    return tree


def to_plain(tree: Any) -> Any:
    """A nested structure with numpy arrays and numpy scalars replaced by tensors and Python
    numbers (dicts, lists and tuples followed), as `torch.save` must see it to be loadable
    by `load_tensors`."""
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.array(tree))
    if isinstance(tree, np.generic):
        return tree.item()
    if isinstance(tree, dict):
        return {k: to_plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_plain(v) for v in tree)
    return tree


def to_numpy_deep(tree: Any) -> Any:
    """`to_numpy` that also follows lists and tuples (the inverse of `to_plain` for a state
    that travels as numpy)."""
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_numpy_deep(v) for v in tree)
    if isinstance(tree, dict):
        return {k: to_numpy_deep(v) for k, v in tree.items()}
    return to_numpy(tree)


def load_tensors(source: bytes | str | os.PathLike[str], *, where: str) -> Any:
    """A file written by `torch.save` of tensors and plain values, read onto the CPU without
    executing anything it holds. Anything else (a pickled object, which loading would
    construct by running code named in the file) raises CheckpointError naming `where`."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _unpickler_reason(str(err))
        raise CheckpointError(
            f"{where}: refused: it holds more than tensors and plain values ({refused}); "
            "cmacc loads checkpoint files without running code from them"
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:  # not a torch file, or truncated
        raise CheckpointError(f"{where}: not a readable tensor file ({err})") from None


def _unpickler_reason(message: str) -> str:
    """The line of torch's weights-only refusal that says what was found (torch wraps it in
    advice to load the file unsafely, which is not ours to give)."""
    skip = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
    lines = [line.strip() for line in message.splitlines()]
    found = [line for line in lines if line and not line.startswith(skip)]
    return found[0] if found else "an object it may not build"
