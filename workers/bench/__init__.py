"""Benchmarks (`cmacc bench ...`; docs/performance.md): each measures on the machine it runs
on and returns a JSON-able report; the commands print it as a table.

* `sampler`: milliseconds per dictionary selection;
* `train`: the plain training step against the whole service path, side by side;
* `reader`: clips per second of the shard reader.

Here: what every benchmark needs of its device.
"""

from __future__ import annotations

import torch

from service.errors import Failure


def check_device(device: str, *, command: str) -> torch.device:
    """`device` as a torch.device; Failure naming `command` when it is CUDA and this machine
    has none."""
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise Failure(f"cmacc bench {command}: --device cuda, but this machine has no CUDA device")
    return torch_device


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
