"""The ablation report's PNGs: probe top-1 per sampler (mean and standard deviation over seeds,
the untrained encoders as a line), dictionary metrics against step (one line per sampler,
mean over seeds with a +-1 standard deviation band), loss and selection time, and, when the
runs carry them, the shadow dictionaries' instruments (one line per shadow sampler).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from jobs.ablation.series import DICT_SERIES, PROBE_FIGURES, SHADOW_SERIES, TRAINING_SERIES


def _colours(samplers: list[str]) -> dict[str, Any]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    return {sampler: palette(i % 10) for i, sampler in enumerate(samplers)}


def _band(ax: Any, runs: list[Any], name: str, label: str, colour: Any) -> None:
    """Mean over seeds of a metric against step, with a +-1 standard deviation band."""
    curves = [r.series(name) for r in runs]
    curves = [(s, v) for s, v in curves if s.size]
    if not curves:
        return
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
    if not common:
        return
    stacked = np.stack([np.interp(common, s, v) for s, v in curves])
    mean = stacked.mean(axis=0)
    std = stacked.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)  # as in the tables
    ax.plot(common, mean, label=label, color=colour, linewidth=1.4)
    if len(curves) > 1:
        ax.fill_between(common, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)


def plots(report: dict[str, Any], runs: list[Any]) -> dict[str, bytes]:
    """The PNGs of the report, by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = list(report["samplers"])
    colours = _colours(samplers)
    by_sampler = {s: [r for r in runs if r.sampler == s] for s in samplers}
    out = {}

    fig, axes = plt.subplots(1, len(PROBE_FIGURES), figsize=(4 * len(PROBE_FIGURES), 3.6))
    for ax, name in zip(axes, PROBE_FIGURES):
        for i, sampler in enumerate(samplers):
            stats = report["samplers"][sampler][name]
            if stats["mean"] is None:
                continue
            ax.bar(i, stats["mean"], yerr=stats["std"] or 0.0, color=colours[sampler], capsize=4, alpha=0.8)
            ax.scatter([i] * stats["n"], stats["values"], color="black", s=10, zorder=3)
        base = report["untrained"][name]
        if base["mean"] is not None:
            ax.axhline(base["mean"], color="grey", linestyle="--", label="untrained")
        ax.set_xticks(range(len(samplers)), samplers, rotation=30)
        ax.set_title(name.replace("/", " "))
        ax.set_ylabel("top-1")
        _legend(ax, loc="lower right", fontsize=8)
    fig.tight_layout()
    out["probes.png"] = _png(fig)

    fig, axes = plt.subplots(len(DICT_SERIES), 2, figsize=(10, 2.6 * len(DICT_SERIES)), squeeze=False)
    for row, (name, title) in enumerate(DICT_SERIES):
        for col, (m, modality) in enumerate((("v", "video"), ("a", "audio"))):
            ax = axes[row][col]
            for sampler in samplers:
                _band(ax, by_sampler[sampler], f"{name}_{m}", sampler, colours[sampler])
            ax.set_title(f"{modality} dictionary: {title}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
    _legend(axes[0][0], fontsize=8)
    fig.tight_layout()
    out["dictionary.png"] = _png(fig)

    fig, axes = plt.subplots(1, len(TRAINING_SERIES), figsize=(10, 3.4))
    for ax, (name, title) in zip(axes, TRAINING_SERIES):
        for sampler in samplers:
            _band(ax, by_sampler[sampler], name, sampler, colours[sampler])
        ax.set_title(title)
        ax.set_xlabel("step")
    _legend(axes[0], fontsize=8)
    fig.tight_layout()
    out["training.png"] = _png(fig)

    shadows = sorted({name for run in runs for name in run.shadows()})
    if shadows:
        out["shadows.png"] = shadow_plot(runs, shadows)
    return out


def shadow_plot(runs: list[Any], shadows: list[str]) -> bytes:
    """Each shadow sampler's instruments against step (mean over the runs that carry it)."""
    import matplotlib.pyplot as plt

    colours = _colours(shadows)
    fig, axes = plt.subplots(len(SHADOW_SERIES), 2, figsize=(10, 2.6 * len(SHADOW_SERIES)), squeeze=False)
    for row, (name, title) in enumerate(SHADOW_SERIES):
        for col, (m, modality) in enumerate((("v", "video"), ("a", "audio"))):
            ax = axes[row][col]
            for shadow in shadows:
                carrying = [r for r in runs if shadow in r.shadows()]
                _band(ax, carrying, f"shadow/{shadow}/{name}_{m}", shadow, colours[shadow])
            ax.set_title(f"shadow {modality} dictionaries: {title}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
    _legend(axes[0][0], fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _legend(ax: Any, **kwargs: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing drawn (no run logged it): no empty legend
        ax.legend(**kwargs)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
