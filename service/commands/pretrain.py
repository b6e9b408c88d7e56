"""`cmacc pretrain`: the whole job on this machine, on an embedded local Ray.

With no `--data` the generated data set of the recipe is made once under
`<storage>/datasets/` and reused. Training shows a progress bar on a terminal; then the final
checkpoint is evaluated on the held-out split and a summary table is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from service import catalog, config
from service.commands.common import Failure, UsageError, add_recipe_args


def default_run_id(recipe: str) -> str:
    name = recipe.rsplit("/", 1)[-1].removesuffix(".toml")
    return f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _pretrain(args: argparse.Namespace) -> int:
    config.load_recipe(args.recipe, args.overrides)  # bad recipes and --set fail here, at once
    args.run_id = args.run_id or default_run_id(args.recipe)
    try:
        catalog.check_run_id(args.run_id)
    except ValueError as err:
        raise UsageError(f"--run-id: {err}") from None
    from jobs import pretrain  # torch and ray load only now

    args.address = "local"  # always an embedded Ray: `cmacc submit` is for clusters
    progress = pretrain.ProgressBar if sys.stderr.isatty() else None
    try:
        outcome = pretrain.run_pretrain(args, progress=progress)
    except pretrain.RunExistsError as err:
        raise UsageError(str(err)) from None
    except pretrain.PretrainError as err:
        raise Failure(str(err)) from None
    print(json.dumps(outcome, indent=2) if args.json else pretrain.format_summary(outcome), flush=True)
    if outcome["state"] == "failed":
        raise Failure(f"run {args.run_id} failed: {outcome.get('error', '')}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "pretrain",
        help="pretrain on an embedded local Ray (default: the demo recipe on generated data), then evaluate",
        description=__doc__.splitlines()[0],
    )
    add_recipe_args(parser)
    parser.add_argument("--run-id", default=None, help="name of the run (default: <recipe>-<date>-<time>)")
    parser.add_argument("--storage", default=None, help="storage root URI for runs and data (default: ./runs)")
    parser.add_argument("--data", default=None, help="clip-shard data set URI (default: generated, cached)")
    parser.add_argument(
        "--resume", action="store_true", help="continue a run id that has a checkpoint (required to reuse one)"
    )
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON instead of the summary")
    parser.set_defaults(handler=_pretrain)
