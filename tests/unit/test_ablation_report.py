"""The ablation's statistics and its progress on a cluster, without running anything:
figures aggregated over seeds, differences to a baseline paired by seed with a Student-t
interval, Holm's correction and the minimum detectable difference (checked against brute-force
references: numerical integration of the t density, simulated power), and the progress a
cluster ablation reads from its runs' records."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jobs.ablation import report, runner, stats
from jobs.ablation.plan import AblationSpec
from jobs.ablation.report import RunResult
from service.errors import UsageError
from service.requests import AblateRequest


def spec(tmp_path, samplers=("active", "random"), seeds=(0, 1, 2)) -> AblationSpec:
    return AblationSpec(
        ablation_id="t",
        storage=str(tmp_path),
        data=str(tmp_path / "data"),
        recipe="demo",
        overrides=(),
        samplers=samplers,
        seeds=seeds,
    )


def result(sampler: str, seed: int, video: float, untrained: float = 0.1) -> RunResult:
    records = [{"step": s, "train/loss": 10.0 - s, "dict/select_ms": 2.0} for s in range(1, 5)]
    return RunResult(
        sampler=sampler,
        seed=seed,
        run_id=f"t-{sampler}-s{seed}",
        state="succeeded",
        steps=4,
        train_s=30.0,
        top1={"video/linear": {"untrained": untrained + seed / 100, "pretrained": video}},
        records=records,
    )


def test_figures_are_aggregated_over_seeds_and_paired_with_random_by_seed(tmp_path):
    runs = [
        result("active", 0, 0.30),
        result("active", 1, 0.40),
        result("active", 2, 0.35),
        result("random", 0, 0.20),
        result("random", 1, 0.36),
        result("random", 2, 0.25),
    ]
    out = report.aggregate(spec(tmp_path), runs)
    active = out["samplers"]["active"]["video/linear"]
    assert active["mean"] == pytest.approx(0.35) and active["std"] == pytest.approx(0.05) and active["n"] == 3
    diff = active["minus_random"]  # paired: 0.10, 0.04, 0.10
    assert diff["mean"] == pytest.approx(0.08) and diff["std"] == pytest.approx(math.sqrt(0.0012)) and diff["n"] == 3
    assert "minus_random" not in out["samplers"]["random"]["video/linear"]
    # the untrained encoders are one value per seed, not one per run
    assert out["untrained"]["video/linear"]["values"] == pytest.approx([0.10, 0.11, 0.12])
    assert out["samplers"]["active"]["final_loss"]["mean"] == pytest.approx(6.0)  # the last 10% of the steps


def test_the_verdict_uses_the_student_t_interval_of_the_paired_differences():
    assert report.t_quantile(2) == pytest.approx(4.303, abs=1e-3)
    assert report.t_quantile(29) == pytest.approx(2.045, abs=1e-3)
    assert report.t_quantile(200) == pytest.approx(1.972, abs=1e-3)
    clear = report.verdict("active", "video/linear", {"mean": 0.08, "std": 0.01, "n": 3})
    assert "above random (the interval excludes 0)" in clear
    # the same mean with a spread that t(2) = 4.303 stretches over 0
    spread = report.verdict("active", "video/linear", {"mean": 0.08, "std": 0.05, "n": 3})
    assert "no difference shown (the interval includes 0)" in spread
    assert "-0.044 to +0.204" in spread
    below = report.verdict("moco", "audio/linear", {"mean": -0.05, "std": 0.005, "n": 3})
    assert "below random" in below
    assert "one seed" in report.verdict("active", "video/linear", {"mean": 0.1, "std": None, "n": 1})


def record_progress(the_spec: AblationSpec, run_id: str, step: int, total: int) -> None:
    """What a training job keeps in its run record while it trains (workers.driver)."""
    from service import catalog, layout

    catalog.write_run_record(
        layout.run_uri(the_spec.storage, run_id),
        run_id=run_id,
        recipe="demo",
        sampler="active",
        data=the_spec.data,
        config={},
        state="running",
        progress={"step": step, "total": total, "loss": 9.0, "clips_per_s": 50.0, "at": "2026-12-04T00:00:00+00:00"},
    )


def test_a_cluster_ablation_shows_each_running_jobs_progress_and_names_runs_left_unfinished(tmp_path, capsys):
    the_spec = spec(tmp_path, seeds=(0,))
    states = {"t-active-s0": iter(["PENDING", "RUNNING", "RUNNING", "FAILED"])}
    states["t-random-s0"] = iter(["RUNNING", "RUNNING", "RUNNING", "SUCCEEDED"])
    submitted = []
    record_progress(the_spec, "t-random-s0", 5, 10)  # the other has not trained a step yet

    def status(run_id: str) -> str:
        return next(states[run_id], "FAILED") if run_id in submitted else ""  # no job before its submission

    with pytest.raises(runner.Failure, match="runs t-active-s0, t-random-s0 are not trained and evaluated"):
        runner.run_on_cluster(
            the_spec,
            address="http://head:8265",
            steps=10,
            submit=lambda request: submitted.append(request.run_id) or request.run_id,
            job_status=status,
            poll_s=0.0,
            progress_every_s=0.0,
        )
    err = capsys.readouterr().err
    assert submitted == ["t-active-s0", "t-random-s0"]
    assert "t-active-s0: submitted as job t-active-s0" in err
    assert "t-random-s0: step 5/10  loss 9.000  clips/s 50.0" in err  # a running job's progress, from its record
    assert "t-active-s0: step" not in err
    assert "t-active-s0: PENDING" in err and "t-active-s0: FAILED" in err


def test_runs_with_shadow_dictionaries_get_the_shadow_tables_and_curves(tmp_path):
    """A `random` run whose shadows (active, moco) logged their instruments: the report
    tabulates each shadow's over the second half of training and draws shadows.png."""
    run = result("random", 0, 0.3)
    for record in run.records:
        record.update({"dict/fn_mass_v": 0.2, "shadow/active/fn_mass_v": 0.1, "shadow/moco/fn_mass_v": 0.4})
        record.update({"shadow/active/hardness_a": 0.5, "shadow/moco/hardness_a": 0.6})
    the_spec = spec(tmp_path, samplers=("random",), seeds=(0,))
    written = report.write_report(the_spec, [run], command="test")
    assert run.shadows() == ["active", "moco"]
    figures = written["samplers"]["random"]
    assert figures["shadow/active/fn_mass_v"]["mean"] == pytest.approx(0.1)
    assert figures["dict/fn_mass_v"]["mean"] == pytest.approx(0.2)
    text = (tmp_path / "ablations" / "t" / "report.md").read_text()
    assert "## Shadow dictionaries of the `random` runs" in text
    assert "| active | 0.100 (n=1) |" in text and "| moco | 0.400 (n=1) |" in text
    assert "![shadows](shadows.png)" in text and (tmp_path / "ablations" / "t" / "shadows.png").stat().st_size > 0


def t_density(t: float, nu: int) -> float:
    return (
        math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2))
        / math.sqrt(nu * math.pi)
        * (1 + t * t / nu) ** (-(nu + 1) / 2)
    )


@pytest.mark.parametrize("nu", [1, 2, 4, 9, 30])
@pytest.mark.parametrize("t", [0.3, 1.0, 2.776, 6.0])
def test_the_t_p_value_equals_the_integral_of_the_t_density(t, nu):
    """Two-sided p = 2 * integral of the density from |t| to infinity (Simpson on t = tan(x))."""
    low, high, steps = math.atan(t), math.pi / 2, 20000
    h = (high - low) / steps
    points = [low + i * h for i in range(steps)] + [high - 1e-12]  # the last just short of pi / 2
    f = [t_density(math.tan(x), nu) / math.cos(x) ** 2 for x in points]
    integral = h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    assert stats.t_two_sided_p(t, nu) == pytest.approx(2 * integral, rel=1e-5, abs=1e-9)


def test_t_quantiles_match_the_printed_tables():
    # two-sided 95% and one-sided 80% quantiles as printed in statistics tables
    for nu, q975, q80 in [(1, 12.706, 1.376), (2, 4.303, 1.061), (4, 2.776, 0.941), (10, 2.228, 0.879)]:
        assert stats.t_quantile(0.975, nu) == pytest.approx(q975, abs=1e-3)
        assert stats.t_quantile(0.80, nu) == pytest.approx(q80, abs=1e-3)
    with pytest.raises(ValueError, match="probability in"):
        stats.t_quantile(0.4, 3)


def test_holm_multiplies_the_ith_smallest_p_by_m_minus_i_plus_1_and_keeps_the_order():
    adjusted = stats.holm([0.01, 0.04, None, 0.03, 0.5])
    # sorted: 0.01 x4 = 0.04, 0.03 x3 = 0.09, 0.04 x2 = 0.08 -> raised to 0.09 (monotone), 0.5 x1 = 0.5
    assert adjusted == pytest.approx([0.04, 0.09, None, 0.09, 0.5])
    assert stats.holm([0.3, 0.2]) == pytest.approx([0.4, 0.4])  # 0.2 x 2, then 0.3 raised to stay monotone
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_the_minimum_detectable_difference_is_found_80_percent_of_the_time():
    """Simulated paired experiments with the MDE as true difference and the given spread are
    shown (paired t-test at 5%) in about 80% of the tries; half the MDE much less often."""
    n, std = 5, 0.02
    mde = stats.Paired(mean=0.0, std=std, n=n).minimum_detectable()
    rng = np.random.default_rng(0)

    def shown_share(true_difference: float) -> float:
        diffs = rng.normal(true_difference, std, size=(4000, n))
        t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(n))
        return float(np.mean([stats.t_two_sided_p(v, n - 1) < 0.05 for v in t]))

    assert 0.74 <= shown_share(mde) <= 0.86  # the textbook formula is an approximation of the exact power
    assert shown_share(mde / 2) < 0.45


def test_the_report_compares_with_any_baseline_and_corrects_for_its_comparisons(tmp_path):
    runs = []
    for seed, (moco, active, rnd) in enumerate([(0.30, 0.31, 0.20), (0.35, 0.37, 0.26), (0.32, 0.30, 0.22)]):
        runs += [result("moco", seed, moco), result("active", seed, active), result("random", seed, rnd)]
    the_spec = spec(tmp_path, samplers=("moco", "active", "random"))
    out = report.aggregate(the_spec, runs, baseline="moco")
    assert out["baseline"] == "moco"
    assert out["samplers"]["random"]["video/linear"]["minus_moco"]["mean"] == pytest.approx(-0.0967, abs=1e-4)
    assert "minus_random" not in out["samplers"]["active"]["video/linear"]
    rows = {(row["sampler"], row["figure"]): row for row in out["comparisons"]}
    assert set(rows) == {("active", "video/linear"), ("random", "video/linear")}  # only figures with values
    assert all(row["family"] == 2 for row in rows.values())
    random_row = rows["random", "video/linear"]
    assert random_row["p"] < 0.01 and random_row["p_holm"] == pytest.approx(min(1, 2 * random_row["p"]))
    assert random_row["high"] < 0 and random_row["mde_holm"] > random_row["mde"] > 0
    text = report.markdown(out, command="test", wall_s=None)
    assert "## Difference to `moco`" in text and "## The 2 comparisons with `moco`" in text
    assert "random vs moco, video/linear: -0.097" in text and "(Holm) still shown" in text
    assert "active vs moco, video/linear" in text and "(Holm) not shown" in text
    # a saved report drawn again against another of its samplers gives what aggregate gives
    again = report.rebase(json.loads(json.dumps(out)), "random")
    direct = report.aggregate(the_spec, runs, baseline="random")
    assert [(r["sampler"], round(r["p_holm"], 12)) for r in again["comparisons"]] == [
        (r["sampler"], round(r["p_holm"], 12)) for r in direct["comparisons"]
    ]
    with pytest.raises(UsageError, match="--baseline: 'hardness' is not one of the report's samplers"):
        report.rebase(out, "hardness")


def test_a_named_baseline_must_be_one_of_the_compared_samplers():
    with pytest.raises(UsageError, match="--baseline: 'moco' is not one of the compared samplers"):
        AblateRequest(data="d", samplers=("active", "random"), baseline="moco")
    assert AblateRequest(data="d", samplers=("active", "moco")).baseline is None  # default: random, when compared
