"""The run lease on local storage: one live holder, a refusal that names it, takeover of a
lapsed lease, heartbeats, and the catalog's verdict on a job that died without a word.
(The same compare-and-swap on S3 is in tests/integration/test_storage_s3.py.)"""

from __future__ import annotations

import json
import threading
import time

import pytest

from service import catalog, layout, storage
from service.errors import RunBusyError
from service.lease import LeaseRecord, RunLease, read_lease

pytestmark = pytest.mark.unit


def test_a_second_job_is_refused_naming_the_holder_until_the_first_releases(tmp_path):
    run = str(tmp_path / "r1")
    first = RunLease(run, run_id="r1", ttl_s=60)
    first.acquire()
    try:
        second = RunLease(run, run_id="r1", ttl_s=60)
        with pytest.raises(RunBusyError) as refused:
            second.acquire()
        message = str(refused.value)
        assert f"pid {first.record.pid}" in message and first.record.host in message
        assert "cmacc stop r1" in message and layout.LEASE_FILE in message
    finally:
        first.release()
    assert read_lease(run).released
    second.acquire()
    assert read_lease(run).owner == second.record.owner and read_lease(run).live()
    second.release()


def test_a_lapsed_lease_is_taken_over(tmp_path):
    run = str(tmp_path / "r1")
    dead = LeaseRecord(
        owner="dead", host="gone", pid=1, job="", acquired="", heartbeat=time.time() - 30, ttl_s=10, released=False
    )
    storage.write_bytes(storage.join(run, layout.LEASE_FILE), dead.to_json())
    assert not read_lease(run).live()
    lease = RunLease(run, run_id="r1", ttl_s=10)
    lease.acquire()
    assert read_lease(run).owner == lease.record.owner
    lease.release()


def test_of_jobs_that_start_together_exactly_one_holds_the_lease(tmp_path):
    run = str(tmp_path / "r1")
    for attempt in range(5):
        leases = [RunLease(run, run_id="r1", ttl_s=60) for _ in range(4)]
        outcomes: list[str] = []
        barrier = threading.Barrier(len(leases))

        def take(lease: RunLease, barrier: threading.Barrier, outcomes: list[str]) -> None:
            barrier.wait()
            try:
                lease.acquire()
                outcomes.append("held")
            except RunBusyError:
                outcomes.append("refused")

        threads = [threading.Thread(target=take, args=(lease, barrier, outcomes)) for lease in leases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["held", "refused", "refused", "refused"], f"attempt {attempt}: {outcomes}"
        for lease in leases:
            lease.release()


def test_the_holder_renews_its_heartbeat_and_a_lost_lease_is_reported(tmp_path):
    run = str(tmp_path / "r1")
    lost: list[str] = []
    lease = RunLease(run, run_id="r1", ttl_s=2, on_lost=lost.append)  # beats every 0.5 s
    lease.acquire()
    first = read_lease(run).heartbeat
    time.sleep(1.3)
    assert read_lease(run).heartbeat > first
    # Another job writes the lease (as after a takeover): the holder notices at its next beat.
    storage.write_bytes(storage.join(run, layout.LEASE_FILE), json.dumps({"owner": "other"}).encode())
    time.sleep(1.3)
    assert lease.lost and lost and "took over" in lost[0]
    lease.release()
    assert json.loads(storage.read_bytes(storage.join(run, layout.LEASE_FILE))) == {"owner": "other"}


def _record(root: str, run_id: str, state: str) -> None:
    info = {"run_id": run_id, "recipe": "demo", "sampler": "active", "state": state, "last_step": 4, "config": {}}
    storage.write_bytes(storage.join(root, run_id, layout.RUN_FILE), json.dumps(info).encode())


def test_a_running_record_without_a_live_lease_is_recorded_as_a_lost_job(tmp_path):
    root = str(tmp_path)
    _record(root, "dead", "running")
    dead = LeaseRecord(owner="x", host="node-7", pid=42, job="", acquired="", heartbeat=time.time() - 300, ttl_s=120)
    storage.write_bytes(storage.join(root, "dead", layout.LEASE_FILE), dead.to_json())
    entry = catalog.read_run(root, "dead")
    assert entry.info["state"] == "failed" and "node-7 pid 42" in entry.info["error"]
    assert "--resume" in entry.info["error"]
    stored = json.loads(storage.read_bytes(storage.join(root, "dead", layout.RUN_FILE)))
    assert stored["state"] == "failed"  # the next look finds it said

    _record(root, "alive", "running")
    lease = RunLease(storage.join(root, "alive"), run_id="alive", ttl_s=60)
    lease.acquire()
    try:
        entry = catalog.read_run(root, "alive")
        assert entry.info["state"] == "running"
        assert entry.held_by.startswith(f"{lease.record.host} pid {lease.record.pid}")
        held = {run.run_id: run.to_dict()["held_by"] for run in catalog.list_runs(root)}
        assert held["alive"] == entry.held_by and held["dead"] == ""
    finally:
        lease.release()
    assert catalog.read_run(root, "alive").held_by == ""


def test_a_look_between_the_jobs_last_record_and_its_release_does_not_overwrite_it(tmp_path, monkeypatch):
    """`cmacc status` reads run.json (`running`); the job writes its final record and
    releases its lease; the look reads the released lease. The job's record stands."""
    root = str(tmp_path)
    _record(root, "ending", "running")
    lease = RunLease(storage.join(root, "ending"), run_id="ending", ttl_s=60)
    lease.acquire()
    real_read_lease = catalog.read_lease

    def job_ends_meanwhile(run_uri, **kwargs):
        _record(root, "ending", "stopped")
        lease.release()
        return real_read_lease(run_uri, **kwargs)

    monkeypatch.setattr(catalog, "read_lease", job_ends_meanwhile)
    assert catalog.read_run(root, "ending").info["state"] == "stopped"
    monkeypatch.setattr(catalog, "read_lease", real_read_lease)
    assert catalog.read_run(root, "ending").info["state"] == "stopped"


def test_the_pre_run_checks_refuse_a_run_a_live_job_holds(tmp_path):
    """`cmacc submit` and the job share `preflight.check_start`: a second job is refused
    before it is submitted, naming the holder, not later in the job's log."""
    from service import preflight

    root = str(tmp_path)
    storage.write_bytes(storage.join(root, "r1", layout.RUN_FILE), json.dumps({"state": "running"}).encode())
    holder = RunLease(storage.join(root, "r1"), run_id="r1", ttl_s=60)
    holder.acquire()
    try:
        with pytest.raises(RunBusyError, match=rf"run r1 is being trained by .* pid {holder.record.pid}"):
            preflight.check_start(catalog.read_run(root, "r1"), run_id="r1", root=root, resume=True)
    finally:
        holder.release()
    entry = catalog.read_run(root, "r1")
    assert preflight.check_start(entry, run_id="r1", root=root, resume=True) == 0
