"""`cmacc data synth|inspect` as a user meets them: real subprocesses, exit codes, output."""

import json
import subprocess
import sys

import pytest

from service import storage

pytestmark = pytest.mark.unit


def cmacc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("cli") / "ds")
    result = cmacc(
        "data", "synth", out, "--clips", "24", "--classes", "3", "--frames", "2", "--size", "16",
        "--seconds", "0.1", "--seed", "2", "--shard-mb", "0.02",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote 24 clips (3 classes; 2 frames of 16x16; 0.1 s of audio at 16000 Hz" in result.stdout
    assert out in result.stdout
    return out


def test_inspect_json_describes_the_set(made):
    result = cmacc("data", "inspect", made, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["num_clips"] == 24 and summary["num_shards"] > 1
    assert summary["has_video"] and summary["has_audio"]
    assert summary["clips_per_label"] == {"circle-0": 8, "square-0": 8, "diamond-0": 8}
    assert summary["frame_sizes"] == ["16x16"] and summary["sample_rates"] == [16000]
    assert sum(summary["splits"].values()) == 24
    assert summary["made_by"]["params"]["seed"] == 2
    assert "verify" not in summary


def test_inspect_text_and_verify_pass_on_an_intact_set(made):
    result = cmacc("data", "inspect", made, "--verify")
    assert result.returncode == 0, result.stderr
    assert "24 in" in result.stdout
    assert "re-hashed: all match the manifest" in result.stdout


def test_verify_fails_with_exit_1_naming_the_tampered_shard(made, tmp_path):
    copy = str(tmp_path / "copy")
    for name in storage.list_dir(made):
        storage.write_bytes(storage.join(copy, name), storage.read_bytes(storage.join(made, name)))
    shard = storage.join(copy, "shard-00001.parquet")
    data = bytearray(storage.read_bytes(shard))
    data[200] ^= 0x55
    storage.write_bytes(shard, bytes(data))

    result = cmacc("data", "inspect", copy, "--verify", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)["verify"]
    assert len(report["problems"]) == 1 and shard in report["problems"][0]
    assert shard in result.stderr and len(result.stderr.strip().splitlines()) == 1

    result = cmacc("data", "inspect", copy, "--verify")
    assert result.returncode == 1
    assert f"{shard} fails its checksum" in result.stdout


def test_missing_data_set_exits_1_with_one_line_naming_it(tmp_path):
    missing = str(tmp_path / "nowhere")
    result = cmacc("data", "inspect", missing)
    assert result.returncode == 1
    assert result.stderr.strip() == f"cmacc: error: no data set at {missing}: manifest.json is missing"


def test_synth_into_an_existing_set_exits_1(made):
    result = cmacc("data", "synth", made, "--clips", "2")
    assert result.returncode == 1
    assert "already holds a data set" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["data", "synth", "OUT", "--clips", "0"], "--clips must be >= 1"),
        (["data", "synth", "OUT", "--clips", "4", "--seconds", "0"], "--seconds must be > 0"),
        (["data", "synth", "OUT", "--clips", "4", "--size", "4"], "--size must be >= 8"),
        (["data", "synth", "OUT"], "--clips"),
        (["data", "inspect"], "URI"),
        (["data"], "subcommand is required"),
    ],
)
def test_bad_usage_exits_2_with_one_line(args, needle, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = cmacc(*args)
    assert result.returncode == 2
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_data_help_lists_the_commands():
    result = cmacc("data", "--help")
    assert result.returncode == 0
    assert "synth" in result.stdout and "inspect" in result.stdout
