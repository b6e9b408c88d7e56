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
    result = run("-m", "service.cli", "bench", "sampler", "--sizes", sizes, "--repeats", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[1].split()[:4] == ["N", "M", "P", "C"]
    assert [line.split()[:4] for line in lines[2:]] == [["64", "8", "2", "8"], ["128", "16", "8", "16"]]
    report = json.loads(out.read_text())
    assert report["sampler"] == "active" and report["d"] == 128
    assert [(r["N"], r["M"], r["P"]) for r in report["results"]] == [(64, 8, 2), (128, 16, 8)]
    assert all(len(r["timings_ms"]) == 2 and r["ms"] > 0 for r in report["results"])


def test_bench_sampler_rejects_bad_sizes_with_exit_2():
    result = run("-m", "jobs.bench", "sampler", "--sizes", "64x")
    assert result.returncode == 2
    assert "--sizes expects NxM[xP]" in result.stderr
