"""The run record's state while a job trains (`workers.driver.Watcher`): `running` from the
first step, `stopping` as soon as a stop arrives (a real SIGTERM, as Ray sends on `cmacc
stop`), even while no new progress comes (the workers are writing the checkpoint), and
`finishing` once rank 0 reports the last step."""

from __future__ import annotations

import os
import signal
import time

import pytest

from service import catalog, config
from workers import driver
from workers.supervision import StopSignals

pytestmark = pytest.mark.unit


class FakeActor:
    """The dictionary actor's client as the Watcher polls it."""

    def __init__(self):
        self.answers: list[dict | None] = []
        self.stops = 0

    def poll_progress(self):
        return self.answers.pop(0) if self.answers else None

    def request_stop(self):
        self.stops += 1


def progress(step: int, total: int = 20) -> dict:
    return {"step": step, "total": total, "loss": 2.0, "clips_per_s": 10.0, "world_size": 1, "checkpoints": []}


@pytest.fixture
def watched(tmp_path):
    cfg = config.load_recipe("demo", [])
    run = driver.Run(run_id="r1", cfg=cfg, storage_root=str(tmp_path), data_uri="/data", split="train")
    actor = FakeActor()

    def state() -> str:
        return catalog._read_json(f"{run.run_uri}/run.json", "")["state"]

    return run, actor, state


def test_the_record_says_stopping_at_once_when_a_stop_arrives(watched):
    run, actor, state = watched
    with StopSignals() as stop:
        stop.client = actor
        watcher = driver.Watcher(run, actor, None, stop)
        watcher.poll()  # no step yet: nothing written (the job's own `waiting` record stands)
        assert not os.path.exists(f"{run.run_uri}/run.json")
        actor.answers.append(progress(3))
        watcher.poll()
        assert state() == "running" and stop.started
        os.kill(os.getpid(), signal.SIGTERM)  # `cmacc stop`: Ray's SIGTERM to the driver
        time.sleep(0.05)
        assert actor.stops == 1
        watcher.poll()  # no new progress: the workers are writing the checkpoint
        info = catalog._read_json(f"{run.run_uri}/run.json", "")
        assert info["state"] == "stopping" and "a stop was requested" in info["note"]
        assert info["progress"]["step"] == 3 and info["last_step"] == 3
        actor.answers.append(progress(20))  # the step the stop waited for, even the last one
        watcher.poll()
        assert state() == "stopping"


def test_the_record_says_finishing_once_the_last_step_is_trained(watched):
    run, actor, state = watched
    stop = StopSignals()  # no signals here
    watcher = driver.Watcher(run, actor, None, stop)
    actor.answers.append(progress(19))
    watcher.poll()
    assert state() == "running"
    actor.answers.append(progress(20))
    watcher.poll()
    info = catalog._read_json(f"{run.run_uri}/run.json", "")
    assert info["state"] == "finishing" and "final checkpoint" in info["note"]
