"""The driver's side of training, while Ray Train runs: Ctrl-C and SIGTERM (`StopSignals`),
`fit()` in a helper thread that keeps the signals (`fit_in_thread`), and what the terminal
shows (`ProgressBar`, `say_above`). `workers.driver.fit` puts them together.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from service.errors import Failure
from workers.actor import DictionaryClient

ProgressFactory = Callable[[DictionaryClient, int, int], Any]


class StoppedBeforeStart(Exception):
    """A stop (Ctrl-C, SIGTERM, `cmacc stop`) arrived before any worker trained a step: there
    is nothing to checkpoint, so the driver ends at once instead of waiting for workers
    (which may never get their resources) to reach a step."""


class StopSignals:
    """Ctrl-C and SIGTERM for the whole job, from Ray's start to the end of training.

    Before rank 0 reported its first step, a signal ends the job at the next `check()`
    (`StoppedBeforeStart`: nothing to checkpoint). Afterwards the first asks the workers to
    write a checkpoint and stop; a second one aborts (the previous handlers are back).
    Installed right after Ray starts, whose own SIGTERM handler would kill the process.
    """

    def __init__(self) -> None:
        self.client: DictionaryClient | None = None  # set once the actor exists
        self.started = False  # rank 0 reported a step
        self.requested = False  # a stop arrived before that
        self.stopping = False  # the workers were asked to checkpoint and stop (the run record says so)
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)  # None: a handler set outside Python
        self.previous = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.started or self.client is None:
            self.requested = True
            print("\ncmacc: stopping: no step was trained yet, so there is nothing to checkpoint", flush=True)
            return
        print("\ncmacc: stopping after the next step and a checkpoint (again to abort)", flush=True)
        self.client.request_stop()
        self.stopping = True
        self._restore()

    def mark_started(self) -> None:
        """Rank 0 reported its first step. A stop that arrived while that step was on its way
        now asks for a checkpoint instead of abandoning the steps trained."""
        self.started = True
        if self.requested and self.client is not None:
            self.requested = False
            self.client.request_stop()
            self.stopping = True
            self._restore()

    def check(self) -> None:
        if self.requested and not self.started:
            raise StoppedBeforeStart()


def fit_in_thread(trainer: Any, stop: StopSignals, *, poll: Callable[[], None]) -> Any:
    """`trainer.fit()` in a helper thread, so that Ray Train does not install its own SIGINT
    handler (which aborts the run without a checkpoint) and this thread keeps the signals;
    `poll` is called twice a second meanwhile. A stop before the first step raises
    `StoppedBeforeStart` at once (the helper thread is left to die with the process)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the calling thread
            outcome["error"] = err

    thread = threading.Thread(target=target, name="cmacc-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        stop.check()
        thread.join(timeout=0.5)
        poll()
    if "error" in outcome:
        err = outcome["error"]
        raise Failure(f"training failed: {type(err).__name__}: {err}") from err
    return outcome["result"]


def say_above(display: Any, line: str) -> None:
    """A line on the terminal, above the progress bar when there is one."""
    if display is not None and hasattr(display, "write"):
        display.write(line)
    else:
        print(line, flush=True)


class ProgressBar:
    """The driver's progress bar (step, loss, clips/s, ETA) from what rank 0 reports to the
    dictionary actor."""

    def __init__(self, client: DictionaryClient, total: int, initial: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", desc="pretrain", file=sys.stderr, dynamic_ncols=True)

    def show(self, progress: dict[str, float]) -> None:
        step = int(progress["step"])
        if step < self.bar.n:  # a restarted attempt replays steps since its checkpoint
            self.bar.reset(total=self.bar.total)
        self.bar.update(step - self.bar.n)
        postfix = {"clips_s": f"{progress['clips_per_s']:.0f}"}
        if math.isfinite(progress["loss"]):  # NaN until the loop first reads its losses (train.log_every)
            postfix = {"loss": f"{progress['loss']:.3f}", **postfix}
        self.bar.set_postfix(postfix, refresh=True)

    def write(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
