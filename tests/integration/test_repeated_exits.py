"""Exit codes are true: every command that reads data sets or runs exits 0 every time.

`cmacc data inspect` once printed its result and then aborted at interpreter exit (exit 134,
"terminate called without an active exception") in about half the runs: pyarrow's reads on
its own thread pool left C++ threads that the interpreter's exit tore down mid-flight. The
reader now reads with `use_threads=False` (`workers/data/format.py`), and this test repeats
each command `CMACC_REPEATS` times (default 3 in the suite; `CMACC_REPEATS=20 make test
PYTEST_ARGS=tests/integration/test_repeated_exits.py` for the full 20), each in a fresh
process as a script or a workflow engine would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service import layout, storage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[2]
REPEATS = int(os.environ.get("CMACC_REPEATS", "3"))


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> tuple[str, str, str]:
    """(storage root, data set, checkpoint): a small labelled set with train and test splits,
    and a run whose checkpoint Ray Train registered, in the layout a real run leaves."""
    import torch

    from service import config
    from workers.data.synth import write_synthetic
    from workers.training import build_train_state

    base = tmp_path_factory.mktemp("exits")
    data = str(base / "data")
    write_synthetic(data, 24, seed=2, num_classes=3, frames=2, size=16, seconds=0.25)
    cfg = config.load_recipe(
        "demo",
        [
            "model.video.frames=2",
            "model.video.size=16",
            "data.clip_seconds=0.25",
            "model.audio.n_mels=16",
            "eval.linear_epochs=5",
        ],
    )
    root = str(base / "runs")
    run = storage.join(root, "r1")
    checkpoint = storage.join(run, layout.checkpoint_name(4))
    state = build_train_state(cfg, device=torch.device("cpu"))
    Path(checkpoint).mkdir(parents=True)
    torch.save({"train": state.state_dict()}, str(Path(checkpoint) / layout.TRAIN_FILE))
    meta = {"step": 4, "run_id": "r1", "format": layout.CHECKPOINT_FORMAT, "config": cfg.to_dict()}
    (Path(checkpoint) / layout.CHECKPOINT_META).write_text(json.dumps(meta))
    snapshot = {"checkpoints": [{"path": checkpoint}]}
    Path(run, layout.SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    record = {"run_id": "r1", "recipe": "demo", "state": "succeeded", "last_step": 4, "data": data}
    Path(run, layout.RUN_FILE).write_text(json.dumps({**record, "config": cfg.to_dict()}))
    return root, data, checkpoint


def commands(root: str, data: str, checkpoint: str) -> dict[str, list[str]]:
    return {
        "data inspect": ["data", "inspect", data],
        "data inspect --json": ["data", "inspect", data, "--json"],
        "data inspect --verify": ["data", "inspect", data, "--verify"],
        "data inspect --json --verify": ["data", "inspect", data, "--json", "--verify"],
        "runs": ["runs", "--storage", root],
        "checkpoints": ["checkpoints", "r1", "--storage", root, "--json"],
        "eval": ["eval", "--checkpoint", checkpoint, "--data", data, "--json"],
    }


def test_commands_that_read_data_exit_0_every_time(run_root):
    root, data, checkpoint = run_root
    failures = []
    for name, argv in commands(root, data, checkpoint).items():
        codes = []
        for _ in range(REPEATS):
            result = subprocess.run(
                [sys.executable, "-m", "cli", *argv], cwd=PROJECT, capture_output=True, text=True, timeout=300
            )
            codes.append(result.returncode)
            if result.returncode != 0:
                failures.append(f"{name}: exit {result.returncode}: {result.stderr.strip()[-400:]}")
            elif "--json" in argv:
                json.loads(result.stdout)  # the whole answer arrived
        print(f"{name}: {codes.count(0)} of {REPEATS} exited 0")
    assert not failures, "\n".join(failures)
