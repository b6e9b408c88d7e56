"""The project's errors, and how they become exit codes (see docs/architecture.md, "Errors").

Every error a user can cause or meet is a `CmaccError` with an `exit_code`:

* 2, `UsageError`: the request is impossible as asked (a bad option, an invalid config
  value, a run id that is taken); nothing was started or written.
* 1, `Failure`: the request was valid and its work failed (a run that failed, an
  unreachable cluster). `InputError` (data sets, checkpoints, runs in storage that are
  missing, corrupt or inconsistent) is a failure too.

`OSError` (storage, files) also exits 1: `service.storage` names the URI in its message.
The CLI and every `python -m jobs.*` entry point go through `run_main`, so an error exits
the same way whichever door it came through; anything else is a bug and keeps its traceback.

This module is torch- and ray-free: the CLI imports it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable


class CmaccError(Exception):
    """Base of the project's errors; `exit_code` is what the process exits with."""

    exit_code = 1


class UsageError(CmaccError):
    """The command line or config asks for something impossible; nothing was touched."""

    exit_code = 2


class RunExistsError(UsageError):
    """The run id already has a checkpoint and `--resume` was not given."""


class RunBusyError(UsageError):
    """Another live job holds the run's lease (`service.lease`)."""


class Failure(CmaccError):
    """The request was valid, but its work failed."""


class InputError(Failure):
    """Input (a data set, shard, row, checkpoint or run in storage) is missing, corrupt or
    inconsistent; the message names the URI."""


class DataError(InputError, ValueError):
    """A data set, shard or row is missing, corrupt or inconsistent; the message names it."""


class CheckpointError(InputError):
    """A URI is not a checkpoint, or one that cannot be read."""


class CatalogError(InputError, LookupError):
    """A run or checkpoint is missing from storage, or its record is unreadable."""


class ActorError(Failure):
    """The dictionary actor failed in a way the training loop cannot recover from."""


class ActorRestarted(ActorError):
    """Ray restarted the dictionary actor: its state is blank and must be re-seeded."""


PIPE_CLOSED = 141  # 128 + SIGPIPE, as a shell reports a writer whose reader went away


def exit_code(err: BaseException) -> int | None:
    """The exit code for an error that ends a command, or None for a bug (keep the traceback)."""
    if isinstance(err, CmaccError):
        return err.exit_code
    if isinstance(err, BrokenPipeError):
        return PIPE_CLOSED
    if isinstance(err, OSError):
        return 1
    if isinstance(err, KeyboardInterrupt):
        return 130
    return None


def report(err: BaseException) -> int | None:
    """Print `err` as one line on stderr and return its exit code (None: not ours to report)."""
    code = exit_code(err)
    if code is None:
        return None
    if isinstance(err, BrokenPipeError):  # `cmacc status | head -1`: the reader had enough
        _silence_stdout()
        return code
    message = "interrupted" if isinstance(err, KeyboardInterrupt) else f"error: {err}"
    print(f"cmacc: {message}", file=sys.stderr, flush=True)
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run_main(main: Callable[[], int], *, own_process: bool = True) -> None:
    """Run an entry point's `main()` and exit with its code, or with the code of its error.
    `own_process=False` (a caller that embeds the entry point, such as a test) always exits
    through `SystemExit`."""
    try:
        code = main()
    except BaseException as err:
        code = report(err)
        if code is None:
            raise
    if own_process and _native_teardown_can_abort():
        _exit_without_native_teardown(code)
    sys.exit(code)


def _native_teardown_can_abort() -> bool:
    """True when this process read Parquet (pyarrow is loaded) and holds no Ray of its own.

    After pyarrow has read files, the C++ runtime's teardown at process exit can destroy one
    of Arrow's native thread pools while a worker thread is still joinable: std::terminate,
    "terminate called without an active exception", exit 134, after the command has printed
    its whole answer (apache/arrow issue 34314; measured 10 of 20 `cmacc data inspect --json`
    runs, and 1 of 20 still with single-threaded reads). A process that started Ray exits
    normally: Ray's own exit handlers stop the local cluster.
    """
    if "pyarrow" not in sys.modules:
        return False
    ray = sys.modules.get("ray")
    return not (ray is not None and getattr(ray, "is_initialized", lambda: False)())


def _exit_without_native_teardown(code: int | None) -> None:
    """Exit as `sys.exit(code)` would, but skip the C++ static destructors: run Python's exit
    handlers (thread-pool joins, pyarrow's own finalizers, logging), flush, then `os._exit`."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code if isinstance(code, int) else 0)
