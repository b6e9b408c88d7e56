"""Typed run configuration: keyword-only dataclasses, TOML recipes and `--set a.b=v` overrides.

A run is described by one `Config`. Recipes are TOML files in `jobs/recipes/`; anything a
recipe leaves out takes the defaults below. Every user mistake raises `ConfigError`, whose
message starts with the dotted name of the offending field (`optim.lr: ...`); the generic
building and coercion is `service.typed_settings`.

This module is imported by the CLI, so it must never import torch or ray.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from service import typed_settings
from service.storage import DEFAULT_RETRY_BUDGET_S
from service.typed_settings import ConfigError, require

__all__ = ["Config", "ConfigError", "field_names", "from_dict", "load_recipe", "parse_overrides", "recipe_names"]


Sampler = Literal["active", "uncertainty", "diversity", "random", "moco", "active-dict", "active-aware", "hardness"]
VideoArch = Literal["r3d_18", "r2plus1d_18"]
AudioArch = Literal["resnet18"]
Precision = Literal["auto", "fp32", "bf16"]
PoolKind = Literal["stream", "fresh"]
Seeding = Literal["exact", "parallel"]  # k-means++ seeding of the samplers that seed (workers/sampler.py)
TRACKERS = ("tensorboard", "mlflow", "wandb")


@dataclass(kw_only=True)
class DataConfig:
    """Where clips come from and how they are read."""

    uri: str = ""  # clip-shard folder URI; "" = generate the default synthetic set
    num_clips: int = 1024  # size of the generated default set
    num_classes: int = 8  # classes of the generated default set
    frames: int = 8  # frames stored per clip in the generated default set
    size: int = 64  # stored frame height and width of the generated default set
    clip_seconds: float = 1.0  # clip length (video and audio window)
    sample_rate: int = 16000  # audio sample rate, Hz
    shuffle_buffer: int = 256  # rows held by the reader's shuffle buffer
    num_decode_threads: int = 2  # background decode threads per reader
    prefetch_batches: int = 2  # decoded batches kept ready per reader
    exclude_clips: str = ""  # comma-separated clip ids the training reader skips (counted in data/skipped)
    # The fresh pool's extra clips are a uniform draw from the whole set, so their reads
    # scatter over every shard: the shards kept in memory for them, per rank (MiB).
    extra_cache_mb: float = 1024.0
    # Where JPEG frames are decoded: on the reader's CPU threads, or in one batched call on the
    # training device (workers.data.decode); auto = the device on CUDA, the CPU elsewhere.
    decode: Literal["auto", "cpu", "device"] = "auto"

    def __post_init__(self) -> None:
        require(self.num_clips > 0, "num_clips", f"must be > 0, got {self.num_clips}")
        require(self.num_classes > 0, "num_classes", f"must be > 0, got {self.num_classes}")
        require(self.frames > 0, "frames", f"must be > 0, got {self.frames}")
        require(self.size >= 8, "size", f"must be >= 8 pixels, got {self.size}")
        require(self.clip_seconds > 0, "clip_seconds", f"must be > 0, got {self.clip_seconds}")
        require(self.sample_rate >= 1000, "sample_rate", f"must be >= 1000 Hz, got {self.sample_rate}")
        require(self.shuffle_buffer >= 1, "shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        require(self.num_decode_threads >= 1, "num_decode_threads", f"must be >= 1, got {self.num_decode_threads}")
        require(self.prefetch_batches >= 1, "prefetch_batches", f"must be >= 1, got {self.prefetch_batches}")
        require(self.extra_cache_mb > 0, "extra_cache_mb", f"must be > 0 MiB, got {self.extra_cache_mb:g}")


@dataclass(kw_only=True)
class VideoModelConfig:
    """The video query/key encoder and its input clip."""

    arch: VideoArch = "r3d_18"
    width: float = 1.0  # channel width multiplier (1.0 = torchvision's 64..512)
    frames: int = 16  # frames per training clip
    size: int = 112  # crop height and width, pixels
    clip_norm: bool = False  # subtract each clip's mean colour (see workers.data.transforms)
    crop_scale: float = 0.4  # smallest area fraction of the random training crop
    jitter: float = 0.4  # colour jitter strength of training clips (0 = none)

    def __post_init__(self) -> None:
        require(0 < self.width <= 4, "width", f"must be in (0, 4], got {self.width}")
        require(self.frames >= 1, "frames", f"must be >= 1, got {self.frames}")
        require(self.size >= 16, "size", f"must be >= 16 pixels, got {self.size}")
        require(0 < self.crop_scale <= 1, "crop_scale", f"must be in (0, 1], got {self.crop_scale}")
        require(0 <= self.jitter < 1, "jitter", f"must be in [0, 1), got {self.jitter}")


@dataclass(kw_only=True)
class AudioModelConfig:
    """The audio query/key encoder and its log-mel input."""

    arch: AudioArch = "resnet18"
    width: float = 1.0
    n_mels: int = 80  # mel bins
    hop_ms: float = 10.0  # hop between log-mel frames, milliseconds
    clip_norm: bool = False  # standardise each clip's log-mel (see workers.data.transforms)

    def __post_init__(self) -> None:
        require(0 < self.width <= 4, "width", f"must be in (0, 4], got {self.width}")
        require(self.n_mels >= 8, "n_mels", f"must be >= 8, got {self.n_mels}")
        require(self.hop_ms > 0, "hop_ms", f"must be > 0, got {self.hop_ms}")


@dataclass(kw_only=True)
class ModelConfig:
    video: VideoModelConfig = field(default_factory=VideoModelConfig)
    audio: AudioModelConfig = field(default_factory=AudioModelConfig)
    embed_dim: int = 128  # d: output size of the MLP heads
    head_hidden: int = 512  # hidden width of the 2-layer MLP heads
    head_norm: Literal["none", "batch"] = "none"  # BatchNorm in the heads keeps embeddings from collapsing

    def __post_init__(self) -> None:
        require(self.embed_dim >= 2, "embed_dim", f"must be >= 2, got {self.embed_dim}")
        require(self.head_hidden >= 1, "head_hidden", f"must be >= 1, got {self.head_hidden}")


@dataclass(kw_only=True)
class MethodConfig:
    """CM-ACC itself: dictionaries, candidate pools and the sampler (docs/architecture.md, "The method")."""

    sampler: Sampler = "active"
    pool: PoolKind = "stream"  # fresh: the batch + extra clips drawn each step; stream: recent arrivals not entered
    dictionary_size: int = 16384  # K keys per modality
    pool_size: int = 0  # N candidates per modality; 0 = 2M (fresh; M for moco without shadows) or 4M (stream)
    enqueue: int = 0  # P keys a pool sampler enqueues per step; 0 = M (fresh) or enqueue_fraction x M (stream)
    enqueue_fraction: float = 0.25  # P as a fraction of the global batch M, stream pool with enqueue = 0
    shadow_samplers: str = ""  # comma-separated samplers fed the same candidates into shadow dictionaries
    seeding: Seeding = "parallel"  # exact: one pick after another; parallel: D^2 picks in 17 rounds
    pseudo_classes: int = 0  # queries used as pseudo-classes; 0 = min(global batch, 256)
    temperature: float = 0.07  # tau
    momentum: float = 0.999  # EMA momentum of the key encoders
    max_staleness: int = 2  # dictionary versions a replica may lag before rank 0 waits
    in_batch_negatives: bool = False  # also use the other clips of the batch as negatives

    def __post_init__(self) -> None:
        require(self.dictionary_size >= 1, "dictionary_size", f"must be >= 1, got {self.dictionary_size}")
        require(self.pool_size >= 0, "pool_size", f"must be >= 0, got {self.pool_size}")
        require(self.enqueue >= 0, "enqueue", f"must be >= 0, got {self.enqueue}")
        require(0 < self.enqueue_fraction <= 1, "enqueue_fraction", f"must be in (0, 1], got {self.enqueue_fraction}")
        require(self.pseudo_classes >= 0, "pseudo_classes", f"must be >= 0, got {self.pseudo_classes}")
        require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.max_staleness >= 0, "max_staleness", f"must be >= 0, got {self.max_staleness}")
        names = self.shadows()
        known = typing.get_args(Sampler)
        # A shadow is a sampler name, or `sampler:seeding` to compare seedings in one run.
        unknown = [name for name in names if name.partition(":")[0] not in known]
        require(
            not unknown,
            "shadow_samplers",
            f"unknown sampler {', '.join(map(repr, unknown))} (known: {', '.join(known)})",
        )
        seedings = typing.get_args(Seeding)
        bad = [name for name in names if ":" in name and name.partition(":")[2] not in seedings]
        require(
            not bad,
            "shadow_samplers",
            f"unknown seeding in {', '.join(map(repr, bad))} (sampler:seeding with {', '.join(seedings)})",
        )
        require(len(set(names)) == len(names), "shadow_samplers", f"names a sampler twice: {self.shadow_samplers!r}")

    def shadows(self) -> tuple[str, ...]:
        """The shadow samplers, in the order given."""
        return tuple(name.strip() for name in self.shadow_samplers.split(",") if name.strip())


@dataclass(kw_only=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4
    warmup_steps: int = 0  # linear warm-up; a run shorter than this warms up throughout
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    fused: bool = True  # torch's fused optimiser kernels (CPU and CUDA); a non-finite step is skipped on the device

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000  # optimiser steps in the whole run
    global_batch_size: int = 0  # M: clips per step over all workers; 0 = batch_size x resources.num_workers
    batch_size: int = 128  # clips per worker per step, when global_batch_size = 0 (a fixed worker count)
    seed: int = 0
    log_every: int = 10  # steps between printed progress lines
    precision: Precision = "auto"  # auto = bf16 autocast on CUDA, float32 on CPU
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the encoders; auto = on CUDA only
    channels_last: bool = True  # NDHWC clips and weights on CUDA (cuDNN's fastest 3D convolutions)
    trackers: tuple[str, ...] = ("tensorboard",)  # where metrics go besides metrics.jsonl: tensorboard, mlflow, wandb
    tracker_project: str = "cmacc"  # the MLflow experiment and the W&B project of the run

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.batch_size >= 2, "batch_size", f"must be >= 2, got {self.batch_size}")
        require(self.global_batch_size >= 0, "global_batch_size", f"must be >= 0, got {self.global_batch_size}")
        unknown = [name for name in self.trackers if name not in TRACKERS]
        require(
            not unknown, "trackers", f"unknown tracker {', '.join(map(repr, unknown))} (known: {', '.join(TRACKERS)})"
        )
        require(bool(self.tracker_project.strip()), "tracker_project", "must not be empty")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 500  # steps between checkpoints (one is always written at the end)
    num_to_keep: int = 2

    def __post_init__(self) -> None:
        require(self.every_steps >= 1, "every_steps", f"must be >= 1, got {self.every_steps}")
        require(self.num_to_keep >= 1, "num_to_keep", f"must be >= 1, got {self.num_to_keep}")


@dataclass(kw_only=True)
class ResourcesConfig:
    num_workers: int = 1  # Ray Train workers (one per GPU on a GPU cluster), when the group is not elastic
    min_workers: int = 0  # elastic group: at least this many workers (0 with max_workers 0: not elastic)
    max_workers: int = 0  # elastic group: at most this many; 0 = a fixed group of num_workers
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # only used when use_gpu
    cpus_per_worker: int = 1  # for decode threads and the data pipeline
    actor_gpus: float = 0.0  # GPU fraction for the dictionary actor's selection
    max_failures: int = 3  # worker-group restarts Ray Train may do before giving up
    max_actor_restarts: int = 3  # restarts of the dictionary actor in a run before the run fails
    actor_timeout_s: float = 300.0  # an actor call not answered in this long: the actor is restarted
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # workers over nodes
    resize_check_s: float = 60.0  # elastic group: how often Ray Train considers growing it, seconds

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        if self.max_workers or self.min_workers:
            require(self.min_workers >= 1, "min_workers", f"must be >= 1 for an elastic group, got {self.min_workers}")
            require(
                self.max_workers >= self.min_workers,
                "max_workers",
                f"must be >= resources.min_workers ({self.min_workers}), got {self.max_workers}",
            )
            require(
                not self.use_gpu or self.actor_gpus == 0 or self.gpus_per_worker + self.actor_gpus <= 1,
                "actor_gpus",
                f"an elastic group grows into every GPU it can get, so the actor's share must fit beside a "
                f"worker's on one GPU (gpus_per_worker {self.gpus_per_worker:g} + actor_gpus {self.actor_gpus:g} "
                "<= 1) or be 0 (the actor selects on the CPU)",
            )
        require(self.gpus_per_worker > 0, "gpus_per_worker", f"must be > 0, got {self.gpus_per_worker}")
        require(self.cpus_per_worker >= 1, "cpus_per_worker", f"must be >= 1, got {self.cpus_per_worker}")
        require(0 <= self.actor_gpus <= 1, "actor_gpus", f"must be in [0, 1], got {self.actor_gpus}")
        require(
            0 <= self.max_failures <= 100,
            "max_failures",
            f"must be in [0, 100], got {self.max_failures} (no longer unlimited: a clip or bug that kills a "
            "worker every time would be retried forever)",
        )
        require(
            0 <= self.max_actor_restarts <= 100,
            "max_actor_restarts",
            f"must be in [0, 100], got {self.max_actor_restarts}",
        )
        require(self.actor_timeout_s > 0, "actor_timeout_s", f"must be > 0, got {self.actor_timeout_s}")
        require(self.resize_check_s >= 0, "resize_check_s", f"must be >= 0, got {self.resize_check_s}")

    @property
    def elastic(self) -> bool:
        return self.max_workers > 0

    @property
    def world_sizes(self) -> tuple[int, ...]:
        """Every worker count the run may train on: the elastic range, or the fixed count."""
        if self.elastic:
            return tuple(range(self.min_workers, self.max_workers + 1))
        return (self.num_workers,)


@dataclass(kw_only=True)
class StorageConfig:
    root: str = "./runs"  # URI under which run folders live
    endpoint_url: str = ""  # S3 endpoint; "" = AWS_ENDPOINT_URL_S3 or the AWS default
    lease_ttl_s: float = 120.0  # a run's lease lapses this long after its job's last heartbeat
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S  # how long one storage operation retries transient errors

    def __post_init__(self) -> None:
        require(self.lease_ttl_s >= 5, "lease_ttl_s", f"must be >= 5 seconds, got {self.lease_ttl_s}")
        require(
            0 <= self.retry_budget_s <= 3600, "retry_budget_s", f"must be in [0, 3600] s, got {self.retry_budget_s}"
        )


@dataclass(kw_only=True)
class EvalConfig:
    after_training: bool = True  # evaluate the final checkpoint on the held-out split
    knn_k: int = 20
    linear_epochs: int = 100  # full-batch epochs of the linear probe
    linear_lr: float = 0.1
    linear_weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        require(self.knn_k >= 1, "knn_k", f"must be >= 1, got {self.knn_k}")
        require(self.linear_epochs >= 1, "linear_epochs", f"must be >= 1, got {self.linear_epochs}")
        require(self.linear_lr > 0, "linear_lr", f"must be > 0, got {self.linear_lr}")


@dataclass(kw_only=True)
class Config:
    """Everything a run needs. `recipe` is the name of the recipe it came from."""

    recipe: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        res, method = self.resources, self.method
        if res.elastic:
            require(
                self.train.global_batch_size > 0,
                "train.global_batch_size",
                f"must be set for an elastic group (resources.min_workers = {res.min_workers}, max_workers = "
                f"{res.max_workers}): the run is defined by its global batch, whatever the number of workers",
            )
        m = self.global_batch_size
        batch = f"the global batch M ({m})"
        indivisible = [w for w in res.world_sizes if m % w or (self.num_extra_clips % w)]
        sizes = ", ".join(map(str, res.world_sizes))
        require(
            not indivisible,
            "train.global_batch_size",
            f"M = {m} (and the fresh pool's E = {self.num_extra_clips} extra clips) must divide by every "
            f"allowed number of workers ({sizes}); {', '.join(map(str, indivisible))} do not",
        )
        require(
            min(m // w for w in res.world_sizes) >= 2,
            "train.global_batch_size",
            f"M = {m} leaves fewer than 2 clips per worker with {max(res.world_sizes)} workers",
        )
        require(
            method.pseudo_classes <= m,
            "method.pseudo_classes",
            f"must be <= {batch}, got {method.pseudo_classes}",
        )
        if method.pool == "stream":
            require(
                method.enqueue <= m,
                "method.enqueue",
                f"must be <= {batch} with the stream pool: at most M keys arrive per step; got {method.enqueue}",
            )
        require(
            method.pool_size == 0 or method.pool_size >= m,
            "method.pool_size",
            f"must be 0 (the default) or >= {batch}: the {method.pool} pool holds at least the batch; "
            f"got {method.pool_size}",
        )
        require(
            method.enqueue <= self.pool_capacity,
            "method.enqueue",
            f"must be <= the pool size N ({self.pool_capacity}), got {method.enqueue}",
        )
        require(
            method.sampler == "moco" or self.enqueue_per_step <= method.dictionary_size,
            "method.enqueue",
            f"must be <= method.dictionary_size ({method.dictionary_size}): more picks per step than "
            f"the dictionary holds would push out the best of them; got P = {self.enqueue_per_step}",
        )

    @property
    def global_batch_size(self) -> int:
        """M: clips per step over all workers, whatever their number."""
        return self.train.global_batch_size or self.train.batch_size * self.resources.num_workers

    def rank_batch_size(self, world_size: int) -> int:
        """Clips per step of each of `world_size` workers (M / W; validation made it whole)."""
        return self.global_batch_size // world_size

    @property
    def shadow_samplers(self) -> tuple[str, ...]:
        return self.method.shadows()

    @property
    def enqueue_per_step(self) -> int:
        """P: keys that enter each dictionary per step (M for `moco`, which enqueues its batch)."""
        m, method = self.global_batch_size, self.method
        if method.sampler == "moco":
            return m
        if method.pool == "fresh":
            return method.enqueue or m
        return method.enqueue or max(1, int(m * method.enqueue_fraction))

    @property
    def pool_capacity(self) -> int:
        """N: the candidates of a modality. Fresh: the batch and N - M extra clips, 2M by default
        (M for `moco` without shadows: it reads no extra clips). Stream: the most recent N
        arrivals, 4M by default (those already taken stay in their slots but cannot be picked
        again)."""
        m, method = self.global_batch_size, self.method
        if method.pool_size:
            return method.pool_size
        if method.pool == "fresh":
            return m if method.sampler == "moco" and not method.shadows() else 2 * m
        return 4 * m

    @property
    def num_extra_clips(self) -> int:
        """E: clips the fresh pool reads per step besides the batch (0 for the stream pool)."""
        return self.pool_capacity - self.global_batch_size if self.method.pool == "fresh" else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- building a Config from mappings ------------------------------------------------------


def field_names(cls: type = Config, prefix: str = "") -> list[str]:
    """Every settable dotted field name under `cls` (default: the whole Config), e.g. `optim.lr`."""
    return typed_settings.field_names(cls, prefix)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `["optim.lr=0.1", "method.sampler=random"]` into a nested mapping of strings."""
    return typed_settings.parse_overrides(Config, overrides)


def from_dict(mapping: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from a nested mapping plus `--set` overrides."""
    return typed_settings.build(Config, typed_settings.merge(mapping, parse_overrides(overrides or [])))


# --- recipes --------------------------------------------------------------------------------


def recipe_names() -> list[str]:
    folder = resources.files("jobs") / "recipes"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("", f"{path} is not valid TOML: {err}") from None


def load_file(path: str | Path, overrides: list[str] | None = None) -> Config:
    mapping = read_toml(path)
    mapping.setdefault("recipe", Path(path).stem)
    return from_dict(mapping, overrides)


def load_recipe(name: str, overrides: list[str] | None = None) -> Config:
    """Load a named recipe from `jobs/recipes/` (or a path to a TOML file) with overrides."""
    if name.endswith(".toml") or "/" in name:
        return load_file(name, overrides)
    names = recipe_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError("recipe", f"unknown recipe {name!r} (known: {', '.join(names)}){hint}")
    with resources.as_file(resources.files("jobs") / "recipes" / f"{name}.toml") as path:
        return load_file(path, overrides)
