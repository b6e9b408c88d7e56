"""The next batch ready before the step ends: `BatchPrefetcher` prepares the batch of step
s + 1 (read from the reader, pinned, copied to the device, its JPEGs decoded there, augmented)
while step s runs.

On CUDA a thread of its own prepares each batch on a side stream and records an event when
the batch is complete; `get` makes the training stream wait for that event on the device
(the host does not wait) and marks the batch's tensors as used by the training stream, so the
caching allocator does not hand their memory to the side stream before the step that reads
them has run. Elsewhere (the CPU) the same `prepare` runs inline when the step asks for its
batch: there is no second engine to overlap with, and a thread would only take CPU time from
the step.

The nvJPEG hazard is handled where the decode is called (`decode.decode_batch`): a host wait
for the side stream right before the batched decode, because its hardware decoder writes when
it is called, whatever is still queued on the stream it is given.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from workers.data.pipeline import POLL_S, put_unless_stopped

# A test hook (passed to the workers with the other CMACC_FAULT_* variables): "1" prepares
# ahead in a thread on the CPU too, so that a CPU test runs the code path of a GPU.
AHEAD_ENV = "CMACC_FAULT_PREFETCH_AHEAD"


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors_in(item)


def pinned(raw: dict[str, Any]) -> dict[str, Any]:
    """A reader batch with its large host tensors (frames or encoded frames, audio) in pinned
    memory, so that their copies to the GPU are asynchronous; nvJPEG reads pinned input
    faster too. The small index tensors are left as they are."""
    out = dict(raw)
    for name in ("frames", "audio"):
        if isinstance(out.get(name), torch.Tensor):
            out[name] = out[name].pin_memory()
    if "jpeg" in out:
        out["jpeg"] = {**out["jpeg"], "data": out["jpeg"]["data"].pin_memory()}
    return out


class BatchPrefetcher:
    """Batches of consecutive steps from `start_step` on, each made by `prepare(step)`.

    `ahead` (default: on CUDA devices, or with AHEAD_ENV) prepares step s + 1 in a background thread on a side
    stream while step s runs; otherwise `get(step)` calls `prepare(step)` itself. Either way
    the batches, their order and their contents are the same. An exception in `prepare`
    comes out of the `get` of its step. `close()` stops the thread (a batch prepared ahead
    is dropped; the caller's cursors are those of the batches `get` returned)."""

    def __init__(
        self,
        prepare: Callable[[int], Any],
        *,
        device: torch.device,
        start_step: int,
        ahead: bool | None = None,
    ):
        self._prepare = prepare
        self._device = torch.device(device)
        self._next_step = start_step
        if ahead is None:
            ahead = self._device.type == "cuda" or os.environ.get(AHEAD_ENV) == "1"
        self.ahead = ahead
        self._stop = threading.Event()
        self._queue: queue.Queue[tuple[int, Any, Any]] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        if self.ahead:
            self._thread = threading.Thread(target=self._run, name="cmacc-prefetch", daemon=True)
            self._thread.start()

    def get(self, step: int) -> Any:
        """The batch of `step` (steps are asked for in order), ready to use on the device."""
        if step != self._next_step:
            raise RuntimeError(f"BatchPrefetcher: asked for step {step}, the next batch is step {self._next_step}")
        self._next_step += 1
        if not self.ahead:
            return self._prepare(step)
        while True:
            try:
                made_for, batch, event = self._queue.get(timeout=POLL_S)
                break
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the batch prefetch thread stopped without a reason") from None
        if isinstance(batch, BaseException):
            raise batch
        assert made_for == step, (made_for, step)
        if event is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(event)  # on the device: the host goes on to queue the step
            for tensor in tensors_in(batch):
                if tensor.is_cuda:
                    tensor.record_stream(current)
        return batch

    def _run(self) -> None:
        cuda = self._device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self._device)
        stream = torch.cuda.Stream(self._device) if cuda else None
        step = self._next_step
        while not self._stop.is_set():
            event = None
            try:
                if stream is not None:
                    with torch.cuda.stream(stream):
                        batch = self._prepare(step)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    batch = self._prepare(step)
            except BaseException as err:  # handed to the step that needed this batch
                batch = err
            if not self._put((step, batch, event)) or isinstance(batch, BaseException):
                return
            step += 1

    def _put(self, entry: tuple[int, Any, Any]) -> bool:
        return put_unless_stopped(self._queue, entry, self._stop)

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the thread; it ends once its `prepare` returns (closing the reader it reads
        from ends a wait there)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None


class CursorAt:
    """A reader's cursor as it stood right after it handed out one batch: what a checkpoint
    taken after that batch's step saves, however far a prefetch has read since."""

    def __init__(self, reader: Any):
        self._state = reader.state_dict()
        self.num_skipped = int(reader.num_skipped)

    def state_dict(self) -> dict[str, Any]:
        return self._state
