"""`python -m jobs.finetune (--checkpoint URI | --run ID [--storage URI]) [--data URI] [--modality video|audio] [--epochs N] ...`

Fine-tunes a checkpoint's encoder end to end with a classifier, next to the same encoder
trained from scratch with the same budget, as a Ray task on the cluster this process joins
(RAY_ADDRESS, as in a Ray job) or on a local Ray (workers/finetune.py). `cmacc finetune` is
the same command; `cmacc finetune --address` submits this module as a Ray job.
"""

from __future__ import annotations

import argparse
import json

from service import errors
from service.requests import FinetuneRequest, add_finetune_arguments


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.finetune", description=__doc__.splitlines()[0])
    add_finetune_arguments(parser, default_storage=None, with_address=False)
    return parser


def run(request: FinetuneRequest, *, as_json: bool) -> int:
    from workers.finetune import finetune, format_finetune  # torch loads when the job runs: --help answers at once

    result = finetune(request)
    print(json.dumps(result, indent=2) if as_json else format_finetune(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(FinetuneRequest.from_args(args), as_json=args.json)


if __name__ == "__main__":
    errors.run_main(main)
