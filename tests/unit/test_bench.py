"""`cmacc bench sampler` as a user runs it: a real subprocess, its table, JSON and exit codes."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, check=False)


def test_bench_sampler_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    sizes = "64x8,128x16x8"
    result = run("-m", "cli", "bench", "sampler", "--sizes", sizes, "--repeats", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[1].split()[:4] == ["N", "M", "P", "C"]
    assert [line.split()[:4] for line in lines[2:]] == [["64", "8", "2", "8"], ["128", "16", "8", "16"]]
    report = json.loads(out.read_text())
    assert report["sampler"] == "active" and report["d"] == 128
    assert [(r["N"], r["M"], r["P"]) for r in report["results"]] == [(64, 8, 2), (128, 16, 8)]
    assert all(len(r["timings_ms"]) == 2 and r["ms"] > 0 for r in report["results"])


def test_bench_sampler_times_each_seeding_and_names_it_in_every_row(tmp_path):
    out = tmp_path / "bench.json"
    args = ("--sizes", "256x64", "--repeats", "1", "--warmup", "0", "--seeding", "exact,parallel", "--out", str(out))
    result = run("-m", "cli", "bench", "sampler", *args)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["N"], r["P"], r["seeding"], r["rounds"]) for r in rows] == [
        (256, 16, "exact", 16),
        (256, 16, "parallel", 16),
    ]
    assert [line.split()[4] for line in result.stdout.strip().splitlines()[2:]] == ["exact", "parallel"]
    bad = run(
        "-m", "cli", "bench", "sampler", "--quick", "--seeding", "exact,greedy", "--out", str(tmp_path / "x.json")
    )
    assert bad.returncode == 2 and "--seeding expects distinct names of exact, parallel" in bad.stderr
    assert not (tmp_path / "x.json").exists()


def test_bench_sampler_rejects_bad_sizes_with_exit_2():
    result = run("-m", "jobs.bench", "sampler", "--sizes", "64x")
    assert result.returncode == 2
    assert "--sizes expects NxM[xP]" in result.stderr


def test_service_figures_time_steps_checkpoints_and_waits_from_the_metrics_log():
    from workers.bench.train import service_figures

    records, now, actor_wait = [], 100.0, 0.0
    for step in range(1, 26):  # 0.1 s steps; checkpoint at 10 and 20: 0.05 s fetching, 0.25 s writing
        now += 0.1 + (0.05 if step % 10 == 0 else 0.0) + (0.25 if step in (11, 21) else 0.0)
        actor_wait += 0.01
        records.append(
            {
                "step": step,
                "time": now,
                "data/wait_s": 0.02,
                "train/clips_per_s": 8 / 0.05,
                "dict/select_ms": 4.0 if step % 2 else float("nan"),
                "dict/staleness": 1.0,
                "dict/wait_s": actor_wait,
            }
        )
    records.append(dict(records[-1], replayed=True))  # a step logged twice counts once
    figures = service_figures(records, global_batch=8, warmup=5, checkpoint_every=10)
    assert figures["steps_timed"] == 19  # steps 7..25 after the first steady record (step 6)
    elapsed = 19 * 0.1 + 2 * 0.3
    assert figures["clips_per_s"] == pytest.approx(19 * 8 / elapsed)
    assert figures["median_step_ms"] == pytest.approx(100.0) and figures["compute_ms"] == pytest.approx(50.0)
    assert figures["checkpoint_stall_s"] == pytest.approx(0.3) and figures["checkpoints_timed"] == 2
    assert figures["data_wait_share"] == pytest.approx(19 * 0.02 / elapsed)
    assert figures["actor_wait_share"] == pytest.approx(19 * 0.01 / elapsed)
    assert figures["select_ms"] == pytest.approx(4.0) and figures["staleness"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="need at least 3"):
        service_figures(records[:6], global_batch=8, warmup=5, checkpoint_every=10)


def test_bench_train_and_reader_refuse_bad_arguments_with_exit_2():
    result = run("-m", "cli", "bench", "train", "--steps", "1")
    assert result.returncode == 2 and "--steps must be >= 3" in result.stderr
    result = run("-m", "jobs.bench", "reader", "--data", "/nowhere", "--threads", "0,x")
    assert result.returncode == 2 and "--threads expects positive integers" in result.stderr


def test_the_plain_step_variants_flip_each_speed_setting_the_device_has():
    from jobs.bench.train import variants
    from service import config

    cfg = config.load_recipe("demo", [])
    assert [name for name, _ in variants(cfg, "cpu")] == ["optim.fused=false", "train.compile=on"]
    names = [name for name, _ in variants(cfg, "cuda")]
    assert names == ["optim.fused=false", "train.compile=off", "train.channels_last=false", "train.precision=fp32"]
    assert all(settings == [name] for name, settings in variants(cfg, "cuda"))
