"""`cmacc ablate` end to end on the session's local Ray: a miniature ablation (2 samplers, 1
seed, a few steps) builds its report from the runs it made, and a rerun skips them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service import catalog, storage
from service.requests import AblateRequest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[2]
TINY = (
    "train.batch_size=8",
    "train.steps=4",
    "train.log_every=2",
    "resources.num_workers=1",
    "resources.cpus_per_worker=1",
    "model.video.frames=4",
    "model.video.size=32",
    "model.audio.n_mels=16",
    "data.clip_seconds=0.5",
    "data.shuffle_buffer=16",
    "method.dictionary_size=16",
    "method.enqueue_fraction=0.25",
    "checkpoint.every_steps=4",
    "optim.warmup_steps=0",
    "eval.linear_epochs=10",
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from workers.data.synth import write_synthetic

    uri = str(tmp_path_factory.mktemp("data") / "synth")
    write_synthetic(uri, 64, seed=2, num_classes=4, frames=4, size=32, seconds=0.5)
    return uri


def test_a_miniature_ablation_builds_its_report_and_a_rerun_skips_its_runs(ray_session, dataset, tmp_path, capsys):
    from jobs.ablate import ablate

    root = str(tmp_path / "runs")
    request = AblateRequest(
        data=dataset, samplers=("active", "random"), seeds=1, overrides=TINY, storage=root, ablation_id="mini"
    )
    report = ablate(request, command="test")
    said = capsys.readouterr().err
    assert "run 1/2 mini-active-s0 (sampler active, seed 0): training" in said
    assert "run 2/2 mini-random-s0 (sampler random, seed 0): training" in said

    runs = {run.run_id: run for run in catalog.list_runs(root)}
    assert set(runs) == {"mini-active-s0", "mini-random-s0"}  # ordinary runs: cmacc runs lists them
    for run in runs.values():
        assert run.info["state"] == "succeeded" and run.info["last_step"] == 4
        assert run.info["eval"]["step"] == 4
    folder = storage.join(root, "ablations", "mini")
    for name in ("ablation.json", "report.md", "report.json", "probes.png", "dictionary.png", "training.png"):
        assert storage.exists(storage.join(folder, name)), name
    saved = json.loads(storage.read_bytes(storage.join(folder, "report.json")))
    assert saved["samplers"].keys() == {"active", "random"}
    for run in saved["runs"]:  # the report's figures are the runs' own evaluations
        top1 = runs[run["run_id"]].info["eval"]["top1"]
        assert run["figures"]["video/linear"] == top1["video/linear"]["pretrained"]
        assert run["figures"]["dict/entered_frac_v"] == pytest.approx(2 / 8)  # P = M / 4 of the arrivals
    assert report["samplers"]["active"]["video/linear"]["minus_random"]["n"] == 1
    text = storage.read_bytes(storage.join(folder, "report.md")).decode()
    assert "| active |" in text and "| random |" in text and "untrained encoders" in text

    checkpoints = {run_id: [c.uri for c in run.checkpoints] for run_id, run in runs.items()}
    ablate(request, command="test")
    said = capsys.readouterr().err
    assert "mini-active-s0: finished before, skipped" in said and "mini-random-s0: finished before, skipped" in said
    again = {run.run_id: [c.uri for c in run.checkpoints] for run in catalog.list_runs(root)}
    assert again == checkpoints


def test_a_bad_sampler_or_data_set_is_refused_with_nothing_written(tmp_path, dataset):
    root = tmp_path / "runs"

    def cmacc(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cli", "ablate", "--storage", str(root), *argv],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=300,
        )

    bad_sampler = cmacc("--data", dataset, "--samplers", "active,greedy")
    assert bad_sampler.returncode == 2 and "unknown sampler 'greedy'" in bad_sampler.stderr
    missing = cmacc("--data", str(tmp_path / "nothing"), "--samplers", "active,random")
    assert missing.returncode == 1 and str(tmp_path / "nothing") in missing.stderr
    for result in (bad_sampler, missing):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not root.exists()
