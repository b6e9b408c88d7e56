"""`cmacc stop|status|runs|submit` against a cluster that is a fake of Ray's job client and a
run folder on the local disk written as a job writes it (`service.catalog`, `service.lease`):
`stop` waits until the job has ended (`--no-wait` does not; Ctrl-C ends the wait, not the
stop), `status` and `runs` name every state of a running job, and a `--resume` submitted
while the stop's checkpoint is still being written waits for the job's end and resumes."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from cli import cluster
from cli.main import main
from service import catalog, layout, ray_jobs, storage
from service.lease import RunLease

pytestmark = pytest.mark.unit


@dataclass
class FakeJob:
    submission_id: str
    status: str
    metadata: dict[str, str]
    start_time: int = field(default_factory=lambda: int((time.time() - 60) * 1000))
    end_time: int | None = None
    message: str = ""
    entrypoint: str = ""


class FakeClient:
    """Ray's JobSubmissionClient as `service.ray_jobs.Jobs` uses it. `on_status(n)` runs
    before the n-th answer of `get_job_status` (n from 1): what the job does meanwhile."""

    def __init__(self, *jobs: FakeJob, on_status=None):
        self.jobs = {job.submission_id: job for job in jobs}
        self.calls: list[tuple[str, Any]] = []
        self.on_status = on_status
        self.status_calls = 0

    def list_jobs(self):
        return list(self.jobs.values())

    def get_job_status(self, submission_id):
        self.status_calls += 1
        self.calls.append(("status", submission_id))
        if self.on_status is not None:
            self.on_status(self.status_calls)
        return self.jobs[submission_id].status

    def stop_job(self, submission_id):
        self.calls.append(("stop", submission_id))
        return True

    def submit_job(self, **kwargs):
        self.calls.append(("submit", kwargs))
        self.jobs[kwargs["submission_id"]] = FakeJob(kwargs["submission_id"], "PENDING", kwargs["metadata"])
        return kwargs["submission_id"]


class RunFolder:
    """A run folder as its job keeps it: the record, the lease while the job lives, and
    checkpoints that Ray Train registered."""

    def __init__(self, root: str, run_id: str = "cl1"):
        self.root, self.run_id = root, run_id
        self.uri = layout.run_uri(root, run_id)
        self.lease: RunLease | None = None

    def record(self, state: str, *, step: int = 7, note: str = "") -> None:
        progress = {"step": step, "total": 600, "loss": 3.5, "clips_per_s": 40.0, "world_size": 1}
        catalog.write_run_record(
            self.uri,
            run_id=self.run_id,
            recipe="demo",
            sampler="active",
            data="/data",
            config={},
            state=state,
            note=note,
            last_step=step,
            progress=progress if state in catalog.LIVE_STATES else None,
        )

    def hold(self) -> None:
        self.lease = RunLease(self.uri, run_id=self.run_id, ttl_s=60)
        self.lease.acquire()

    def checkpoint(self, step: int) -> None:
        name = layout.checkpoint_name(step)
        meta = {"step": step, "run_id": self.run_id, "format": layout.CHECKPOINT_FORMAT}
        storage.write_bytes(storage.join(self.uri, name, layout.CHECKPOINT_META), json.dumps(meta).encode())
        snapshot = {"checkpoints": [{"path": storage.join(self.uri, name)}]}
        storage.write_bytes(storage.join(self.uri, layout.SNAPSHOT_FILE), json.dumps(snapshot).encode())

    def stopped(self, step: int) -> None:
        """What the job does at the end of a stop: the checkpoint, its last record, the lease."""
        self.checkpoint(step)
        self.record("stopped", step=step)
        if self.lease is not None:
            self.lease.release()
            self.lease = None


@pytest.fixture
def cluster_of(monkeypatch):
    """Install a fake cluster for the commands: `cluster_of(client)`."""
    monkeypatch.setattr(ray_jobs, "POLL_S", 0.01)

    def install(client: FakeClient) -> FakeClient:
        jobs = object.__new__(ray_jobs.Jobs)
        jobs.address, jobs.client = "http://head:8265", client
        monkeypatch.setattr(cluster, "Jobs", lambda address, verbose=False: jobs)
        return client

    return install


@pytest.fixture
def run(tmp_path):
    folder = RunFolder(str(tmp_path / "runs"))
    yield folder
    if folder.lease is not None:
        folder.lease.release()


def job_of(run: RunFolder, submission_id: str = "cl1", status: str = "RUNNING") -> FakeJob:
    return FakeJob(submission_id, status, {ray_jobs.RUN_ID_KEY: run.run_id, "cmacc_storage": run.root})


# --- stop ------------------------------------------------------------------------------------


def test_stop_waits_until_the_job_has_ended_and_says_where_the_run_stopped(cluster_of, run, capsys):
    run.hold()
    run.record("running", step=9)
    job = job_of(run)

    def meanwhile(n):  # the driver gets SIGTERM: the record says stopping, then the job ends
        if n == 1:
            run.record("stopping", step=10, note="a stop was requested")
        if n == 4:
            run.stopped(11)
            job.status = "STOPPED"

    client = cluster_of(FakeClient(job, on_status=meanwhile))
    assert main(["stop", "cl1"]) == 0
    out = capsys.readouterr().out
    assert client.calls[0] == ("stop", "cl1") and client.status_calls == 4
    lines = out.splitlines()
    assert lines[0].startswith("stop requested for job cl1: waiting for run cl1 to write its checkpoint and end")
    assert "up to 180 s" in lines[0] and "Ctrl-C stops the waiting, not the stop" in lines[0]
    assert lines[1].startswith("  STOPPING after 0 s: step 10/600")
    assert lines[2].startswith("job cl1 STOPPED after ") and "stopped at step 11" in lines[2]
    assert lines[2].endswith(f"({storage.join(run.uri, layout.checkpoint_name(11))})")
    assert "--resume" in lines[3]


def test_stop_no_wait_returns_once_the_stop_is_requested(cluster_of, run, capsys):
    run.hold()
    run.record("running")
    client = cluster_of(FakeClient(job_of(run)))
    assert main(["stop", "cl1", "--no-wait"]) == 0
    assert client.calls == [("stop", "cl1")]  # no wait: the job's status was never asked
    out = capsys.readouterr().out
    assert out.startswith("stop requested for job cl1:") and "STOPPING until it has" in out


def test_ctrl_c_while_stop_waits_leaves_the_stop_going_and_says_so(cluster_of, run, capsys):
    run.hold()
    run.record("stopping")

    def interrupted(n):
        if n == 2:
            raise KeyboardInterrupt

    client = cluster_of(FakeClient(job_of(run), on_status=interrupted))
    assert main(["stop", "cl1"]) == 130
    assert [call for call in client.calls if call[0] == "stop"] == [("stop", "cl1")]
    err = capsys.readouterr().err
    assert "stopped waiting; the stop of job cl1 goes on" in err and "cmacc status cl1" in err


def test_stop_gives_up_waiting_after_the_kill_timeout(cluster_of, run, capsys, monkeypatch):
    run.hold()
    run.record("stopping")
    monkeypatch.setattr(cluster, "STOP_WAIT_S", 0)
    monkeypatch.setattr(cluster, "STOP_GRACE_S", 0.05)
    monkeypatch.setattr(ray_jobs, "POLL_S", 0.01)
    cluster_of(FakeClient(job_of(run), on_status=lambda n: time.sleep(0.01)))
    assert main(["stop", "cl1"]) == 1
    assert "job cl1 at http://head:8265 is still STOPPING after" in capsys.readouterr().err


def test_stop_of_an_ended_job_says_so(cluster_of, run, capsys):
    client = cluster_of(FakeClient(job_of(run, status="SUCCEEDED")))
    assert main(["stop", "cl1"]) == 0
    assert client.calls == [] and "has already ended: SUCCEEDED" in capsys.readouterr().out


# --- status and runs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "shown", "note"),
    [
        (None, "STARTING", None),
        ("waiting", "WAITING", "starting workers"),
        ("running", "RUNNING", None),
        ("stopping", "STOPPING", "a stop was requested"),
        ("finishing", "FINISHING", "evaluating the final checkpoint"),
    ],
)
def test_status_and_runs_name_every_state_of_a_running_job(cluster_of, run, capsys, state, shown, note):
    run.hold()
    if state is not None:
        run.record(state, note=note or "")
    cluster_of(FakeClient(job_of(run)))
    assert main(["status", "cl1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == [shown, "run", "cl1", "job"]
    if note:
        assert f"  {note}" in lines
    if state in ("running", "stopping", "finishing"):
        assert "  step 7/600  loss 3.500  clips/s 40.0  workers 1" in lines
    assert main(["status", "cl1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shown"] == shown
    if state is not None:
        assert main(["runs", "--storage", run.root]) == 0
        row = capsys.readouterr().out.splitlines()[1].split()
        assert row[0] == "cl1" and row[3] == state


def test_a_stopping_record_whose_job_was_lost_reads_failed(run):
    run.record("stopping")  # no live lease: the job died while it wrote its checkpoint
    info = catalog.read_run(run.root, "cl1").info
    assert info["state"] == "failed" and "was lost" in info["error"]


def test_the_moment_between_the_last_record_and_the_job_end_keeps_its_own_name():
    running = "RUNNING"
    assert ray_jobs.shown_state(running, True, {"state": "stopped"}) == "STOPPING"
    assert ray_jobs.shown_state(running, True, {"state": "succeeded"}) == "FINISHING"
    assert ray_jobs.shown_state(running, True, {"state": "failed"}) == "FAILING"
    assert ray_jobs.shown_state(running, False, None) == "RUNNING"  # storage unreadable here: Ray's own
    assert ray_jobs.shown_state("STOPPED", True, {"state": "stopping"}) == "STOPPED"


# --- submit --resume -------------------------------------------------------------------------


def submit(run: RunFolder, *extra: str) -> int:
    return main(["submit", "--recipe", "demo", "--run-id", "cl1", "--storage", run.root, *extra])


def test_a_resume_submitted_while_the_stop_checkpoint_is_written_waits_and_resumes(cluster_of, run, capsys):
    run.hold()
    run.checkpoint(4)
    run.record("stopping", step=6)
    job = job_of(run)
    ended = {}

    def meanwhile(n):  # the checkpoint of the stop is still being written when the resume arrives
        if n == 3:
            run.stopped(6)
            job.status = "STOPPED"
            ended["at_call"] = len(client.calls)

    client = cluster_of(FakeClient(job, on_status=meanwhile))
    assert submit(run, "--resume") == 0
    captured = capsys.readouterr()
    submitted = [call for call in client.calls if call[0] == "submit"]
    assert len(submitted) == 1 and client.calls.index(submitted[0]) >= ended["at_call"]  # after the job ended
    kwargs = submitted[0][1]
    assert kwargs["submission_id"] == "cl1.2" and "--resume" in kwargs["entrypoint"]
    assert "cmacc: run cl1 is stopping (job cl1 writes its checkpoint and ends); waiting for it to end" in captured.err
    assert "cmacc: job cl1 STOPPED after" in captured.err and "resuming run cl1" in captured.err
    assert captured.out.startswith("submitted run cl1 as job cl1.2")


def test_a_resume_of_a_running_run_is_refused_naming_stop(cluster_of, run, capsys):
    run.hold()
    run.record("running")
    client = cluster_of(FakeClient(job_of(run)))
    assert submit(run, "--resume") == 1
    err = capsys.readouterr().err
    assert "run 'cl1' is still running as job cl1 (RUNNING): stop it first (cmacc stop cl1)" in err
    assert not [call for call in client.calls if call[0] in ("submit", "status")]


def test_a_stopping_run_without_resume_is_refused_at_once(cluster_of, run, capsys):
    run.hold()
    run.record("stopping")
    client = cluster_of(FakeClient(job_of(run)))
    assert submit(run) == 2
    assert "run 'cl1' is stopping (job cl1): pass --resume" in capsys.readouterr().err
    assert not [call for call in client.calls if call[0] in ("submit", "status")]


# --- Ray's client on the terminal ------------------------------------------------------------


class Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_packaging_chatter_reaches_the_terminal_only_with_verbose(verbose):
    from ray.job_submission import JobSubmissionClient  # noqa: F401  (sets Ray's loggers up)

    kept = Kept()
    ray_logger = logging.getLogger("ray")
    ray_logger.addHandler(kept)
    try:
        ray_jobs._quiet_ray_client(verbose)
        chatter = "Directory '.git' is now ignored by default when packaging the working directory. To ..."
        logging.getLogger("ray._private.runtime_env.working_dir").warning(chatter)
        logging.getLogger("ray._private.runtime_env.packaging").info("Pushing file package 'gcs://x.zip' (1 MiB)")
        logging.getLogger("ray.dashboard.modules.dashboard_sdk").info("Uploading package gcs://x.zip.")
        logging.getLogger("ray.dashboard.modules.job.sdk").info("WebSocket closed for job cl1 with close code 1000")
        logging.getLogger("ray._private.runtime_env.packaging").warning("File /p/big.bin is very large (120 MiB).")
    finally:
        ray_logger.removeHandler(kept)
        ray_jobs._quiet_ray_client(False)
    shown = [record.getMessage() for record in kept.records]
    assert "File /p/big.bin is very large (120 MiB)." in shown  # a warning that asks to act
    assert len(shown) == (5 if verbose else 1), shown


def test_submit_leaves_a_local_data_path_missing_here_to_the_job_and_refuses_a_damaged_one(tmp_path, capsys):
    """A local --data path that is not on the submitting machine may be one on the cluster's
    nodes: a warning, the job checks it. One that is here and damaged is refused at once."""
    from service import config
    from service.errors import DataError

    cfg = config.load_recipe("demo", [])
    cluster.check_data_here(str(tmp_path / "only-on-the-nodes"), cfg)
    assert "is not on this machine: the job checks it on the cluster" in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json"):
        cluster.check_data_here(str(damaged), cfg)
