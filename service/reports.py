"""Text a user reads at the end of a job: the pretraining summary and the accuracy table.

Both work on plain JSON-ready dicts (a pretraining outcome, an evaluation), so the CLI and
the catalog use them without torch.
"""

from __future__ import annotations

from typing import Any

MODALITIES = ("video", "audio")


def summary_rows(evaluation: dict[str, Any]) -> list[tuple[str, str, float | None, float]]:
    """(modality, probe, untrained top-1 or None, pretrained top-1) per row of the table."""
    rows = []
    results = evaluation["results"]
    for modality in MODALITIES:
        for probe, scores in results["pretrained"].get(modality, {}).items():
            untrained = results.get("untrained", {}).get(modality, {}).get(probe)
            rows.append((modality, probe, untrained["top1"] if untrained else None, scores["top1"]))
    return rows


def format_table(evaluation: dict[str, Any]) -> str:
    """The accuracy table: one row per modality and probe, untrained next to pretrained."""
    names = {"linear": "linear", "knn": f"k-NN (k={evaluation.get('knn_k', '?')})"}
    splits = evaluation["splits"]
    lines = [
        f"top-1 on {splits.get('test', '?')} held-out clips ({evaluation['num_classes']} classes; "
        f"probes fit on {splits.get('train', '?')} clips), checkpoint step {evaluation['step']}:",
        f"  {'modality':<9}{'probe':<13}{'untrained':>10}{'pretrained':>12}{'change':>9}",
    ]
    for modality, probe, untrained, pretrained in summary_rows(evaluation):
        base = f"{untrained:.3f}" if untrained is not None else "-"
        change = f"{pretrained - untrained:+.3f}" if untrained is not None else ""
        lines.append(f"  {modality:<9}{names.get(probe, probe):<13}{base:>10}{pretrained:>12.3f}{change:>9}")
    return "\n".join(lines)


def format_summary(outcome: dict[str, Any]) -> str:
    """The closing text of a pretraining job: steps, wall time, clips/s, then the probe
    accuracies (untrained vs pretrained)."""
    timings = outcome.get("timings", {})
    rate = outcome.get("clips_per_s")
    lines = [
        f"run {outcome['run_id']}: {outcome['state']} at step {outcome['step']} "
        f"(this job: steps {outcome.get('start_step', 0)} -> {outcome['step']}, "
        f"{'-' if rate is None else f'{rate:.1f}'} clips/s)",
        f"  wall time {timings.get('total_s', 0.0):.1f} s: training {timings.get('train_s', 0.0):.1f} s "
        f"(with Ray Train start-up), evaluation {timings.get('eval_s', 0.0):.1f} s",
    ]
    if outcome.get("checkpoint"):
        lines.append(f"  newest checkpoint {outcome['checkpoint']}")
    if outcome.get("error"):
        lines.append(f"  error: {outcome['error']}")
    if outcome.get("note"):
        lines.append(f"  {outcome['note']}")
    if outcome.get("evaluation"):
        lines.append(format_table(outcome["evaluation"]))
    elif outcome.get("evaluation_note"):
        lines.append(f"  {outcome['evaluation_note']}")
    return "\n".join(lines)
