"""Start or join Ray the one way every entry point does it.

Without an address (no `--address`, no `RAY_ADDRESS`) a command starts a private local Ray.
It never joins "the cluster Ray started last": Ray records that cluster in a file under its
temp folder, and a head stopped with Ctrl-C or killed leaves the file behind, so joining
it would fail with Ray's traceback about `num_cpus` or hang on a dead address. With an
address, the cluster must answer: a GCS address (`host:port`) that refuses or times out a
TCP connection is a one-line `ClusterUnreachable` error naming it, before Ray retries for
minutes.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from service.errors import Failure

CONNECT_TIMEOUT_S = 10.0


class ClusterUnreachable(Failure):
    """The Ray cluster at the given address does not answer."""


def resolve_address(address: str | None) -> str | None:
    """The address to join (`--address`, else `RAY_ADDRESS`), or None for a local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "local") else address


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise `ClusterUnreachable` when `host:port` does not accept a TCP connection.
    Other forms (`auto`, `ray://...`, URLs) are left to Ray."""
    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise ClusterUnreachable(
            f"cannot reach the Ray cluster at {address} ({err.strerror or err}); is it running? "
            f"(--address or RAY_ADDRESS; leave both unset to start a local Ray)"
        ) from None


# Notices Ray logs on every start that call for no action: said once in the docs instead
# (README, "Token authentication"), kept off a quiet terminal.
KNOWN_NOTICES = ("Token authentication is enabled",)
# Lines Ray's own processes print on every run that call for no action, forwarded from the
# workers to this terminal: Ray Train 2.60's controller warns about its own preemption
# watcher actor (ray-project/ray#53727). They stay in the worker log files.
KNOWN_WORKER_NOTICES = ("has constructor arguments in the object store and max_restarts > 0",)
# Tracebacks of the same kind, dropped whole, as (actor, marker in the batch): with a second
# Ray on the machine, Ray Train's placement-group cleaner cannot tell which one it belongs
# to and its monitor thread ends; it only matters when the controller dies and leaves a
# placement group behind, which ends with an embedded Ray anyway.
KNOWN_WORKER_TRACEBACKS = (("PlacementGroupCleaner", "Found multiple active Ray instances"),)


class _KnownNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in KNOWN_NOTICES)


def init(address: str | None, *, num_cpus: int, quiet: bool = False, **kwargs: Any) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local Ray with `num_cpus`
    logical CPUs. `quiet`: Ray's start-up INFO lines and its known notices stay off the
    terminal (warnings that call for action still show). Extra arguments go to `ray.init`."""
    import ray

    if quiet:
        kwargs.setdefault("logging_level", logging.WARNING)
        notices = _KnownNotices()
        for name in ("ray", ""):
            logging.getLogger(name).addFilter(notices)
            for handler in logging.getLogger(name).handlers:
                handler.addFilter(notices)
    address = resolve_address(address)
    if address is None:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    else:
        check_reachable(address)
        ray.init(address=address, **kwargs)
    if quiet:
        drop_known_worker_notices()


def drop_known_worker_notices() -> None:
    """Ray forwards its workers' output to this process through one dispatcher; wrap its
    handlers so that lines of `KNOWN_WORKER_NOTICES` are dropped. A Ray without that
    dispatcher (another version) prints them: nothing else changes."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        dispatcher.handlers = [(name, _without_notices(handler)) for name, handler in dispatcher.handlers]


def _without_notices(handler: Any) -> Any:
    def handle(data: dict[str, Any]) -> None:
        actor = data.get("actor_name") or ""
        if any(
            actor == name and any(marker in line for line in data.get("lines", []))
            for name, marker in KNOWN_WORKER_TRACEBACKS
        ):
            return
        lines = [line for line in data.get("lines", []) if not any(n in line for n in KNOWN_WORKER_NOTICES)]
        if lines:
            handler({**data, "lines": lines})

    return handle


def run_task(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, device=..., **kwargs)` as a Ray task on the cluster of RAY_ADDRESS (as in a
    Ray job) or a local Ray, started when this process is not connected yet: one GPU and
    `device="cuda"` when the cluster has a GPU, else one CPU and `device="cpu"`. Its result."""
    import ray

    if not ray.is_initialized():
        init(None, num_cpus=os.cpu_count() or 1, log_to_driver=True)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(fn).options(num_cpus=1, num_gpus=gpus)
    return ray.get(task.remote(*args, device="cuda" if gpus else "cpu", **kwargs))
