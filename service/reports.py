"""Text a user reads at the end of a job: the pretraining summary and the accuracy table.

Both work on plain JSON-ready dicts (a pretraining outcome, an evaluation), so the CLI and
the catalog use them without torch.
"""

from __future__ import annotations

import math
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
    """The accuracy table: the protocol, one row per modality and probe (untrained next to
    pretrained; over folds the mean and standard deviation; top-5 with more than 5 classes),
    then the pretrained encoders' per-class accuracy, and where the results were saved."""
    names = {"linear": "linear", "knn": f"k-NN (k={evaluation.get('knn_k', '?')})"}
    splits = evaluation["splits"]
    protocol = evaluation.get("protocol") or {"name": "split"}
    pretrained_results = evaluation["results"]["pretrained"]
    if protocol["name"] == "folds":
        scored = f"{sum(splits.values())} clips, each held out once"
    else:
        scored = f"{splits.get('test', '?')} held-out clips (probes fit on {splits.get('train', '?')})"
    lines = []
    if protocol.get("description"):
        lines.append(f"protocol: {protocol['description']}")
    lines.append(f"top-1 on {scored}, {evaluation['num_classes']} classes, checkpoint step {evaluation['step']}:")
    with_top5 = any("top5" in r for per_probe in pretrained_results.values() for r in per_probe.values())
    header = f"  {'modality':<9}{'probe':<13}{'untrained':>10}{'pretrained':>16}{'change':>9}"
    lines.append(header + (f"{'top-5':>8}" if with_top5 else ""))
    for modality, probe, untrained, pretrained in summary_rows(evaluation):
        result = pretrained_results[modality][probe]
        base = f"{untrained:.3f}" if untrained is not None else "-"
        change = f"{pretrained - untrained:+.3f}" if untrained is not None else ""
        shown = f"{pretrained:.3f}" + (f" ± {result['top1_std']:.3f}" if "top1_std" in result else "")
        line = f"  {modality:<9}{names.get(probe, probe):<13}{base:>10}{shown:>16}{change:>9}"
        if with_top5:
            line += f"{result['top5']:>8.3f}" if "top5" in result else f"{'-':>8}"
        lines.append(line)
    if evaluation.get("skipped_clips"):
        lines.append(f"{evaluation['skipped_clips']} clips could not be decoded and were left out (see the warnings)")
    lines += _per_class_lines(evaluation)
    if evaluation.get("saved"):
        lines.append(f"saved: {evaluation['saved']} (confusion matrices beside it, as PNG)")
    return "\n".join(lines)


def _per_class_lines(evaluation: dict[str, Any]) -> list[str]:
    """Accuracy (and test clips) per class of the pretrained encoders, one column per
    modality, for the first probe evaluated."""
    results = evaluation["results"]["pretrained"]
    modalities = [m for m in MODALITIES if m in results]
    if not modalities or not evaluation.get("class_names"):
        return []
    probe = next(iter(results[modalities[0]]))
    if "support" not in results[modalities[0]][probe]:
        return []  # an evaluation saved before per-class support was recorded
    names = evaluation["class_names"]
    width = max(8, *(len(str(name)) + 2 for name in names))
    lines = [f"per class (pretrained, {probe} probe): accuracy (test clips)"]
    lines.append(f"  {'class':<{width}}" + "".join(f"{m:>16}" for m in modalities))
    for c, name in enumerate(names):
        cells = []
        for modality in modalities:
            result = results[modality][probe]
            accuracy, support = result["per_class"][c], result["support"][c]
            cells.append(f"{'-' if support == 0 else f'{accuracy:.3f}'} ({support})")
        lines.append(f"  {name!s:<{width}}" + "".join(f"{cell:>16}" for cell in cells))
    return lines


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


def progress_text(progress: dict[str, Any]) -> str:
    """A training job's progress as a run record keeps it (`service.catalog`), on one line:
    `step 50/1000  loss 9.123  clips/s 50.0`."""
    parts = [f"step {int(progress['step'])}/{int(progress['total'])}"]
    loss = progress.get("loss")
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        parts.append(f"loss {loss:.3f}")
    if progress.get("clips_per_s") is not None:
        parts.append(f"clips/s {float(progress['clips_per_s']):.1f}")
    if progress.get("world_size"):
        parts.append(f"workers {int(progress['world_size'])}")
    return "  ".join(parts)
