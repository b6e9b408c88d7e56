"""`cmacc`: the user's door to everything (the parser and the error-to-exit-code mapping).

Exit codes: 0 success, 1 failure (the work was attempted and failed), 2 bad usage or an
invalid config (`service.errors`, shared with every `python -m jobs.*`). Errors are one line
on stderr that names the field, file or URI.

No module of the command line imports torch or ray at load time: the CLI answers at once,
and commands that need the heavy stack import it inside their handlers.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cli import ablate as ablate_commands
from cli import bench as bench_commands
from cli import cluster as cluster_commands
from cli import config as config_commands
from cli import data as dataset_commands
from cli import export as export_commands
from cli import prepare as prepare_commands
from cli import pretrain as pretrain_commands
from cli import runs as runs_commands
from service.errors import UsageError, report, run_main


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other usage error
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cmacc",
        description="Cross-Modal Active Contrastive Coding: pretrain audio and video encoders on Ray.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    pretrain_commands.register(commands)
    ablate_commands.register(commands)
    cluster_commands.register(commands)
    runs_commands.register(commands)
    export_commands.register(commands)
    config_commands.register(commands)
    bench_commands.register(commands)
    data_group = commands.add_parser("data", help="make, prepare and inspect clip-shard data sets")
    data_commands = data_group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    dataset_commands.register(data_commands)
    prepare_commands.register(data_commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handler = getattr(args, "handler", None)
        if handler is None:
            if args.command is None:
                parser.print_help()
                return 2
            raise UsageError(f"cmacc {args.command}: a subcommand is required (see cmacc {args.command} --help)")
        return handler(args)
    except BaseException as err:  # the project's errors, OSError (names its URI) and Ctrl-C
        code = report(err)
        if code is None:  # a bug: keep the traceback
            raise
        return code


def entry() -> None:
    """The `cmacc` console script: `main()`, then an exit that cannot abort after the answer
    (`service.errors.run_main`)."""
    run_main(main)


if __name__ == "__main__":
    entry()
