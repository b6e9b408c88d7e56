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

from jobs.ablation import plots, stats
from jobs.ablation.plan import AblationSpec
from jobs.ablation.series import (
    DICT_SERIES,
    HOLDING_SERIES,
    INSTRUMENT_SERIES,
    PROBE_FIGURES,
    SHADOW_SERIES,
)
from service import catalog, errors, storage
from service.errors import UsageError
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


def t_quantile(degrees_of_freedom: int) -> float:
    """The two-sided 95% quantile of Student's t (what every interval of the report uses)."""
    return stats.t_quantile(1.0 - stats.ALPHA / 2.0, degrees_of_freedom)


def _stats(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for fewer than 2 values), count and the values."""
    array = np.array(values, dtype=float)
    return {
        "mean": float(array.mean()) if array.size else None,
        "std": float(array.std(ddof=1)) if array.size > 1 else None,
        "n": int(array.size),
        "values": [float(v) for v in array],
    }


def aggregate(spec: AblationSpec, runs: list[RunResult], *, baseline: str = "random") -> dict[str, Any]:
    """report.json's content: the spec, every run's figures, per sampler the mean and standard
    deviation over seeds of each figure and of its difference to `baseline` (paired by seed),
    and the family of comparisons with the baseline (`comparisons`)."""
    run_rows = [
        {
            "run_id": r.run_id,
            "sampler": r.sampler,
            "seed": r.seed,
            "state": r.state,
            "steps": r.steps,
            "figures": r.figures(),
            "top1": r.top1,
        }
        for r in runs
    ]
    return summarise(spec.to_dict(), run_rows, baseline=baseline)


def summarise(spec: dict[str, Any], runs: list[dict[str, Any]], *, baseline: str = "random") -> dict[str, Any]:
    """The report's aggregates from its runs' rows (as report.json keeps them), against `baseline`:
    what `aggregate` computes, and how a saved report is drawn against another baseline (`rebase`)."""
    figures_of = {(r["sampler"], r["seed"]): r["figures"] for r in runs}
    names = list(next(iter(figures_of.values()))) if figures_of else []
    has_baseline = baseline in spec["samplers"]
    samplers: dict[str, Any] = {}
    for sampler in spec["samplers"]:
        mine = {seed: figures_of[sampler, seed] for seed in spec["seeds"] if (sampler, seed) in figures_of}
        figures = {}
        for name in names:
            figures[name] = _stats([f[name] for f in mine.values() if f.get(name) is not None])
            if has_baseline and sampler != baseline:
                diffs = []
                for seed, f in mine.items():
                    base = figures_of.get((baseline, seed), {}).get(name)
                    if f.get(name) is not None and base is not None:
                        diffs.append(f[name] - base)
                figures[name][f"minus_{baseline}"] = _stats(diffs)
        samplers[sampler] = figures
    untrained = {}  # the untrained encoders of a seed are the same for every sampler: one value per seed
    for name in PROBE_FIGURES:
        per_seed = {}
        for r in runs:
            value = r["top1"].get(name, {}).get("untrained")
            if value is not None:
                per_seed.setdefault(r["seed"], value)
        untrained[name] = _stats(list(per_seed.values()))
    return {
        "spec": spec,
        "baseline": baseline,
        "runs": runs,
        "samplers": samplers,
        "untrained": untrained,
        "comparisons": comparisons(samplers, baseline) if has_baseline else [],
    }


def rebase(report: dict[str, Any], baseline: str) -> dict[str, Any]:
    """A saved report (report.json) with its aggregates and comparisons drawn against `baseline`."""
    if baseline not in report["spec"]["samplers"]:
        known = ", ".join(report["spec"]["samplers"])
        raise UsageError(f"--baseline: {baseline!r} is not one of the report's samplers ({known})")
    out = summarise(report["spec"], report["runs"], baseline=baseline)
    return {**{k: v for k, v in report.items() if k not in out}, **out}


def comparisons(samplers: dict[str, Any], baseline: str) -> list[dict[str, Any]]:
    """Every sampler against the baseline on every probe figure: the family a report tests.

    Each row has the paired mean difference, its spread and 95% interval, the paired t-test's p,
    Holm's adjusted p over the whole family (so that the chance of any false claim in the report
    stays at 5%), and the minimum detectable difference at 80% power, at 5% and at the strictest
    Holm level (5% over the family's size)."""
    rows = []
    for sampler, figures in samplers.items():
        if sampler == baseline:
            continue
        for name in PROBE_FIGURES:
            diff = figures.get(name, {}).get(f"minus_{baseline}") or {}
            if diff.get("mean") is None:
                continue
            rows.append({"sampler": sampler, "figure": name, "diff": diff})
    family = len([row for row in rows if row["diff"]["std"] is not None])
    pairs = [stats.Paired(mean=row["diff"]["mean"], std=row["diff"]["std"], n=row["diff"]["n"]) for row in rows]
    adjusted = stats.holm([pair.p_value for pair in pairs])
    out = []
    for row, pair, p_holm in zip(rows, pairs, adjusted):
        half = pair.half_width
        out.append(
            {
                "sampler": row["sampler"],
                "figure": row["figure"],
                "mean": pair.mean,
                "std": pair.std,
                "n": pair.n,
                "low": None if half is None else pair.mean - half,
                "high": None if half is None else pair.mean + half,
                "p": pair.p_value,
                "p_holm": p_holm,
                "family": family,
                "mde": pair.minimum_detectable(),
                "mde_holm": pair.minimum_detectable(alpha=stats.ALPHA / family) if family else None,
            }
        )
    return out


def _fmt(stats: dict[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    """`mean ± std`, or the one value with "(n=1)", or "-"."""
    if not stats or stats.get("mean") is None:
        return "-"
    sign = "+" if signed else ""
    if stats["std"] is None:
        return f"{stats['mean']:{sign}.{digits}f} (n=1)"
    return f"{stats['mean']:{sign}.{digits}f} ± {stats['std']:.{digits}f}"


def verdict(
    sampler: str,
    name: str,
    diff: dict[str, Any],
    *,
    baseline: str = "random",
    p_holm: float | None = None,
    family: int = 0,
) -> str:
    """One sentence on `sampler` - `baseline` for a figure: the mean paired difference and its 95%
    confidence interval over seeds (Student's t with n - 1 degrees of freedom) and, given the
    Holm-adjusted p of the report's family of `family` comparisons, whether it holds after it."""
    if not diff or diff.get("mean") is None:
        return f"{sampler} vs {baseline}, {name}: no paired runs"
    mean, std, n = diff["mean"], diff["std"], diff["n"]
    if std is None:
        return f"{sampler} vs {baseline}, {name}: {mean:+.3f} (one seed: no spread to judge it against)"
    half_width = t_quantile(n - 1) * std / math.sqrt(n)
    interval = f"95% interval {mean - half_width:+.3f} to {mean + half_width:+.3f}"
    if abs(mean) <= half_width:
        judged = "no difference shown (the interval includes 0)"
    else:
        judged = f"{'above' if mean > 0 else 'below'} {baseline} (the interval excludes 0)"
    sentence = f"{sampler} vs {baseline}, {name}: {mean:+.3f} ± {std:.3f} over {n} seeds, {interval}: {judged}"
    if p_holm is not None and family > 1:
        held = "still shown" if p_holm < stats.ALPHA else "not shown"
        sentence += f"; over the report's {family} comparisons (Holm) {held}, adjusted p = {p_holm:.3f}"
    return sentence


def comparison_lines(report: dict[str, Any]) -> list[str]:
    """The report's comparisons with its baseline: paired tables, Holm's verdicts, and power."""
    baseline = report.get("baseline", "random")
    if baseline not in report["samplers"]:
        return []
    key = f"minus_{baseline}"
    lines = [
        "",
        f"## Difference to `{baseline}` (paired by seed: same initialisation and data order)",
        "",
        "| sampler | video linear | video k-NN | audio linear | audio k-NN |",
        "| --- | --- | --- | --- | --- |",
    ]
    for sampler, figures in report["samplers"].items():
        if sampler != baseline:
            cells = [_fmt(figures[name].get(key), signed=True) for name in PROBE_FIGURES]
            lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    rows = report.get("comparisons") or []
    family = rows[0]["family"] if rows else 0
    if family:
        lines += [
            "",
            f"## The {family} comparisons with `{baseline}`: intervals, Holm's correction, power",
            "",
            f"With {family} comparisons at 5%, about {family * stats.ALPHA:.1f} would exclude 0 by chance alone; Holm's",
            "adjusted p keeps the chance of any false claim in the report at 5%. The minimum detectable",
            "difference (MDE) is the smallest true difference these seeds would show 80% of the time, taking the",
            "observed spread of the paired differences as the true one, at 5% and at Holm's strictest level",
            f"(5% / {family}).",
            "",
            "| sampler | figure | difference | 95% interval | p | Holm p | shown after Holm | MDE 80% | MDE 80%, Holm |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in rows:
            if row["std"] is None:
                continue
            shown = row["p_holm"] < stats.ALPHA
            lines.append(
                f"| {row['sampler']} | {row['figure']} | {row['mean']:+.3f} | "
                f"[{row['low']:+.3f}, {row['high']:+.3f}] | {row['p']:.3f} | {row['p_holm']:.3f} | "
                f"{'yes' if shown else 'no'} | {row['mde']:.3f} | {row['mde_holm']:.3f} |"
            )
    lines += [
        "",
        "What the numbers say (the mean paired difference over seeds and its 95% confidence interval,",
        "Student's t with n - 1 degrees of freedom: with few seeds the interval is wide):",
        "",
    ]
    holm_of = {(row["sampler"], row["figure"]): row["p_holm"] for row in rows}
    for sampler, figures in report["samplers"].items():
        if sampler != baseline:
            for name in ("video/linear", "audio/linear"):
                sentence = verdict(
                    sampler,
                    name,
                    figures[name].get(key),
                    baseline=baseline,
                    p_holm=holm_of.get((sampler, name)),
                    family=family,
                )
                lines.append(f"* {sentence}")
    return lines


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
    lines += comparison_lines(report)
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
    spec: AblationSpec,
    runs: list[RunResult],
    *,
    command: str,
    wall_s: float | None = None,
    baseline: str = "random",
    endpoint_url: str = "",
) -> dict[str, Any]:
    """Write report.json, report.md and the PNGs into the ablation folder; returns the report."""
    report = aggregate(spec, runs, baseline=baseline)
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


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.ablation.report REPORT_JSON [--baseline NAME]`: a saved report's comparisons
    drawn again against another of its samplers (printed as Markdown; nothing is written)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m jobs.ablation.report", description=main.__doc__.splitlines()[0])
    parser.add_argument("report", help="URI of an ablation's report.json")
    parser.add_argument("--baseline", default="random", help="the sampler every other is compared with")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    saved = json.loads(storage.read_bytes(args.report))
    print("\n".join(comparison_lines(rebase(saved, args.baseline))).strip(), flush=True)
    return 0


if __name__ == "__main__":
    errors.run_main(main)
