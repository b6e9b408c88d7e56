"""Typed run configuration: keyword-only dataclasses, TOML recipes and `--set a.b=v` overrides.

A run is described by one `Config`. Recipes are TOML files in `jobs/recipes/`; anything a
recipe leaves out takes the defaults below. Every user mistake raises `ConfigError`, whose
message starts with the dotted name of the offending field (`optim.lr: ...`).

This module is imported by the CLI, so it must never import torch or ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from service.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A config value is invalid (exit code 2). `field` is the dotted name of the offending field."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        self.reason = message
        super().__init__(f"{field_name}: {message}" if field_name else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its field name qualified by a section prefix."""
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.reason)


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(field_name, message)


Sampler = Literal["active", "uncertainty", "diversity", "random", "moco"]
VideoArch = Literal["r3d_18", "r2plus1d_18"]
AudioArch = Literal["resnet18"]
Precision = Literal["auto", "fp32", "bf16"]


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

    def __post_init__(self) -> None:
        _require(self.num_clips > 0, "num_clips", f"must be > 0, got {self.num_clips}")
        _require(self.num_classes > 0, "num_classes", f"must be > 0, got {self.num_classes}")
        _require(self.frames > 0, "frames", f"must be > 0, got {self.frames}")
        _require(self.size >= 8, "size", f"must be >= 8 pixels, got {self.size}")
        _require(self.clip_seconds > 0, "clip_seconds", f"must be > 0, got {self.clip_seconds}")
        _require(self.sample_rate >= 1000, "sample_rate", f"must be >= 1000 Hz, got {self.sample_rate}")
        _require(self.shuffle_buffer >= 1, "shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        _require(self.num_decode_threads >= 1, "num_decode_threads", f"must be >= 1, got {self.num_decode_threads}")
        _require(self.prefetch_batches >= 1, "prefetch_batches", f"must be >= 1, got {self.prefetch_batches}")


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
        _require(0 < self.width <= 4, "width", f"must be in (0, 4], got {self.width}")
        _require(self.frames >= 1, "frames", f"must be >= 1, got {self.frames}")
        _require(self.size >= 16, "size", f"must be >= 16 pixels, got {self.size}")
        _require(0 < self.crop_scale <= 1, "crop_scale", f"must be in (0, 1], got {self.crop_scale}")
        _require(0 <= self.jitter < 1, "jitter", f"must be in [0, 1), got {self.jitter}")


@dataclass(kw_only=True)
class AudioModelConfig:
    """The audio query/key encoder and its log-mel input."""

    arch: AudioArch = "resnet18"
    width: float = 1.0
    n_mels: int = 80  # mel bins
    hop_ms: float = 10.0  # hop between log-mel frames, milliseconds
    clip_norm: bool = False  # standardise each clip's log-mel (see workers.data.transforms)

    def __post_init__(self) -> None:
        _require(0 < self.width <= 4, "width", f"must be in (0, 4], got {self.width}")
        _require(self.n_mels >= 8, "n_mels", f"must be >= 8, got {self.n_mels}")
        _require(self.hop_ms > 0, "hop_ms", f"must be > 0, got {self.hop_ms}")


@dataclass(kw_only=True)
class ModelConfig:
    video: VideoModelConfig = field(default_factory=VideoModelConfig)
    audio: AudioModelConfig = field(default_factory=AudioModelConfig)
    embed_dim: int = 128  # d: output size of the MLP heads
    head_hidden: int = 512  # hidden width of the 2-layer MLP heads
    head_norm: Literal["none", "batch"] = "none"  # BatchNorm in the heads keeps embeddings from collapsing

    def __post_init__(self) -> None:
        _require(self.embed_dim >= 2, "embed_dim", f"must be >= 2, got {self.embed_dim}")
        _require(self.head_hidden >= 1, "head_hidden", f"must be >= 1, got {self.head_hidden}")


@dataclass(kw_only=True)
class MethodConfig:
    """CM-ACC itself: dictionaries, candidate pools and the sampler (docs/architecture.md, "The method")."""

    sampler: Sampler = "active"
    dictionary_size: int = 16384  # K keys per modality
    pool_size: int = 0  # N candidates per modality; 0 = 4 x the global batch M
    enqueue: int = 0  # P keys a pool sampler enqueues per step; 0 = enqueue_fraction x M (moco enqueues all M)
    enqueue_fraction: float = 0.25  # P as a fraction of the global batch M, when enqueue = 0
    pseudo_classes: int = 0  # queries used as pseudo-classes; 0 = min(global batch, 256)
    temperature: float = 0.07  # tau
    momentum: float = 0.999  # EMA momentum of the key encoders
    max_staleness: int = 2  # dictionary versions a replica may lag before rank 0 waits
    in_batch_negatives: bool = False  # also use the other clips of the batch as negatives

    def __post_init__(self) -> None:
        _require(self.dictionary_size >= 1, "dictionary_size", f"must be >= 1, got {self.dictionary_size}")
        _require(self.pool_size >= 0, "pool_size", f"must be >= 0, got {self.pool_size}")
        _require(self.enqueue >= 0, "enqueue", f"must be >= 0, got {self.enqueue}")
        _require(0 < self.enqueue_fraction <= 1, "enqueue_fraction", f"must be in (0, 1], got {self.enqueue_fraction}")
        _require(self.pseudo_classes >= 0, "pseudo_classes", f"must be >= 0, got {self.pseudo_classes}")
        _require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        _require(self.max_staleness >= 0, "max_staleness", f"must be >= 0, got {self.max_staleness}")


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
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000  # optimiser steps in the whole run
    batch_size: int = 128  # clips per worker per step
    seed: int = 0
    log_every: int = 10  # steps between printed progress lines
    precision: Precision = "auto"  # auto = bf16 autocast on CUDA, float32 on CPU
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the encoders; auto = on CUDA only
    channels_last: bool = True  # NDHWC clips and weights on CUDA (cuDNN's fastest 3D convolutions)

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _require(self.batch_size >= 2, "batch_size", f"must be >= 2, got {self.batch_size}")
        _require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 500  # steps between checkpoints (one is always written at the end)
    num_to_keep: int = 2

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, "every_steps", f"must be >= 1, got {self.every_steps}")
        _require(self.num_to_keep >= 1, "num_to_keep", f"must be >= 1, got {self.num_to_keep}")


@dataclass(kw_only=True)
class ResourcesConfig:
    num_workers: int = 1  # Ray Train workers (one per GPU on a GPU cluster)
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # only used when use_gpu
    cpus_per_worker: int = 1  # for decode threads and the data pipeline
    actor_gpus: float = 0.0  # GPU fraction for the dictionary actor's selection
    max_failures: int = 3  # worker-group restarts Ray Train may do before giving up
    max_actor_restarts: int = 3  # restarts of the dictionary actor in a run before the run fails
    actor_timeout_s: float = 300.0  # an actor call not answered in this long: the actor is restarted
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # workers over nodes

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        _require(self.gpus_per_worker > 0, "gpus_per_worker", f"must be > 0, got {self.gpus_per_worker}")
        _require(self.cpus_per_worker >= 1, "cpus_per_worker", f"must be >= 1, got {self.cpus_per_worker}")
        _require(0 <= self.actor_gpus <= 1, "actor_gpus", f"must be in [0, 1], got {self.actor_gpus}")
        _require(
            0 <= self.max_failures <= 100,
            "max_failures",
            f"must be in [0, 100], got {self.max_failures} (no longer unlimited: a clip or bug that kills a "
            "worker every time would be retried forever)",
        )
        _require(
            0 <= self.max_actor_restarts <= 100,
            "max_actor_restarts",
            f"must be in [0, 100], got {self.max_actor_restarts}",
        )
        _require(self.actor_timeout_s > 0, "actor_timeout_s", f"must be > 0, got {self.actor_timeout_s}")


@dataclass(kw_only=True)
class StorageConfig:
    root: str = "./runs"  # URI under which run folders live
    endpoint_url: str = ""  # S3 endpoint; "" = AWS_ENDPOINT_URL_S3 or the AWS default
    lease_ttl_s: float = 120.0  # a run's lease lapses this long after its job's last heartbeat
    retry_budget_s: float = 60.0  # how long one storage operation retries transient errors

    def __post_init__(self) -> None:
        _require(self.lease_ttl_s >= 5, "lease_ttl_s", f"must be >= 5 seconds, got {self.lease_ttl_s}")
        _require(
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
        _require(self.knn_k >= 1, "knn_k", f"must be >= 1, got {self.knn_k}")
        _require(self.linear_epochs >= 1, "linear_epochs", f"must be >= 1, got {self.linear_epochs}")
        _require(self.linear_lr > 0, "linear_lr", f"must be > 0, got {self.linear_lr}")


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
        batch = f"the global batch M (train.batch_size x resources.num_workers = {self.global_batch_size})"
        _require(
            self.method.pseudo_classes <= self.global_batch_size,
            "method.pseudo_classes",
            f"must be <= {batch}, got {self.method.pseudo_classes}",
        )
        _require(
            self.method.enqueue <= self.global_batch_size,
            "method.enqueue",
            f"must be <= {batch}: at most M keys arrive per step; got {self.method.enqueue}",
        )
        _require(
            self.method.sampler == "moco" or self.enqueue_per_step <= self.method.dictionary_size,
            "method.enqueue",
            f"must be <= method.dictionary_size ({self.method.dictionary_size}): more picks per step than "
            f"the dictionary holds would push out the best of them; got P = {self.enqueue_per_step}",
        )
        _require(
            self.method.pool_size == 0 or self.method.pool_size >= self.global_batch_size,
            "method.pool_size",
            f"must be 0 (= 4M) or >= {batch}, got {self.method.pool_size}",
        )

    @property
    def global_batch_size(self) -> int:
        """M: clips per step over all workers."""
        return self.train.batch_size * self.resources.num_workers

    @property
    def enqueue_per_step(self) -> int:
        """P: keys that enter each dictionary per step (M for `moco`, which has no pool)."""
        if self.method.sampler == "moco":
            return self.global_batch_size
        return self.method.enqueue or max(1, int(self.global_batch_size * self.method.enqueue_fraction))

    @property
    def pool_capacity(self) -> int:
        """N: the arrivals each pool remembers (the most recent N; those already taken into a
        dictionary stay in their slots but cannot be picked again)."""
        return self.method.pool_size or 4 * self.global_batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- building a Config from mappings ------------------------------------------------------


def field_names(cls: type = Config, prefix: str = "") -> list[str]:
    """Every settable dotted field name under `cls`, e.g. `optim.lr`."""
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            names.extend(field_names(kind, path + "."))
        else:
            names.append(path)
    return names


def _unknown_key(path: str) -> ConfigError:
    candidates = field_names()
    close = difflib.get_close_matches(path, candidates, n=1, cutoff=0.5)
    if not close:  # a wrong section name still leaves a useful leaf name
        leaf = path.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf][:1]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(path, f"unknown config key{hint}")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(value: Any, kind: Any, path: str) -> Any:
    """Convert a TOML value or a `--set` string to the field's declared type."""
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(path, f"{value!r} is not one of {', '.join(map(str, choices))}{hint}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(path, f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value.strip())
        if number is None:
            raise ConfigError(path, f"expected a number, got {value!r}")
        if not math.isfinite(number):  # inf and nan pass float() but no rate, length or size is infinite
            raise ConfigError(path, f"expected a finite number, got {value!r}")
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"expected a string, got {value!r}")
    raise AssertionError(f"config field {path} has an unsupported type {kind!r}")


def _build(cls: type, mapping: dict[str, Any], prefix: str) -> Any:
    if not isinstance(mapping, dict):
        raise ConfigError(prefix.rstrip("."), f"expected a table of settings, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise _unknown_key(path)
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, path + ".")
        else:
            kwargs[key] = _coerce(value, kind, path)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix.rstrip(".")) if prefix else err from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `["optim.lr=0.1", "method.sampler=random"]` into a nested mapping of strings."""
    nested: dict[str, Any] = {}
    leaves = set(field_names())
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("", f"--set expects key=value, got {item!r}")
        if key not in leaves:
            raise _unknown_key(key)
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(mapping: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from a nested mapping plus `--set` overrides."""
    merged = _merge(mapping, parse_overrides(overrides or []))
    return _build(Config, merged, "")


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
