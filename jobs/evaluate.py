"""`python -m jobs.evaluate (--checkpoint URI | --run ID [--storage URI]) [--data URI] [--probe linear|knn] [--json]`

Evaluates a checkpoint's frozen encoders with the linear probe and k-NN per modality on a
labelled clip-shard data set (probes fit on its `train` split, scored on its `test` split),
next to the same probes on the untrained encoders. `cmacc eval` calls `run_evaluation`
in-process; `jobs.pretrain` runs `evaluate_remote` as a Ray task after training.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from service import catalog, storage
from service.config import Config

PROBES_DEFAULT = ("linear", "knn")


def resolve(
    *, checkpoint: str | None, run_id: str | None, storage_root: str | None, data: str | None, endpoint_url: str = ""
) -> tuple[str, str]:
    """(checkpoint URI, data URI) from the arguments: `--run` picks the run's newest checkpoint
    and, without `--data`, the data set the run trained on."""
    if (checkpoint is None) == (run_id is None):
        raise ValueError("give exactly one of --checkpoint URI and --run ID")
    if run_id is not None:
        root = storage_root or Config().storage.root
        entry = catalog.require_run(root, run_id, endpoint_url=endpoint_url)
        newest = entry.newest_checkpoint
        if newest is None:
            raise catalog.CatalogError(f"run {run_id!r} at {entry.uri} has no checkpoint yet")
        checkpoint = newest.uri
        data = data or entry.info.get("data")
    if not data:
        raise ValueError("--data URI is required with --checkpoint (the labelled data set to probe on)")
    return checkpoint, data


def run_evaluation(
    *,
    checkpoint: str,
    data: str,
    probes: tuple[str, ...],
    device: str = "cpu",
    endpoint_url: str = "",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate in this process, with a progress bar on a terminal."""
    from tqdm import tqdm

    from workers.evaluate import evaluate_checkpoint

    with tqdm(unit="clip", desc="features", file=sys.stderr, disable=None if show_progress else True) as bar:
        return evaluate_checkpoint(
            checkpoint, data_uri=data, probes=probes, device=device, endpoint_url=endpoint_url, progress=bar.update
        )


def evaluate_remote(cfg: Config, *, checkpoint: str, data: str) -> dict[str, Any]:
    """Evaluate as a Ray task with one worker's resources (its GPU when the run uses GPUs)."""
    import ray

    from workers.evaluate import evaluate_checkpoint

    use_gpu = cfg.resources.use_gpu
    task = ray.remote(evaluate_checkpoint).options(
        num_cpus=cfg.resources.cpus_per_worker, num_gpus=cfg.resources.gpus_per_worker if use_gpu else 0
    )
    return ray.get(
        task.remote(
            checkpoint,
            data_uri=data,
            device="cuda" if use_gpu else "cpu",
            endpoint_url=cfg.storage.endpoint_url,
        )
    )


def save_evaluation(run_uri: str, evaluation: dict[str, Any], *, endpoint_url: str = "") -> str:
    """Store it as `<run>/eval/checkpoint-%08d.json`; returns the URI."""
    uri = catalog.eval_uri(run_uri, evaluation["step"])
    storage.write_bytes(uri, json.dumps(evaluation, indent=2).encode(), endpoint_url=endpoint_url)
    return uri


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder URI")
    parser.add_argument("--run", dest="run_id", default=None, help="run id: its newest checkpoint")
    parser.add_argument("--storage", default=None, help="storage root of --run (default: ./runs)")
    parser.add_argument("--data", default=None, help="labelled data set URI (default with --run: its data)")
    parser.add_argument("--probe", choices=("linear", "knn"), action="append", help="default: both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from workers.evaluate import format_table

    args = parse_args(argv)
    checkpoint, data = resolve(
        checkpoint=args.checkpoint, run_id=args.run_id, storage_root=args.storage, data=args.data
    )
    evaluation = run_evaluation(
        checkpoint=checkpoint, data=data, probes=tuple(args.probe or PROBES_DEFAULT), device=args.device
    )
    print(json.dumps(evaluation, indent=2) if args.json else format_table(evaluation))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, LookupError, OSError) as err:
        print(f"cmacc: error: {err}", file=sys.stderr)
        sys.exit(1)
