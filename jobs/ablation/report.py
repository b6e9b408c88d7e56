"""The ablation report: per-run figures read from storage, aggregated over seeds.

Written into the ablation folder: `report.json` (every figure), `report.md` (tables, the
plots, and what the numbers say about each sampler against `random`) and the PNGs of
`jobs.ablation.plots`. When the runs carry shadow dictionaries (`method.shadow_samplers`),
the report adds their tables and `shadows.png`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jobs.ablation import plots
from jobs.ablation.plan import AblationSpec
from jobs.ablation.series import (
    DICT_SERIES,
    HOLDING_SERIES,
    INSTRUMENT_SERIES,
    PROBE_FIGURES,
    SHADOW_SERIES,
)
from service import catalog, storage
from workers.metrics import read_metrics


@dataclass(kw_only=True)
class RunResult:
    """What one run of the ablation measured."""

    sampler: str
    seed: int
    run_id: str
    state: str
    steps: int
    train_s: float | None
    top1: dict[str, dict[str, float | None]]  # figure -> {"untrained": ..., "pretrained": ...}
    records: list[dict[str, Any]] = field(repr=False)  # metrics.jsonl, one record per step

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a metric over the steps that logged it (finite values only)."""
        points = [(r["step"], _number(r.get(name))) for r in self.records]
        points = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
        return np.array([s for s, _ in points]), np.array([v for _, v in points])

    def final(self, name: str, fraction: float = 0.1) -> float | None:
        """Mean of a metric over the last `fraction` of the steps that logged it."""
        _, values = self.series(name)
        if values.size == 0:
            return None
        return float(values[-max(1, round(fraction * values.size)) :].mean())

    def shadows(self) -> list[str]:
        """The shadow samplers whose instruments the run logged (`shadow/<sampler>/...`)."""
        names = {key.split("/")[1] for record in self.records for key in record if key.startswith("shadow/")}
        return sorted(names)

    def figures(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {name: self.top1.get(name, {}).get("pretrained") for name in PROBE_FIGURES}
        out["final_loss"] = self.final("train/loss")
        out["select_ms"] = self.final("dict/select_ms", fraction=1.0)
        out["train_s"] = self.train_s
        for name, _ in DICT_SERIES:
            for m in "va":
                out[f"{name}_{m}"] = self.final(f"{name}_{m}", fraction=0.5)
        for shadow in self.shadows():
            for name, _ in SHADOW_SERIES:
                for m in "va":
                    out[f"shadow/{shadow}/{name}_{m}"] = self.final(f"shadow/{shadow}/{name}_{m}", fraction=0.5)
        return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)  # "nan" and "inf" are stored as strings
    except (TypeError, ValueError):
        return None


def load_run(spec: AblationSpec, sampler: str, seed: int, *, endpoint_url: str = "") -> RunResult:
    run_id = spec.run_id(sampler, seed)
    entry = catalog.require_run(spec.storage, run_id, endpoint_url=endpoint_url)
    records = [r for r in read_metrics(entry.uri, endpoint_url=endpoint_url) if not r.get("replayed")]
    records.sort(key=lambda r: r["step"])
    info = entry.info
    return RunResult(
        sampler=sampler,
        seed=seed,
        run_id=run_id,
        state=str(info.get("state", "")),
        steps=int(info.get("last_step", 0)),
        train_s=_train_seconds(info, records),
        top1=(info.get("eval") or {}).get("top1", {}),
        records=records,
    )


def _train_seconds(info: dict[str, Any], records: list[dict[str, Any]]) -> float | None:
    """Training wall time: the jobs' own figure when recorded, else the span of the log."""
    timings = info.get("timings") or {}
    if "train_s_total" in timings:
        return float(timings["train_s_total"])
    times = [r["time"] for r in records if "time" in r]
    return float(times[-1] - times[0]) if len(times) > 1 else None


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's).
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile(degrees_of_freedom: int) -> float:
    return T_975[degrees_of_freedom - 1] if degrees_of_freedom <= len(T_975) else 1.96


def _stats(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for fewer than 2 values), count and the values."""
    array = np.array(values, dtype=float)
    return {
        "mean": float(array.mean()) if array.size else None,
        "std": float(array.std(ddof=1)) if array.size > 1 else None,
        "n": int(array.size),
        "values": [float(v) for v in array],
    }


def aggregate(spec: AblationSpec, runs: list[RunResult]) -> dict[str, Any]:
    """report.json's content: the spec, every run's figures, and per sampler the mean and
    standard deviation over seeds of each figure and of its difference to `random` (paired
    by seed)."""
    figures_of = {(r.sampler, r.seed): r.figures() for r in runs}
    names = list(next(iter(figures_of.values()))) if figures_of else []
    samplers: dict[str, Any] = {}
    for sampler in spec.samplers:
        mine = {seed: figures_of[sampler, seed] for seed in spec.seeds if (sampler, seed) in figures_of}
        figures = {}
        for name in names:
            figures[name] = _stats([f[name] for f in mine.values() if f[name] is not None])
            if "random" in spec.samplers and sampler != "random":
                diffs = []
                for seed, f in mine.items():
                    base = figures_of.get(("random", seed), {}).get(name)
                    if f[name] is not None and base is not None:
                        diffs.append(f[name] - base)
                figures[name]["minus_random"] = _stats(diffs)
        samplers[sampler] = figures
    untrained = {}  # the untrained encoders of a seed are the same for every sampler: one value per seed
    for name in PROBE_FIGURES:
        per_seed = {}
        for r in runs:
            value = r.top1.get(name, {}).get("untrained")
            if value is not None:
                per_seed.setdefault(r.seed, value)
        untrained[name] = _stats(list(per_seed.values()))
    return {
        "spec": spec.to_dict(),
        "runs": [
            {
                "run_id": r.run_id,
                "sampler": r.sampler,
                "seed": r.seed,
                "state": r.state,
                "steps": r.steps,
                "figures": figures_of[r.sampler, r.seed],
                "top1": r.top1,
            }
            for r in runs
        ],
        "samplers": samplers,
        "untrained": untrained,
    }


def _fmt(stats: dict[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    """`mean ± std`, or the one value with "(n=1)", or "-"."""
    if not stats or stats.get("mean") is None:
        return "-"
    sign = "+" if signed else ""
    if stats["std"] is None:
        return f"{stats['mean']:{sign}.{digits}f} (n=1)"
    return f"{stats['mean']:{sign}.{digits}f} ± {stats['std']:.{digits}f}"


def verdict(sampler: str, name: str, diff: dict[str, Any]) -> str:
    """One sentence on `sampler` - random for a figure: the mean paired difference and its 95%
    confidence interval over seeds (Student's t with n - 1 degrees of freedom)."""
    if not diff or diff.get("mean") is None:
        return f"{sampler} vs random, {name}: no paired runs"
    mean, std, n = diff["mean"], diff["std"], diff["n"]
    if std is None:
        return f"{sampler} vs random, {name}: {mean:+.3f} (one seed: no spread to judge it against)"
    half_width = t_quantile(n - 1) * std / math.sqrt(n)
    interval = f"95% interval {mean - half_width:+.3f} to {mean + half_width:+.3f}"
    if abs(mean) <= half_width:
        judged = "no difference shown (the interval includes 0)"
    else:
        judged = f"{'above' if mean > 0 else 'below'} random (the interval excludes 0)"
    return f"{sampler} vs random, {name}: {mean:+.3f} ± {std:.3f} over {n} seeds, {interval}: {judged}"


def markdown(report: dict[str, Any], *, command: str, wall_s: float | None) -> str:
    spec = report["spec"]
    lines = [
        f"# Ablation {spec['ablation_id']}",
        "",
        f"* data: `{spec['data']}`; recipe `{spec['recipe']}`; overrides: "
        f"{', '.join(f'`{o}`' for o in spec['overrides']) or 'none'}",
        f"* samplers: {', '.join(spec['samplers'])}; seeds: {', '.join(map(str, spec['seeds']))} "
        f"({len(report['runs'])} runs)",
        f"* command: `{command}`",
    ]
    train_s = [run["figures"]["train_s"] for run in report["runs"] if run["figures"]["train_s"] is not None]
    if train_s:
        lines.append(f"* training time of the runs, summed: {sum(train_s) / 60:.1f} min")
    if wall_s is not None:
        lines.append(f"* wall time of this invocation (finished runs are skipped): {wall_s / 60:.1f} min")
    lines += [
        "",
        "## Probe top-1 on the held-out split (mean ± standard deviation over seeds)",
        "",
        "| sampler | runs | video linear | video k-NN | audio linear | audio k-NN | final loss | select ms | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    untrained = report["untrained"]
    lines.append(
        f"| untrained encoders | {untrained['video/linear']['n']} | "
        + " | ".join(_fmt(untrained[name]) for name in PROBE_FIGURES)
        + " | - | - | - |"
    )
    for sampler, figures in report["samplers"].items():
        cells = [str(figures["video/linear"]["n"])] + [_fmt(figures[name]) for name in PROBE_FIGURES]
        cells += [_fmt(figures["final_loss"]), _fmt(figures["select_ms"], 1), _fmt(figures["train_s"], 0)]
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    if "random" in report["samplers"]:
        lines += [
            "",
            "## Difference to `random` (paired by seed: same initialisation and data order)",
            "",
            "| sampler | video linear | video k-NN | audio linear | audio k-NN |",
            "| --- | --- | --- | --- | --- |",
        ]
        for sampler, figures in report["samplers"].items():
            if sampler == "random":
                continue
            cells = [_fmt(figures[name].get("minus_random"), signed=True) for name in PROBE_FIGURES]
            lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "What the numbers say (the mean paired difference over seeds and its 95% confidence interval,",
            "Student's t with n - 1 degrees of freedom: with few seeds the interval is wide):",
            "",
        ]
        for sampler, figures in report["samplers"].items():
            if sampler != "random":
                for name in ("video/linear", "audio/linear"):
                    lines.append(f"* {verdict(sampler, name, figures[name].get('minus_random'))}")
    lines += dictionary_tables(report)
    lines += shadow_tables(report)
    lines += [
        "",
        "## Every run",
        "",
        "| run | state | steps | video linear | video k-NN | audio linear | audio k-NN | final loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in report["runs"]:
        f = run["figures"]
        cells = [f"{f[name]:.3f}" if f[name] is not None else "-" for name in (*PROBE_FIGURES, "final_loss")]
        lines.append(f"| {run['run_id']} | {run['state']} | {run['steps']} | " + " | ".join(cells) + " |")
    pictures = ["probes", "dictionary", "training"] + (["shadows"] if any_shadows(report) else [])
    for name in pictures:
        lines += ["", f"![{name}]({name}.png)"]
    return "\n".join([*lines, ""])


def dictionary_tables(report: dict[str, Any]) -> list[str]:
    """Per sampler, what its queries met and what its dictionaries held (second half of
    training; mean ± standard deviation over seeds), the video (v) and audio (a) dictionary."""
    lines = []
    for title, series in (
        ("What the queries met in the dictionaries", INSTRUMENT_SERIES),
        ("What the dictionaries held", HOLDING_SERIES),
    ):
        lines += [
            "",
            f"## {title} (mean over the second half of training; mean ± standard deviation over seeds)",
            "",
            "| sampler | " + " | ".join(f"{name} {m}" for name, _ in series for m in "va") + " |",
            "| --- | " + " | ".join("---" for _ in series for _ in "va") + " |",
        ]
        for sampler, figures in report["samplers"].items():
            cells = [_fmt(figures.get(f"dict/{name}_{m}")) for name, _ in series for m in "va"]
            lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    return lines


def any_shadows(report: dict[str, Any]) -> bool:
    return any(key.startswith("shadow/") for run in report["runs"] for key in run["figures"])


def shadow_tables(report: dict[str, Any]) -> list[str]:
    """The shadow dictionaries of each sampler's runs: every shadow fed the same candidates
    on the same model, so their differences are the samplers' own, free of seed noise."""
    if not any_shadows(report):
        return []
    lines = []
    for sampler, figures in report["samplers"].items():
        shadows = sorted({key.split("/")[1] for key in figures if key.startswith("shadow/")})
        if not shadows:
            continue
        lines += [
            "",
            f"## Shadow dictionaries of the `{sampler}` runs (same model, same candidates; second half of training)",
            "",
            "| shadow | " + " | ".join(f"{name} {m}" for name, _ in SHADOW_SERIES for m in "va") + " |",
            "| --- | " + " | ".join("---" for _ in SHADOW_SERIES for _ in "va") + " |",
        ]
        for shadow in shadows:
            cells = [_fmt(figures.get(f"shadow/{shadow}/{name}_{m}")) for name, _ in SHADOW_SERIES for m in "va"]
            lines.append(f"| {shadow} | " + " | ".join(cells) + " |")
    return lines


def summary_table(report: dict[str, Any]) -> str:
    """What the terminal shows at the end: the probe tables, the verdicts, where the report is."""
    spec = report["spec"]
    text = markdown(report, command=report.get("command", ""), wall_s=report.get("wall_s"))
    body = text[text.index("## Probe top-1") : text.index("## What the queries met")].rstrip()
    folder = storage.join(spec["storage"], "ablations", spec["ablation_id"])
    return f"{body}\n\nreport: {storage.join(folder, 'report.md')} (with report.json and the plots)"


def write_report(
    spec: AblationSpec, runs: list[RunResult], *, command: str, wall_s: float | None = None, endpoint_url: str = ""
) -> dict[str, Any]:
    """Write report.json, report.md and the PNGs into the ablation folder; returns the report."""
    report = aggregate(spec, runs)
    report["command"] = command
    report["wall_s"] = wall_s
    files = {
        "report.json": json.dumps(report, indent=2).encode(),
        "report.md": markdown(report, command=command, wall_s=wall_s).encode(),
        **plots.plots(report, runs),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(spec.folder, name), data, endpoint_url=endpoint_url)
    return report
