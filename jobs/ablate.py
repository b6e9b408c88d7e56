"""`python -m jobs.ablate --data URI [--samplers active,uncertainty,diversity,random,moco] [--seeds 3] [--baseline random] [--recipe R] [--set k=v ...] [--storage URI] [--id NAME] [--address ...]`

Runs that differ only in sampler and seed, each an ordinary pretraining run (listed by
`cmacc runs`, resumable), then an evaluation of each and a report (`report.md`,
`report.json`, PNG plots) in `<storage>/ablations/<id>/`. Locally the runs go one after
another; with `--address` they run side by side as jobs on that cluster. Rerunning the same
ablation skips finished runs and continues unfinished ones. `cmacc ablate` is the same command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from typing import Any

from service import config, errors, ray_jobs, storage
from service.requests import AblateRequest, add_ablate_arguments


def default_id(request: AblateRequest) -> str:
    """The same settings give the same id (from any folder), so rerunning continues the ablation."""
    settings = [storage.absolute(request.data), request.recipe, list(request.overrides)]
    key = json.dumps([*settings, list(request.samplers), request.seeds])
    return f"ablation-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def ablate(request: AblateRequest, *, command: str = "", progress: Any = None) -> dict[str, Any]:
    """Check, run (or continue) every run, evaluate, write the report; returns the report."""
    from jobs.ablation import plan, runner  # torch and ray load when the job runs: --help answers at once

    started = time.perf_counter()
    cfg = config.load_recipe(request.recipe, list(request.overrides))
    spec = plan.AblationSpec(
        ablation_id=request.ablation_id or default_id(request),
        storage=storage.absolute(request.storage or cfg.storage.root),
        data=storage.absolute(request.data),
        recipe=request.recipe,
        overrides=request.overrides,
        samplers=request.samplers,
        seeds=tuple(range(request.seeds)),
    )
    endpoint = cfg.storage.endpoint_url
    plan.check(spec, cfg, endpoint_url=endpoint)  # refusals happen here, before anything is written
    if not request.skip_data_check:  # a damaged shard is named now, not in the first run's workers
        from workers.data.inspect import check

        check(spec.data, endpoint_url=endpoint, retry_budget_s=cfg.storage.retry_budget_s)
    if request.address:
        submit, job_status = ray_jobs.ablation_jobs(request.address, cfg, request.recipe)
    plan.save_spec(spec, endpoint_url=endpoint)
    print(
        f"cmacc ablate: {spec.ablation_id}: {len(spec.runs())} runs under {spec.storage}; report in {spec.folder}",
        file=sys.stderr,
        flush=True,
    )
    if request.address:
        runner.run_on_cluster(
            spec,
            address=request.address,
            steps=cfg.train.steps,
            submit=submit,
            job_status=job_status,
            endpoint_url=endpoint,
        )
    else:
        runner.run_locally(spec, steps=cfg.train.steps, progress=progress, endpoint_url=endpoint)
    return runner.build_report(
        spec,
        command=command or "cmacc ablate",
        wall_s=time.perf_counter() - started,
        baseline=request.baseline or "random",
        endpoint_url=endpoint,
    )


def report(result: dict[str, Any], *, as_json: bool) -> int:
    from jobs.ablation.report import summary_table

    print(json.dumps(result, indent=2) if as_json else summary_table(result), flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.ablate", description=__doc__.splitlines()[0])
    add_ablate_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    command = shlex.join(["python", "-m", "jobs.ablate", *argv])
    return report(ablate(AblateRequest.from_args(args), command=command), as_json=args.json)


if __name__ == "__main__":
    errors.run_main(main)
