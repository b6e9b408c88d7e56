"""`cmacc submit|status|logs|stop|list`: pretraining runs as Ray Jobs on a cluster.

The Ray Jobs API itself (submission ids, the job's entry point and working directory, token
authentication) is `service.ray_jobs`; here are the commands a user types. `status`, `logs`
and `stop` take a run id and act on its newest job (a submission id works too). Each
returns when what it says is true: `stop` waits until the job has ended (`--no-wait`
returns at once), so the README's commands work typed one after another.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from service import config, preflight, reports, storage
from service.errors import DataError, Failure
from service.ray_jobs import (
    STOP_GRACE_S,
    STOP_WAIT_S,
    TERMINAL,
    Jobs,
    job_summary,
    recipe_for_job,
    run_phase,
    short_error,
    submit_run,
    tail_logs,
    wait_for_end,
)
from service.requests import PretrainRequest, add_pretrain_arguments


def _storage_root(args: argparse.Namespace, cfg: config.Config) -> str:
    # The job runs in another folder: a relative path would land in its working_dir.
    return storage.absolute(args.storage or cfg.storage.root)


def submission(args: argparse.Namespace) -> tuple[PretrainRequest, config.Config]:
    """The job's request from `cmacc submit`'s arguments (the recipe as it travels, storage
    and data URIs absolute, no address), and the recipe's config; usage errors before any
    contact with the cluster. `job_entrypoint` of it is the job's command line, the same as
    a KubeRay RayJob's entrypoint for the same run (infra/k8s/rayjob-pretrain.yaml)."""
    cfg = config.load_recipe(args.recipe, args.overrides)
    request = PretrainRequest.from_args(
        args,
        run_id=preflight.check_run_id(args.run_id),
        recipe=recipe_for_job(args.recipe),
        storage=_storage_root(args, cfg),
        data=storage.absolute(args.data) if args.data else None,
        address=None,
    )
    return request, cfg


def _submit(args: argparse.Namespace) -> int:
    request, cfg = submission(args)
    run_id = request.run_id
    if request.data and not request.skip_data_check:
        check_data_here(request.data, cfg)
    jobs = Jobs(args.address, verbose=args.verbose)
    job_id = submit_run(jobs, request, cfg)
    if args.json:
        print(
            json.dumps({"run_id": run_id, "submission_id": job_id, "address": jobs.address, "storage": request.storage})
        )
    else:
        print(f"submitted run {run_id} as job {job_id} to {jobs.address} (storage {request.storage})")
        print(f"  follow it: cmacc logs {run_id} --follow   status: cmacc status {run_id}")
    return 0


def check_data_here(data: str, cfg: config.Config) -> None:
    """The job's own check of the data set (`workers.data.inspect.check`), from this machine
    before the cluster is contacted: a damaged shard is named now, not in the job's log. A set
    this machine cannot reach, or a local path that is not on this machine (it may be one on
    the cluster's nodes), is the job's to check (a warning)."""
    from workers.data.inspect import check  # pyarrow loads only now

    if storage.is_local(data) and not os.path.exists(storage.absolute(data)):
        print(f"cmacc: warning: {data} is not on this machine: the job checks it on the cluster", file=sys.stderr)
        return
    try:
        check(data, endpoint_url=cfg.storage.endpoint_url, retry_budget_s=min(cfg.storage.retry_budget_s, 10.0))
    except DataError:
        raise
    except OSError as err:
        print(f"cmacc: warning: the data set cannot be checked from here (the job checks it): {err}", file=sys.stderr)


TRAINING_STATES = ("running", "stopping", "finishing")  # run states whose record carries live progress


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _status(args: argparse.Namespace) -> int:
    """The job's status; while the job runs, the run's own state from its record: STARTING
    (checks, a generated data set), WAITING (for its workers or for resources, with what it
    lacks), RUNNING (training), STOPPING (a stop was requested: the run writes its checkpoint
    and ends) or FINISHING (the final checkpoint and the evaluation). When this machine
    cannot read the run's storage, the job's own RUNNING, said so."""
    jobs = Jobs(args.address, verbose=args.verbose)
    job = jobs.newest(args.run_id)
    info = job_summary(job)
    shown, readable, record = run_phase(job)
    info["run_state"] = (record or {}).get("state", "")
    info["run_note"] = (record or {}).get("note", "")
    info["last_step"] = (record or {}).get("last_step")
    info["held_by"] = (record or {}).get("held_by", "")
    progress = (record or {}).get("progress") or {}
    info["world_size"] = progress.get("world_size")  # the workers training now (an elastic group changes)
    info["progress"] = reports.progress_text(progress) if progress and info["run_state"] in TRAINING_STATES else ""
    if args.json:
        print(json.dumps({**info, "shown": shown, "storage_readable": readable}, indent=2))
    else:
        print(f"{shown}  run {args.run_id}  job {info['submission_id']}  started {_when(info['start_time'])}")
        if info["run_note"] and shown in ("WAITING", "STOPPING", "FINISHING"):
            print(f"  {info['run_note']}")
        if info["progress"] and shown in ("RUNNING", "STOPPING", "FINISHING"):
            print(f"  {info['progress']}")
        if info["held_by"]:
            print(f"  trained by {info['held_by']}")
        if info["status"] == "RUNNING" and not readable:
            print("  the run's own state is unknown here: its storage cannot be read from this machine")
        if info["message"]:
            print(f"  {info['message']}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    jobs = Jobs(args.address, verbose=args.verbose)
    job = jobs.newest(args.run_id)
    if args.follow:
        try:
            asyncio.run(tail_logs(jobs, job.submission_id))
        except Exception as err:
            raise Failure(
                f"following the logs of job {job.submission_id} at {jobs.address}: {short_error(err)}"
            ) from None
    else:
        sys.stdout.write(jobs.call(f"reading the logs of job {job.submission_id}", "get_job_logs", job.submission_id))
    return 0


def _stop(args: argparse.Namespace) -> int:
    """Ask the run's job to stop (Ray sends its driver SIGTERM: the run writes a checkpoint
    and ends; Ray kills it after `STOP_WAIT_S`), then wait until the job has ended, as `ray
    job stop` does. `--no-wait` returns at once; Ctrl-C ends the wait, not the stop."""
    jobs = Jobs(args.address, verbose=args.verbose)
    job = jobs.newest(args.run_id)
    run, job_id = args.run_id, job.submission_id
    if str(job.status) in TERMINAL:
        print(f"job {job_id} of run {run} has already ended: {job.status}")
        return 0
    jobs.call(f"stopping job {job_id}", "stop_job", job_id)
    if args.no_wait:
        print(
            f"stop requested for job {job_id}: run {run} writes a checkpoint and ends (killed if it takes over "
            f"{STOP_WAIT_S} s); cmacc status {run} says STOPPING until it has, then STOPPED"
        )
        return 0
    bound = STOP_WAIT_S + STOP_GRACE_S
    print(
        f"stop requested for job {job_id}: waiting for run {run} to write its checkpoint and end "
        f"(up to {STOP_WAIT_S} s, then Ray kills it; Ctrl-C stops the waiting, not the stop)",
        flush=True,
    )

    def say(shown: str, readable: bool, record: dict | None, waited_s: float) -> None:
        line = f"  {shown} after {waited_s:.0f} s"
        progress = (record or {}).get("progress") or {}
        if progress and (record or {}).get("state") in TRAINING_STATES:
            line += f": {reports.progress_text(progress)}"
        if not readable:
            line += " (the run's own state is unknown here: its storage cannot be read from this machine)"
        print(line, flush=True)

    started = time.monotonic()
    try:
        status, record = wait_for_end(jobs, job, timeout_s=bound, on_change=say)
    except KeyboardInterrupt:
        print(
            f"\ncmacc: stopped waiting; the stop of job {job_id} goes on (cmacc status {run} shows it, "
            f"STOPPED once the run has ended)",
            file=sys.stderr,
            flush=True,
        )
        return 130
    took = time.monotonic() - started
    record = record or {}
    if status == "STOPPED" and record.get("state") == "stopped":
        where = record.get("newest_checkpoint") or "no checkpoint"
        print(
            f"job {job_id} STOPPED after {took:.0f} s: run {run} stopped at step {record.get('last_step', 0)} ({where})"
        )
        print(f"  continue it: cmacc submit ... --run-id {run} --resume")
    elif record.get("state") in ("succeeded", "failed"):  # it ended on its own meanwhile
        print(
            f"job {job_id} {status} after {took:.0f} s: run {run} {record['state']} at step {record.get('last_step', 0)}"
        )
    else:  # killed, or its storage cannot be read from here
        state = f"its record says {record['state']}" if record.get("state") else "its record cannot be read from here"
        print(f"job {job_id} {status} after {took:.0f} s; run {run}: {state} (cmacc runs --storage ... shows it)")
    return 0


def _list(args: argparse.Namespace) -> int:
    jobs = Jobs(args.address, verbose=args.verbose)
    listed = [
        job_summary(job)
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


def _add_address(parser: argparse.ArgumentParser, *, verbose: bool = True) -> None:
    parser.add_argument(
        "--address", default=None, help="Ray dashboard address, http://HEAD:8265 (default: RAY_ADDRESS)"
    )
    if verbose:  # `submit` has its own (add_pretrain_arguments), which reaches the job too
        parser.add_argument(
            "--verbose", action="store_true", help="also show Ray's client messages (how it packages the project)"
        )


def register(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser(
        "submit", help="submit a pretraining run to a Ray cluster as a Ray job", description=__doc__.splitlines()[0]
    )
    _add_address(submit, verbose=False)
    add_pretrain_arguments(submit, run_id_required=True, run_id_help="name of the run (the job's submission id)")
    submit.set_defaults(handler=_submit)

    for name, handler, text in (
        ("status", _status, "the status of a run's newest job"),
        ("logs", _logs, "the logs of a run's newest job"),
        ("stop", _stop, "stop a run's job: it writes a checkpoint and ends; waits until it has"),
    ):
        parser = commands.add_parser(name, help=text, description=text)
        parser.add_argument("run_id", metavar="ID", help="run id (or a job's submission id)")
        _add_address(parser)
        if name == "status":
            parser.add_argument("--json", action="store_true", help="print JSON")
        if name == "logs":
            parser.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        if name == "stop":
            parser.add_argument(
                "--no-wait", action="store_true", help="return once the stop is requested, not when the job has ended"
            )
        parser.set_defaults(handler=handler)

    listing = commands.add_parser("list", help="the jobs of a Ray cluster", description="List the cluster's jobs.")
    _add_address(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_list)
