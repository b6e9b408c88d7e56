"""The README's cluster-job example, run as written against the local stack
(`infra/local/stack.sh`): the commands are read from the README's first code block of
"Cluster jobs", in order. Two changes only: the stack gets free ports and its own state
folder (another Ray runs beside it in the test session), and the submissions get tiny
settings (`--set`) so that the demo trains in seconds. Between the commands the test checks
what the README promises: status waiting, then running; stop within seconds with a
checkpoint; the resubmission continues from it; `cmacc runs` shows the true state."""

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
    "train.log_every=1",
    "eval.linear_epochs=5",
]


def readme_commands() -> list[str]:
    text = (PROJECT / "README.md").read_text()
    section = text[text.index("## Cluster jobs") :]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


@pytest.fixture
def stack_env(free_ports):
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
    for name in ("RAY_ADDRESS", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        env.pop(name, None)
    yield env
    subprocess.run(["bash", str(PROJECT / "infra/local/stack.sh"), "stop"], env=env, timeout=120)
    leftover = subprocess.run(["pgrep", "-f", f"{state}/ray"], capture_output=True, text=True).stdout.split()
    shutil.rmtree(state, ignore_errors=True)
    assert not leftover, f"stack.sh stop left processes: {leftover}"


def run(line: str, env: dict[str, str], *, extra: list[str] = ()) -> subprocess.CompletedProcess:
    argv = shlex.split(line)
    if argv[0] == ".venv/bin/cmacc":
        argv = [sys.executable, "-m", "service.cli", *argv[1:]]
    argv += list(extra)
    result = subprocess.run(argv, env=env, cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{line}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_the_readme_cluster_example_works_against_the_local_stack(stack_env):
    commands = readme_commands()
    assert commands[0].startswith("infra/local/stack.sh start && source /tmp/cmacc-local/env")
    assert commands[-1] == "infra/local/stack.sh stop"
    env = dict(stack_env)

    run("bash infra/local/stack.sh start", env)
    for line in Path(env["CMACC_LOCAL"], "env").read_text().splitlines():  # `source .../env`
        name, value = line.removeprefix("export ").split("=", 1)
        env[name] = value
    env["PYTHONPATH"] = str(PROJECT)
    submit, status, logs, stop, resubmit, runs = commands[1:7]
    sets = [f"--set={item}" for item in TINY]

    def state() -> dict:
        return json.loads(run(runs, env, extra=["--json"]).stdout)[0]

    run(submit, env, extra=[*sets, "--set=train.steps=100000"])
    seen = []
    deadline = time.monotonic() + 600
    while "RUNNING" not in seen:
        shown = run(status, env).stdout.split()[0]
        if not seen or seen[-1] != shown:
            seen.append(shown)
        assert shown in ("PENDING", "STARTING", "WAITING", "RUNNING"), (
            seen,
            run(logs.replace(" --follow", ""), env).stdout[-3000:],
        )
        assert time.monotonic() < deadline, seen
        time.sleep(1)
    assert "WAITING" in seen, f"status went {seen}"
    assert state()["state"] == "running"

    asked = time.monotonic()
    run(stop, env)
    while run(status, env).stdout.split()[0] != "STOPPED":
        assert time.monotonic() - asked < 60, run(logs.replace(" --follow", ""), env).stdout[-3000:]
        time.sleep(1)
    took = time.monotonic() - asked
    info = state()
    job_log = run(logs.replace(" --follow", ""), env).stdout[-4000:]
    assert info["state"] == "stopped" and info["last_step"] > 0, f"{json.dumps(info, indent=1)}\n{job_log}"
    assert info["newest_checkpoint"].endswith(f"checkpoint-{info['last_step']:08d}")
    print(f"stop took {took:.1f} s, at step {info['last_step']}")
    assert took < 60, f"the stop took {took:.0f} s"

    run(resubmit, env, extra=[*sets, f"--set=train.steps={info['last_step'] + 3}"])
    deadline = time.monotonic() + 600
    while run(status, env).stdout.split()[0] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline
        time.sleep(2)
    output = run(logs.replace(" --follow", ""), env).stdout
    assert f"succeeded at step {info['last_step'] + 3} (this job: steps {info['last_step']} ->" in output, output[
        -3000:
    ]
    assert (state()["state"], state()["last_step"]) == ("succeeded", info["last_step"] + 3)

    run("bash infra/local/stack.sh stop", env)
    assert "down" in run("bash infra/local/stack.sh status", env).stdout
