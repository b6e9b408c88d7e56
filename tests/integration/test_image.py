"""The container image's install steps, run here in a fresh virtual environment because no
container builder runs on this machine: the same script the Dockerfile runs
(`infra/docker/install.sh`), on a copy of the build context. The dependency steps list and resolve
the pins of pyproject.toml for this Python with pip's `--dry-run` (resolving is what can
fail; downloading 5 GB of CUDA wheels is not tested), the project step installs for real,
and the image's own check, `python -m jobs.pretrain --help`, then answers from the fresh
environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[2]
INSTALL = PROJECT / "infra" / "docker" / "install.sh"


def context_copy(dest: Path) -> Path:
    """The build context as .dockerignore leaves it (its plain top-level names)."""
    ignored = {line.strip() for line in (PROJECT / ".dockerignore").read_text().splitlines()}
    names = {name for name in ignored if name and not name.startswith(("#", "!", "*")) and "/" not in name}
    shutil.copytree(
        PROJECT,
        dest,
        ignore=lambda folder, entries: [
            e for e in entries if e in names or e == "__pycache__" or e.endswith(".egg-info")
        ],
    )
    return dest


def test_the_image_install_steps_work_in_a_fresh_environment(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    env.pop("PYTHONPATH", None)
    context = context_copy(tmp_path / "context")

    listed = subprocess.run(
        ["bash", str(INSTALL), "requirements", str(context / "pyproject.toml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(listed.stdout)
    report = tmp_path / "report.json"
    deps = subprocess.run(
        [
            "bash",
            str(INSTALL),
            "deps",
            str(requirements),
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert deps.returncode == 0, deps.stderr[-3000:]
    resolved = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    pins = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]
    for pin in pins:
        if "==" in pin:
            name, version = pin.split("==")
            assert resolved[name.split("[")[0].lower()] == version, pin

    project = subprocess.run(
        ["bash", str(INSTALL), "project", str(context), "--quiet"], env=env, capture_output=True, text=True, timeout=600
    )
    assert project.returncode == 0, project.stderr[-3000:]
    answered = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "jobs.pretrain", "--help"],
        env=env,
        cwd=tmp_path,  # not the project folder: the installed package must answer
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert answered.returncode == 0 and "--run-id" in answered.stdout, answered.stderr[-3000:]
    cli = subprocess.run(
        [str(venv / "bin" / "cmacc"), "--help"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert cli.returncode == 0 and "submit" in cli.stdout, cli.stderr[-3000:]
    recipes = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.resources as r; print(sorted(p.name for p in r.files('jobs').joinpath('recipes').iterdir()))",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "paper.toml" in recipes.stdout, recipes.stderr
