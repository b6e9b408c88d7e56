"""Running an ablation: locally one run after another, or on a cluster side by side.

Either way each run is an ordinary pretraining run (`jobs.pretrain.pretrain` here, a
`jobs.pretrain` job there) and the report is built from what the runs left in storage.
Rerunning an ablation skips finished runs, evaluates trained ones that lack an evaluation
and resumes unfinished ones from their newest checkpoint.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from jobs.ablation import plan, report
from jobs.pretrain import pretrain
from service import catalog, reports
from service.errors import Failure
from service.requests import PretrainRequest
from workers.evaluate import evaluate_checkpoint, save_evaluation


def _say(message: str) -> None:
    print(f"cmacc ablate: {message}", file=sys.stderr, flush=True)


def run_request(
    spec: plan.AblationSpec, sampler: str, seed: int, *, resume: bool, address: str | None
) -> PretrainRequest:
    return PretrainRequest(
        run_id=spec.run_id(sampler, seed),
        recipe=spec.recipe,
        overrides=spec.run_overrides(sampler, seed),
        storage=spec.storage,
        data=spec.data,
        address=address,
        resume=resume,
    )


def run_locally(spec: plan.AblationSpec, *, steps: int, progress: Any = None, endpoint_url: str = "") -> None:
    """Every run of the ablation that is not finished, one after another on this machine."""

    status = plan.statuses(spec, steps=steps, endpoint_url=endpoint_url)
    todo = spec.runs()
    left = sum(1 for key in todo if status[key] != "done")
    durations: list[float] = []
    for index, (sampler, seed) in enumerate(todo, start=1):
        run_id = spec.run_id(sampler, seed)
        what = status[sampler, seed]
        if what == "done":
            _say(f"run {index}/{len(todo)} {run_id}: finished before, skipped")
            continue
        # the mean of the runs trained here so far (an evaluation alone takes seconds)
        eta = f"; about {left * sum(durations) / len(durations) / 60:.0f} min left" if durations else ""
        started = time.perf_counter()
        if what == "evaluate":
            _say(f"run {index}/{len(todo)} {run_id} (sampler {sampler}, seed {seed}): trained, evaluating{eta}")
            evaluate_finished(spec, sampler, seed, endpoint_url=endpoint_url)
        else:
            verb = "resuming" if what == "resume" else "training"
            _say(f"run {index}/{len(todo)} {run_id} (sampler {sampler}, seed {seed}): {verb}{eta}")
            request = run_request(spec, sampler, seed, resume=what == "resume", address="local")
            outcome = pretrain(request, progress=progress)
            if outcome["state"] != "succeeded":
                raise Failure(
                    f"run {run_id} {outcome['state']} at step {outcome['step']}: {outcome.get('error', '')}; "
                    "rerun the same ablation to continue it"
                )
            if outcome.get("evaluation") is None:
                raise Failure(f"run {run_id} was not evaluated: {outcome.get('evaluation_note', 'no test split')}")
            _say(f"run {run_id}: done at step {outcome['step']} in {time.perf_counter() - started:.0f} s")
            durations.append(time.perf_counter() - started)
        left -= 1


def evaluate_finished(spec: plan.AblationSpec, sampler: str, seed: int, *, endpoint_url: str = "") -> None:
    """Evaluate a trained run's final checkpoint here and record it with the run."""
    run_id = spec.run_id(sampler, seed)
    entry = catalog.require_run(spec.storage, run_id, endpoint_url=endpoint_url)
    newest = entry.newest_checkpoint
    evaluation = evaluate_checkpoint(newest.uri, data_uri=spec.data, endpoint_url=endpoint_url)
    evaluation["uri"] = save_evaluation(entry.uri, evaluation, endpoint_url=endpoint_url)
    info = entry.info
    catalog.write_run_record(
        entry.uri,
        run_id=run_id,
        recipe=info.get("recipe", spec.recipe),
        sampler=info.get("sampler", sampler),
        data=info.get("data", spec.data),
        config=info.get("config", {}),
        state=info.get("state", "succeeded"),
        last_step=info.get("last_step"),
        error=info.get("error", ""),
        evaluation=evaluation,
        endpoint_url=endpoint_url,
    )


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def run_on_cluster(
    spec: plan.AblationSpec,
    *,
    address: str,
    steps: int,
    submit: Callable[[PretrainRequest], str],
    job_status: Callable[[str], str],
    poll_s: float = 10.0,
    progress_every_s: float = 60.0,
    endpoint_url: str = "",
) -> None:
    """Every unfinished run as a job on the cluster, side by side; then wait for all of them,
    printing each change of state and, about every `progress_every_s`, how far each running
    job has come (the progress its job writes into the run record, `service.catalog`).
    `submit(request)` submits a run's job and returns its submission id; `job_status(run_id)`
    is the status of the run's newest job ("" when it has none). A run whose job is still
    running (an earlier invocation's) is waited for, not submitted again. The cluster must
    write to the same storage this machine reads."""
    status = plan.statuses(spec, steps=steps, endpoint_url=endpoint_url)
    waiting = []
    for sampler, seed in spec.runs():
        run_id = spec.run_id(sampler, seed)
        what = status[sampler, seed]
        if what == "done":
            _say(f"{run_id}: finished before, skipped")
            continue
        running = job_status(run_id)
        if running and running not in TERMINAL:
            _say(f"{run_id}: its job is still {running}; waiting for it")
        else:
            # A trained run without its evaluation: a resumed job trains no more and evaluates it.
            job = submit(run_request(spec, sampler, seed, resume=what != "new", address=address))
            _say(f"{run_id}: submitted as job {job}")
        waiting.append(run_id)
    states = dict.fromkeys(waiting, "")
    started = last_progress = time.perf_counter()
    while waiting:
        show_progress = time.perf_counter() - last_progress >= progress_every_s
        for run_id in list(waiting):
            state = job_status(run_id)
            if state != states[run_id]:
                step = _last_step(spec, run_id, endpoint_url=endpoint_url)
                _say(f"{run_id}: {state} (step {step}; {time.perf_counter() - started:.0f} s since submission)")
                states[run_id] = state
            elif show_progress and state == "RUNNING":
                line = progress_of(spec, run_id, endpoint_url=endpoint_url)
                if line:
                    _say(f"{run_id}: {line}")
            if state in TERMINAL:
                waiting.remove(run_id)
        if show_progress:
            last_progress = time.perf_counter()
        if waiting:
            time.sleep(poll_s)
    after = plan.statuses(spec, steps=steps, endpoint_url=endpoint_url)
    unfinished = [spec.run_id(s, d) for (s, d), what in after.items() if what != "done"]
    if unfinished:
        raise Failure(
            f"runs {', '.join(unfinished)} are not trained and evaluated (cmacc logs ID and cmacc runs say why); "
            "rerun the same ablation to continue them"
        )


def _last_step(spec: plan.AblationSpec, run_id: str, *, endpoint_url: str = "") -> int:
    try:
        entry = catalog.read_run(spec.storage, run_id, endpoint_url=endpoint_url)
    except OSError:
        return 0
    newest = entry.newest_checkpoint if entry else None
    return newest.step if newest else 0


def progress_of(spec: plan.AblationSpec, run_id: str, *, endpoint_url: str = "") -> str:
    """How far a running run has come, from the progress its job keeps in the run record
    ("" before the first record)."""
    try:
        entry = catalog.read_run(spec.storage, run_id, endpoint_url=endpoint_url)
    except OSError:
        return ""
    progress = (entry.info.get("progress") if entry else None) or {}
    return reports.progress_text(progress) if progress else ""


def build_report(
    spec: plan.AblationSpec,
    *,
    command: str,
    wall_s: float | None,
    baseline: str = "random",
    endpoint_url: str = "",
) -> dict[str, Any]:
    runs = [report.load_run(spec, sampler, seed, endpoint_url=endpoint_url) for sampler, seed in spec.runs()]
    return report.write_report(spec, runs, command=command, wall_s=wall_s, baseline=baseline, endpoint_url=endpoint_url)
