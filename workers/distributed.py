"""The Ray Train worker loop (DESIGN.md sections 5 and 6): DDP training against replicas of the
dictionaries kept by the dictionary actor.

Each step, on every rank: a batch from the rank's `ClipReader`, device transforms seeded by
(seed, rank, step), `train_step` (the same per-step math as the single-process trainer, with
the query encoders in DDP). Then the global batch's keys, queries and clip ids are gathered
(`all_gather`) and rank 0 sends them to the actor without waiting.

Replicas follow the actor on a fixed schedule: before step s every rank applies the deltas of
the batches of steps <= s - 1 - `method.max_staleness`. Rank 0 fetches them (waiting only if
the actor has not finished them: staleness is bounded, never silent) and broadcasts them, so
all ranks apply the same deltas at the same step and the replicas stay identical. The fixed
schedule also makes a run independent of timing: a resumed run equals an uninterrupted one.
With `max_staleness = 0` the replicas see every selection before the next step, exactly as
the single-process trainer does.

A checkpoint (every `checkpoint.every_steps` and at the end) holds the encoders, optimiser,
schedule, step, every rank's reader cursor, the replicas, the actor's state and the pending
delta schedule. Randomness needs no saved state: the transforms are seeded per (seed, rank,
step), the actor's sampler state is part of its state, and the reader is a function of
(seed, epoch, rank) plus its cursor.

Test hooks (environment variables, read by the loop; never set in production):
`CMACC_FAULT_NAN_STEP=s` makes the loss non-finite at step s; `CMACC_FAULT_STOP_STEP=s` stops
the run after step s as a preemption would (checkpoint, then stop); `CMACC_FAULT_KILL_WORKER=r:s`
makes rank r SIGKILL itself at step s; `CMACC_FAULT_KILL_ACTOR=s` makes rank 0 SIGKILL the
actor's process at step s. Kill hooks fire once per run (a marker file in
`CMACC_FAULT_MARKER_DIR` remembers it).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from service import config as config_module
from service.config import Config
from workers.actor import DictionaryClient, to_numpy
from workers.data.reader import ClipReader
from workers.data.transforms import AudioTransform, VideoTransform
from workers.dictionary import NegativeDictionary
from workers.metrics import MetricsLog, NullMetricsLog
from workers.trainer import (
    NonFiniteLossError,
    TrainState,
    autocast_dtype,
    build_dictionaries,
    build_train_state,
    train_step,
)

logger = logging.getLogger("cmacc")
PROGRESS_EVERY_S = 0.5  # how often rank 0 tells the actor its step, for the driver's progress bar


@dataclass(kw_only=True)
class RunContext:
    """What a worker needs besides the config: where data and the run folder are."""

    run_id: str
    data_uri: str
    run_uri: str
    actor_name: str  # the dictionary actor this driver created for the run
    endpoint_url: str = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunContext:
        return cls(**raw)


# --- builders -------------------------------------------------------------------------------


def build_device(cfg: Config) -> torch.device:
    if cfg.resources.use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def build_reader(cfg: Config, run: RunContext, *, rank: int, world_size: int, split: str | None) -> ClipReader:
    return ClipReader(
        uri=run.data_uri,
        rank=rank,
        world_size=world_size,
        seed=cfg.train.seed,
        batch_size=cfg.train.batch_size,
        frames=cfg.model.video.frames,
        seconds=cfg.data.clip_seconds,
        sample_rate=cfg.data.sample_rate,
        split=split,
        shuffle_buffer=cfg.data.shuffle_buffer,
        num_decode_threads=cfg.data.num_decode_threads,
        prefetch_batches=cfg.data.prefetch_batches,
        endpoint_url=run.endpoint_url,
    )


@dataclass(kw_only=True)
class Transforms:
    video: VideoTransform
    audio: AudioTransform

    def __call__(self, raw: dict[str, Any], *, device: torch.device, generator: torch.Generator) -> dict[str, Any]:
        """Raw reader batch -> model inputs on `device`."""
        return {
            "video": self.video(raw["frames"].to(device, non_blocking=True), generator=generator),
            "audio": self.audio(raw["audio"].to(device, non_blocking=True), generator=generator),
            "index": raw["index"].to(device),
            "label": raw["label"].to(device),
        }


def build_transforms(cfg: Config, *, device: torch.device, train: bool = True) -> Transforms:
    """The model inputs of `cfg.model`: augmented for training, deterministic for evaluation."""
    video, audio = cfg.model.video, cfg.model.audio
    return Transforms(
        video=VideoTransform(
            frames=video.frames,
            size=video.size,
            train=train,
            scale=(video.crop_scale, 1.0),
            jitter=video.jitter,
            clip_norm=video.clip_norm,
        ).to(device),
        audio=AudioTransform(
            sample_rate=cfg.data.sample_rate,
            n_mels=audio.n_mels,
            hop_ms=audio.hop_ms,
            train=train,
            clip_norm=audio.clip_norm,
        ).to(device),
    )


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The augmentation generator of one rank's step: no state to checkpoint."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) % (2**63))


# --- collectives ----------------------------------------------------------------------------


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows [B, ...] in rank order -> [W x B, ...]."""
    if dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_from_rank0(obj: Any) -> Any:
    """`obj` of rank 0 on every rank (small Python objects and numpy arrays)."""
    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    value = torch.tensor([1 if flag else 0], device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


# --- the replicas and their schedule ----------------------------------------------------------


def apply_delta(dictionary: NegativeDictionary, slots: np.ndarray, keys: np.ndarray, ids: np.ndarray) -> None:
    if len(slots) == 0:
        return
    device = dictionary.keys.device
    # np.array copies: arrays from the object store are read-only, which torch warns about.
    index = torch.as_tensor(np.array(slots), device=device, dtype=torch.long)
    dictionary.keys[index] = torch.as_tensor(np.array(keys), device=device, dtype=dictionary.keys.dtype)
    dictionary.ids[index] = torch.as_tensor(np.array(ids), device=device, dtype=torch.long)
    dictionary.pointer = (int(slots[-1]) + 1) % dictionary.size


@dataclass(kw_only=True)
class Replicas:
    """This rank's copies of D_v and D_a and the version they are at."""

    dictionary_v: NegativeDictionary
    dictionary_a: NegativeDictionary
    version: int = 0

    def apply(self, delta: dict[str, Any]) -> None:
        for modality in "va":
            dictionary = getattr(self, f"dictionary_{modality}")
            apply_delta(dictionary, delta[f"slots_{modality}"], delta[f"keys_{modality}"], delta[f"ids_{modality}"])
        self.version = int(delta["version"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "dictionary_v": self.dictionary_v.state_dict(),
            "dictionary_a": self.dictionary_a.state_dict(),
            "version": self.version,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dictionary_v.load_state_dict(state["dictionary_v"])
        self.dictionary_a.load_state_dict(state["dictionary_a"])
        self.version = int(state["version"])

    def checksum(self) -> float:
        return float(self.dictionary_v.keys.double().sum() + 3 * self.dictionary_a.keys.double().sum())


def build_replicas(cfg: Config, *, device: torch.device) -> Replicas:
    """Replicas initialised exactly as the actor initialises its dictionaries."""
    dictionaries = build_dictionaries(cfg, device=device)
    return Replicas(dictionary_v=dictionaries.dictionary_v, dictionary_a=dictionaries.dictionary_a)


@dataclass(kw_only=True)
class DeltaSchedule:
    """Rank 0's view of the actor: deltas submitted and not yet applied, oldest first.

    Entries are (step, ObjectRef or delta). `due(step)` returns the deltas the replicas must
    apply before `step`, waiting for the actor only when one is late.
    """

    client: DictionaryClient
    max_staleness: int
    incarnation: str = ""
    pending: collections.deque[tuple[int, Any]] = field(default_factory=collections.deque)
    actor_restarts: int = 0
    wait_s: float = 0.0

    def submit(self, step: int, arrays: dict[str, np.ndarray]) -> None:
        self.pending.append((step, self.client.submit(step=step, **arrays)))

    def due(self, step: int, replicas: Replicas, *, drain: bool = False) -> list[dict[str, Any]]:
        import ray

        deltas: list[dict[str, Any]] = []
        while self.pending and (drain or self.pending[0][0] <= step - 1 - self.max_staleness):
            ref = self.pending[0][1]
            started = time.perf_counter()
            try:
                delta = ref if isinstance(ref, dict) else ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                self._recover(replicas, deltas, f"{type(err).__name__}: {err}")
                return deltas
            finally:
                self.wait_s += time.perf_counter() - started
            if delta["incarnation"] != self.incarnation:  # Ray restarted it: its state is blank
                self._recover(replicas, deltas, "restarted by Ray")
                return deltas
            self.pending.popleft()
            deltas.append(delta)
        return deltas

    def actor_state(self, replicas: Replicas) -> dict[str, Any]:
        """The actor's state for a checkpoint, re-seeding it first if Ray restarted it."""
        import ray

        for _ in range(3):
            try:
                state = self.client.call("state_dict")
            except ray.exceptions.RayActorError as err:
                self._recover(replicas, [], f"{type(err).__name__}: {err}")
                continue
            if state["incarnation"] == self.incarnation:
                return state
            self._recover(replicas, [], "restarted by Ray")
        raise RuntimeError("the dictionary actor keeps failing; giving up on this attempt")

    def _recover(self, replicas: Replicas, applied_now: list[dict[str, Any]], reason: str) -> None:
        """The actor died: wait for Ray to restart it, re-seed it from this replica (plus the
        deltas about to be applied) and drop the selections it lost."""
        logger.warning("dictionary actor failed (%s); waiting for Ray to restart it", reason)
        status = self.client.call("status")
        seed = Replicas(
            dictionary_v=_clone_dictionary(replicas.dictionary_v),
            dictionary_a=_clone_dictionary(replicas.dictionary_a),
            version=replicas.version,
        )
        for delta in applied_now:
            seed.apply(delta)
        # Submits queued before this call run first on the new actor; their deltas are dropped.
        self.client.call(
            "reseed",
            dictionary_v=to_numpy(seed.dictionary_v.state_dict()),
            dictionary_a=to_numpy(seed.dictionary_a.state_dict()),
            version=seed.version,
        )
        self.incarnation = status["incarnation"]
        self.pending.clear()
        self.actor_restarts += 1
        logger.warning("dictionary actor restarted and re-seeded at version %d", seed.version)

    def pending_steps(self) -> list[int]:
        return [step for step, _ in self.pending]


def _clone_dictionary(dictionary: NegativeDictionary) -> NegativeDictionary:
    clone = NegativeDictionary(size=dictionary.size, dim=dictionary.dim, device=dictionary.keys.device)
    clone.load_state_dict(dictionary.state_dict())
    return clone


# --- checkpoints ----------------------------------------------------------------------------

TRAIN_FILE = "train.pt"
ACTOR_FILE = "actor.pt"
META_FILE = "meta.json"


def reader_file(rank: int) -> str:
    return f"reader-{rank:05d}.json"


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def save_checkpoint(
    *,
    cfg: Config,
    run: RunContext,
    state: TrainState,
    reader: ClipReader,
    replicas: Replicas,
    schedule: DeltaSchedule | None,
    clip_labels: np.ndarray | None,
    metrics: dict[str, float],
) -> None:
    """Write this rank's part of a checkpoint to a fresh folder and report it (async upload)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    folder = tempfile.mkdtemp(prefix="cmacc-ckpt-")
    with open(os.path.join(folder, reader_file(rank)), "w") as f:
        json.dump(reader.state_dict(), f)
    if schedule is not None:  # rank 0 writes the shared state
        # First: re-seeding a restarted actor may drop pending deltas, which changes the rest.
        torch.save(schedule.actor_state(replicas), os.path.join(folder, ACTOR_FILE))
        train_state = {**state.state_dict(), "query": _unwrap(state.query).state_dict()}  # no DDP prefix
        torch.save(
            {
                "train": train_state,
                "replicas": replicas.state_dict(),
                "pending_steps": schedule.pending_steps(),
                "clip_labels": clip_labels,
            },
            os.path.join(folder, TRAIN_FILE),
        )
        meta = {
            "step": state.step,
            "run_id": run.run_id,
            "world_size": ray.train.get_context().get_world_size(),
            "sampler": cfg.method.sampler,
            "time": time.time(),
            "config": cfg.to_dict(),  # makes the checkpoint self-describing for `cmacc eval`
        }
        with open(os.path.join(folder, META_FILE), "w") as f:
            json.dump(meta, f)
    ray.train.report(
        {"step": state.step, **metrics},
        checkpoint=ray.train.Checkpoint.from_directory(folder),
        checkpoint_dir_name=f"checkpoint-{state.step:08d}",
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
    )


@dataclass(kw_only=True)
class Restored:
    train: dict[str, Any]
    replicas: dict[str, Any]
    pending_steps: list[int]
    clip_labels: np.ndarray | None
    actor: dict[str, Any]
    readers: list[dict[str, Any]]


def load_checkpoint(checkpoint: Any) -> Restored:
    """Download a checkpoint into a folder of this process's own and read it.

    A private folder, not `as_directory()`: ranks on one node would otherwise share a
    download folder, and one rank can read a file another is still writing.
    """
    folder = tempfile.mkdtemp(prefix="cmacc-restore-")
    try:
        checkpoint.to_directory(folder)
        saved = torch.load(os.path.join(folder, TRAIN_FILE), map_location="cpu", weights_only=False)
        actor = torch.load(os.path.join(folder, ACTOR_FILE), map_location="cpu", weights_only=False)
        names = sorted(name for name in os.listdir(folder) if name.startswith("reader-"))
        readers = []
        for name in names:
            with open(os.path.join(folder, name)) as f:
                readers.append(json.load(f))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return Restored(
        train=saved["train"],
        replicas=saved["replicas"],
        pending_steps=saved["pending_steps"],
        clip_labels=saved["clip_labels"],
        actor=actor,
        readers=readers,
    )


# --- metrics of the dictionaries ------------------------------------------------------------


def label_entropy(labels: np.ndarray) -> float:
    """Entropy (nats) of the label distribution of the dictionary keys whose label is known."""
    known = labels[labels >= 0]
    if known.size == 0:
        return float("nan")
    p = np.bincount(known) / known.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def same_label_fraction(query_labels: np.ndarray, dictionary_labels: np.ndarray) -> float:
    """Mean over labelled queries of the fraction of known-label negatives sharing its label."""
    known = dictionary_labels[dictionary_labels >= 0]
    queries = query_labels[query_labels >= 0]
    if known.size == 0 or queries.size == 0:
        return float("nan")
    counts = np.bincount(known, minlength=int(max(known.max(), queries.max())) + 1)
    return float((counts[queries] / known.size).mean())


# --- fault-injection hooks ------------------------------------------------------------------


def _fire_once(name: str) -> bool:
    """True the first time a kill hook fires in this run (a marker file remembers it)."""
    marker_dir = os.environ.get("CMACC_FAULT_MARKER_DIR", tempfile.gettempdir())
    marker = os.path.join(marker_dir, f"cmacc-fault-{name}")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _fault_hooks(step: int, rank: int, client: DictionaryClient | None) -> None:
    kill_worker = os.environ.get("CMACC_FAULT_KILL_WORKER")
    if kill_worker:
        target_rank, target_step = (int(x) for x in kill_worker.split(":"))
        if (rank, step) == (target_rank, target_step) and _fire_once(f"worker-{target_rank}-{target_step}"):
            # Ray Train registers a reported checkpoint when it next polls the workers (every
            # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); a crash before that loses it, so wait that long.
            time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
            os.kill(os.getpid(), signal.SIGKILL)
    kill_actor = os.environ.get("CMACC_FAULT_KILL_ACTOR")
    if kill_actor and client is not None and step == int(kill_actor) and _fire_once(f"actor-{step}"):
        os.kill(client.call("status")["pid"], signal.SIGKILL)


# --- the loop -------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The function every Ray Train worker runs. Returns the outcome (rank 0's reaches the
    driver as `Result.return_value`): `state` (succeeded, stopped or failed), `step`,
    `metrics` of the last step, `error`."""
    import ray.train

    cfg = config_module.from_dict(loop_config["config"])
    run = RunContext.from_dict(loop_config["run"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = build_device(cfg)
    torch.set_num_threads(max(1, cfg.resources.cpus_per_worker))

    reader = build_reader(cfg, run, rank=rank, world_size=world_size, split=loop_config.get("split"))
    transforms = build_transforms(cfg, device=device)
    state = build_train_state(cfg, device=device)
    replicas = build_replicas(cfg, device=device)
    client = DictionaryClient.connect(run.actor_name) if rank == 0 else None
    schedule = DeltaSchedule(client=client, max_staleness=cfg.method.max_staleness) if client else None
    clip_labels = np.full(reader.manifest.num_clips, -1, dtype=np.int64) if rank == 0 else None

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        restored = load_checkpoint(checkpoint)
        state.load_state_dict(restored.train)
        replicas.load_state_dict(restored.replicas)
        reader.load_state_dict(restored.readers)
        if schedule is not None:
            schedule.client.call("load_state_dict", restored.actor)
            behind = {d["step"]: d for d in schedule.client.call("deltas_after", replicas.version)}
            schedule.pending.extend((step, behind[step]) for step in restored.pending_steps if step in behind)
            clip_labels = restored.clip_labels
    elif schedule is not None:
        schedule.client.call("reset")
    if world_size > 1:
        state.query = torch.nn.parallel.DistributedDataParallel(
            state.query, device_ids=[device.index] if device.type == "cuda" else None
        )

    if schedule is not None:
        schedule.incarnation = schedule.client.call("status")["incarnation"]
    log = MetricsLog(run_uri=run.run_uri, endpoint_url=run.endpoint_url) if rank == 0 else NullMetricsLog()
    try:
        return _train(cfg, run, state, reader, transforms, replicas, schedule, clip_labels, log, device)
    finally:
        reader.close()
        log.close()


def _train(
    cfg: Config,
    run: RunContext,
    state: TrainState,
    reader: ClipReader,
    transforms: Transforms,
    replicas: Replicas,
    schedule: DeltaSchedule | None,
    clip_labels: np.ndarray | None,
    log: NullMetricsLog,
    device: torch.device,
) -> dict[str, Any]:
    """Steps until `train.steps`, a stop request or a non-finite loss; returns the outcome."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    total = cfg.train.steps
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    nan_step = int(os.environ.get("CMACC_FAULT_NAN_STEP", "-1"))
    stop_step = int(os.environ.get("CMACC_FAULT_STOP_STEP", "-1"))
    batches = iter(reader)
    start_step = state.step
    state.query.train()
    state.key.train()
    last_log = last_progress = time.perf_counter()
    metrics: dict[str, float] = {}
    stop = False
    while state.step < total and not stop:
        step = state.step
        _fault_hooks(step, rank, schedule.client if schedule else None)
        started = time.perf_counter()
        raw = next(batches)
        batch = transforms(raw, device=device, generator=step_generator(cfg.train.seed, rank, step))
        loaded = time.perf_counter()
        if step == nan_step:
            batch["video"] = batch["video"] * float("nan")
        try:
            out = train_step(
                state,
                batch,
                dictionary_v=replicas.dictionary_v,
                dictionary_a=replicas.dictionary_a,
                method=cfg.method,
                grad_clip=cfg.optim.grad_clip,
                amp_dtype=amp_dtype,
                all_finite=lambda ok: all_ranks_true(ok, device),
            )
        except NonFiniteLossError as err:
            message = f"{err}; the last good checkpoint is kept"
            print(f"cmacc: error: {message}", flush=True)
            return {"state": "failed", "step": step, "metrics": metrics, "error": message}
        gathered = {name: gather_rows(getattr(out, name)) for name in ("queries_v", "queries_a", "keys_v", "keys_a")}
        clip_ids = gather_rows(batch["index"])
        labels = gather_rows(batch["label"])

        control: dict[str, Any] = {"deltas": [], "stop": False}
        if schedule is not None:
            arrays = {name: value.cpu().numpy() for name, value in gathered.items()}
            arrays["clip_ids"] = clip_ids.cpu().numpy()
            clip_labels[arrays["clip_ids"]] = labels.cpu().numpy()
            schedule.submit(step, arrays)
            final = state.step >= total
            control["deltas"] = schedule.due(state.step, replicas, drain=final)
            control["stop"] = any(d["stop_requested"] for d in control["deltas"])
        control = broadcast_from_rank0(control)
        for delta in control["deltas"]:
            replicas.apply(delta)
        stop = control["stop"] or state.step == stop_step or _preempted(state.step, cfg.train.log_every)
        finished = time.perf_counter()

        metrics = {
            "train/loss": out.losses["loss"],
            "train/loss_va": out.losses["loss_va"],
            "train/loss_av": out.losses["loss_av"],
            "train/lr": out.lr,
            "train/clips_per_s": clip_ids.shape[0] / (finished - loaded),
            "data/wait_s": loaded - started,
            "data/skipped": float(reader.num_skipped),
            # the global batch's clip ids, condensed: resumed and uninterrupted runs must agree
            "data/batch_digest": float(zlib.crc32(clip_ids.cpu().numpy().tobytes())),
        }
        if schedule is not None:
            select_ms = [d["select_ms"] for d in control["deltas"]]
            metrics.update(
                {
                    "dict/select_ms": float(np.mean(select_ms)) if select_ms else float("nan"),
                    "dict/staleness": float(len(schedule.pending)),
                    "dict/version": float(replicas.version),
                    "dict/wait_s": schedule.wait_s,
                    "dict/actor_restarts": float(schedule.actor_restarts),
                    "dict/label_entropy_v": label_entropy(clip_labels[_known(replicas.dictionary_v)]),
                    "dict/label_entropy_a": label_entropy(clip_labels[_known(replicas.dictionary_a)]),
                    "dict/same_label_frac_a": same_label_fraction(
                        labels.cpu().numpy(), clip_labels[_known(replicas.dictionary_a)]
                    ),
                    "dict/same_label_frac_v": same_label_fraction(
                        labels.cpu().numpy(), clip_labels[_known(replicas.dictionary_v)]
                    ),
                }
            )
        if step == start_step:  # marks where each attempt began: the steps a failure cost
            metrics["run/start_step"] = float(start_step)
        at_end = state.step >= total or stop
        if at_end:
            metrics.update(_final_checks(replicas, schedule, device))
            if stop:
                metrics["stopped"] = 1.0
        log.log(state.step, metrics)
        if schedule is not None and (at_end or time.perf_counter() - last_progress >= PROGRESS_EVERY_S):
            schedule.client.report_progress(
                {
                    "step": state.step,
                    "total": total,
                    "loss": metrics["train/loss"],
                    "clips_per_s": metrics["train/clips_per_s"],
                }
            )
            last_progress = time.perf_counter()
        if rank == 0 and (state.step % cfg.train.log_every == 0 or state.step == total or stop):
            rate = cfg.train.log_every if state.step % cfg.train.log_every == 0 else 1
            print(_progress_line(state.step, total, metrics, rate / max(time.perf_counter() - last_log, 1e-9)))
            last_log = time.perf_counter()
        if at_end or state.step % cfg.checkpoint.every_steps == 0:
            log.sync()
            save_checkpoint(
                cfg=cfg,
                run=run,
                state=state,
                reader=reader,
                replicas=replicas,
                schedule=schedule,
                clip_labels=clip_labels,
                metrics=metrics,
            )
    return {"state": "stopped" if stop else "succeeded", "step": state.step, "metrics": metrics, "error": ""}


def _preempted(step: int, every: int) -> bool:
    """A preemption notice for any worker's node; asked every `every` steps by all ranks,
    because Ray Train answers it with a barrier over the worker group."""
    import ray.train

    return step % every == 0 and ray.train.get_preemption_info() is not None


def _known(dictionary: NegativeDictionary) -> np.ndarray:
    ids = dictionary.ids.cpu().numpy()
    return ids[ids >= 0]


def _final_checks(replicas: Replicas, schedule: DeltaSchedule | None, device: torch.device) -> dict[str, float]:
    """At the end: are all replicas identical to each other and to the actor, at its version?"""
    mine = torch.tensor([replicas.checksum(), float(replicas.version)], device=device, dtype=torch.float64)
    everyone = gather_rows(mine[None])  # W x 2
    result = {
        "dict/replicas_agree": float(bool((everyone == everyone[0]).all())),
        "cluster/num_nodes": float(_num_nodes()),
    }
    if schedule is not None:
        actor = schedule.actor_state(replicas)
        actor_v = torch.as_tensor(
            actor["dictionaries"]["dictionary_v"]["keys"], device=replicas.dictionary_v.keys.device
        )
        actor_a = torch.as_tensor(
            actor["dictionaries"]["dictionary_a"]["keys"], device=replicas.dictionary_a.keys.device
        )
        same = (
            actor["version"] == replicas.version
            and torch.equal(actor_v, replicas.dictionary_v.keys)
            and torch.equal(actor_a, replicas.dictionary_a.keys)
        )
        result["dict/replicas_match_actor"] = float(same)
        result["dict/actor_version"] = float(actor["version"])
    return result


def _num_nodes() -> int:
    """Distinct Ray nodes the workers of this run are on."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    if dist.get_world_size() == 1:
        return 1
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, node_id)
    return len(set(everyone))


def _progress_line(step: int, total: int, metrics: dict[str, float], steps_per_s: float) -> str:
    eta = (total - step) / steps_per_s if steps_per_s > 0 else math.inf
    parts = [
        f"step {step}/{total}",
        f"loss {metrics['train/loss']:.4f}",
        f"clips/s {metrics['train/clips_per_s']:.1f}",
    ]
    if "dict/select_ms" in metrics and math.isfinite(metrics["dict/select_ms"]):
        parts.append(f"select {metrics['dict/select_ms']:.1f} ms")
    if "dict/staleness" in metrics:
        parts.append(f"stale {metrics['dict/staleness']:.0f}")
    parts.append(f"eta {eta:.0f} s")
    return "  ".join(parts)
