"""`python -m jobs.pretrain --recipe R --run-id ID [--storage URI] [--data URI] [--set k=v ...] [--resume]`

Pretrains with CM-ACC on Ray Train (V2), then evaluates the final checkpoint on the data
set's held-out split and prints a summary. The run id is the user's handle: a run id that
already has a checkpoint in storage continues from its newest one with `--resume` and is
refused without it (nothing is touched). Without `--data` (and `data.uri`), a synthetic data
set is generated once under `<storage>/datasets/` and reused. This is the entry point of
submitted cluster jobs; `cmacc pretrain` runs it on an embedded local Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service import catalog, storage
from service import config as config_module
from service.config import Config

PASSED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
FAULT_ENV_PREFIX = "CMACC_FAULT_"


class PretrainError(RuntimeError):
    """The run cannot start or did not finish; the message says why and names the URI."""


class RunExistsError(PretrainError):
    """The run id already has checkpoints and `--resume` was not given (a usage error)."""


@dataclass(kw_only=True)
class Run:
    run_id: str
    cfg: Config
    storage_root: str
    data_uri: str
    split: str | None
    has_test_split: bool = False
    start_step: int = 0  # the step it resumes from (0 for a new run)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage_root, self.run_id)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    outcome = run_pretrain(args)
    print(json.dumps(outcome, indent=2) if args.json else format_summary(outcome), flush=True)
    if outcome["state"] == "failed":
        raise PretrainError(outcome["error"])
    return 0


def run_pretrain(args: argparse.Namespace, *, progress: Callable[[Any, int, int], Any] | None = None) -> dict[str, Any]:
    """Check, start Ray (or join it), train, evaluate; return the outcome (state, step,
    metrics, evaluation, timings).

    `progress(client, total, initial)`, when given, makes the driver's progress display: an
    object with `poll()` (called twice a second during training) and `close()`.
    """
    started = time.perf_counter()
    cfg = config_module.load_recipe(args.recipe, args.overrides)
    run = build_run(
        cfg, run_id=args.run_id, storage_root=args.storage, data_uri=args.data, resume=getattr(args, "resume", False)
    )
    import ray

    if not ray.is_initialized():
        address = args.address or os.environ.get("RAY_ADDRESS") or None
        local = address in (None, "local")
        # A local Ray gets enough logical CPUs for the workers and the actor on a small machine.
        wanted = cfg.resources.num_workers * cfg.resources.cpus_per_worker + 1
        ray.init(
            address=address,
            num_cpus=max(os.cpu_count() or 1, wanted) if local else None,
            log_to_driver=progress is None,  # a progress bar replaces the workers' progress lines
        )
    check_resources(cfg)
    from workers.actor import DictionaryClient

    client = DictionaryClient.create(run_id=run.run_id, config=cfg)
    write_run_json(run, state="running")
    display = progress(client, cfg.train.steps, run.start_step) if progress else None
    fit_started, fit_wallclock = time.perf_counter(), time.time()
    try:
        result = fit_with_graceful_stop(build_trainer(run, client), client, poll=display.poll if display else None)
        outcome = summarise(run, result)
    except Exception as err:
        write_run_json(run, state="failed", error=str(err))
        raise
    finally:
        if display:
            display.close()
        client.kill()
    run.timings["train_s"] = time.perf_counter() - fit_started
    outcome["clips_per_s"] = steady_throughput(run, cfg.global_batch_size, since=fit_wallclock)
    evaluation = None
    if outcome["state"] == "succeeded" and cfg.eval.after_training:
        evaluation = evaluate_run(run, outcome)
    run.timings["total_s"] = time.perf_counter() - started
    outcome["timings"] = {name: round(value, 2) for name, value in run.timings.items()}
    outcome["start_step"] = run.start_step
    outcome["global_batch"] = cfg.global_batch_size
    outcome["evaluation"] = evaluation
    write_run_json(
        run, state=outcome["state"], last_step=outcome["step"], error=outcome.get("error", ""), evaluation=evaluation
    )
    return outcome


def steady_throughput(run: Run, global_batch: int, *, since: float) -> float | None:
    """Clips per second between the first and the last step logged since `since` (this job's
    training; worker start-up excluded), from the run's metrics log."""
    from workers.metrics import read_metrics

    try:
        records = read_metrics(run.run_uri, endpoint_url=run.cfg.storage.endpoint_url)
    except (OSError, ValueError):
        return None
    times = [r["time"] for r in records if r.get("time", 0) >= since]
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) * global_batch / (times[-1] - times[0])


def evaluate_run(run: Run, outcome: dict[str, Any]) -> dict[str, Any] | None:
    """Evaluate the final checkpoint on the held-out split (a Ray task); a failure here is
    reported in the outcome but does not fail the trained run."""
    from jobs.evaluate import evaluate_remote, save_evaluation

    if not run.has_test_split:
        outcome["evaluation_note"] = f"data set {run.data_uri} has no 'test' split: evaluation skipped"
        print(f"cmacc: {outcome['evaluation_note']}", flush=True)
        return None
    checkpoint = storage.join(run.run_uri, catalog.checkpoint_name(outcome["step"]))
    print(f"cmacc: evaluating {checkpoint} on the held-out split of {run.data_uri} ...", flush=True)
    started = time.perf_counter()
    try:
        evaluation = evaluate_remote(run.cfg, checkpoint=checkpoint, data=run.data_uri)
        evaluation["uri"] = save_evaluation(run.run_uri, evaluation, endpoint_url=run.cfg.storage.endpoint_url)
    except Exception as err:  # the weights are safe in the checkpoint; `cmacc eval` can retry
        outcome["evaluation_note"] = f"evaluation failed: {type(err).__name__}: {err}"
        print(f"cmacc: warning: {outcome['evaluation_note']}", file=sys.stderr, flush=True)
        return None
    finally:
        run.timings["eval_s"] = time.perf_counter() - started
    return evaluation


class ProgressBar:
    """The driver's progress bar (step, loss, clips/s, ETA) from what rank 0 reports to the
    dictionary actor; `poll()` never blocks (an answer not there yet is picked up later)."""

    def __init__(self, client: Any, total: int, initial: int):
        from tqdm import tqdm

        self.client = client
        self.bar = tqdm(total=total, initial=initial, unit="step", desc="pretrain", file=sys.stderr, dynamic_ncols=True)
        self.pending: Any = None

    def poll(self) -> None:
        import ray

        if self.pending is not None:
            ready, _ = ray.wait([self.pending], timeout=0)
            if not ready:
                return
            with contextlib.suppress(Exception):  # the actor is restarting: the next answer will do
                self._show(ray.get(self.pending))
        self.pending = self.client.handle.progress.remote()

    def _show(self, progress: dict[str, float]) -> None:
        if not progress:
            return
        step = int(progress["step"])
        if step < self.bar.n:  # a restarted attempt replays steps since its checkpoint
            self.bar.reset(total=self.bar.total)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{progress['loss']:.3f}", clips_s=f"{progress['clips_per_s']:.0f}", refresh=True)

    def close(self) -> None:
        self.bar.close()


def format_summary(outcome: dict[str, Any]) -> str:
    """The closing table: steps, wall time, clips/s, then probe accuracies (untrained vs
    pretrained)."""
    timings = outcome.get("timings", {})
    rate = outcome.get("clips_per_s")
    lines = [
        f"run {outcome['run_id']}: {outcome['state']} at step {outcome['step']} "
        f"(this job: steps {outcome.get('start_step', 0)} -> {outcome['step']}, "
        f"{'-' if rate is None else f'{rate:.1f}'} clips/s)",
        f"  wall time {timings.get('total_s', 0.0):.1f} s: training {timings.get('train_s', 0.0):.1f} s "
        f"(with Ray Train start-up), evaluation {timings.get('eval_s', 0.0):.1f} s",
    ]
    if outcome.get("checkpoint"):
        lines.append(f"  newest checkpoint {outcome['checkpoint']}")
    if outcome.get("error"):
        lines.append(f"  error: {outcome['error']}")
    if outcome.get("evaluation"):
        from workers.evaluate import format_table

        lines.append(format_table(outcome["evaluation"]))
    elif outcome.get("evaluation_note"):
        lines.append(f"  {outcome['evaluation_note']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--run-id", required=True, help="name of the run; the same id resumes it")
    parser.add_argument("--storage", default=None, help="storage root URI (default: storage.root)")
    parser.add_argument("--data", default=None, help="clip-shard data set URI (default: data.uri or generated)")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="continue the run id from its newest checkpoint")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON instead of the summary")
    return parser.parse_args(argv)


def build_run(cfg: Config, *, run_id: str, storage_root: str | None, data_uri: str | None, resume: bool = False) -> Run:
    """Check everything that can be checked before Ray starts: the run id against what storage
    holds (before anything is written), storage, data, sizes."""
    from workers.data.format import DataError, read_manifest

    try:
        catalog.check_run_id(run_id)
    except ValueError as err:
        raise RunExistsError(str(err)) from None
    root = storage.absolute(storage_root or cfg.storage.root)
    endpoint = cfg.storage.endpoint_url
    try:
        existing = catalog.read_run(root, run_id, endpoint_url=endpoint)
    except (OSError, catalog.CatalogError) as err:
        raise PretrainError(f"storage {root} cannot be read: {err}") from None
    newest = existing.newest_checkpoint if existing else None
    if newest is not None and not resume:
        raise RunExistsError(
            f"run {run_id!r} already exists at {existing.uri} with a checkpoint at step {newest.step}: "
            "pass --resume to continue it, or choose another --run-id (nothing was changed)"
        )
    if resume and existing is None:
        raise PretrainError(f"--resume: no run {run_id!r} under {root} to continue")
    probe = storage.join(root, f".write-probe-{run_id}")  # beside the run: a refused run leaves no folder
    try:
        storage.write_bytes(probe, b"ok", endpoint_url=endpoint)
        storage.remove(probe, endpoint_url=endpoint)
    except OSError as err:
        raise PretrainError(f"storage {root} is not writable: {err}") from None
    data = storage.absolute(data_uri or cfg.data.uri or default_data(cfg, root))
    try:
        manifest = read_manifest(data, endpoint_url=endpoint)
    except (DataError, OSError) as err:
        raise PretrainError(f"data set {data} cannot be read: {err}") from None
    split = "train" if manifest.splits.get("train") else None
    num_train = manifest.splits["train"] if split else manifest.num_clips
    if not (manifest.has_video and manifest.has_audio):
        raise PretrainError(f"data set {data} must hold both video and audio for CM-ACC")
    if cfg.method.dictionary_size > num_train:
        raise PretrainError(
            f"method.dictionary_size ({cfg.method.dictionary_size}) exceeds the {num_train} training clips of {data}"
        )
    return Run(
        run_id=run_id,
        cfg=cfg,
        storage_root=root,
        data_uri=data,
        split=split,
        has_test_split=bool(manifest.splits.get("test")),
        start_step=newest.step if newest is not None else 0,
    )


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
    uri = storage.join(root, "datasets", f"synth-{digest}")
    if not storage.exists(storage.join(uri, MANIFEST_NAME), endpoint_url=cfg.storage.endpoint_url):
        print(f"generating {d.num_clips} synthetic clips at {uri} ...", flush=True)
        write_synthetic(uri, endpoint_url=cfg.storage.endpoint_url, **params)
    return uri


def check_resources(cfg: Config) -> None:
    """Say plainly when the cluster cannot hold the run now (an autoscaler may still add nodes)."""
    import ray

    total = ray.cluster_resources()
    needed_cpus = cfg.resources.num_workers * cfg.resources.cpus_per_worker + 1
    needed_gpus = cfg.resources.num_workers * cfg.resources.gpus_per_worker if cfg.resources.use_gpu else 0
    needed_gpus += cfg.resources.actor_gpus
    if total.get("CPU", 0) < needed_cpus or total.get("GPU", 0) < needed_gpus:
        print(
            f"cmacc: warning: the run asks for {needed_cpus} CPUs and {needed_gpus:g} GPUs "
            f"(resources.num_workers, cpus_per_worker, use_gpu, gpus_per_worker, actor_gpus); the cluster "
            f"has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs now and will wait for more",
            file=sys.stderr,
            flush=True,
        )


def build_trainer(run: Run, client: Any) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    from workers.distributed import RunContext, train_loop_per_worker

    cfg = run.cfg
    filesystem, path = storage.arrow_filesystem(run.storage_root, endpoint_url=cfg.storage.endpoint_url)
    resources = {"CPU": cfg.resources.cpus_per_worker}
    if cfg.resources.use_gpu:
        resources["GPU"] = cfg.resources.gpus_per_worker
    env = {k: v for k, v in os.environ.items() if k in PASSED_ENV or k.startswith(FAULT_ENV_PREFIX)}
    context = RunContext(
        run_id=run.run_id,
        data_uri=run.data_uri,
        run_uri=run.run_uri,
        actor_name=client.name,
        endpoint_url=cfg.storage.endpoint_url,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run": vars(context), "split": run.split},
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
            worker_runtime_env={"env_vars": env},
        ),
    )


def fit_with_graceful_stop(trainer: Any, client: Any, *, poll: Callable[[], None] | None = None) -> Any:
    """`trainer.fit()`, where the first Ctrl-C (SIGINT or SIGTERM) asks the workers to write a
    checkpoint and stop; a second one aborts.

    fit() runs in a helper thread so that Ray Train does not install its own SIGINT handler
    (which aborts the run without a checkpoint); this thread keeps the signals. `poll` is
    called twice a second meanwhile (the progress display).
    """
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the calling thread
            outcome["error"] = err

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        print("\ncmacc: stopping after the next step and a checkpoint (again to abort)", flush=True)
        client.handle.request_stop.remote()
        for sig, old in previous.items():
            signal.signal(sig, old)

    thread = threading.Thread(target=fit, name="cmacc-fit", daemon=True)
    for sig in previous:
        signal.signal(sig, handler)
    try:
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.5)
            if poll is not None:
                poll()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if "error" in outcome:
        err = outcome["error"]
        raise PretrainError(f"training failed: {type(err).__name__}: {err}") from err
    return outcome["result"]


def summarise(run: Run, result: Any) -> dict[str, Any]:
    """The run's outcome from rank 0's return value (Result.metrics only holds the metrics
    attached to the newest checkpoint)."""
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
    return outcome


def write_run_json(
    run: Run, *, state: str, last_step: int | None = None, error: str = "", evaluation: dict[str, Any] | None = None
) -> None:
    """The run's small catalogue entry, `<run>/run.json` (no credentials in it)."""
    uri = storage.join(run.run_uri, catalog.RUN_FILE)
    endpoint = run.cfg.storage.endpoint_url
    previous: dict[str, Any] = {}
    if storage.exists(uri, endpoint_url=endpoint):
        previous = json.loads(storage.read_bytes(uri, endpoint_url=endpoint))
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    entry = {
        "run_id": run.run_id,
        "recipe": run.cfg.recipe,
        "sampler": run.cfg.method.sampler,
        "data": run.data_uri,
        "state": state,
        "last_step": previous.get("last_step", 0) if last_step is None else last_step,
        "error": error,
        "created": previous.get("created", now),
        "updated": now,
        "eval": previous.get("eval"),
        "config": run.cfg.to_dict(),
    }
    if evaluation is not None:
        from workers.evaluate import summary_rows

        entry["eval"] = {
            "step": evaluation["step"],
            "uri": evaluation.get("uri", ""),
            "top1": {
                f"{modality}/{probe}": {"untrained": untrained, "pretrained": pretrained}
                for modality, probe, untrained, pretrained in summary_rows(evaluation)
            },
        }
    storage.write_bytes(uri, json.dumps(entry, indent=2).encode(), endpoint_url=endpoint)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (PretrainError, config_module.ConfigError) as err:
        print(f"cmacc: error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, (config_module.ConfigError, RunExistsError)) else 1)
