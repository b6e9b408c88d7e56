"""`python -m jobs.bench train|reader|sampler ...`: the same benchmarks as `cmacc bench`, as a
job (for example on a GPU node)."""

from __future__ import annotations

import argparse

from service import errors
from service.commands import bench as bench_commands


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    bench_commands.add_sampler_arguments(sub.add_parser("sampler", help="milliseconds per dictionary selection"))
    bench_commands.add_train_arguments(sub.add_parser("train", help="plain step against the service path"))
    bench_commands.add_reader_arguments(sub.add_parser("reader", help="clips/s of the shard reader"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.benchmark == "train":
        return bench_commands.run_train(args)
    if args.benchmark == "reader":
        return bench_commands.run_reader(args)
    return bench_commands.run_sampler(args)


if __name__ == "__main__":
    errors.run_main(main)
