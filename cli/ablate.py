"""`cmacc ablate`: compare samplers on a data set, several seeds each, then a report.

Each run is an ordinary pretraining run `<id>-<sampler>-s<seed>` under the storage root
(`cmacc runs` lists it); the report (`report.md`, `report.json`, PNG plots) lands in
`<storage>/ablations/<id>/`. Rerunning the same command skips finished runs and continues
unfinished ones.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from service import config
from service.requests import AblateRequest, add_ablate_arguments


def _ablate(args: argparse.Namespace) -> int:
    request = AblateRequest.from_args(args)  # bad samplers and seeds fail here, at once
    config.load_recipe(request.recipe, list(request.overrides))
    from jobs import ablate  # torch and ray load only now
    from workers.supervision import ProgressBar

    command = shlex.join(["cmacc", *sys.argv[1:]])
    result = ablate.ablate(request, command=command, progress=ProgressBar if sys.stderr.isatty() else None)
    return ablate.report(result, as_json=args.json)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "ablate",
        help="compare samplers (several seeds each) on a data set: runs, evaluations and a report",
        description=__doc__.splitlines()[0],
    )
    add_ablate_arguments(parser)
    parser.set_defaults(handler=_ablate)
