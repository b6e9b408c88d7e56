"""The service end to end, as a user runs it: the README's cluster-job example against the
local development stack (`infra/local/stack.sh`: an S3 endpoint and a Ray head with its
dashboard and token authentication), with the checks of what each command promises; the
refusals that must leave storage untouched; an ablation whose runs are cluster jobs; a run
the cluster cannot hold; and `cmacc pretrain` on an embedded Ray.

The stack is started once for the module. The README's commands are read from its first
code block of "Cluster jobs", in order, with two changes only: the stack gets free ports and
its own state folder (another Ray runs beside it in the test session), and the submissions
get tiny settings (`--set`) so that the demo trains in seconds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[2]
TINY = [
    "train.batch_size=4",
    "resources.num_workers=1",
    "resources.cpus_per_worker=1",
    "model.video.frames=4",
    "model.video.size=32",
    "model.audio.n_mels=16",
    "data.clip_seconds=0.5",
    "data.num_clips=48",
    "data.frames=4",
    "data.size=32",
    "data.shuffle_buffer=16",
    "method.dictionary_size=16",
    "checkpoint.every_steps=50",
    "optim.warmup_steps=0",
    "train.log_every=1",
    "eval.linear_epochs=5",
]
SETS = [f"--set={item}" for item in TINY]


def readme_commands() -> list[str]:
    text = (PROJECT / "README.md").read_text()
    section = text[text.index("## Cluster jobs") :]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def run(line: str, env: dict[str, str], *, extra: list[str] = (), check: bool = True) -> subprocess.CompletedProcess:
    """One command line as the README writes it (`.venv/bin/cmacc` is this interpreter's)."""
    argv = shlex.split(line)
    if argv[0] == ".venv/bin/cmacc":
        argv = [sys.executable, "-m", "cli", *argv[1:]]
    result = subprocess.run([*argv, *extra], env=env, cwd=PROJECT, capture_output=True, text=True, timeout=600)
    token = env.get("CMACC_TEST_TOKEN", "")
    assert not token or token not in result.stdout + result.stderr, "the token was printed"
    if check:
        assert result.returncode == 0, f"{line}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def cmacc(env: dict[str, str], *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(shlex.join([".venv/bin/cmacc", *argv]), env, check=check)


@pytest.fixture(scope="module")
def stack(free_ports):
    """The README's local stack on free ports, started as the README says; its environment
    (`source .../env`) and the path of the S3 bucket's runs; stopped after the module."""
    commands = readme_commands()
    assert commands[0].startswith("infra/local/stack.sh start && source /tmp/cmacc-local/env")
    assert commands[-1] == "infra/local/stack.sh stop"
    state = tempfile.mkdtemp(prefix="cl-", dir="/tmp")  # short: Unix socket paths are limited
    s3, dashboard, gcs, listen, grpc, metrics, client, runtime_env = free_ports(8)
    env = {
        **os.environ,
        "CMACC_LOCAL": state,
        "S3_PORT": str(s3),
        "DASHBOARD_PORT": str(dashboard),
        "GCS_PORT": str(gcs),
        "RAY_START_ARGS": f"--dashboard-agent-listen-port={listen} --dashboard-agent-grpc-port={grpc} "
        f"--metrics-export-port={metrics} --ray-client-server-port={client} --runtime-env-agent-port={runtime_env}",
        "CMACC_VENV": str(Path(sys.executable).parent.parent),
    }
    for name in ("RAY_ADDRESS", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "RAY_AUTH_MODE"):
        env.pop(name, None)
    run("bash infra/local/stack.sh start", env)
    for line in Path(state, "env").read_text().splitlines():  # `source .../env`
        name, value = line.removeprefix("export ").split("=", 1)
        env[name] = value
    env["PYTHONPATH"] = str(PROJECT)
    env["CMACC_TEST_TOKEN"] = (Path.home() / ".ray" / "auth_token").read_text().strip()
    yield {"env": env, "commands": commands, "state": state}
    subprocess.run(["bash", str(PROJECT / "infra/local/stack.sh"), "stop"], env=env, timeout=120)
    deadline = time.monotonic() + 30
    while leftover := subprocess.run(["pgrep", "-f", f"{state}/ray"], capture_output=True, text=True).stdout.split():
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    shutil.rmtree(state, ignore_errors=True)
    assert not leftover, f"stack.sh stop left processes: {leftover}"


def bucket_objects(env: dict[str, str]) -> list[tuple[str, int]]:
    """What the stack's bucket holds: (key, size) of every object."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="cmacc")
    return sorted((o["Key"], o["Size"]) for page in pages for o in page.get("Contents", []))


def test_the_readme_cluster_example_submits_stops_resumes_and_evaluates_on_the_cluster(stack, monkeypatch):
    env, commands = stack["env"], stack["commands"]
    submit, status, logs, stop, resubmit, follow, runs = commands[1:8]
    logs_now = logs.replace(" --follow", "")

    def state() -> dict:
        return json.loads(run(runs, env, extra=["--json"]).stdout)[0]

    # Submitted, the run goes through WAITING (for its worker) to RUNNING, and `cmacc runs`
    # shows it training, with the step it has reached. The terminal shows cmacc's lines, not
    # how Ray's client packages the project.
    submitted = run(submit, env, extra=[*SETS, "--set=train.steps=100000", "--set=checkpoint.every_steps=4"])
    assert submitted.stdout.startswith("submitted run cl1 as job cl1 "), submitted.stdout
    assert not submitted.stderr.strip(), submitted.stderr
    seen = []
    deadline = time.monotonic() + 600
    while "RUNNING" not in seen or state()["last_step"] < 6:
        shown = run(status, env).stdout.split()[0]
        if not seen or seen[-1] != shown:
            seen.append(shown)
        assert shown in ("PENDING", "STARTING", "WAITING", "RUNNING"), (seen, run(logs_now, env).stdout[-3000:])
        assert time.monotonic() < deadline, seen
        time.sleep(1)
    assert "WAITING" in seen, f"status went {seen}"
    assert state()["state"] == "running" and "step " in run(status, env).stdout

    # The same id while its job runs: refused, naming the job.
    busy = run(submit, env, extra=[*SETS, "--set=train.steps=8"], check=False)
    assert busy.returncode == 1 and "still running as job cl1" in busy.stderr, busy.stderr

    # Stopped, typed as a person does: `stop` returns once the job has ended (STOPPING while
    # the run writes its checkpoint), within a minute; nothing trained is lost. Every command
    # from here to the resubmission runs right after the previous one returned.
    asked = time.monotonic()
    stopped = run(stop, env).stdout
    took = time.monotonic() - asked
    assert "  STOPPING after " in stopped and "job cl1 STOPPED after " in stopped, stopped
    assert took < 60, stopped
    assert run(status, env).stdout.startswith("STOPPED  run cl1")
    info = state()
    stopped_at = info["last_step"]
    assert info["state"] == "stopped" and stopped_at > 4, (
        f"{json.dumps(info, indent=1)}\n{run(logs_now, env).stdout[-3000:]}"
    )
    assert info["newest_checkpoint"].endswith(f"checkpoint-{stopped_at:08d}")
    checkpoints = json.loads(cmacc(env, "checkpoints", "cl1", "--storage", "s3://cmacc/runs", "--json").stdout)
    assert checkpoints[-1]["step"] == stopped_at and checkpoints[-1]["registered"]
    print(f"stop took {took:.1f} s, at step {stopped_at}")

    # The same id again without --resume: refused before anything reaches the cluster or storage.
    before = bucket_objects(env)
    refused = run(submit, env, extra=[*SETS, "--set=train.steps=8"], check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    assert bucket_objects(env) == before

    # Resubmitted as the README writes it: it continues from the stop's checkpoint and finishes.
    resubmitted = run(resubmit, env, extra=[*SETS, f"--set=train.steps={stopped_at + 3}"])
    assert resubmitted.stdout.startswith("submitted run cl1 as job cl1.2 ") and not resubmitted.stderr.strip()
    run(follow, env)  # returns when the job has ended
    assert run(status, env).stdout.startswith("SUCCEEDED  run cl1  job cl1.2")
    output = run(logs_now, env).stdout
    assert f"succeeded at step {stopped_at + 3} (this job: steps {stopped_at} ->" in output, output[-3000:]
    assert "top-1 on" in output and "untrained" in output and "pretrained" in output
    assert "Reporting training result" not in output, "Ray Train's report dump reached the job's log"
    final = state()
    assert (final["state"], final["last_step"]) == ("succeeded", stopped_at + 3)
    assert set(final["eval"]["top1"]) == {"video/linear", "video/knn", "audio/linear", "audio/knn"}
    jobs = json.loads(cmacc(env, "list", "--json").stdout)
    assert [(j["submission_id"], j["status"]) for j in jobs if j["run_id"] == "cl1"] == [
        ("cl1", "STOPPED"),
        ("cl1.2", "SUCCEEDED"),
    ]
    from workers.metrics import read_metrics

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):  # run alone too
        monkeypatch.setenv(name, env[name])
    records = read_metrics("s3://cmacc/runs/cl1", endpoint_url=env["AWS_ENDPOINT_URL_S3"])
    starts = [int(r["run/start_step"]) for r in records if "run/start_step" in r]
    assert starts == [0, stopped_at], f"attempts started at {starts}, not at their checkpoints"
    assert sorted({r["step"] for r in records}) == list(range(1, stopped_at + 4))

    # Evaluation and fine-tuning of the run where it ran: Ray jobs whose work is a Ray task.
    on_cluster = ["--run", "cl1", "--storage", "s3://cmacc/runs", "--address", env["RAY_ADDRESS"]]
    evaluated = cmacc(env, "eval", *on_cluster, "--probe", "knn")
    assert "submitted as job eval-cl1-" in evaluated.stderr and "as a Ray task" in evaluated.stdout
    assert "protocol: official split" in evaluated.stdout
    assert f"checkpoint-{stopped_at + 3:08d}.json" in evaluated.stdout
    tuned = cmacc(env, "finetune", *on_cluster, "--epochs", "1", "--batch-size", "8")
    assert "pretrained (CM-ACC)" in tuned.stdout and "from scratch" in tuned.stdout
    record = state()
    assert set(record["finetune"]["top1"]) == {"pretrained", "scratch"}
    assert json.loads(cmacc(env, "status", "cl1", "--json").stdout)["status"] == "SUCCEEDED"  # still the run's job


def test_submission_errors_are_one_line_with_the_right_exit_code(stack, tmp_path):
    env = stack["env"]
    root = tmp_path / "runs"
    common = ["--run-id", "bad", "--storage", str(root), "--data", str(tmp_path / "none")]
    unknown = cmacc(env, "submit", "--recipe", "no-such-recipe", *common, check=False)
    assert unknown.returncode == 2 and "no-such-recipe" in unknown.stderr
    invalid = cmacc(env, "submit", *common, "--set", "optim.lr=abc", check=False)
    assert invalid.returncode == 2 and "optim.lr" in invalid.stderr
    unreachable = cmacc(env, "submit", *common, "--skip-data-check", "--address", "http://127.0.0.1:9", check=False)
    assert unreachable.returncode == 1 and "127.0.0.1:9" in unreachable.stderr
    missing = cmacc(env, "status", "no-such-run", check=False)
    assert missing.returncode == 1 and "no-such-run" in missing.stderr
    resized = cmacc(
        env, "submit", *common, "--set", "resources.min_workers=2", "--set", "resources.max_workers=3", check=False
    )
    assert resized.returncode == 2 and "train.global_batch_size" in resized.stderr
    assert not root.exists(), "a rejected submission wrote to storage"
    for result in (unknown, invalid, unreachable, missing, resized):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_ablate_with_an_address_runs_side_by_side_as_jobs_and_reports(stack, tmp_path):
    """`cmacc ablate --address`: every run is a job on the cluster; the report comes from storage."""
    env = stack["env"]
    root = tmp_path / "runs"
    data = ["data.num_clips=48", "train.steps=2", "eval.linear_epochs=5"]
    sets = [f"--set={item}" for item in [*TINY, *data]]
    argv = ["ablate", "--samplers", "active,random", "--seeds", "1", "--storage", str(root), "--id", "cl"]
    dataset = str(tmp_path / "data")
    cmacc(
        env,
        "data",
        "synth",
        dataset,
        "--clips",
        "48",
        "--classes",
        "4",
        "--frames",
        "4",
        "--size",
        "32",
        "--seconds",
        "0.5",
    )
    result = cmacc(env, *argv, "--data", dataset, *sets, "--address", env["RAY_ADDRESS"])
    assert "cl-active-s0: submitted as job cl-active-s0" in result.stderr
    assert "cl-random-s0: SUCCEEDED" in result.stderr
    jobs = {j["run_id"]: j["status"] for j in json.loads(cmacc(env, "list", "--json").stdout)}
    assert jobs["cl-active-s0"] == jobs["cl-random-s0"] == "SUCCEEDED"
    report = json.loads((root / "ablations" / "cl" / "report.json").read_text())
    assert [r["run_id"] for r in report["runs"]] == ["cl-active-s0", "cl-random-s0"]
    assert all(r["state"] == "succeeded" and r["figures"]["video/linear"] is not None for r in report["runs"])
    again = cmacc(env, *argv, "--data", dataset, *sets, "--address", env["RAY_ADDRESS"])
    assert "cl-active-s0: finished before, skipped" in again.stderr


def test_a_run_the_cluster_cannot_hold_is_shown_waiting_and_stops_within_seconds(stack, tmp_path):
    """The head offers 4 CPUs; a run asking for 9 (8 for its worker, 1 for the actor) waits
    for resources: `cmacc status` says so and what it lacks, `cmacc stop` ends it within
    seconds (there is no step to checkpoint), and the run record says `stopped` at step 0."""
    env = stack["env"]
    root = str(tmp_path / "runs")
    sets = [f"--set={item}" for item in [*TINY, "resources.cpus_per_worker=8", "train.steps=4"]]
    cmacc(env, "submit", "--recipe", "demo", "--run-id", "big", "--storage", root, *sets)
    deadline = time.monotonic() + 300
    while True:
        status = json.loads(cmacc(env, "status", "big", "--json").stdout)
        if status["shown"] == "WAITING":
            break
        assert status["status"] in ("PENDING", "RUNNING"), status
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert "waiting for resources" in status["run_note"] and "9 CPUs" in status["run_note"], status
    text = cmacc(env, "status", "big").stdout
    assert text.startswith("WAITING") and "waiting for resources" in text
    assert json.loads(cmacc(env, "runs", "--storage", root, "--json").stdout)[0]["state"] == "waiting"

    asked = time.monotonic()
    cmacc(env, "stop", "big")
    deadline = time.monotonic() + 60
    while json.loads(cmacc(env, "status", "big", "--json").stdout)["status"] != "STOPPED":
        assert time.monotonic() < deadline
        time.sleep(1)
    took = time.monotonic() - asked
    assert took < 30, f"the stop took {took:.0f} s"
    info = json.loads(cmacc(env, "runs", "--storage", root, "--json").stdout)[0]
    assert (info["state"], info["last_step"]) == ("stopped", 0), info


def test_cmacc_pretrain_generates_data_trains_evaluates_and_prints_the_summary(tmp_path):
    """The local door: embedded Ray, the default generated data set, training, evaluation,
    and a terminal without Ray's report dumps."""
    root = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        env.pop(name, None)
    sets = [f"--set={item}" for item in [*TINY, "data.num_clips=60", "train.steps=4", "checkpoint.every_steps=2"]]
    result = subprocess.run(
        [sys.executable, "-m", "cli", "pretrain", "--run-id", "local", "--storage", str(root), *sets],
        env=env,
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    terminal = result.stdout + result.stderr
    assert "generating 60 synthetic clips" in result.stdout
    assert "run local: succeeded at step 4 (this job: steps 0 -> 4" in result.stdout
    assert f"cmacc: checkpoint at step 2: {root / 'local' / 'checkpoint-00000002'}" in terminal
    for noise in (
        "Reporting training result",
        "not writable",
        "Token authentication is enabled",
        "Started a local Ray",
        "has constructor arguments in the object store",  # Ray Train's own preemption watcher
        "Found multiple active Ray instances",  # the suite's Ray runs beside this one
    ):
        assert noise not in terminal, f"{noise!r} reached the terminal:\n{terminal[-3000:]}"
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
