"""`python -m jobs.evaluate (--checkpoint URI | --run ID [--storage URI]) [--data URI] [--probe linear|knn] [--protocol P] [--json]`

Evaluates a checkpoint's frozen encoders with the linear probe and k-NN per modality on a
labelled clip-shard data set under its protocol (workers/protocols.py), next to the same
probes on the untrained encoders. `cmacc eval` is the same command; `cmacc eval --address`
submits this module as a Ray job.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from service import errors, reports
from service.requests import EvaluateRequest, add_evaluate_arguments


def evaluate(request: EvaluateRequest) -> dict[str, Any]:
    """The evaluation of a request (see `workers.evaluate.evaluate`)."""
    from workers.evaluate import evaluate as evaluate_here  # torch loads when the job runs: --help answers at once

    return evaluate_here(request)


def report(evaluation: dict[str, Any], *, as_json: bool) -> int:
    print(json.dumps(evaluation, indent=2) if as_json else reports.format_table(evaluation), flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.splitlines()[0])
    add_evaluate_arguments(parser, default_storage=None, with_address=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return report(evaluate(EvaluateRequest.from_args(args)), as_json=args.json)


if __name__ == "__main__":
    errors.run_main(main)
