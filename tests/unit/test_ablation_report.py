"""The ablation's statistics and its progress on a cluster, without running anything:
figures aggregated over seeds, differences to `random` paired by seed with a Student-t
interval, and the progress a cluster ablation reads from its runs' records."""

from __future__ import annotations

import math

import pytest

from jobs.ablation import report, runner
from jobs.ablation.plan import AblationSpec
from jobs.ablation.report import RunResult


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
    assert report.t_quantile(2) == pytest.approx(4.303)
    assert report.t_quantile(29) == pytest.approx(2.045)
    assert report.t_quantile(200) == pytest.approx(1.96)
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
