"""Typed requests: what a user asks of a job, parsed once from a command line.

`cmacc pretrain`, `cmacc submit` and `python -m jobs.pretrain` share the pretraining
arguments and build the same `PretrainRequest`; `cmacc submit` turns it back into the job's
command line with `PretrainRequest.job_argv`. Likewise `cmacc eval` and `python -m
jobs.evaluate` build an `EvaluateRequest`. Torch-free: the CLI imports it.
"""

from __future__ import annotations

import argparse
import math
import typing
from dataclasses import dataclass

from service.config import Sampler
from service.errors import UsageError

PROBES = ("linear", "knn")
EVAL_PROTOCOLS = ("auto", "split", "folds", "auto-split")  # see workers/protocols.py


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="demo", help="recipe name in jobs/recipes/ or a TOML path (default: demo)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set optim.lr=0.1 (repeatable)",
    )


SKIP_DATA_CHECK = "--skip-data-check"


def add_skip_data_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        SKIP_DATA_CHECK,
        action="store_true",
        help="skip reading every shard's Parquet footer and row count against the manifest before starting "
        "(the check `cmacc data inspect` makes; on by default)",
    )


def add_pretrain_arguments(parser: argparse.ArgumentParser, *, run_id_help: str, run_id_required: bool) -> None:
    """The arguments of a pretraining run (all but where it runs)."""
    add_recipe_arguments(parser)
    parser.add_argument("--run-id", required=run_id_required, default=None, help=run_id_help)
    parser.add_argument("--storage", default=None, help="storage root URI for runs and data (default: ./runs)")
    parser.add_argument("--data", default=None, help="clip-shard data set URI (default: data.uri or generated, cached)")
    parser.add_argument(
        "--resume", action="store_true", help="continue a run id that has a checkpoint (required to reuse one)"
    )
    parser.add_argument(
        "--resume-if-any",
        action="store_true",
        help="continue the run id when it has a checkpoint, else start it (for jobs that a scheduler retries)",
    )
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON instead of the summary")
    add_skip_data_check(parser)
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's own messages (each report's metrics, worker start-up, notices) on the terminal",
    )


@dataclass(kw_only=True, frozen=True)
class PretrainRequest:
    """One pretraining job: which recipe, which run, where its storage and data are."""

    run_id: str
    recipe: str = "demo"
    overrides: tuple[str, ...] = ()
    storage: str | None = None  # storage root URI; None = the recipe's storage.root
    data: str | None = None  # data set URI; None = data.uri or the generated set
    address: str | None = None  # Ray address; None = RAY_ADDRESS or a local Ray
    resume: bool = False
    resume_if_any: bool = False  # resume when there is a checkpoint, else start (retried jobs)
    verbose: bool = False  # Ray's own INFO messages on the terminal too (always in Ray's log files)
    skip_data_check: bool = False  # no check of the shards' footers and rows before Ray starts

    @classmethod
    def from_args(cls, args: argparse.Namespace, **changes: object) -> PretrainRequest:
        fields = {
            "run_id": args.run_id,
            "recipe": args.recipe,
            "overrides": tuple(args.overrides),
            "storage": args.storage,
            "data": args.data,
            "address": getattr(args, "address", None),
            "resume": args.resume,
            "resume_if_any": getattr(args, "resume_if_any", False),
            "verbose": getattr(args, "verbose", False),
            "skip_data_check": getattr(args, "skip_data_check", False),
        }
        return cls(**{**fields, **changes})

    def job_argv(self) -> list[str]:
        """The arguments of `python -m jobs.pretrain` for this request (no address: a job
        runs on the cluster it was submitted to)."""
        argv = ["--recipe", self.recipe, "--run-id", self.run_id]
        if self.storage:
            argv += ["--storage", self.storage]
        if self.data:
            argv += ["--data", self.data]
        for item in self.overrides:
            argv += ["--set", item]
        if self.resume:
            argv.append("--resume")
        if self.resume_if_any:
            argv.append("--resume-if-any")
        if self.verbose:
            argv.append("--verbose")
        if self.skip_data_check:
            argv.append(SKIP_DATA_CHECK)
        return argv


def _add_checkpoint_arguments(parser: argparse.ArgumentParser, *, default_storage: str | None) -> None:
    """Which checkpoint and which labelled data: `cmacc eval` and `cmacc finetune`."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run", dest="run_id", default=None, help="run id: its newest checkpoint")
    which.add_argument("--checkpoint", default=None, help="checkpoint folder URI")
    parser.add_argument(
        "--storage", default=default_storage, help=f"storage root of --run (default: {default_storage or './runs'})"
    )
    parser.add_argument("--data", default=None, help="labelled data set URI (default with --run: the run's data)")


def _checkpoint_argv(request: EvaluateRequest | FinetuneRequest) -> list[str]:
    """`_add_checkpoint_arguments`'s part of a job's command line for `request`."""
    argv = ["--checkpoint", request.checkpoint] if request.checkpoint else ["--run", str(request.run_id)]
    if request.storage:
        argv += ["--storage", request.storage]
    if request.data:
        argv += ["--data", request.data]
    return argv


def _check_test_fraction(value: float) -> None:
    if not 0 < value < 1:
        raise UsageError(f"--test-fraction: must be between 0 and 1, got {value}")


def add_evaluate_arguments(
    parser: argparse.ArgumentParser, *, default_storage: str | None, with_address: bool = True
) -> None:
    _add_checkpoint_arguments(parser, default_storage=default_storage)
    add_skip_data_check(parser)
    parser.add_argument("--probe", choices=PROBES, action="append", help="a probe (default: both)")
    parser.add_argument(
        "--protocol",
        choices=EVAL_PROTOCOLS,
        default="auto",
        help="split: the set's train/test splits; folds: cross-validation over its fold1..foldK splits; "
        "auto-split: a seeded stratified split that keeps each source file on one side; auto (default): "
        "the first of these the set allows",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.3,
        help="share of clips held out by the automatic split (default: 0.3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the automatic split (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device for the features (default: cpu)")
    if with_address:
        parser.add_argument(
            "--address",
            default=None,
            help="run the evaluation as a Ray job on the cluster of this dashboard address (http://HEAD:8265), "
            "as a task with a GPU when it has one, and follow its output; checkpoint and data must be reachable "
            "from it",
        )
    parser.add_argument("--on-ray", action="store_true", help=argparse.SUPPRESS)  # inside such a job
    parser.add_argument("--json", action="store_true", help="print JSON")


@dataclass(kw_only=True, frozen=True)
class EvaluateRequest:
    """One evaluation: a checkpoint (or a run's newest), the labelled data, the probes."""

    checkpoint: str | None = None
    run_id: str | None = None
    storage: str | None = None
    data: str | None = None
    probes: tuple[str, ...] = PROBES
    protocol: str = "auto"
    test_fraction: float = 0.3
    seed: int = 0
    device: str = "cpu"
    on_ray: bool = False  # a Ray task on the cluster this process is in (a job's driver)
    skip_data_check: bool = False  # no check of the shards' footers and rows first

    def __post_init__(self) -> None:
        if self.protocol not in EVAL_PROTOCOLS:
            raise UsageError(f"--protocol {self.protocol!r}: choose from {', '.join(EVAL_PROTOCOLS)}")
        _check_test_fraction(self.test_fraction)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvaluateRequest:
        return cls(
            checkpoint=args.checkpoint,
            run_id=args.run_id,
            storage=args.storage,
            data=args.data,
            probes=tuple(args.probe or PROBES),
            protocol=args.protocol,
            test_fraction=args.test_fraction,
            seed=args.seed,
            device=args.device,
            on_ray=getattr(args, "on_ray", False),
            skip_data_check=getattr(args, "skip_data_check", False),
        )

    def job_argv(self) -> list[str]:
        """The arguments of `python -m jobs.evaluate` running this request as a Ray task
        in a job (storage and data URIs as given: make them absolute first)."""
        argv = _checkpoint_argv(self)
        for probe in self.probes:
            argv += ["--probe", probe]
        argv += ["--protocol", self.protocol, "--test-fraction", repr(self.test_fraction), "--seed", str(self.seed)]
        return [*argv, *([SKIP_DATA_CHECK] if self.skip_data_check else []), "--on-ray"]


SAMPLERS: tuple[str, ...] = typing.get_args(Sampler)  # active, uncertainty, diversity, random, moco


def parse_samplers(text: str) -> tuple[str, ...]:
    """`"active,random"` -> ("active", "random"); a UsageError names an unknown sampler."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise UsageError("--samplers: name at least one sampler")
    for name in names:
        if name not in SAMPLERS:
            raise UsageError(f"--samplers: unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")
    if len(set(names)) != len(names):
        raise UsageError(f"--samplers: {text!r} names a sampler twice")
    return names


def add_ablate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, help="labelled data set URI with a test split (the probes score on it)"
    )
    parser.add_argument(
        "--samplers",
        default=",".join(SAMPLERS),
        help=f"comma-separated samplers to compare (default: {','.join(SAMPLERS)})",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per sampler: 0..N-1 (default: 3)")
    parser.add_argument(
        "--baseline",
        default=None,
        help="the sampler every other is compared with, paired by seed (one of --samplers; default: random)",
    )
    add_recipe_arguments(parser)
    parser.add_argument(
        "--storage", default=None, help="storage root URI for the runs and the report (default: ./runs)"
    )
    parser.add_argument(
        "--id", dest="ablation_id", default=None, help="name of the ablation (default: from the settings)"
    )
    parser.add_argument(
        "--address", default=None, help="Ray dashboard address: run side by side as cluster jobs (default: here)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of its table")
    add_skip_data_check(parser)


@dataclass(kw_only=True, frozen=True)
class AblateRequest:
    """An ablation: the same recipe and data, one run per sampler and seed."""

    data: str
    samplers: tuple[str, ...] = SAMPLERS
    seeds: int = 3
    recipe: str = "demo"
    overrides: tuple[str, ...] = ()
    storage: str | None = None
    ablation_id: str | None = None
    address: str | None = None
    baseline: str | None = None  # None: `random` (the report has no comparisons when it is not compared)
    skip_data_check: bool = False  # no check of the shards' footers and rows before the runs

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise UsageError(f"--seeds must be >= 1, got {self.seeds}")
        if self.baseline is not None and self.baseline not in self.samplers:
            raise UsageError(
                f"--baseline: {self.baseline!r} is not one of the compared samplers ({', '.join(self.samplers)})"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AblateRequest:
        return cls(
            data=args.data,
            samplers=parse_samplers(args.samplers),
            seeds=args.seeds,
            recipe=args.recipe,
            overrides=tuple(args.overrides),
            storage=args.storage,
            ablation_id=args.ablation_id,
            address=args.address,
            baseline=args.baseline,
            skip_data_check=getattr(args, "skip_data_check", False),
        )


@dataclass(kw_only=True, frozen=True)
class FinetuneSettings:
    modality: str = "video"
    epochs: int = 5
    lr: float = 0.01  # SGD, momentum 0.9, cosine to 0
    batch_size: int = 16
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (
            ("modality", self.modality in ("video", "audio"), f"choose video or audio, got {self.modality!r}"),
            ("epochs", 1 <= self.epochs <= 1000, f"must be in [1, 1000], got {self.epochs}"),
            ("lr", 0 < self.lr < 10 and math.isfinite(self.lr), f"must be in (0, 10), got {self.lr}"),
            ("batch-size", 1 <= self.batch_size <= 4096, f"must be in [1, 4096], got {self.batch_size}"),
            ("weight-decay", 0 <= self.weight_decay < 1, f"must be in [0, 1), got {self.weight_decay}"),
        )
        for name, ok, message in checks:
            if not ok:
                raise UsageError(f"--{name}: {message}")


def add_finetune_arguments(
    parser: argparse.ArgumentParser, *, default_storage: str | None, with_address: bool = True
) -> None:
    _add_checkpoint_arguments(parser, default_storage=default_storage)
    parser.add_argument("--modality", choices=("video", "audio"), default="video", help="encoder to fine-tune")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training clips (default: 5)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate, cosine to 0 (default: 0.01)")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per step (default: 16)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="(default: 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the classifier and the clip order")
    parser.add_argument(
        "--protocol", choices=EVAL_PROTOCOLS, default="auto", help="as for cmacc eval (folds: the first is held out)"
    )
    parser.add_argument("--test-fraction", type=float, default=0.3, help="of the automatic split (default: 0.3)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the automatic split (default: 0)")
    parser.add_argument(
        "--no-scratch", dest="scratch", action="store_false", help="skip the reference row trained from scratch"
    )
    if with_address:
        parser.add_argument(
            "--address",
            default=None,
            help="run it as a Ray job on the cluster of this dashboard address (http://HEAD:8265) and follow its "
            "output (default: on a local Ray, or the cluster of RAY_ADDRESS)",
        )
    parser.add_argument("--json", action="store_true", help="print JSON")


@dataclass(kw_only=True, frozen=True)
class FinetuneRequest:
    """One fine-tuning: a checkpoint (or a run's newest), the labelled data, the settings."""

    checkpoint: str | None = None
    run_id: str | None = None
    storage: str | None = None
    data: str | None = None
    settings: FinetuneSettings = FinetuneSettings()
    protocol: str = "auto"
    test_fraction: float = 0.3
    split_seed: int = 0
    scratch: bool = True

    def __post_init__(self) -> None:
        _check_test_fraction(self.test_fraction)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FinetuneRequest:
        return cls(
            checkpoint=args.checkpoint,
            run_id=args.run_id,
            storage=args.storage,
            data=args.data,
            settings=FinetuneSettings(
                modality=args.modality,
                epochs=args.epochs,
                lr=args.lr,
                batch_size=args.batch_size,
                weight_decay=args.weight_decay,
                seed=args.seed,
            ),
            protocol=args.protocol,
            test_fraction=args.test_fraction,
            split_seed=args.split_seed,
            scratch=args.scratch,
        )

    def job_argv(self) -> list[str]:
        """The arguments of `python -m jobs.finetune` for this request."""
        argv = _checkpoint_argv(self)
        s = self.settings
        argv += ["--modality", s.modality, "--epochs", str(s.epochs), "--lr", repr(s.lr)]
        argv += ["--batch-size", str(s.batch_size), "--weight-decay", repr(s.weight_decay), "--seed", str(s.seed)]
        argv += ["--protocol", self.protocol, "--test-fraction", repr(self.test_fraction)]
        argv += ["--split-seed", str(self.split_seed)]
        return argv if self.scratch else [*argv, "--no-scratch"]
