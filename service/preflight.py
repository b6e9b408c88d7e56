"""Checks made before a pretraining run starts, and what a job takes along from the
submitting machine. Shared by `cmacc submit` (before it contacts the cluster) and the job
itself (`jobs.pretrain`, before Ray starts), so both refuse the same runs with the same words.

Torch-free: the CLI imports it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from service import catalog, layout, storage
from service.config import Config
from service.errors import Failure, RunExistsError, UsageError
from service.lease import busy_error

# Environment variables a job and its workers take along: object-store endpoint and region,
# never credentials (the cluster's nodes use their own).
PASSED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
FAULT_ENV_PREFIX = "CMACC_FAULT_"  # test hooks of workers.distributed.faults


def check_run_id(run_id: str) -> str:
    try:
        return layout.check_run_id(run_id)
    except ValueError as err:
        raise UsageError(f"--run-id: {err}") from None


def read_run(root: str, run_id: str, *, endpoint_url: str = "") -> catalog.RunEntry | None:
    """What storage holds of the run (None: nothing yet); Failure when storage cannot be read."""
    try:
        return catalog.read_run(root, run_id, endpoint_url=endpoint_url)
    except (OSError, catalog.CatalogError) as err:
        raise Failure(f"storage {root} cannot be read: {err}") from None


def check_start(
    entry: catalog.RunEntry | None, *, run_id: str, root: str, resume: bool, may_be_new: bool = False
) -> int:
    """The step the run starts from (0 for a new run), or an error when it may not start.

    A run id with a checkpoint needs `--resume` (RunExistsError: nothing is touched);
    `--resume` needs something to continue, unless the caller knows of one elsewhere
    (`may_be_new`, for example an earlier job of the run on the cluster). A run whose lease
    a live job holds is refused first (RunBusyError naming the holder), wherever that job
    runs: `cmacc submit` says so before submitting, not in the job's log.
    """
    if entry is not None and entry.lease is not None and entry.lease.live():
        raise busy_error(run_id, entry.lease, storage.join(entry.uri, layout.LEASE_FILE))
    newest = entry.newest_checkpoint if entry is not None else None
    if newest is not None and not resume:
        raise RunExistsError(
            f"run {run_id!r} already exists at {entry.uri} with a checkpoint at step {newest.step}: "
            "pass --resume to continue it, or choose another --run-id (nothing was changed)"
        )
    if resume and entry is None and not may_be_new:
        raise UsageError(f"--resume: no run {run_id!r} under {root} to continue")
    return newest.step if newest is not None else 0


def passed_environment(environ: Mapping[str, str] | None = None, *, with_fault_hooks: bool = False) -> dict[str, str]:
    """The variables of `environ` (default: this process's) a job or its workers take along."""
    environ = os.environ if environ is None else environ
    return {
        name: value
        for name, value in environ.items()
        if value and (name in PASSED_ENV or (with_fault_hooks and name.startswith(FAULT_ENV_PREFIX)))
    }


def resources_needed(cfg: Config) -> tuple[int, float]:
    """(CPUs, GPUs) a run asks of the cluster: its workers and the dictionary actor."""
    res = cfg.resources
    cpus = res.num_workers * res.cpus_per_worker + 1  # + 1: the actor
    gpus = (res.num_workers * res.gpus_per_worker if res.use_gpu else 0) + res.actor_gpus
    return cpus, gpus
