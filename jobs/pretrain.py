"""`python -m jobs.pretrain --recipe R --run-id ID [--storage URI] [--data URI] [--set k=v ...] [--resume]`

Pretrains with CM-ACC on Ray Train, then evaluates the final checkpoint on the data set's
held-out split and prints a summary. The run id is the user's handle: a run id that already
has a checkpoint continues from its newest one with `--resume` and is refused without it
(nothing is touched). One job at a time trains a run: the job holds the run's lease
(`service.lease`) and a second job with the same run id is refused, naming the holder.
Without `--data` (and `data.uri`), a generated data set is made once under
`<storage>/datasets/` and reused. This is the entry point of submitted cluster jobs;
`cmacc pretrain` calls `pretrain` on an embedded local Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from service import config, errors, preflight, reports
from service.lease import RunLease
from service.requests import PretrainRequest, add_pretrain_arguments


def pretrain(request: PretrainRequest, *, progress: Any = None) -> dict[str, Any]:
    """The whole job: check, start Ray, train, evaluate. Returns the outcome (state, step,
    checkpoint, metrics, evaluation, timings). `progress`: see `workers.driver.fit`."""
    # torch and ray load when the job runs, not when it is imported: `python -m jobs.pretrain
    # --help` answers at once (the container image's own check runs it).
    from workers import driver

    started = time.perf_counter()
    cfg = config.load_recipe(request.recipe, list(request.overrides))
    run = driver.prepare_run(cfg, request)  # refusals happen here, before anything is written
    if not request.skip_data_check:  # every shard's footer and rows against the manifest, before Ray
        run.timings["data_check_s"] = check_data_set(run.data_uri, cfg)
    lease = RunLease(
        run.run_uri,
        run_id=run.run_id,
        ttl_s=cfg.storage.lease_ttl_s,
        endpoint_url=run.endpoint_url,
        retry_budget_s=cfg.storage.retry_budget_s,
    )
    lease.acquire()  # another live job on this run id: refused here, naming it
    try:
        return _pretrain_holding_lease(cfg, run, request, lease, progress=progress, started=started)
    finally:
        lease.release()


def _pretrain_holding_lease(
    cfg: config.Config, run: Any, request: PretrainRequest, lease: RunLease, *, progress: Any, started: float
) -> dict[str, Any]:
    from workers import driver, supervision

    if run.resume is not None and run.resume.describe():  # said before Ray's own output
        print(f"cmacc: {run.resume.describe()}", file=sys.stderr, flush=True)
        preflight.pass_over(run.run_uri, run.resume, endpoint_url=run.endpoint_url)
    shortage = driver.start_ray(cfg, request.address, log_to_driver=progress is None, quiet=not request.verbose)
    with supervision.StopSignals() as stop:
        client = driver.start_actor(run)
        stop.client = client
        lease.on_lost = lambda message: client.request_stop()  # another job holds the run now: stop
        note = f"waiting for resources: {shortage}" if shortage else "starting workers"
        driver.record(run, state="waiting", note=note)
        try:
            outcome = driver.summarise(run, driver.fit(run, client, stop, progress=progress))
        except supervision.StoppedBeforeStart:
            outcome = {"run_id": run.run_id, "state": "stopped", "step": run.start_step, "checkpoint": None}
            outcome["note"] = "stopped while starting: no step was reported yet, so there was nothing to checkpoint"
        except Exception as err:
            try:
                driver.record(run, state="failed", error=str(err))
            except OSError as unrecorded:  # storage is what failed: the training error still comes first
                print(f"cmacc: warning: could not record the failure in {run.run_uri}: {unrecorded}", file=sys.stderr)
            raise
        finally:
            client.kill()
    evaluation = None
    if outcome["state"] == "succeeded" and cfg.eval.after_training:
        if run.has_test_split:  # the job's last minutes: `cmacc status` says FINISHING, not RUNNING
            driver.record(run, state="finishing", note="evaluating the final checkpoint")
        evaluation = driver.evaluate_run(run, outcome)
        if evaluation is not None:
            driver.track_evaluation(run, evaluation)
    run.timings["total_s"] = time.perf_counter() - started
    outcome.update(
        timings={name: round(value, 2) for name, value in run.timings.items()},
        start_step=run.start_step,
        global_batch=cfg.global_batch_size,
        evaluation=evaluation,
    )
    driver.record(
        run,
        state=outcome["state"],
        last_step=outcome["step"],
        error=outcome.get("error", ""),
        note=outcome.get("note", ""),
        evaluation=evaluation,
        final=True,
    )
    return outcome


def check_data_set(data_uri: str, cfg: config.Config) -> float:
    """`cmacc data inspect`'s check of the data set (`workers.data.inspect.check`, bounded by its
    `CHECK_TIMEOUT_S`); a DataError naming the first damaged shard. Returns its seconds."""
    from workers.data.inspect import check

    started = time.perf_counter()
    check(data_uri, endpoint_url=cfg.storage.endpoint_url, retry_budget_s=cfg.storage.retry_budget_s)
    return time.perf_counter() - started


def report(outcome: dict[str, Any], *, as_json: bool) -> int:
    """Print the outcome (the summary or JSON); a failed run is a Failure (exit code 1)."""
    print(json.dumps(outcome, indent=2) if as_json else reports.format_summary(outcome), flush=True)
    if outcome["state"] == "failed":
        raise errors.Failure(f"run {outcome['run_id']} failed: {outcome.get('error', '')}")
    return 0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.pretrain", description=__doc__.splitlines()[0])
    add_pretrain_arguments(parser, run_id_required=True, run_id_help="name of the run; the same id resumes it")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return report(pretrain(PretrainRequest.from_args(args)), as_json=args.json)


if __name__ == "__main__":
    errors.run_main(main)
