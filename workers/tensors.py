"""Moving arrays between torch and numpy: the one copy of these helpers.

Numpy arrays, not tensors, cross the Ray object store (zero-copy); arrays that come out of
it are read-only, so turning them back into tensors takes a copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


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
