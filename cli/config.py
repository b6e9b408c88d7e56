"""`cmacc config show|validate`."""

from __future__ import annotations

import argparse
import json

from service import config
from service.requests import add_recipe_arguments


def _show(args: argparse.Namespace) -> int:
    cfg = config.load_recipe(args.recipe, args.overrides)
    resolved = cfg.to_dict()
    if args.json:
        print(json.dumps(resolved, indent=2))
        return 0
    for name in config.field_names():
        value = resolved
        for part in name.split("."):
            value = value[part]
        print(f"{name} = {json.dumps(value)}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    cfg = config.load_file(args.file, args.overrides)
    print(f"{args.file}: valid (recipe {cfg.recipe!r}, sampler {cfg.method.sampler!r}, {cfg.train.steps} steps)")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("config", help="show or validate run configs")
    sub = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    show = sub.add_parser("show", help="print the resolved config of a recipe")
    add_recipe_arguments(show)
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_show)
    validate = sub.add_parser("validate", help="check a recipe TOML file")
    validate.add_argument("file", help="path to a TOML recipe")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(handler=_validate)
