"""`cmacc bench train` and `cmacc bench reader` as a user runs them, on CPU, a few steps: every
figure the issue asks for is reported (no speed is asserted: a benchmark measures, a test
checks that it measured)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

TINY = [
    "train.batch_size=4",
    "resources.cpus_per_worker=1",
    "model.video.frames=4",
    "model.video.size=32",
    "model.audio.n_mels=16",
    "data.clip_seconds=0.5",
    "data.num_clips=32",
    "data.shuffle_buffer=16",
    "method.dictionary_size=16",
]


def cmacc(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def test_bench_train_reports_both_paths_and_the_reader_bench_reads_the_set(tmp_path):
    sets = [arg for setting in TINY for arg in ("--set", setting)]
    out = tmp_path / "train.json"
    result = cmacc(
        "bench", "train", *sets, "--steps", "6", "--warmup", "2", "--checkpoint-every", "3",
        "--storage", str(tmp_path / "runs"), "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    plain, service = report["plain"], report["service"]
    assert plain["clips_per_s"] > 0 and plain["flops_per_step"] > 0 and plain["tflops"] > 0
    assert plain["mfu"] is None and report["peak_tflops"] is None  # no known peak for a CPU: said, not invented
    for figure in (
        "clips_per_s",
        "compute_ms",
        "data_wait_share",
        "actor_wait_share",
        "select_ms",
        "staleness",
        "tflops",
    ):
        assert service[figure] is not None and service[figure] >= 0, figure
    assert service["checkpoint_stall_s"] is not None and service["checkpoints_timed"] == 1  # step 6 (3 is warm-up)
    assert service["steps_timed"] == 5
    assert report["ratio"] == pytest.approx(service["clips_per_s"] / plain["clips_per_s"])
    table = result.stdout
    for row in ("clips/s", "MFU", "data-wait share", "selection ms", "staleness", "checkpoint stall s", "(b)/(a)"):
        assert row in table, row
    assert (tmp_path / "runs" / service["run"].rsplit("/", 1)[-1] / "metrics").is_dir()  # kept: --storage

    (dataset,) = (tmp_path / "runs" / "datasets").iterdir()
    out = tmp_path / "reader.json"
    result = cmacc(
        "bench", "reader", "--data", str(dataset), "--recipe", "demo", "--set", "train.batch_size=8",
        "--threads", "1,2", "--batches", "3", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["threads"] for r in report["results"]] == [1, 2]
    assert all(r["clips_per_s"] > 0 and r["frames_per_s"] > 0 and r["batch_shape"][0] == 8 for r in report["results"])
    assert "x one GPU" in result.stdout
