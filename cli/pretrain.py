"""`cmacc pretrain`: the whole job on this machine, on an embedded local Ray.

With no `--data` the generated data set of the recipe is made once under
`<storage>/datasets/` and reused. Training shows a progress bar on a terminal; then the final
checkpoint is evaluated on the held-out split and a summary table is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from service import config, preflight
from service.requests import PretrainRequest, add_pretrain_arguments


def default_run_id(recipe: str) -> str:
    name = recipe.rsplit("/", 1)[-1].removesuffix(".toml")
    return f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _pretrain(args: argparse.Namespace) -> int:
    config.load_recipe(args.recipe, args.overrides)  # bad recipes and --set fail here, at once
    run_id = preflight.check_run_id(args.run_id or default_run_id(args.recipe))
    # Always an embedded Ray: `cmacc submit` is for clusters.
    request = PretrainRequest.from_args(args, run_id=run_id, address="local")
    from jobs import pretrain  # torch and ray load only now
    from workers.supervision import ProgressBar

    outcome = pretrain.pretrain(request, progress=ProgressBar if sys.stderr.isatty() else None)
    return pretrain.report(outcome, as_json=args.json)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "pretrain",
        help="pretrain on an embedded local Ray (default: the demo recipe on generated data), then evaluate",
        description=__doc__.splitlines()[0],
    )
    add_pretrain_arguments(
        parser, run_id_required=False, run_id_help="name of the run (default: <recipe>-<date>-<time>)"
    )
    parser.set_defaults(handler=_pretrain)
