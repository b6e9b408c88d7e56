"""The service end to end: a Ray head with its dashboard on 127.0.0.1 (token authentication
on), `cmacc submit|status|logs|runs|checkpoints|list` as a user runs them (subprocesses),
a resubmission with `--resume` that continues from the checkpoint, and the refusals that
must leave storage untouched."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[2]
CMACC = [sys.executable, "-m", "service.cli"]
TINY = [
    "train.batch_size=4",
    "resources.num_workers=1",
    "resources.cpus_per_worker=1",
    "model.video.frames=4",
    "model.video.size=32",
    "model.audio.n_mels=16",
    "data.clip_seconds=0.5",
    "data.shuffle_buffer=16",
    "method.dictionary_size=16",
    "checkpoint.every_steps=2",
    "optim.warmup_steps=0",
    "train.log_every=1",
    "eval.linear_epochs=20",
]


@pytest.fixture(scope="module")
def head(free_ports):
    """A Ray head on loopback with the dashboard and token authentication; stopped after."""
    token = secrets.token_hex(32)
    gcs, dashboard, agent_listen, agent_grpc, metrics, client, runtime_env = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="ray-e2e-", dir="/tmp")  # short: Unix socket paths are limited
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` = this one
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    env.pop("RAY_ADDRESS", None)
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent_listen}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}",
        f"--runtime-env-agent-port={runtime_env}",
        "--num-cpus=3",
        f"--temp-dir={temp_dir}",
    ]
    log = open(os.path.join(temp_dir, "head.log"), "w")  # noqa: SIM115 - open while the head runs
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 180
    while True:  # up once the Jobs API answers
        probe = subprocess.run(
            [*CMACC, "list", "--address", address],
            env=_client_env(token),
            cwd=PROJECT,
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0:
            break
        assert process.poll() is None, Path(temp_dir, "head.log").read_text()[-4000:]
        assert time.monotonic() < deadline, f"the Ray head did not answer: {probe.stderr}"
        time.sleep(2)
    yield {"address": address, "token": token}
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _client_env(token: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_TOKEN": token, "PYTHONPATH": str(PROJECT)}
    env.pop("RAY_AUTH_MODE", None)  # cmacc turns token mode on when it finds a token
    env.pop("RAY_ADDRESS", None)
    return env


def cmacc(head: dict, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**_client_env(head["token"]), "RAY_ADDRESS": head["address"]}
    result = subprocess.run([*CMACC, *argv], env=env, cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert head["token"] not in result.stdout + result.stderr, "the token was printed"
    if check:
        assert result.returncode == 0, (
            f"cmacc {' '.join(argv)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def wait_for(head: dict, run_id: str, timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = json.loads(cmacc(head, "status", run_id, "--json").stdout)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        assert time.monotonic() < deadline, f"run {run_id} still {status} after {timeout_s} s"
        time.sleep(3)


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from workers.data.synth import write_synthetic

    uri = str(tmp_path_factory.mktemp("data") / "synth")
    write_synthetic(uri, 60, seed=5, num_classes=4, frames=4, size=32, seconds=0.5)
    return uri


def test_cmacc_pretrain_generates_data_trains_evaluates_and_prints_the_summary(tmp_path):
    """The local door: embedded Ray, the default generated data set, training, evaluation."""
    root = tmp_path / "runs"
    data = ["data.num_clips=60", "data.num_classes=4", "data.frames=4", "data.size=32"]
    sets = [f"--set={item}" for item in [*TINY, *data, "train.steps=4"]]
    env = _client_env("")
    env.pop("RAY_AUTH_TOKEN")
    result = subprocess.run(
        [*CMACC, "pretrain", "--run-id", "local", "--storage", str(root), *sets],
        env=env,
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "generating 60 synthetic clips" in result.stdout
    assert "run local: succeeded at step 4 (this job: steps 0 -> 4" in result.stdout
    table = result.stdout[result.stdout.index("top-1 on") :]
    rows = [line.split() for line in table.splitlines()[2:6]]
    assert [row[:2] for row in rows] == [["video", "linear"], ["video", "k-NN"], ["audio", "linear"], ["audio", "k-NN"]]
    run_json = json.loads((root / "local" / "run.json").read_text())
    assert run_json["state"] == "succeeded" and run_json["last_step"] == 4
    assert run_json["data"].startswith(str(root / "datasets" / "synth-"))
    evaluation = json.loads((root / "local" / "eval" / "checkpoint-00000004.json").read_text())
    for model in ("pretrained", "untrained"):
        for modality in ("video", "audio"):
            for probe in ("linear", "knn"):
                top1 = evaluation["results"][model][modality][probe]["top1"]
                assert 0.0 <= top1 <= 1.0
                assert run_json["eval"]["top1"][f"{modality}/{probe}"][model] == top1


def test_submit_status_logs_runs_and_resume_continue_from_the_checkpoint(head, dataset, tmp_path):
    root = tmp_path / "runs"
    sets = [f"--set={item}" for item in TINY]
    common = ["--recipe", "demo", "--run-id", "e2e", "--storage", str(root), "--data", dataset]

    cmacc(head, "submit", *common, *sets, "--set=train.steps=4")
    assert wait_for(head, "e2e") == "SUCCEEDED", cmacc(head, "logs", "e2e").stdout[-4000:]
    logs = cmacc(head, "logs", "e2e").stdout
    assert "run e2e: succeeded at step 4" in logs
    assert "top-1 on" in logs and "untrained" in logs and "pretrained" in logs
    listed = json.loads(cmacc(head, "runs", "--storage", str(root), "--json").stdout)
    assert [(r["run_id"], r["state"], r["last_step"]) for r in listed] == [("e2e", "succeeded", 4)]
    assert listed[0]["newest_checkpoint"].endswith("checkpoint-00000004")
    assert set(listed[0]["eval"]["top1"]) == {"video/linear", "video/knn", "audio/linear", "audio/knn"}

    # The same id again without --resume: refused before anything reaches the cluster or storage.
    before = snapshot(root)
    refused = cmacc(head, "submit", *common, *sets, "--set=train.steps=8", check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    assert snapshot(root) == before

    # Resubmitted with --resume and many more steps; `cmacc stop` once it is past step 4: the job
    # writes a checkpoint and stops, and nothing trained is lost.
    cmacc(head, "submit", *common, *sets, "--set=train.steps=400", "--resume")
    deadline = time.monotonic() + 600
    while not any(c["step"] > 4 for c in checkpoints_of(head, root)):
        assert time.monotonic() < deadline, cmacc(head, "logs", "e2e").stdout[-4000:]
        time.sleep(2)
    cmacc(head, "stop", "e2e")
    assert wait_for(head, "e2e") == "STOPPED"
    info = json.loads(cmacc(head, "runs", "--storage", str(root), "--json").stdout)[0]
    stopped_at = info["last_step"]
    assert info["state"] == "stopped" and 4 < stopped_at < 400, info
    assert info["newest_checkpoint"].endswith(f"checkpoint-{stopped_at:08d}")

    # Resubmitted again: it continues from the stop's checkpoint and finishes.
    cmacc(head, "submit", *common, *sets, f"--set=train.steps={stopped_at + 2}", "--resume")
    assert wait_for(head, "e2e") == "SUCCEEDED", cmacc(head, "logs", "e2e").stdout[-4000:]
    logs = cmacc(head, "logs", "e2e").stdout
    assert f"run e2e: succeeded at step {stopped_at + 2} (this job: steps {stopped_at} -> {stopped_at + 2}" in logs, (
        "\n".join(line for line in logs.splitlines() if "Reporting" not in line and "Checkpoint succ" not in line)[
            -6000:
        ]
    )
    assert json.loads(cmacc(head, "runs", "--storage", str(root), "--json").stdout)[0]["last_step"] == stopped_at + 2
    assert checkpoints_of(head, root)[-1]["step"] == stopped_at + 2

    from workers.metrics import read_metrics

    records = read_metrics(str(root / "e2e"))
    starts = [int(r["run/start_step"]) for r in records if "run/start_step" in r]
    assert starts == [0, 4, stopped_at], f"attempts started at {starts}, not at their checkpoints"
    assert sorted({r["step"] for r in records}) == list(range(1, stopped_at + 3))

    jobs = json.loads(cmacc(head, "list", "--json").stdout)
    assert [(j["submission_id"], j["run_id"], j["status"]) for j in jobs if j["run_id"] == "e2e"] == [
        ("e2e", "e2e", "SUCCEEDED"),
        ("e2e.2", "e2e", "STOPPED"),
        ("e2e.3", "e2e", "SUCCEEDED"),
    ]

    # Evaluation and fine-tuning of the run where it ran: Ray jobs whose work is a Ray task.
    on_cluster = ["--run", "e2e", "--storage", str(root), "--address", head["address"]]
    evaluated = cmacc(head, "eval", *on_cluster, "--probe", "knn")
    assert "submitted as job eval-e2e-" in evaluated.stderr and "as a Ray task" in evaluated.stdout
    assert "protocol: official split" in evaluated.stdout
    assert f"saved: {root / 'e2e' / 'eval' / f'checkpoint-{stopped_at + 2:08d}.json'}" in evaluated.stdout
    tuned = cmacc(head, "finetune", *on_cluster, "--epochs", "1", "--batch-size", "8")
    assert "pretrained (CM-ACC)" in tuned.stdout and "from scratch" in tuned.stdout
    record = json.loads(cmacc(head, "runs", "--storage", str(root), "--json").stdout)[0]
    assert set(record["finetune"]["top1"]) == {"pretrained", "scratch"}
    assert record["finetune"]["uri"].endswith(f"finetune-checkpoint-{stopped_at + 2:08d}-video.json")
    assert json.loads(cmacc(head, "status", "e2e", "--json").stdout)["status"] == "SUCCEEDED"  # still the run's job


def checkpoints_of(head: dict, root: Path) -> list[dict]:
    return json.loads(cmacc(head, "checkpoints", "e2e", "--storage", str(root), "--json").stdout)


def test_submission_errors_are_one_line_with_the_right_exit_code(head, dataset, tmp_path):
    root = tmp_path / "runs"
    common = ["--run-id", "bad", "--storage", str(root), "--data", dataset]
    unknown = cmacc(head, "submit", "--recipe", "no-such-recipe", *common, check=False)
    assert unknown.returncode == 2 and "no-such-recipe" in unknown.stderr
    invalid = cmacc(head, "submit", *common, "--set", "optim.lr=abc", check=False)
    assert invalid.returncode == 2 and "optim.lr" in invalid.stderr
    unreachable = cmacc(head, "submit", *common, "--address", "http://127.0.0.1:9", check=False)
    assert unreachable.returncode == 1 and "127.0.0.1:9" in unreachable.stderr
    missing = cmacc(head, "status", "no-such-run", check=False)
    assert missing.returncode == 1 and "no-such-run" in missing.stderr
    assert not root.exists(), "a rejected submission wrote to storage"
    for result in (unknown, invalid, unreachable, missing):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_ablate_with_an_address_runs_side_by_side_as_jobs_and_reports(head, dataset, tmp_path):
    """`cmacc ablate --address`: every run is a job on the cluster; the report comes from storage."""
    root = tmp_path / "runs"
    sets = [f"--set={item}" for item in [*TINY, "train.steps=2", "eval.linear_epochs=5"]]
    argv = ["ablate", "--data", dataset, "--samplers", "active,random", "--seeds", "1", "--storage", str(root)]
    result = cmacc(head, *argv, "--id", "cl", *sets, "--address", head["address"])
    assert "cl-active-s0: submitted as job cl-active-s0" in result.stderr
    assert "cl-random-s0: SUCCEEDED" in result.stderr
    jobs = {j["run_id"]: j["status"] for j in json.loads(cmacc(head, "list", "--json").stdout)}
    assert jobs["cl-active-s0"] == jobs["cl-random-s0"] == "SUCCEEDED"
    report = json.loads((root / "ablations" / "cl" / "report.json").read_text())
    assert [r["run_id"] for r in report["runs"]] == ["cl-active-s0", "cl-random-s0"]
    assert all(r["state"] == "succeeded" and r["figures"]["video/linear"] is not None for r in report["runs"])
    again = cmacc(head, *argv, "--id", "cl", *sets, "--address", head["address"])
    assert "cl-active-s0: finished before, skipped" in again.stderr


def test_a_run_the_cluster_cannot_hold_is_shown_waiting_and_stops_within_seconds(head, dataset, tmp_path):
    """The head offers 3 CPUs; a run asking for 9 (8 for its worker, 1 for the actor) waits
    for resources: `cmacc status` says so and what it lacks, `cmacc stop` ends it within
    seconds (there is no step to checkpoint), and the run record says `stopped` at step 0."""
    root = tmp_path / "runs"
    sets = [f"--set={item}" for item in [*TINY, "resources.cpus_per_worker=8", "train.steps=4"]]
    cmacc(head, "submit", "--recipe", "demo", "--run-id", "big", "--storage", str(root), "--data", dataset, *sets)
    deadline = time.monotonic() + 300
    while True:
        status = json.loads(cmacc(head, "status", "big", "--json").stdout)
        if status["shown"] == "WAITING":
            break
        assert status["status"] in ("PENDING", "RUNNING"), status
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert "waiting for resources" in status["run_note"] and "9 CPUs" in status["run_note"], status
    text = cmacc(head, "status", "big").stdout
    assert text.startswith("WAITING") and "waiting for resources" in text
    assert json.loads(cmacc(head, "runs", "--storage", str(root), "--json").stdout)[0]["state"] == "waiting"

    asked = time.monotonic()
    cmacc(head, "stop", "big")
    assert wait_for(head, "big", timeout_s=60) == "STOPPED"
    took = time.monotonic() - asked
    assert took < 30, f"the stop took {took:.0f} s"
    info = json.loads(cmacc(head, "runs", "--storage", str(root), "--json").stdout)[0]
    assert (info["state"], info["last_step"]) == ("stopped", 0), (info, cmacc(head, "logs", "big").stdout[-3000:])
