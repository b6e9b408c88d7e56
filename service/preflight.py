"""Checks made before a pretraining run starts, and what a job takes along from the
submitting machine. Shared by `cmacc submit` (before it contacts the cluster) and the job
itself (`jobs.pretrain`, before Ray starts), so both refuse the same runs with the same words.

Torch-free: the CLI imports it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from service import catalog, integrity, layout, storage
from service.config import Config
from service.errors import CheckpointError, Failure, RunExistsError, UsageError
from service.lease import busy_error

# Environment variables a job and its workers take along: object-store endpoint and region,
# where the experiment trackers log and how; never credentials (WANDB_API_KEY, AWS keys:
# the cluster's nodes use their own).
PASSED_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_DISABLE_TELEMETRY",
    "WANDB_MODE",
    "WANDB_ENTITY",
    "WANDB_SILENT",
    "WANDB_CONSOLE",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",  # how long a (re)starting group waits: docs/scaling.md
)
FAULT_ENV_PREFIX = "CMACC_FAULT_"  # test hooks of workers.distributed.faults


def check_run_id(run_id: str) -> str:
    try:
        return layout.check_run_id(run_id)
    except ValueError as err:
        raise UsageError(f"--run-id: {err}") from None


def read_run(
    root: str, run_id: str, *, endpoint_url: str = "", retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S
) -> catalog.RunEntry | None:
    """What storage holds of the run (None: nothing yet); Failure when storage cannot be read."""
    try:
        return catalog.read_run(root, run_id, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    except catalog.CatalogError as err:  # storage answered; a file of the run is damaged
        raise catalog.CatalogError(f"run {run_id!r} under {root} cannot be read: {err}") from None
    except OSError as err:
        raise Failure(f"storage {root} cannot be read: {err}") from None


def check_start(
    entry: catalog.RunEntry | None,
    *,
    run_id: str,
    root: str,
    resume: bool,
    may_be_new: bool = False,
    endpoint_url: str = "",
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
    registered = (
        integrity.registered_names(entry.uri, endpoint_url=endpoint_url) if entry is not None and newest is None else []
    )
    if registered and not resume:  # Ray Train would hand them over, damaged or not
        raise RunExistsError(
            f"run {run_id!r} already exists at {entry.uri} with registered checkpoints ({', '.join(registered)}, "
            "damaged): choose another --run-id (nothing was changed)"
        )
    if resume and entry is None and not may_be_new:
        raise UsageError(f"--resume: no run {run_id!r} under {root} to continue")
    return newest.step if newest is not None else 0


@dataclass(kw_only=True)
class ResumePoint:
    """Where `--resume` continues: the newest registered checkpoint that verifies
    (`service.integrity`), and the newer ones it passes over, newest first."""

    checkpoint: integrity.Verdict
    passed_over: list[integrity.Verdict] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(
            self.checkpoint.meta.get("step", layout.checkpoint_step(self.checkpoint.uri.rsplit("/", 1)[-1]) or 0)
        )

    def describe(self) -> str:
        """One line for the terminal ("" when nothing was passed over)."""
        notes = [self.checkpoint.note()] if self.checkpoint.note() else []
        if self.passed_over:
            passed = "; ".join(f"{v.uri.rsplit('/', 1)[-1]}: {v.problem}" for v in self.passed_over)
            notes.insert(
                0,
                f"resuming from {self.checkpoint.uri} (step {self.step}), passing over the newer "
                f"damaged checkpoint(s) {passed}",
            )
        return "; ".join(notes)


def resume_point(
    entry: catalog.RunEntry, *, endpoint_url: str = "", retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S
) -> ResumePoint | None:
    """The checkpoint a `--resume` of the run `entry` continues from (None: it has none
    registered). Every registered checkpoint damaged: a CheckpointError naming each, with
    nothing changed."""
    intact, passed = integrity.newest_intact(entry.uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    if intact is not None:
        return ResumePoint(checkpoint=intact, passed_over=passed)
    if not passed:
        return None
    damaged = "; ".join(f"{v.problem}" for v in passed)
    raise CheckpointError(
        f"--resume: every checkpoint of run {entry.run_id!r} is damaged ({damaged}); nothing was changed"
    )


def pass_over(run_uri: str, point: ResumePoint, *, endpoint_url: str = "") -> list[str]:
    """Make Ray Train resume from `point` rather than from the damaged newer checkpoints: drop
    them from its snapshot (`layout.SNAPSHOT_FILE`, which lists what it registered and hands
    over the newest) and move their folders to `<run>/damaged/`, where they stay for a
    person to look at, out of the way of the checkpoints the resumed run writes at the same
    steps. Call while holding the run's lease. Returns the new URIs of the moved folders."""
    if not point.passed_over:
        return []
    names = {v.uri.rsplit("/", 1)[-1] for v in point.passed_over}
    keep = point.checkpoint.uri.rsplit("/", 1)[-1]
    snapshot_uri = storage.join(run_uri, layout.SNAPSHOT_FILE)
    snapshot = json.loads(storage.read_bytes(snapshot_uri, endpoint_url=endpoint_url))
    storage.write_bytes(
        snapshot_uri, json.dumps(without_checkpoints(snapshot, names, keep=keep)).encode(), endpoint_url=endpoint_url
    )
    fs, run_path = storage.filesystem(run_uri, endpoint_url=endpoint_url)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    moved = []
    for name in sorted(names):
        target = f"{run_path}/damaged/{name}-{stamp}"
        fs.mv(f"{run_path}/{name}", target, recursive=True)
        moved.append(storage.join(run_uri, "damaged", f"{name}-{stamp}"))
    print(f"cmacc: moved the damaged checkpoint(s) to {', '.join(moved)}", file=sys.stderr, flush=True)
    return moved


def without_checkpoints(snapshot: dict, names: set[str], *, keep: str) -> dict:
    """Ray Train's checkpoint-manager snapshot without the checkpoints `names`, its newest
    being `keep`."""
    out = dict(snapshot)
    results = snapshot.get("checkpoint_results", [])
    indices = snapshot.get("checkpoint_report_indices", [])
    pairs = [(r, i) for r, i in zip(results, indices, strict=False) if r.get("checkpoint_dir_name") not in names]
    out["checkpoint_results"] = [r for r, _ in pairs]
    out["checkpoint_report_indices"] = [i for _, i in pairs]
    kept = [r for r in out["checkpoint_results"] if r.get("checkpoint_dir_name") == keep]
    out["latest_checkpoint_result"] = kept[-1] if kept else None
    pending = snapshot.get("pending_training_results", [])
    specs = snapshot.get("pending_validation_specs", [])
    pending_pairs = [(r, v) for r, v in zip(pending, specs, strict=False) if r.get("checkpoint_dir_name") not in names]
    out["pending_training_results"] = [r for r, _ in pending_pairs]
    out["pending_validation_specs"] = [v for _, v in pending_pairs]
    for key in (
        "validated_checkpoint_dir_names",
        "timed_out_validation_checkpoint_dir_names",
        "failed_validation_checkpoint_dir_names",
    ):
        if key in snapshot:
            out[key] = [name for name in snapshot[key] if name not in names]
    return out


# Settings that shape what a checkpoint holds: a run resumed with another value cannot load it
# (tensor shapes, state parts) or would silently become another method. The world size is
# not among them: a run is defined by its global batch M, whatever its number of workers.
STATE_SETTINGS = (
    "model.video.arch",
    "model.video.width",
    "model.audio.arch",
    "model.audio.width",
    "model.embed_dim",
    "model.head_hidden",
    "model.head_norm",
    "method.sampler",
    "method.pool",
    "method.dictionary_size",
    "method.shadow_samplers",
    "optim.name",
    "train.seed",
)


def _flat(tree: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_config(saved: Mapping[str, object], cfg: Config, *, where: str) -> None:
    """Refuse, before any worker starts, a resume whose settings cannot continue the
    checkpoint at `where` (its `meta.json` config `saved`): another global batch M (or pool
    size N), or another value of a setting in `STATE_SETTINGS`. A UsageError names every
    setting that differs, both values, and how to keep M on another number of workers."""
    old_flat = _flat(saved)
    new_flat = _flat(cfg.to_dict())
    differ = [
        f"{name} {old_flat[name]!r} -> {new_flat.get(name)!r}"
        for name in STATE_SETTINGS
        if name in old_flat and old_flat[name] != new_flat.get(name)
    ]
    saved_batch = _global_batch(old_flat)
    if saved_batch is not None and saved_batch != cfg.global_batch_size:
        differ.append(
            f"the global batch M {saved_batch} -> {cfg.global_batch_size} (train.global_batch_size, or "
            "train.batch_size x resources.num_workers when it is 0; to resume on another number of workers "
            f"keep M: --set train.global_batch_size={saved_batch})"
        )
    saved_pool = old_flat.get("method.pool_size")
    if not differ and saved_pool and saved_pool != cfg.method.pool_size:
        differ.append(f"method.pool_size {saved_pool!r} -> {cfg.method.pool_size!r}")
    if differ:
        raise UsageError(
            f"--resume: the checkpoint {where} cannot continue with these settings: {'; '.join(differ)} "
            "(nothing was changed)"
        )


def _global_batch(flat: Mapping[str, object]) -> int | None:
    """M of a saved config: its global batch, or its per-worker batch x workers."""
    explicit = flat.get("train.global_batch_size")
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    batch, workers = flat.get("train.batch_size"), flat.get("resources.num_workers")
    if isinstance(batch, int) and isinstance(workers, int):
        return batch * workers
    return None


def passed_environment(environ: Mapping[str, str] | None = None, *, with_fault_hooks: bool = False) -> dict[str, str]:
    """The variables of `environ` (default: this process's) a job or its workers take along."""
    environ = os.environ if environ is None else environ
    return {
        name: value
        for name, value in environ.items()
        if value and (name in PASSED_ENV or (with_fault_hooks and name.startswith(FAULT_ENV_PREFIX)))
    }


def resources_needed(cfg: Config) -> tuple[int, float]:
    """(CPUs, GPUs) a run needs of the cluster to start: its workers (an elastic group's
    minimum) and the dictionary actor."""
    res = cfg.resources
    workers = min(res.world_sizes)
    cpus = workers * res.cpus_per_worker + (0 if res.elastic else 1)  # the actor's CPU (none when elastic)
    gpus = (workers * res.gpus_per_worker if res.use_gpu else 0) + res.actor_gpus
    return cpus, gpus
