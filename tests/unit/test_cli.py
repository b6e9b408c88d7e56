"""The `cmacc` command as a user meets it: a real subprocess, real exit codes and output."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def cmacc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=60, check=False)


def test_config_show_json_applies_the_override():
    result = cmacc("config", "show", "--recipe", "demo", "--set", "optim.lr=0.1", "--json")
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["optim"]["lr"] == 0.1
    assert resolved["recipe"] == "demo"


def test_config_show_text_lists_dotted_fields():
    result = cmacc("config", "show", "--recipe", "paper")
    assert result.returncode == 0, result.stderr
    assert 'method.sampler = "active"' in result.stdout
    assert "method.dictionary_size = 16384" in result.stdout


def test_invalid_value_exits_2_naming_the_field():
    result = cmacc("config", "show", "--recipe", "demo", "--set", "optim.lr=abc")
    assert result.returncode == 2
    assert "optim.lr" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_key_exits_2_and_suggests():
    result = cmacc("config", "show", "--set", "optim.lrr=0.1")
    assert result.returncode == 2
    assert "did you mean 'optim.lr'" in result.stderr


def test_validate_accepts_a_good_file_and_rejects_a_bad_one(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[train]\nsteps = 5\n[method]\nsampler = "random"\n')
    result = cmacc("config", "validate", str(good))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = -5\n")
    result = cmacc("config", "validate", str(bad))
    assert result.returncode == 2
    assert "train.steps" in result.stderr

    result = cmacc("config", "validate", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert "missing.toml" in result.stderr


def test_bad_usage_exits_2():
    assert cmacc("no-such-command").returncode == 2
    assert cmacc("config").returncode == 2
    assert cmacc().returncode == 2


def test_help_lists_the_commands():
    result = cmacc("--help")
    assert result.returncode == 0
    for command in ("pretrain", "submit", "runs", "eval", "config", "bench", "data"):
        assert command in result.stdout


def test_bench_cli_reports_the_startup_time_of_help(tmp_path):
    """How fast `cmacc --help` answers is a benchmark figure, not an assertion: a busy runner
    would make a time limit flaky. What keeps it fast is the import wall
    (tests/unit/test_architecture.py)."""
    out = tmp_path / "cli.json"
    result = cmacc("bench", "cli", "--repeats", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "cmacc --help" in result.stdout
    report = json.loads(out.read_text())
    assert report["repeats"] == 2 and len(report["timings_s"]) == 2
    assert report["s_min"] <= report["s_median"] <= report["s_max"]


def test_importing_the_cli_loads_neither_torch_nor_ray():
    code = (
        "import sys, cli.main, cli.cluster, cli.runs, cli.bench, cli.data, service.config, service.storage\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'pyarrow', 's3fs') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == ""


def test_a_job_package_leaves_secrets_and_environments_behind(tmp_path):
    """What `cmacc submit` uploads as the job's working_dir, matched as Ray matches it."""
    from ray._private.runtime_env.packaging import _get_excludes

    from service.ray_jobs import WORKING_DIR_EXCLUDES

    excluded = _get_excludes(tmp_path, WORKING_DIR_EXCLUDES)
    for path in (
        ".env",
        ".env.local",
        "deploy/server.pem",
        "tls.key",
        ".ssh/id_rsa",
        ".aws/credentials",
        ".venv/bin/python",
        "runs/r1/run.json",
    ):
        assert excluded(tmp_path / path), f"{path} would travel with the job"
    for path in ("cli/main.py", "jobs/recipes/demo.toml", "pyproject.toml"):
        assert not excluded(tmp_path / path), f"{path} would be missing from the job"
