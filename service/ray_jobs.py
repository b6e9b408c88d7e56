"""The Ray Jobs API, as this project uses it: submitting a run's pretraining job, finding a
run's jobs, following a job's logs, and running one command of this project as a job.

Used by the command line (`cmacc submit|status|logs|stop|list`, `eval|finetune --address`)
and by `cmacc ablate --address` (`jobs.ablate`); it imports nothing above the ground floor.

A run's first job has the run id as its submission id; a resubmission (`--resume`) gets
`<run id>.<n>`, because Ray keeps every submission id for good. Every job carries the run id
in its metadata, so a run id finds its newest job. The job's entry point is `python -m
jobs.pretrain` in a copy of this project folder (`working_dir`, without the virtual
environment, runs and caches). While a job runs, what its run does (starting, waiting,
running, stopping, finishing) comes from the run record the job keeps in storage
(`shown_state`); `wait_for_end` waits for a job's end (`cmacc stop`, and a `--resume` of a
run whose job is stopping).

The address is an argument or `RAY_ADDRESS` (the dashboard, `http://HEAD:8265`). With Ray's
token authentication the token comes from where Ray documents it (`RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`); it is sent as Ray's client sends it and never
printed. Credentials for object storage are not shipped: the cluster's nodes use their own.
Ray's client is imported only when a `Jobs` is made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service import catalog, config, preflight
from service.errors import Failure, UsageError
from service.requests import PretrainRequest

PROJECT = Path(__file__).resolve().parents[1]
RUN_ID_KEY = "cmacc_run_id"
WORKING_DIR_EXCLUDES = [
    ".venv",
    ".git",
    "runs",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "build",
    "dist",
    "tests",
    # secrets never travel with a job
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "id_rsa*",
    "id_ed25519*",
    ".aws",
    "credentials",
    ".netrc",
]
STOP_WAIT_S = 180  # after `cmacc stop`: time the run gets to write its checkpoint before SIGKILL
STOP_GRACE_S = 30  # after Ray's SIGKILL: time for it to record the job as STOPPED
POLL_S = 1.0  # how often a wait for a job's end asks the cluster
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# What `cmacc status` shows while the job runs, by the run record's state. The final states
# are the moment between the job's last record and its process's end.
RUN_PHASES = {
    "waiting": "WAITING",
    "running": "RUNNING",
    "stopping": "STOPPING",
    "finishing": "FINISHING",
    "stopped": "STOPPING",
    "succeeded": "FINISHING",
    "failed": "FAILING",
}
# Ray's client logs how it packages the working_dir: INFO lines and, once per folder that Ray
# now leaves out by default (`.git`, `.venv`, ...), a warning about a folder cmacc leaves out
# anyway. Neither asks the user to act; other warnings (a very large file) still show.
_PACKAGING_CHATTER = "is now ignored by default when packaging the working directory"
# Ray's client loggers that importing it sets to INFO ("Uploading package ...", "WebSocket
# closed for job ..." at the end of `logs --follow`).
_RAY_CLIENT_LOGGERS = ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk")


def _configure_token_auth() -> None:
    """Turn on Ray's token mode in this process when a token is where Ray looks for one
    (Ray's client sends it only in token mode); an explicit RAY_AUTH_MODE is left alone."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    default_file = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or default_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def _drop_chatter(record: logging.LogRecord) -> bool:
    return _PACKAGING_CHATTER not in record.getMessage()


def _quiet_ray_client(verbose: bool) -> None:
    """The terminal of a command that talks to a cluster shows cmacc's lines and the warnings
    that ask the user to act; Ray's client INFO messages and its packaging notices only with
    `--verbose`."""
    working_dir = logging.getLogger("ray._private.runtime_env.working_dir")
    for name in _RAY_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        working_dir.removeFilter(_drop_chatter)
        return
    if _drop_chatter not in working_dir.filters:
        working_dir.addFilter(_drop_chatter)


def short_error(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


class Jobs:
    """The Ray Jobs API of one cluster, with errors turned into one clear line."""

    def __init__(self, address: str | None, *, verbose: bool = False):
        self.address = address or os.environ.get("RAY_ADDRESS", "")
        if not self.address:
            raise UsageError("--address: give the Ray dashboard address (http://HEAD:8265) or set RAY_ADDRESS")
        _configure_token_auth()
        # Ray's client prefers these variables to its argument: an explicit --address wins here.
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        os.environ["RAY_ADDRESS"] = self.address
        from ray.job_submission import JobSubmissionClient

        _quiet_ray_client(verbose)  # after the import: importing Ray sets its loggers to INFO
        try:
            self.client = JobSubmissionClient(self.address)
        except Exception as err:
            raise Failure(f"cannot reach the Ray dashboard at {self.address}: {short_error(err)}") from None

    def call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except Exception as err:
            raise Failure(f"{what} at {self.address}: {short_error(err)}") from None

    def jobs_of(self, run_id: str) -> list[Any]:
        """The run's jobs, oldest first."""
        jobs = [
            job
            for job in self.call("listing jobs", "list_jobs")
            if job.submission_id and ((job.metadata or {}).get(RUN_ID_KEY) == run_id or job.submission_id == run_id)
        ]
        return sorted(jobs, key=lambda job: job.start_time or 0)

    def newest(self, run_id: str) -> Any:
        jobs = self.jobs_of(run_id)
        if not jobs:
            raise Failure(f"no job of run {run_id!r} at {self.address} (cmacc list shows the jobs there)")
        return jobs[-1]


def recipe_for_job(recipe: str) -> str:
    """Recipe names travel as they are; a recipe file must be inside the project folder."""
    if not recipe.endswith(".toml") and os.sep not in recipe:
        return recipe
    path = Path(recipe).resolve()
    try:
        return str(path.relative_to(PROJECT))
    except ValueError:
        raise UsageError(f"--recipe {recipe}: a recipe file must be inside {PROJECT} to travel with the job") from None


def _read_storage(root: str, run_id: str, *, endpoint_url: str, retry_budget_s: float) -> tuple[bool, Any]:
    """(readable, what storage holds of the run); the job checks storage itself when this
    machine cannot read it."""
    try:
        return True, preflight.read_run(root, run_id, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    except Failure as err:
        print(f"cmacc: note: {short_error(err)} from here; the job checks it", file=sys.stderr)
        return False, None


def runtime_env(env_vars: dict[str, str]) -> dict[str, Any]:
    """A job's runtime environment: this project folder (without what must not travel) and
    the variables it takes along."""
    return {"working_dir": str(PROJECT), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env_vars}


def job_entrypoint(request: PretrainRequest) -> list[str]:
    """The command a pretraining job runs on the cluster."""
    return ["python", "-m", "jobs.pretrain", *request.job_argv()]


def submit_run(jobs: Jobs, request: PretrainRequest, cfg: config.Config, *, resume_if_submitted: bool = False) -> str:
    """Submit a pretraining job for `request` (storage and data URIs absolute, the recipe as
    it travels) after the shared pre-run checks; returns its submission id.
    `resume_if_submitted`: a run submitted before continues (as `cmacc ablate` wants)."""
    run_id = request.run_id
    previous = jobs.jobs_of(run_id)
    running = [job for job in previous if str(job.status) not in TERMINAL]
    if running:
        wants_resume = request.resume or request.resume_if_any or resume_if_submitted
        _wait_if_stopping(jobs, running[-1], run_id, resume=wants_resume)
        previous = jobs.jobs_of(run_id)
    if previous and resume_if_submitted:
        request = dataclasses.replace(request, resume=True)
    readable, entry = _read_storage(
        request.storage, run_id, endpoint_url=cfg.storage.endpoint_url, retry_budget_s=cfg.storage.retry_budget_s
    )
    if readable:
        preflight.check_start(
            entry,
            run_id=run_id,
            root=request.storage,
            resume=request.resume or request.resume_if_any,
            may_be_new=bool(previous) or request.resume_if_any,
        )
        newest = entry.newest_checkpoint if entry is not None else None
        if newest is not None and newest.meta.get("config"):
            preflight.check_resume_config(newest.meta["config"], cfg, where=newest.uri)
    if previous and not (request.resume or request.resume_if_any):
        raise UsageError(
            f"run {run_id!r} was submitted before (job {previous[-1].submission_id}, {previous[-1].status}): "
            "pass --resume to continue it, or choose another --run-id"
        )
    taken = {job.submission_id for job in previous}
    submission_id = run_id
    attempt = len(previous) + 1
    while submission_id in taken:
        submission_id = f"{run_id}.{attempt}"
        attempt += 1
    env = preflight.passed_environment()
    env["RAY_JOB_STOP_WAIT_TIME_S"] = str(STOP_WAIT_S)
    return jobs.call(
        "submitting the job",
        "submit_job",
        entrypoint=shlex.join(job_entrypoint(request)),
        submission_id=submission_id,
        runtime_env=runtime_env(env),
        metadata={RUN_ID_KEY: run_id, "cmacc_recipe": request.recipe, "cmacc_storage": request.storage},
    )


def _wait_if_stopping(jobs: Jobs, job: Any, run_id: str, *, resume: bool) -> None:
    """A run whose job is stopping (a stop was requested and the run writes its checkpoint)
    is continued by `--resume` once that job has ended: wait for it, at most as long as Ray
    gives a stop before it kills the job. A job that runs and is not stopping is refused."""
    shown, _, _ = run_phase(job)
    if shown != "STOPPING":
        raise Failure(
            f"run {run_id!r} is still running as job {job.submission_id} ({shown}): stop it first (cmacc stop {run_id})"
        )
    if not resume:
        raise UsageError(
            f"run {run_id!r} is stopping (job {job.submission_id}): pass --resume to continue it once it has "
            "stopped, or choose another --run-id"
        )
    bound = STOP_WAIT_S + STOP_GRACE_S
    print(
        f"cmacc: run {run_id} is stopping (job {job.submission_id} writes its checkpoint and ends); "
        f"waiting for it to end, up to {bound} s ...",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    status, _ = wait_for_end(jobs, job, timeout_s=bound)
    print(
        f"cmacc: job {job.submission_id} {status} after {time.monotonic() - started:.0f} s; resuming run {run_id}",
        file=sys.stderr,
        flush=True,
    )


def shown_state(status: str, readable: bool, record: dict[str, Any] | None) -> str:
    """What `cmacc status` shows for a job in Ray's `status` whose run record is `record`:
    Ray's status, and while the job runs the run's own phase (`RUN_PHASES`); STARTING until
    the job writes its first record (checks, a generated data set). Ray's RUNNING when this
    machine cannot read the run's storage."""
    if status != "RUNNING" or not readable:
        return status
    if record is None:
        return "STARTING"
    state = str(record.get("state", ""))
    return RUN_PHASES.get(state, state.upper() or "STARTING")


def run_phase(job: Any, status: str | None = None) -> tuple[str, bool, dict[str, Any] | None]:
    """(shown, readable, record) of `job` (`status`: Ray's, when read since `job` was)."""
    readable, record = run_record(job)
    return shown_state(str(job.status) if status is None else status, readable, record), readable, record


def wait_for_end(
    jobs: Jobs,
    job: Any,
    *,
    timeout_s: float,
    on_change: Callable[[str, bool, dict[str, Any] | None, float], None] | None = None,
) -> tuple[str, dict[str, Any] | None]:
    """Wait until `job` has ended (SUCCEEDED, FAILED or STOPPED); (its status, the run's
    record then). `on_change(shown, readable, record, waited_s)` hears each new phase and,
    every 30 s of the same one, that the wait goes on. A Failure naming the job when it has
    not ended after `timeout_s`."""
    started = time.monotonic()
    last, told = "", started
    while True:
        status = str(jobs.call(f"reading the status of job {job.submission_id}", "get_job_status", job.submission_id))
        readable, record = run_record(job)
        waited = time.monotonic() - started
        if status in TERMINAL:
            return status, record
        shown = shown_state(status, readable, record)
        if on_change is not None and (shown != last or time.monotonic() - told >= 30):
            on_change(shown, readable, record, waited)
            last, told = shown, time.monotonic()
        if waited > timeout_s:
            raise Failure(f"job {job.submission_id} at {jobs.address} is still {shown} after {waited:.0f} s")
        time.sleep(POLL_S)


def job_summary(job: Any) -> dict[str, Any]:
    return {
        "run_id": (job.metadata or {}).get(RUN_ID_KEY, ""),
        "submission_id": job.submission_id,
        "status": str(job.status),
        "message": job.message or "",
        "start_time": job.start_time,
        "end_time": job.end_time,
        "entrypoint": job.entrypoint,
    }


def run_record(job: Any) -> tuple[bool, dict[str, Any] | None]:
    """(readable, the run record of this job) from the storage in the job's metadata. Not
    readable: this machine cannot read the cluster's storage, or the job names none. A
    record older than the job's start belongs to an earlier job of the run (one that ended
    without a final record): None, as before the job wrote its own."""
    metadata = job.metadata or {}
    root, run_id = metadata.get("cmacc_storage"), metadata.get(RUN_ID_KEY)
    if not root or not run_id:
        return False, None
    try:
        entry = catalog.read_run(root, run_id)  # the endpoint: AWS_ENDPOINT_URL_S3 as for every command
    except Exception:  # status must answer even when storage does not
        return False, None
    if entry is None:
        return True, None
    try:
        updated = dt.datetime.fromisoformat(entry.info.get("updated", "")).timestamp()
    except ValueError:
        return True, None
    if job.start_time and updated < job.start_time / 1000 - 1:
        return True, None
    newest = entry.newest_checkpoint
    return True, {**entry.info, "held_by": entry.held_by, "newest_checkpoint": newest.uri if newest else None}


async def tail_logs(jobs: Jobs, submission_id: str) -> None:
    async for chunk in jobs.client.tail_job_logs(submission_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def run_as_job(address: str, entrypoint: list[str], *, what: str, run_id: str | None) -> int:
    """Run a command of this project as a Ray job on the cluster at `address` (`cmacc eval
    --address`, `cmacc finetune --address`): submitted with this project as its working_dir,
    its output followed here until it ends. 0 when it succeeded, else a Failure naming the
    job. Not a run's job: `cmacc status RUN` keeps showing the run's own."""
    jobs = Jobs(address)
    submission_id = f"{what}-{run_id or 'checkpoint'}-{uuid.uuid4().hex[:6]}"
    jobs.call(
        "submitting the job",
        "submit_job",
        entrypoint=shlex.join(entrypoint),
        submission_id=submission_id,
        runtime_env=runtime_env(preflight.passed_environment()),
        metadata={"cmacc_kind": what, "cmacc_of_run": run_id or ""},
    )
    print(f"cmacc: {what} submitted as job {submission_id} to {jobs.address}; its output:", file=sys.stderr, flush=True)
    try:
        asyncio.run(tail_logs(jobs, submission_id))
    except Exception as err:
        raise Failure(f"following the logs of job {submission_id} at {jobs.address}: {short_error(err)}") from None
    deadline = time.monotonic() + 60
    while (status := str(jobs.call("reading the job's status", "get_job_status", submission_id))) not in TERMINAL:
        if time.monotonic() > deadline:
            raise Failure(f"job {submission_id} at {jobs.address}: still {status} after its output ended")
        time.sleep(1)
    if status != "SUCCEEDED":
        raise Failure(f"job {submission_id} at {jobs.address} ended {status} (its output is above)")
    return 0


def ablation_jobs(
    address: str, cfg: config.Config, recipe: str
) -> tuple[Callable[[PretrainRequest], str], Callable[[str], str]]:
    """(submit, status) for `cmacc ablate --address`: submit a run's job (a run submitted
    before continues), and the status of a run's newest job ("" when it has none). The
    address and the recipe are checked here, before anything is submitted or written. How
    far a run has come is read from its record in storage, not from the job's logs."""
    jobs = Jobs(address)
    travelling_recipe = recipe_for_job(recipe)

    def submit(request: PretrainRequest) -> str:
        travelling = dataclasses.replace(request, recipe=travelling_recipe, address=None)
        return submit_run(jobs, travelling, cfg, resume_if_submitted=True)

    def status(run_id: str) -> str:
        runs = jobs.jobs_of(run_id)
        return str(runs[-1].status) if runs else ""

    return submit, status
