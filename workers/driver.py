"""The driver of a pretraining run: the steps `jobs.pretrain.pretrain` takes, one function
each (docs/architecture.md, "The components").

`prepare_run` checks everything that can be checked before Ray starts (the run id against
storage, storage, data, sizes) and makes the generated data set when none is given;
`start_ray` starts or joins Ray; `start_actor` creates the run's dictionary actor; `fit`
runs Ray Train (`workers.distributed.loop` on every worker) with a graceful Ctrl-C and a
progress display; `summarise` turns Ray Train's result into the outcome; `evaluate_run`
probes the final checkpoint; `record` keeps the run record in storage.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from service import catalog, layout, preflight, reports, storage
from service.config import Config
from service.errors import DataError, Failure
from service.requests import PretrainRequest
from workers import ray_init, trackers
from workers.actor import DictionaryClient
from workers.data.format import MANIFEST_NAME, read_manifest
from workers.data.synth import VERSION as SYNTH_VERSION
from workers.data.synth import write_synthetic
from workers.distributed.loop import train_loop_per_worker
from workers.distributed.worker import RunContext
from workers.evaluate import evaluate_remote, save_evaluation
from workers.metrics import open_run_trackers, read_metrics
from workers.supervision import ProgressFactory, StopSignals, fit_in_thread, say_above


@dataclass(kw_only=True)
class Run:
    """A checked pretraining run: its config, where it lives, what it reads."""

    run_id: str
    cfg: Config
    storage_root: str
    data_uri: str
    split: str | None  # the split it trains on ("train", or None: every clip)
    has_test_split: bool = False
    start_step: int = 0  # the step it resumes from (0 for a new run)
    resume: preflight.ResumePoint | None = None  # what `--resume` continues from (service.preflight)
    verbose: bool = False  # Ray Train's own INFO messages on the terminal too
    timings: dict[str, float] = field(default_factory=dict)
    fit_started_at: float = 0.0  # wall-clock time training started (for the throughput)

    @property
    def run_uri(self) -> str:
        return layout.run_uri(self.storage_root, self.run_id)

    @property
    def endpoint_url(self) -> str:
        return self.cfg.storage.endpoint_url


# --- before Ray ------------------------------------------------------------------------------


def prepare_run(cfg: Config, request: PretrainRequest) -> Run:
    """Check the run before anything is written: the run id against what storage holds
    (`service.preflight`, as `cmacc submit` does), storage writable, data readable and big
    enough. Raises UsageError (RunExistsError) or Failure naming the URI."""
    run_id = preflight.check_run_id(request.run_id)
    budget = cfg.storage.retry_budget_s
    root = storage.absolute(request.storage or cfg.storage.root)
    endpoint = cfg.storage.endpoint_url
    existing = preflight.read_run(root, run_id, endpoint_url=endpoint, retry_budget_s=budget)
    start_step = preflight.check_start(
        existing,
        run_id=run_id,
        root=root,
        resume=request.resume or request.resume_if_any,
        may_be_new=request.resume_if_any,
    )
    resume = None  # the newest checkpoint that verifies, and the damaged newer ones passed over
    if existing is not None and (request.resume or request.resume_if_any):
        resume = preflight.resume_point(existing, endpoint_url=endpoint, retry_budget_s=budget)
    if resume is not None:
        start_step, saved = resume.step, resume.checkpoint.meta
        layout.check_checkpoint_format(saved, resume.checkpoint.uri, to="resume")
        if saved.get("config"):
            preflight.check_resume_config(saved["config"], cfg, where=resume.checkpoint.uri)
    probe = storage.join(root, f".write-probe-{run_id}")  # beside the run: a refused run leaves no folder
    try:
        storage.write_bytes(probe, b"ok", endpoint_url=endpoint, retry_budget_s=budget)
        storage.remove(probe, endpoint_url=endpoint, retry_budget_s=budget)
    except OSError as err:
        raise Failure(f"storage {root} is not writable: {err}") from None
    trackers.check_available(cfg.train.trackers)  # a tracker whose extra is missing: refused now
    data = storage.absolute(request.data or cfg.data.uri or default_data(cfg, root))
    split, has_test_split = check_data(cfg, data)
    return Run(
        run_id=run_id,
        cfg=cfg,
        storage_root=root,
        data_uri=data,
        split=split,
        has_test_split=has_test_split,
        start_step=start_step,
        resume=resume,
        verbose=request.verbose,
    )


def check_data(cfg: Config, data: str, *, need_test_split: bool = False) -> tuple[str | None, bool]:
    """Can a run of `cfg` train on the data set `data`? (the split it trains on, whether it
    has a test split); Failure naming the URI when it cannot, or when `need_test_split` and
    it has none."""
    try:
        manifest = read_manifest(data, endpoint_url=cfg.storage.endpoint_url, retry_budget_s=cfg.storage.retry_budget_s)
    except (DataError, OSError) as err:
        raise Failure(f"data set {data} cannot be read: {err}") from None
    split = "train" if manifest.splits.get("train") else None
    num_train = manifest.splits["train"] if split else manifest.num_clips
    has_test_split = bool(manifest.splits.get("test"))
    if not (manifest.has_video and manifest.has_audio):
        raise Failure(f"data set {data} must hold both video and audio for CM-ACC")
    if cfg.method.dictionary_size > num_train:
        raise Failure(
            f"method.dictionary_size ({cfg.method.dictionary_size}) exceeds the {num_train} training clips of {data}"
        )
    if need_test_split and not (split and has_test_split):
        splits = sorted(name or "none" for name in manifest.splits)
        raise Failure(f"data set {data} needs a train and a test split to be evaluated (it has {splits})")
    if need_test_split and not manifest.label_names:
        raise Failure(f"data set {data} has no labels (manifest label_names is empty): the probes need them")
    return split, has_test_split


def default_data(cfg: Config, root: str) -> str:
    """The generated data set of `data.*`, made once under `<root>/datasets/` and reused."""
    d = cfg.data
    params = dict(
        num_clips=d.num_clips,
        num_classes=d.num_classes,
        frames=d.frames,
        size=d.size,
        seconds=d.clip_seconds,
        sample_rate=d.sample_rate,
        seed=0,
    )
    key = {**params, "version": SYNTH_VERSION}  # a new generator version is a new data set
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    uri = storage.join(layout.datasets_uri(root), f"synth-{digest}")
    if not storage.exists(storage.join(uri, MANIFEST_NAME), endpoint_url=cfg.storage.endpoint_url):
        print(f"generating {d.num_clips} synthetic clips at {uri} ...", flush=True)
        write_synthetic(uri, endpoint_url=cfg.storage.endpoint_url, **params)
    return uri


# --- Ray -------------------------------------------------------------------------------------


def start_ray(cfg: Config, address: str | None, *, log_to_driver: bool = True, quiet: bool = False) -> str:
    """Join the Ray at `address` (or RAY_ADDRESS), or start a local one with enough logical
    CPUs for the run's workers and actor; nothing when this process is already connected.
    Says plainly when the cluster cannot hold the run now (an autoscaler may add nodes) and
    returns that shortage ("" when the cluster has enough)."""
    import ray

    cpus, gpus = preflight.resources_needed(cfg)
    if not ray.is_initialized():  # a local Ray offers what the largest group asks for
        largest = max(cfg.resources.world_sizes) * cfg.resources.cpus_per_worker + 1
        ray_init.init(address, num_cpus=max(os.cpu_count() or 1, largest), log_to_driver=log_to_driver, quiet=quiet)
    total = ray.cluster_resources()
    if total.get("CPU", 0) >= cpus and total.get("GPU", 0) >= gpus:
        return ""
    shortage = (
        f"the run asks for {cpus} CPUs and {gpus:g} GPUs "
        f"(resources.num_workers, cpus_per_worker, use_gpu, gpus_per_worker, actor_gpus); the cluster "
        f"has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs now"
    )
    print(f"cmacc: warning: {shortage} and will wait for more", file=sys.stderr, flush=True)
    return shortage


def start_actor(run: Run) -> DictionaryClient:
    """The run's dictionary actor, owned by this driver (it ends with it)."""
    return DictionaryClient.create(run_id=run.run_id, config=run.cfg)


def build_trainer(run: Run, client: DictionaryClient) -> Any:
    """Ray Train's TorchTrainer for the run: its workers run `train_loop_per_worker`; the
    run id names the run in storage, so running it again resumes it."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = run.cfg
    filesystem, path = storage.arrow_filesystem(
        run.storage_root, endpoint_url=cfg.storage.endpoint_url, retry_budget_s=cfg.storage.retry_budget_s
    )
    resources = {"CPU": cfg.resources.cpus_per_worker}
    if cfg.resources.use_gpu:
        resources["GPU"] = cfg.resources.gpus_per_worker
    context = RunContext(
        run_id=run.run_id,
        data_uri=run.data_uri,
        run_uri=run.run_uri,
        actor_name=client.name,
        endpoint_url=cfg.storage.endpoint_url,
        split=run.split,
        verbose=run.verbose,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run": context.to_dict()},
        scaling_config=scaling_config(cfg, resources),
        run_config=ray.train.RunConfig(
            name=run.run_id,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.resources.max_failures),
            # Ray Train's INFO messages (each report's metrics, worker start-up) stay in its log
            # files unless asked for: the terminal shows our progress, checkpoints and warnings.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if run.verbose else "WARNING"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            worker_runtime_env={"env_vars": preflight.passed_environment(with_fault_hooks=True)},
        ),
    )


def scaling_config(cfg: Config, resources: dict[str, float]) -> Any:
    """Ray Train's worker group: a fixed `resources.num_workers`, or with
    `resources.max_workers` an elastic group of min..max workers (Ray Train starts with what
    the cluster can hold, restarts smaller after losing a node and grows when resources come
    back, checked every `resources.resize_check_s`; docs/scaling.md, "Elastic runs")."""
    import ray.train

    res = cfg.resources
    return ray.train.ScalingConfig(
        num_workers=(res.min_workers, res.max_workers) if res.elastic else res.num_workers,
        use_gpu=res.use_gpu,
        resources_per_worker=resources,
        placement_strategy=res.placement_strategy,
        elastic_resize_monitor_interval_s=res.resize_check_s,
    )


def fit(run: Run, client: DictionaryClient, stop: StopSignals, *, progress: ProgressFactory | None = None) -> Any:
    """Train: Ray Train's `fit()`, stopped gracefully through `stop`; returns its Result.
    `progress(client, total, initial)`, when given, makes the progress display: an object
    with `show(progress)` (rank 0's newest step, loss and rate) and `close()`. The run
    record says `waiting` until rank 0 reports its first step, then `running`."""
    stop.check()
    trainer = build_trainer(run, client)
    display = progress(client, run.cfg.train.steps, run.start_step) if progress else None
    started = time.perf_counter()
    run.fit_started_at = time.time()
    watcher = Watcher(run, client, display, stop)
    try:
        return fit_in_thread(trainer, stop, poll=watcher.poll)
    finally:
        run.timings["train_s"] = time.perf_counter() - started
        if display:
            display.close()


PROGRESS_RECORD_S = 10.0  # how often the run record's progress is renewed while the run trains
PROGRESS_RECORD_ENV = "CMACC_PROGRESS_RECORD_S"  # tests that watch a run mid-way renew it more often


class Watcher:
    """Polls rank 0's progress from the actor (never blocks): feeds the display, at the first
    step turns the run record from `waiting` to `running` and arms the graceful stop, and
    every `PROGRESS_RECORD_S` keeps the record's progress (step, loss, rate) current, which
    is what `cmacc runs`, `cmacc status` and a cluster ablation read. The record says
    `stopping` from the moment a stop was requested (the workers write their checkpoint and
    end) and `finishing` once rank 0 has reached the last step (the final checkpoint), at
    once: `cmacc status` and a resubmission tell them from `running`."""

    def __init__(self, run: Run, client: DictionaryClient, display: Any, stop: StopSignals):
        self.run, self.client, self.display, self.stop = run, client, display, stop
        self.recorded_at = -math.inf
        self.recorded_state = ""
        self.record_every_s = float(os.environ.get(PROGRESS_RECORD_ENV, PROGRESS_RECORD_S))
        self.checkpoint: int | None = None
        self.progress: dict[str, Any] | None = None  # rank 0's newest, with the time it arrived

    def poll(self) -> None:
        progress = self.client.poll_progress()
        if progress:
            self._take(progress)
        if self.progress is None:  # no step yet: the record says `waiting`
            return
        state, note = self.phase()
        if state != self.recorded_state or (progress and time.monotonic() - self.recorded_at >= self.record_every_s):
            self.recorded_at, self.recorded_state = time.monotonic(), state
            try:
                record(self.run, state=state, note=note, progress=self.progress)
            except Exception as err:  # the record is for people; training goes on without it
                print(f"cmacc: warning: could not update the run record: {err}", file=sys.stderr, flush=True)

    def _take(self, progress: dict[str, Any]) -> None:
        if not self.stop.started:
            self.stop.mark_started()
        progress = dict(progress)
        for step in progress.pop("checkpoints", None) or []:  # each one this job reported, oldest first
            if self.checkpoint is None or step > self.checkpoint:
                self.checkpoint = int(step)
                name = layout.checkpoint_name(self.checkpoint)
                say_above(
                    self.display, f"cmacc: checkpoint at step {self.checkpoint}: {storage.join(self.run.run_uri, name)}"
                )
        if self.display is not None:
            self.display.show(progress)
        self.progress = {**progress, "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}

    def phase(self) -> tuple[str, str]:
        """The run's state now and what it does (the record's note)."""
        if self.stop.stopping:
            return "stopping", "a stop was requested: the workers write a checkpoint after the step in progress and end"
        progress = self.progress or {}
        if progress.get("total") is not None and int(progress["step"]) >= int(progress["total"]):
            return "finishing", "the last step is trained: writing the final checkpoint"
        return "running", ""


# --- after training --------------------------------------------------------------------------


def summarise(run: Run, result: Any) -> dict[str, Any]:
    """The run's outcome from rank 0's return value (Result.metrics only holds the metrics
    attached to the newest checkpoint): state, step, checkpoint, metrics, error, and the
    steady clips/s of this job."""
    returned = result.return_value or {}
    outcome = {
        "run_id": run.run_id,
        "state": returned.get("state", "failed"),
        "step": int(returned.get("step", 0)),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": returned.get("metrics", {}),
    }
    error = returned.get("error") or ("" if returned else "the workers returned no outcome")
    if result.error is not None:
        error = f"{type(result.error).__name__}: {result.error}"
        outcome["state"] = "failed"
    if error:
        outcome["error"] = error
    outcome["clips_per_s"] = steady_throughput(run)
    if result.checkpoint is not None:
        # The catalog and `cmacc eval` use registered checkpoints only: the job reports its
        # end once Ray Train's snapshot, written a moment after fit() returns, lists the last.
        name = result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
        if not catalog.wait_registered(run.run_uri, name, endpoint_url=run.endpoint_url):
            print(f"cmacc: warning: {name} is not listed as registered in {run.run_uri} yet", file=sys.stderr)
    return outcome


def steady_throughput(run: Run) -> float | None:
    """Clips per second between the first and the last step this job logged (worker
    start-up excluded), from the run's metrics log."""
    try:
        records = read_metrics(run.run_uri, endpoint_url=run.endpoint_url)
    except (OSError, ValueError):
        return None
    times = [r["time"] for r in records if r.get("time", 0) >= run.fit_started_at]
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) * run.cfg.global_batch_size / (times[-1] - times[0])


def evaluate_run(run: Run, outcome: dict[str, Any]) -> dict[str, Any] | None:
    """Evaluate the final checkpoint on the held-out split (a Ray task); a failure here is
    reported in the outcome but does not fail the trained run."""
    if not run.has_test_split:
        outcome["evaluation_note"] = (
            f"data set {run.data_uri} has no 'test' split: evaluation skipped (`cmacc eval --run {run.run_id}` "
            "evaluates it by cross-validation over fold splits or on an automatic split)"
        )
        print(f"cmacc: {outcome['evaluation_note']}", flush=True)
        return None
    checkpoint = storage.join(run.run_uri, layout.checkpoint_name(outcome["step"]))
    print(f"cmacc: evaluating {checkpoint} on the held-out split of {run.data_uri} ...", flush=True)
    started = time.perf_counter()
    try:
        evaluation = evaluate_remote(run.cfg, checkpoint=checkpoint, data=run.data_uri)
        evaluation["uri"] = save_evaluation(run.run_uri, evaluation, endpoint_url=run.endpoint_url)
    except Exception as err:  # the weights are safe in the checkpoint; `cmacc eval` can retry
        outcome["evaluation_note"] = f"evaluation failed: {type(err).__name__}: {err}"
        print(f"cmacc: warning: {outcome['evaluation_note']}", file=sys.stderr, flush=True)
        return None
    finally:
        run.timings["eval_s"] = time.perf_counter() - started
    return evaluation


def track_evaluation(run: Run, evaluation: dict[str, Any]) -> None:
    """The evaluation in the run's MLflow and W&B runs (`train.trackers`): each probe's top-1,
    pretrained and untrained, at the checkpoint's step, and the evaluation's JSON and
    confusion-matrix PNGs as artefacts. A tracker that fails is a warning: the evaluation is
    saved in the run folder either way."""
    if not [name for name in run.cfg.train.trackers if name != "tensorboard"]:
        return
    try:
        tracker = open_run_trackers(run.cfg, run_uri=run.run_uri, run_id=run.run_id, endpoint_url=run.endpoint_url)
        try:
            values = {}
            for modality, probe, untrained, pretrained in reports.summary_rows(evaluation):
                values[f"eval/{modality}/{probe}/top1"] = pretrained
                if untrained is not None:
                    values[f"eval/{modality}/{probe}/top1_untrained"] = untrained
            tracker.log_metrics(int(evaluation["step"]), values)
            uri = evaluation.get("uri", "")
            if uri:
                folder, name = uri.rsplit("/", 1)
                for found in storage.list_dir(folder, endpoint_url=run.endpoint_url):
                    if found == name or (found.startswith(name.removesuffix(".json")) and found.endswith(".png")):
                        data = storage.read_bytes(storage.join(folder, found), endpoint_url=run.endpoint_url)
                        tracker.log_artifact(f"eval/{found}", data)
        finally:
            tracker.close(status="FINISHED")
    except Exception as err:  # the trackers are for people; the evaluation is saved already
        print(
            f"cmacc: warning: could not log the evaluation to {', '.join(run.cfg.train.trackers)}: {err}",
            file=sys.stderr,
        )


def record(
    run: Run,
    *,
    state: str,
    last_step: int | None = None,
    error: str = "",
    note: str = "",
    evaluation: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
    final: bool = False,
) -> None:
    """Write the run record (`run.json`) with the run's state (and, while it trains, its
    progress); the `final` record of a job adds its training time to the run's total."""
    catalog.write_run_record(
        run.run_uri,
        run_id=run.run_id,
        recipe=run.cfg.recipe,
        sampler=run.cfg.method.sampler,
        data=run.data_uri,
        config=run.cfg.to_dict(),
        state=state,
        last_step=last_step,
        error=error,
        note=note,
        evaluation=evaluation,
        train_s=run.timings.get("train_s") if final else None,
        progress=progress,
        endpoint_url=run.endpoint_url,
        retry_budget_s=run.cfg.storage.retry_budget_s,
    )
