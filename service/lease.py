"""One live job per run: a lease object in the run folder (docs/architecture.md, "Run lease").

The job that trains a run holds `<run>/lease.json`: who (owner id, host, pid, Ray job id),
since when, and a heartbeat it renews every `ttl / 4`. Every write is a compare-and-swap
(`service.storage.write_if`: a conditional PUT on S3), so of two jobs that start together
exactly one gets the lease; the other is refused with `RunBusyError` naming the holder. A
lease whose heartbeat is older than its `ttl_s` (its job died: SIGKILL, a lost node) has
lapsed, and the next job takes it over. Releasing marks it `released`.

Torch- and ray-free: the CLI reads leases for `cmacc status` and `cmacc runs`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from service import layout, storage
from service.errors import RunBusyError

logger = logging.getLogger("cmacc")


@dataclass(kw_only=True)
class LeaseRecord:
    owner: str  # a fresh id per job
    host: str
    pid: int
    job: str  # the Ray job submission id, when the job was submitted
    acquired: str  # ISO time
    heartbeat: float  # epoch seconds of the last renewal
    ttl_s: float
    released: bool = False

    def live(self, now: float | None = None) -> bool:
        return not self.released and (time.time() if now is None else now) <= self.heartbeat + self.ttl_s

    def describe(self, now: float | None = None) -> str:
        """`host pid 123 (job r1), heartbeat 4 s ago`."""
        age = (time.time() if now is None else now) - self.heartbeat
        job = f" (job {self.job})" if self.job else ""
        return f"{self.host} pid {self.pid}{job}, heartbeat {age:.0f} s ago"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord | None:
        try:
            raw = json.loads(data)
            return cls(**{name: raw[name] for name in cls.__dataclass_fields__ if name in raw})
        except (ValueError, TypeError, KeyError):
            return None  # unreadable: treated as lapsed


def read_lease(
    run_uri: str, *, endpoint_url: str = "", retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S
) -> LeaseRecord | None:
    """The run's lease record (live or lapsed), or None when it has none."""
    lease_uri = storage.join(run_uri, layout.LEASE_FILE)
    found = storage.read_with_token(lease_uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    return LeaseRecord.from_json(found[0]) if found else None


def busy_error(run_id: str, holder: LeaseRecord | None, lease_uri: str) -> RunBusyError:
    """The refusal of a second job for a run whose lease `holder` holds."""
    who = holder.describe() if holder else "another job"
    lapse = f"; it lapses {holder.ttl_s:.0f} s after the holder's last heartbeat" if holder else ""
    return RunBusyError(
        f"run {run_id} is being trained by {who} ({lease_uri}){lapse}. "
        f"Stop that job first (cmacc stop {run_id}), or use another --run-id"
    )


class RunLease:
    """The lease of one job on one run: `acquire()`, then a heartbeat thread until
    `release()`. `on_lost` is called (from the heartbeat thread) if another job took the
    lease over, which happens only after this job missed heartbeats for `ttl_s`."""

    def __init__(
        self,
        run_uri: str,
        *,
        run_id: str,
        ttl_s: float,
        endpoint_url: str = "",
        retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S,
        on_lost: Callable[[str], None] | None = None,
    ):
        self.uri = storage.join(run_uri, layout.LEASE_FILE)
        self.run_id = run_id
        self.endpoint_url = endpoint_url
        self.retry_budget_s = retry_budget_s
        self.on_lost = on_lost
        self.record = LeaseRecord(
            owner=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            job=os.environ.get("RAY_JOB_SUBMISSION_ID", ""),
            acquired=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            heartbeat=time.time(),
            ttl_s=ttl_s,
        )
        self.token: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease, or raise RunBusyError naming the live holder."""
        found = storage.read_with_token(self.uri, endpoint_url=self.endpoint_url, retry_budget_s=self.retry_budget_s)
        if found is not None:
            holder = LeaseRecord.from_json(found[0])
            if holder is not None and holder.live() and holder.owner != self.record.owner:
                raise self._busy(holder)
            if holder is not None and not holder.released and holder.owner != self.record.owner:
                logger.warning("run %s: taking over the lease of %s (lapsed)", self.run_id, holder.describe())
        self.record.heartbeat = time.time()
        try:
            self.token = storage.write_if(
                self.uri,
                self.record.to_json(),
                token=found[1] if found else None,
                endpoint_url=self.endpoint_url,
                retry_budget_s=self.retry_budget_s,
            )
        except storage.PreconditionFailed:  # another job wrote it between our read and write
            holder = LeaseRecord.from_json(
                storage.read_bytes(self.uri, endpoint_url=self.endpoint_url, retry_budget_s=self.retry_budget_s)
            )
            if holder is not None and holder.owner == self.record.owner:  # our write did land
                self.token = storage.content_token(self.record.to_json())
            else:
                raise self._busy(holder) from None
        self._thread = threading.Thread(target=self._beat, name="cmacc-lease", daemon=True)
        self._thread.start()

    def _busy(self, holder: LeaseRecord | None) -> RunBusyError:
        return busy_error(self.run_id, holder, self.uri)

    def _beat(self) -> None:
        interval = self.record.ttl_s / 4
        while not self._stop.wait(interval):
            try:
                self._write(heartbeat=time.time())
            except storage.PreconditionFailed:
                self.lost = True
                message = f"run {self.run_id}: another job took over this job's lease ({self.uri})"
                logger.error(message)
                if self.on_lost is not None:
                    self.on_lost(message)
                return
            except OSError as err:  # storage unreachable for now: try again at the next beat
                logger.warning("run %s: could not renew the lease: %s", self.run_id, err)

    def _write(self, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(self.record, name, value)
        self.token = storage.write_if(
            self.uri,
            self.record.to_json(),
            token=self.token,
            endpoint_url=self.endpoint_url,
            retry_budget_s=self.retry_budget_s,
        )

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (a lost lease is left alone)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.token is None or self.lost:
            return
        try:
            self._write(released=True, heartbeat=time.time())
        except OSError as err:  # it lapses by itself after ttl_s
            logger.warning("run %s: could not release the lease (it lapses by itself): %s", self.run_id, err)

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
