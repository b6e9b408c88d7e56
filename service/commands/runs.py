"""`cmacc runs|checkpoints|eval`: the run catalog, read from storage (no Ray needed)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from service import catalog
from service.commands.common import Failure, InputError, UsageError
from service.config import Config

DEFAULT_ROOT = Config().storage.root


def _ago(iso: str) -> str:
    return iso.replace("T", " ").split("+")[0] if iso else "-"


def _runs(args: argparse.Namespace) -> int:
    try:
        runs = catalog.list_runs(args.storage)
    except catalog.CatalogError as err:
        raise Failure(str(err)) from None
    if args.json:
        print(json.dumps([run.to_dict() for run in runs], indent=2))
        return 0
    if not runs:
        print(f"no runs under {args.storage}")
        return 0
    print(f"{'RUN':<28}{'RECIPE':<10}{'SAMPLER':<13}{'STATE':<11}{'STEP':>6}  {'CHECKPOINT':<21}{'UPDATED (UTC)':<20}")
    for run in runs:
        info = run.info
        newest = run.newest_checkpoint
        print(
            f"{run.run_id:<28}{info.get('recipe', '-'):<10}{info.get('sampler', '-'):<13}{info.get('state', '-'):<11}"
            f"{info.get('last_step', 0):>6}  {catalog.checkpoint_name(newest.step) if newest else '-':<21}"
            f"{_ago(info.get('updated', '')):<20}"
        )
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    try:
        run = catalog.require_run(args.storage, args.run_id)
    except catalog.CatalogError as err:
        raise Failure(str(err)) from None
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


def _eval(args: argparse.Namespace) -> int:
    from jobs import evaluate

    try:
        checkpoint, data = evaluate.resolve(
            checkpoint=args.checkpoint, run_id=args.run_id, storage_root=args.storage, data=args.data
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    except catalog.CatalogError as err:
        raise Failure(str(err)) from None
    from workers.evaluate import format_table

    probes = tuple(args.probe or evaluate.PROBES_DEFAULT)
    try:
        result = evaluate.run_evaluation(checkpoint=checkpoint, data=data, probes=probes, device=args.device)
    except ValueError as err:
        raise InputError(str(err)) from None
    print(json.dumps(result, indent=2) if args.json else format_table(result), file=sys.stdout)
    return 0


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
        description="Probe frozen features on a labelled data set's train split, score them on its test split.",
    )
    which = evaluation.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", dest="run_id", default=None, help="run id: its newest checkpoint")
    which.add_argument("--checkpoint", default=None, help="checkpoint folder URI")
    evaluation.add_argument("--storage", default=DEFAULT_ROOT, help=f"storage root of --run (default: {DEFAULT_ROOT})")
    evaluation.add_argument("--data", default=None, help="labelled data set URI (default with --run: the run's data)")
    evaluation.add_argument("--probe", choices=("linear", "knn"), action="append", help="a probe (default: both)")
    evaluation.add_argument("--device", default="cpu", help="torch device for the features (default: cpu)")
    evaluation.add_argument("--json", action="store_true", help="print JSON")
    evaluation.set_defaults(handler=_eval)
