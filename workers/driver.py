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

import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service import catalog, layout, preflight, storage
from service.config import Config
from service.errors import DataError, Failure
from service.requests import PretrainRequest
from workers import ray_init
from workers.actor import DictionaryClient


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
    storage.set_retry_budget(cfg.storage.retry_budget_s)  # this process and the workers it starts
    root = storage.absolute(request.storage or cfg.storage.root)
    endpoint = cfg.storage.endpoint_url
    existing = preflight.read_run(root, run_id, endpoint_url=endpoint)
    start_step = preflight.check_start(
        existing,
        run_id=run_id,
        root=root,
        resume=request.resume or request.resume_if_any,
        may_be_new=request.resume_if_any,
    )
    if existing is not None and existing.newest_checkpoint is not None:
        newest = existing.newest_checkpoint
        layout.check_checkpoint_format(newest.meta, newest.uri, to="resume")
    probe = storage.join(root, f".write-probe-{run_id}")  # beside the run: a refused run leaves no folder
    try:
        storage.write_bytes(probe, b"ok", endpoint_url=endpoint)
        storage.remove(probe, endpoint_url=endpoint)
    except OSError as err:
        raise Failure(f"storage {root} is not writable: {err}") from None
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
    )


def check_data(cfg: Config, data: str, *, need_test_split: bool = False) -> tuple[str | None, bool]:
    """Can a run of `cfg` train on the data set `data`? (the split it trains on, whether it
    has a test split); Failure naming the URI when it cannot, or when `need_test_split` and
    it has none."""
    from workers.data.format import read_manifest

    try:
        manifest = read_manifest(data, endpoint_url=cfg.storage.endpoint_url)
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
    from workers.data.format import MANIFEST_NAME
    from workers.data.synth import VERSION as SYNTH_VERSION
    from workers.data.synth import write_synthetic

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


def start_ray(cfg: Config, address: str | None, *, log_to_driver: bool = True) -> str:
    """Join the Ray at `address` (or RAY_ADDRESS), or start a local one with enough logical
    CPUs for the run's workers and actor; nothing when this process is already connected.
    Says plainly when the cluster cannot hold the run now (an autoscaler may add nodes) and
    returns that shortage ("" when the cluster has enough)."""
    import ray

    cpus, gpus = preflight.resources_needed(cfg)
    if not ray.is_initialized():
        ray_init.init(address, num_cpus=max(os.cpu_count() or 1, cpus), log_to_driver=log_to_driver)
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

    from workers.distributed.loop import RunContext, train_loop_per_worker

    cfg = run.cfg
    filesystem, path = storage.arrow_filesystem(run.storage_root, endpoint_url=cfg.storage.endpoint_url)
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
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run": context.to_dict()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.resources.num_workers,
            use_gpu=cfg.resources.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.resources.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run.run_id,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            worker_runtime_env={"env_vars": preflight.passed_environment(with_fault_hooks=True)},
        ),
    )


ProgressFactory = Callable[[DictionaryClient, int, int], Any]


class StoppedBeforeStart(Exception):
    """A stop (Ctrl-C, SIGTERM, `cmacc stop`) arrived before any worker trained a step: there
    is nothing to checkpoint, so the driver ends at once instead of waiting for workers
    (which may never get their resources) to reach a step."""


class StopSignals:
    """Ctrl-C and SIGTERM for the whole job, from Ray's start to the end of training.

    Before rank 0 reported its first step, a signal ends the job at the next `check()`
    (`StoppedBeforeStart`: nothing to checkpoint). Afterwards the first asks the workers to
    write a checkpoint and stop; a second one aborts (the previous handlers are back).
    Installed right after Ray starts, whose own SIGTERM handler would kill the process.
    """

    def __init__(self) -> None:
        self.client: DictionaryClient | None = None  # set once the actor exists
        self.started = False  # rank 0 reported a step
        self.requested = False  # a stop arrived before that
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)  # None: a handler set outside Python
        self.previous = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.started or self.client is None:
            self.requested = True
            print("\ncmacc: stopping: no step was trained yet, so there is nothing to checkpoint", flush=True)
            return
        print("\ncmacc: stopping after the next step and a checkpoint (again to abort)", flush=True)
        self.client.request_stop()
        self._restore()

    def mark_started(self) -> None:
        """Rank 0 reported its first step. A stop that arrived while that step was on its way
        now asks for a checkpoint instead of abandoning the steps trained."""
        self.started = True
        if self.requested and self.client is not None:
            self.requested = False
            self.client.request_stop()
            self._restore()

    def check(self) -> None:
        if self.requested and not self.started:
            raise StoppedBeforeStart()


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


class Watcher:
    """Polls rank 0's progress from the actor (never blocks): feeds the display, and at the
    first step turns the run record from `waiting` to `running` and arms the graceful stop."""

    def __init__(self, run: Run, client: DictionaryClient, display: Any, stop: StopSignals):
        self.run, self.client, self.display, self.stop = run, client, display, stop

    def poll(self) -> None:
        progress = self.client.poll_progress()
        if not progress:
            return
        if not self.stop.started:
            self.stop.mark_started()
            try:
                record(self.run, state="running")
            except Exception as err:  # the record is for people; training goes on without it
                print(f"cmacc: warning: could not update the run record: {err}", file=sys.stderr, flush=True)
        if self.display is not None:
            self.display.show(progress)


def fit_in_thread(trainer: Any, stop: StopSignals, *, poll: Callable[[], None]) -> Any:
    """`trainer.fit()` in a helper thread, so that Ray Train does not install its own SIGINT
    handler (which aborts the run without a checkpoint) and this thread keeps the signals;
    `poll` is called twice a second meanwhile. A stop before the first step raises
    `StoppedBeforeStart` at once (the helper thread is left to die with the process)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the calling thread
            outcome["error"] = err

    thread = threading.Thread(target=target, name="cmacc-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        stop.check()
        thread.join(timeout=0.5)
        poll()
    if "error" in outcome:
        err = outcome["error"]
        raise Failure(f"training failed: {type(err).__name__}: {err}") from err
    return outcome["result"]


class ProgressBar:
    """The driver's progress bar (step, loss, clips/s, ETA) from what rank 0 reports to the
    dictionary actor."""

    def __init__(self, client: DictionaryClient, total: int, initial: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", desc="pretrain", file=sys.stderr, dynamic_ncols=True)

    def show(self, progress: dict[str, float]) -> None:
        step = int(progress["step"])
        if step < self.bar.n:  # a restarted attempt replays steps since its checkpoint
            self.bar.reset(total=self.bar.total)
        self.bar.update(step - self.bar.n)
        postfix = {"clips_s": f"{progress['clips_per_s']:.0f}"}
        if math.isfinite(progress["loss"]):  # NaN until the loop first reads its losses (train.log_every)
            postfix = {"loss": f"{progress['loss']:.3f}", **postfix}
        self.bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        self.bar.close()


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
    from workers.metrics import read_metrics

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
    from workers.evaluate import evaluate_remote, save_evaluation

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


def record(
    run: Run,
    *,
    state: str,
    last_step: int | None = None,
    error: str = "",
    note: str = "",
    evaluation: dict[str, Any] | None = None,
    final: bool = False,
) -> None:
    """Write the run record (`run.json`) with the run's state; the `final` record of a job
    adds its training time to the run's total."""
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
        endpoint_url=run.endpoint_url,
    )
