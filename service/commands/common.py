"""Pieces shared by the command modules: errors with exit codes, common arguments."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """The command line asks for something impossible (exit code 2)."""


class Failure(Exception):
    """The command was valid but its work failed (exit code 1)."""


class InputError(Exception):
    """Input data (a data set, shard or row) is missing, corrupt or inconsistent (exit code 1).

    It lives here, free of heavy imports, so errors raised deep in `workers` (for example
    `workers.data.format.DataError`) subclass it and the CLI maps them without importing them.
    """


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="demo", help="recipe name in jobs/recipes/ or a TOML path (default: demo)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set optim.lr=0.1 (repeatable)",
    )
