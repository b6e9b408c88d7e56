"""`python -m jobs.pretrain --recipe R --run-id ID [--storage URI] [--data URI] [--set k=v ...]`

Pretrains with CM-ACC on Ray Train (V2). The run id is the user's handle: running again with
the same id and storage resumes from the newest checkpoint in storage. Without `--data` (and
`data.uri`), a synthetic data set is generated once under `<storage>/datasets/` and reused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from service import config as config_module
from service import storage
from service.config import Config

PASSED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
FAULT_ENV_PREFIX = "CMACC_FAULT_"


class PretrainError(RuntimeError):
    """The run cannot start or did not finish; the message says why and names the URI."""


@dataclass(kw_only=True)
class Run:
    run_id: str
    cfg: Config
    storage_root: str
    data_uri: str
    split: str | None

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage_root, self.run_id)


def main(argv: list[str] | None = None) -> int:
    outcome = run_pretrain(parse_args(argv))
    print(json.dumps(outcome, indent=2))
    if outcome["state"] == "failed":
        raise PretrainError(outcome["error"])
    return 0


def run_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Check, start Ray (or join it), train, and return the outcome (state, step, metrics)."""
    cfg = config_module.load_recipe(args.recipe, args.overrides)
    run = build_run(cfg, run_id=args.run_id, storage_root=args.storage, data_uri=args.data)
    import ray

    if not ray.is_initialized():
        address = args.address or os.environ.get("RAY_ADDRESS") or None
        # A local Ray gets enough logical CPUs for the workers and the actor on a small machine.
        wanted = cfg.resources.num_workers * cfg.resources.cpus_per_worker + 1
        ray.init(address=address, num_cpus=None if address else max(os.cpu_count() or 1, wanted))
    check_resources(cfg)
    from workers.actor import DictionaryClient

    client = DictionaryClient.create(run_id=run.run_id, config=cfg)
    write_run_json(run, state="running")
    try:
        outcome = summarise(run, fit_with_graceful_stop(build_trainer(run), client))
    except Exception as err:
        write_run_json(run, state="failed", error=str(err))
        raise
    finally:
        client.kill()
    write_run_json(run, state=outcome["state"], last_step=outcome["step"], error=outcome.get("error", ""))
    return outcome


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--run-id", required=True, help="name of the run; the same id resumes it")
    parser.add_argument("--storage", default=None, help="storage root URI (default: storage.root)")
    parser.add_argument("--data", default=None, help="clip-shard data set URI (default: data.uri or generated)")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def build_run(cfg: Config, *, run_id: str, storage_root: str | None, data_uri: str | None) -> Run:
    """Check everything that can be checked before Ray starts: storage, data, sizes."""
    from workers.data.format import DataError, read_manifest

    if not run_id or "/" in run_id or run_id.startswith("."):
        raise PretrainError(f"run id {run_id!r} must be a non-empty name without '/'")
    root = storage_root or cfg.storage.root
    endpoint = cfg.storage.endpoint_url
    probe = storage.join(root, run_id, ".write-probe")
    try:
        storage.write_bytes(probe, b"ok", endpoint_url=endpoint)
        storage.remove(probe, endpoint_url=endpoint)
    except OSError as err:
        raise PretrainError(f"storage {root} is not writable: {err}") from None
    data = data_uri or cfg.data.uri or default_data(cfg, root)
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
    return Run(run_id=run_id, cfg=cfg, storage_root=root, data_uri=data, split=split)


def default_data(cfg: Config, root: str) -> str:
    """The generated data set of `data.*`, made once under `<root>/datasets/` and reused."""
    from workers.data.format import MANIFEST_NAME
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
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
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


def build_trainer(run: Run) -> Any:
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
        run_id=run.run_id, data_uri=run.data_uri, run_uri=run.run_uri, endpoint_url=cfg.storage.endpoint_url
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


def fit_with_graceful_stop(trainer: Any, client: Any) -> Any:
    """`trainer.fit()`, where the first Ctrl-C (SIGINT or SIGTERM) asks the workers to write a
    checkpoint and stop; a second one aborts.

    fit() runs in a helper thread so that Ray Train does not install its own SIGINT handler
    (which aborts the run without a checkpoint); this thread keeps the signals.
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


def write_run_json(run: Run, *, state: str, last_step: int | None = None, error: str = "") -> None:
    """The run's small catalogue entry, `<run>/run.json` (no credentials in it)."""
    uri = storage.join(run.run_uri, "run.json")
    previous: dict[str, Any] = {}
    if storage.exists(uri, endpoint_url=run.cfg.storage.endpoint_url):
        previous = json.loads(storage.read_bytes(uri, endpoint_url=run.cfg.storage.endpoint_url))
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
        "config": run.cfg.to_dict(),
    }
    storage.write_bytes(uri, json.dumps(entry, indent=2).encode(), endpoint_url=run.cfg.storage.endpoint_url)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (PretrainError, config_module.ConfigError) as err:
        print(f"cmacc: error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, config_module.ConfigError) else 1)
