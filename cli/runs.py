"""`cmacc runs|checkpoints|eval|finetune`: the run catalog, read from storage (no Ray needed), and
what is measured on its checkpoints (fine-tuning runs on Ray)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

from service import catalog, layout, storage
from service.config import Config
from service.ray_jobs import run_as_job
from service.requests import EvaluateRequest, FinetuneRequest, add_evaluate_arguments, add_finetune_arguments

DEFAULT_ROOT = Config().storage.root


def _ago(iso: str) -> str:
    return iso.replace("T", " ").split("+")[0] if iso else "-"


def _runs(args: argparse.Namespace) -> int:
    runs = catalog.list_runs(args.storage)
    if args.json:
        print(json.dumps([run.to_dict() for run in runs], indent=2))
        return 0
    if not runs:
        print(f"no runs under {args.storage}")
        return 0
    width = max(28, *(len(run.run_id) + 2 for run in runs))  # a long id keeps a space after it
    print(
        f"{'RUN':<{width}}{'RECIPE':<10}{'SAMPLER':<13}{'STATE':<11}{'STEP':>6}  {'CHECKPOINT':<21}{'UPDATED (UTC)':<20}"
    )
    for run in runs:
        info = run.info
        newest = run.newest_checkpoint
        print(
            f"{run.run_id:<{width}}{info.get('recipe', '-'):<10}{info.get('sampler', '-'):<13}{info.get('state', '-'):<11}"
            f"{info.get('last_step', 0):>6}  {layout.checkpoint_name(newest.step) if newest else '-':<21}"
            f"{_ago(info.get('updated', '')):<20}"
        )
        if run.held_by:
            print(f"  trained now by {run.held_by}")
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    run = catalog.require_run(args.storage, args.run_id)
    if args.json:
        print(json.dumps([c.to_dict() for c in run.checkpoints], indent=2))
        return 0
    if not run.checkpoints:
        print(f"run {args.run_id} at {run.uri} has no checkpoint yet")
        return 0
    print(f"{'STEP':>8}  {'WRITTEN':<20}{'RESUMABLE':<10}URI")
    for c in run.checkpoints:
        written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.meta["time"])) if "time" in c.meta else "-"
        print(f"{c.step:>8}  {written:<20}{'yes' if c.registered else 'no':<10}{c.uri}")
    return 0


def _absolute(request: Any) -> Any:
    """The request with its URIs absolute: a job runs in another folder."""
    return dataclasses.replace(
        request,
        checkpoint=storage.absolute(request.checkpoint) if request.checkpoint else None,
        storage=storage.absolute(request.storage) if request.storage else None,
        data=storage.absolute(request.data) if request.data else None,
    )


def _eval(args: argparse.Namespace) -> int:
    from jobs import evaluate

    request = EvaluateRequest.from_args(args)
    if args.address:
        argv = [*_absolute(request).job_argv(), *(["--json"] if args.json else [])]
        return run_as_job(args.address, ["python", "-m", "jobs.evaluate", *argv], what="eval", run_id=request.run_id)
    return evaluate.report(evaluate.evaluate(request), as_json=args.json)


def _finetune(args: argparse.Namespace) -> int:
    from jobs import finetune

    request = FinetuneRequest.from_args(args)
    if args.address:
        argv = [*_absolute(request).job_argv(), *(["--json"] if args.json else [])]
        return run_as_job(
            args.address, ["python", "-m", "jobs.finetune", *argv], what="finetune", run_id=request.run_id
        )
    return finetune.run(request, as_json=args.json)


def register(commands: argparse._SubParsersAction) -> None:
    runs = commands.add_parser("runs", help="the runs under a storage root", description="List the runs in storage.")
    runs.add_argument("--storage", default=DEFAULT_ROOT, help=f"storage root URI (default: {DEFAULT_ROOT})")
    runs.add_argument("--json", action="store_true", help="print JSON")
    runs.set_defaults(handler=_runs)

    checkpoints = commands.add_parser(
        "checkpoints", help="the checkpoints of a run", description="List a run's checkpoints, oldest first."
    )
    checkpoints.add_argument("run_id", metavar="ID", help="run id")
    checkpoints.add_argument("--storage", default=DEFAULT_ROOT, help=f"storage root URI (default: {DEFAULT_ROOT})")
    checkpoints.add_argument("--json", action="store_true", help="print JSON")
    checkpoints.set_defaults(handler=_checkpoints)

    evaluation = commands.add_parser(
        "eval",
        help="evaluate a checkpoint: linear probe and k-NN per modality, next to untrained encoders",
        description="Probe frozen features of a labelled data set under its protocol (train/test split, "
        "cross-validation over folds, or an automatic split), per modality it has.",
    )
    add_evaluate_arguments(evaluation, default_storage=DEFAULT_ROOT)
    evaluation.set_defaults(handler=_eval)

    tuning = commands.add_parser(
        "finetune",
        help="fine-tune a checkpoint's encoder end to end with a classifier, next to training from scratch",
        description="Fine-tune the video (or audio) encoder of a checkpoint with a linear classifier on a labelled "
        "set's training clips and report clip-level and video-level top-1 on its held-out clips, next to the same "
        "encoder trained from scratch with the same budget. Runs as a Ray task (a GPU when there is one).",
    )
    add_finetune_arguments(tuning, default_storage=DEFAULT_ROOT)
    tuning.set_defaults(handler=_finetune)
