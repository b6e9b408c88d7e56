"""The ablation's statistics and its progress on a cluster, without running anything:
figures aggregated over seeds, differences to `random` paired by seed with a Student-t
interval, and the progress lines a cluster ablation reads from its jobs' logs."""

from __future__ import annotations

import math

import pytest

from service.commands.cluster import PROGRESS_LINE
from workers.ablation import report, runner
from workers.ablation.plan import AblationSpec
from workers.ablation.report import RunResult
from workers.distributed.loop import progress_line


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


def test_the_progress_line_of_the_training_loop_is_found_in_a_jobs_logs():
    metrics = {
        "train/loss": 9.1,
        "train/clips_per_s": 50.0,
        "dict/select_ms": 3.0,
        "dict/staleness": 0.0,
        "embed/cos_qv": 0.01,
        "embed/cos_qa": 0.02,
        "embed/pos_cos_va": 0.5,
        "embed/neg_cos_va": 0.0,
    }
    first = progress_line(25, 1000, metrics, steps_per_s=2.0)
    newest = progress_line(50, 1000, metrics, steps_per_s=2.0)
    logs = f"(RayTrainWorker pid=1) {first}\nsome other line\n\x1b[36m(RayTrainWorker pid=1)\x1b[0m {newest}\n"
    found = PROGRESS_LINE.findall(logs)
    assert found == [first, newest]
    assert found[-1].startswith("step 50/1000") and found[-1].endswith("eta 475 s")


def test_a_cluster_ablation_shows_each_running_jobs_progress_and_names_runs_left_unfinished(tmp_path, capsys):
    the_spec = spec(tmp_path, seeds=(0,))
    states = {"t-active-s0": iter(["PENDING", "RUNNING", "RUNNING", "FAILED"])}
    states["t-random-s0"] = iter(["RUNNING", "RUNNING", "RUNNING", "SUCCEEDED"])
    submitted = []

    def status(run_id: str) -> str:
        return next(states[run_id], "FAILED") if run_id in submitted else ""  # no job before its submission

    with pytest.raises(runner.Failure, match="runs t-active-s0, t-random-s0 are not trained and evaluated"):
        runner.run_on_cluster(
            the_spec,
            address="http://head:8265",
            steps=10,
            submit=lambda request: submitted.append(request.run_id) or request.run_id,
            job_status=status,
            job_progress=lambda run_id: f"step 5/10  loss 9.0  eta 12 s ({run_id})",
            poll_s=0.0,
            progress_every_s=0.0,
        )
    err = capsys.readouterr().err
    assert submitted == ["t-active-s0", "t-random-s0"]
    assert "t-active-s0: submitted as job t-active-s0" in err
    assert "t-random-s0: step 5/10  loss 9.0  eta 12 s (t-random-s0)" in err  # a running job's progress
    assert "t-active-s0: PENDING" in err and "t-active-s0: FAILED" in err
