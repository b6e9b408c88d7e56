"""`cmacc submit|status|logs|stop|list`: pretraining runs as Ray Jobs on a cluster.

A run's first job has the run id as its submission id; a resubmission (`--resume`) gets
`<run id>.<n>`, because Ray keeps every submission id for good. Every job carries the run id
in its metadata, so `status`, `logs` and `stop` take a run id and act on its newest job (a
submission id works too). The job's entry point is `python -m jobs.pretrain` in a copy of
this project folder (`working_dir`, without the virtual environment, runs and caches).

The address is `--address` or `RAY_ADDRESS` (the dashboard, `http://HEAD:8265`). With Ray's
token authentication the token comes from where Ray documents it (`RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`); it is sent as Ray's client sends it and never
printed. Credentials for object storage are not shipped: the cluster's nodes use their own.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service import catalog, config, preflight, storage
from service.errors import Failure, UsageError
from service.requests import PretrainRequest, add_pretrain_arguments

PROJECT = Path(__file__).resolve().parents[2]
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
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _configure_token_auth() -> None:
    """Turn on Ray's token mode in this process when a token is where Ray looks for one
    (Ray's client sends it only in token mode); an explicit RAY_AUTH_MODE is left alone."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    default_file = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or default_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


class Jobs:
    """The Ray Jobs API of one cluster, with errors turned into one clear line."""

    def __init__(self, address: str | None):
        self.address = address or os.environ.get("RAY_ADDRESS", "")
        if not self.address:
            raise UsageError("--address: give the Ray dashboard address (http://HEAD:8265) or set RAY_ADDRESS")
        _configure_token_auth()
        # Ray's client prefers these variables to its argument: an explicit --address wins here.
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        os.environ["RAY_ADDRESS"] = self.address
        import logging

        logging.getLogger("ray").setLevel(logging.WARNING)
        from ray.job_submission import JobSubmissionClient

        try:
            self.client = JobSubmissionClient(self.address)
        except Exception as err:
            raise Failure(f"cannot reach the Ray dashboard at {self.address}: {_short(err)}") from None

    def call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except Exception as err:
            raise Failure(f"{what} at {self.address}: {_short(err)}") from None

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


def _storage_root(args: argparse.Namespace, cfg: config.Config) -> str:
    # The job runs in another folder: a relative path would land in its working_dir.
    return storage.absolute(args.storage or cfg.storage.root)


def _recipe_for_job(recipe: str) -> str:
    """Recipe names travel as they are; a recipe file must be inside the project folder."""
    if not recipe.endswith(".toml") and os.sep not in recipe:
        return recipe
    path = Path(recipe).resolve()
    try:
        return str(path.relative_to(PROJECT))
    except ValueError:
        raise UsageError(f"--recipe {recipe}: a recipe file must be inside {PROJECT} to travel with the job") from None


def _read_storage(root: str, run_id: str, *, endpoint_url: str) -> tuple[bool, Any]:
    """(readable, what storage holds of the run); the job checks storage itself when this
    machine cannot read it."""
    try:
        return True, preflight.read_run(root, run_id, endpoint_url=endpoint_url)
    except Failure as err:
        print(f"cmacc: note: {_short(err)} from here; the job checks it", file=sys.stderr)
        return False, None


def _runtime_env(env_vars: dict[str, str]) -> dict[str, Any]:
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
        raise Failure(
            f"run {run_id!r} is still running as job {running[-1].submission_id} "
            f"({running[-1].status}): stop it first (cmacc stop {run_id})"
        )
    if previous and resume_if_submitted:
        request = dataclasses.replace(request, resume=True)
    readable, entry = _read_storage(request.storage, run_id, endpoint_url=cfg.storage.endpoint_url)
    if readable:
        preflight.check_start(
            entry,
            run_id=run_id,
            root=request.storage,
            resume=request.resume or request.resume_if_any,
            may_be_new=bool(previous) or request.resume_if_any,
        )
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
        runtime_env=_runtime_env(env),
        metadata={RUN_ID_KEY: run_id, "cmacc_recipe": request.recipe, "cmacc_storage": request.storage},
    )


def submission(args: argparse.Namespace) -> tuple[PretrainRequest, config.Config]:
    """The job's request from `cmacc submit`'s arguments (the recipe as it travels, storage
    and data URIs absolute, no address), and the recipe's config; usage errors before any
    contact with the cluster. `job_entrypoint` of it is the job's command line, the same as
    a KubeRay RayJob's entrypoint for the same run (infra/k8s/rayjob-pretrain.yaml)."""
    cfg = config.load_recipe(args.recipe, args.overrides)
    request = PretrainRequest.from_args(
        args,
        run_id=preflight.check_run_id(args.run_id),
        recipe=_recipe_for_job(args.recipe),
        storage=_storage_root(args, cfg),
        data=storage.absolute(args.data) if args.data else None,
        address=None,
    )
    return request, cfg


def _submit(args: argparse.Namespace) -> int:
    request, cfg = submission(args)
    run_id = request.run_id
    jobs = Jobs(args.address)
    job_id = submit_run(jobs, request, cfg)
    if args.json:
        print(
            json.dumps({"run_id": run_id, "submission_id": job_id, "address": jobs.address, "storage": request.storage})
        )
    else:
        print(f"submitted run {run_id} as job {job_id} to {jobs.address} (storage {request.storage})")
        print(f"  follow it: cmacc logs {run_id} --follow   status: cmacc status {run_id}")
    return 0


def ablation_jobs(
    address: str, cfg: config.Config, recipe: str
) -> tuple[Callable[[PretrainRequest], str], Callable[[str], str], Callable[[str], str]]:
    """(submit, status, progress) for `cmacc ablate --address`: submit a run's job, the status
    of a run's newest job ("" when it has none), and the newest progress line in its logs
    ("step N/T ... eta S s", or ""). The address and the recipe are checked here, before
    anything is submitted or written."""
    jobs = Jobs(address)
    travelling_recipe = _recipe_for_job(recipe)

    def submit(request: PretrainRequest) -> str:
        travelling = dataclasses.replace(request, recipe=travelling_recipe, address=None)
        return submit_run(jobs, travelling, cfg, resume_if_submitted=True)

    def status(run_id: str) -> str:
        runs = jobs.jobs_of(run_id)
        return str(runs[-1].status) if runs else ""

    def progress(run_id: str) -> str:
        runs = jobs.jobs_of(run_id)
        if not runs:
            return ""
        logs = jobs.call(f"reading the logs of job {runs[-1].submission_id}", "get_job_logs", runs[-1].submission_id)
        lines = PROGRESS_LINE.findall(logs or "")
        return lines[-1] if lines else ""

    return submit, status, progress


# The training loop's progress line (workers.distributed.loop.progress_line), as it reaches a job's logs.
PROGRESS_LINE = re.compile(r"step \d+/\d+ .*? eta \S+ s")


def _job_dict(job: Any) -> dict[str, Any]:
    return {
        "run_id": (job.metadata or {}).get(RUN_ID_KEY, ""),
        "submission_id": job.submission_id,
        "status": str(job.status),
        "message": job.message or "",
        "start_time": job.start_time,
        "end_time": job.end_time,
        "entrypoint": job.entrypoint,
    }


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _run_record(job: Any) -> tuple[bool, dict[str, Any] | None]:
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
    return True, {**entry.info, "held_by": entry.held_by}


def _status(args: argparse.Namespace) -> int:
    """The job's status; while the job runs, the run's own state from its record: STARTING
    (checks, a generated data set), WAITING (for its workers or for resources, with what it
    lacks) or RUNNING (training). When this machine cannot read the run's storage, the job's
    own RUNNING, said so."""
    jobs = Jobs(args.address)
    job = jobs.newest(args.run_id)
    info = _job_dict(job)
    readable, record = _run_record(job)
    info["run_state"] = (record or {}).get("state", "")
    info["run_note"] = (record or {}).get("note", "")
    info["last_step"] = (record or {}).get("last_step")
    info["held_by"] = (record or {}).get("held_by", "")
    shown = info["status"]
    if info["status"] == "RUNNING" and readable:  # the job runs; its run may still prepare or wait for workers
        shown = info["run_state"].upper() if info["run_state"] in ("waiting", "running") else "STARTING"
    if args.json:
        print(json.dumps({**info, "shown": shown, "storage_readable": readable}, indent=2))
    else:
        print(f"{shown}  run {args.run_id}  job {info['submission_id']}  started {_when(info['start_time'])}")
        if info["run_note"] and shown == "WAITING":
            print(f"  {info['run_note']}")
        if info["held_by"]:
            print(f"  trained by {info['held_by']}")
        if info["status"] == "RUNNING" and not readable:
            print("  the run's own state is unknown here: its storage cannot be read from this machine")
        if info["message"]:
            print(f"  {info['message']}")
    return 0


async def _tail(jobs: Jobs, submission_id: str) -> None:
    async for chunk in jobs.client.tail_job_logs(submission_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _logs(args: argparse.Namespace) -> int:
    jobs = Jobs(args.address)
    job = jobs.newest(args.run_id)
    if args.follow:
        try:
            asyncio.run(_tail(jobs, job.submission_id))
        except Exception as err:
            raise Failure(f"following the logs of job {job.submission_id} at {jobs.address}: {_short(err)}") from None
    else:
        sys.stdout.write(jobs.call(f"reading the logs of job {job.submission_id}", "get_job_logs", job.submission_id))
    return 0


def _stop(args: argparse.Namespace) -> int:
    jobs = Jobs(args.address)
    job = jobs.newest(args.run_id)
    if str(job.status) in TERMINAL:
        print(f"job {job.submission_id} of run {args.run_id} has already ended: {job.status}")
        return 0
    jobs.call(f"stopping job {job.submission_id}", "stop_job", job.submission_id)
    print(
        f"stop requested for job {job.submission_id}: run {args.run_id} writes a checkpoint and stops "
        f"(killed if it takes over {STOP_WAIT_S} s); continue it with cmacc submit ... --resume"
    )
    return 0


def run_as_job(address: str, entrypoint: list[str], *, what: str, run_id: str | None) -> int:
    """Run a command of this project as a Ray job on the cluster at `address` (`cmacc eval
    --address`, `cmacc finetune --address`): submitted with this project as its working_dir,
    its output followed here until it ends. 0 when it succeeded, else a Failure naming the
    job. Not a run's job: `cmacc status RUN` keeps showing the run's own."""
    import uuid

    jobs = Jobs(address)
    submission_id = f"{what}-{run_id or 'checkpoint'}-{uuid.uuid4().hex[:6]}"
    jobs.call(
        "submitting the job",
        "submit_job",
        entrypoint=shlex.join(entrypoint),
        submission_id=submission_id,
        runtime_env=_runtime_env(preflight.passed_environment()),
        metadata={"cmacc_kind": what, "cmacc_of_run": run_id or ""},
    )
    print(f"cmacc: {what} submitted as job {submission_id} to {jobs.address}; its output:", file=sys.stderr, flush=True)
    try:
        asyncio.run(_tail(jobs, submission_id))
    except Exception as err:
        raise Failure(f"following the logs of job {submission_id} at {jobs.address}: {_short(err)}") from None
    deadline = time.monotonic() + 60
    while (status := str(jobs.call("reading the job's status", "get_job_status", submission_id))) not in TERMINAL:
        if time.monotonic() > deadline:
            raise Failure(f"job {submission_id} at {jobs.address}: still {status} after its output ended")
        time.sleep(1)
    if status != "SUCCEEDED":
        raise Failure(f"job {submission_id} at {jobs.address} ended {status} (its output is above)")
    return 0


def _list(args: argparse.Namespace) -> int:
    jobs = Jobs(args.address)
    listed = [
        _job_dict(job)
        for job in sorted(jobs.call("listing jobs", "list_jobs"), key=lambda j: j.start_time or 0)
        if job.submission_id
    ]
    if args.json:
        print(json.dumps(listed, indent=2))
        return 0
    if not listed:
        print(f"no jobs at {jobs.address}")
        return 0
    print(f"{'SUBMISSION':<28}{'RUN':<24}{'STATUS':<11}{'STARTED':<21}")
    for job in listed:
        print(f"{job['submission_id']:<28}{job['run_id'] or '-':<24}{job['status']:<11}{_when(job['start_time']):<21}")
    return 0


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=None, help="Ray dashboard address, http://HEAD:8265 (default: RAY_ADDRESS)"
    )


def register(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser(
        "submit", help="submit a pretraining run to a Ray cluster as a Ray job", description=__doc__.splitlines()[0]
    )
    _add_address(submit)
    add_pretrain_arguments(submit, run_id_required=True, run_id_help="name of the run (the job's submission id)")
    submit.set_defaults(handler=_submit)

    for name, handler, text in (
        ("status", _status, "the status of a run's newest job"),
        ("logs", _logs, "the logs of a run's newest job"),
        ("stop", _stop, "stop a run's job: it writes a checkpoint and stops"),
    ):
        parser = commands.add_parser(name, help=text, description=text)
        parser.add_argument("run_id", metavar="ID", help="run id (or a job's submission id)")
        _add_address(parser)
        if name == "status":
            parser.add_argument("--json", action="store_true", help="print JSON")
        if name == "logs":
            parser.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        parser.set_defaults(handler=handler)

    listing = commands.add_parser("list", help="the jobs of a Ray cluster", description="List the cluster's jobs.")
    _add_address(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_list)
