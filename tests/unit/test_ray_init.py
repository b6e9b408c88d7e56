"""Joining Ray: no address means a local Ray; an address that does not answer is a one-line
error naming it, raised before Ray retries (the local-start path is exercised by every
integration test and by `test_prepare`'s stale-file test)."""

import socket
import time

import pytest

from service.errors import Failure, exit_code
from workers import ray_init


def test_no_address_and_local_mean_a_local_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_init.resolve_address(None) is None
    assert ray_init.resolve_address("local") is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_init.resolve_address(None) == "10.0.0.1:6379"
    assert ray_init.resolve_address("10.0.0.2:6379") == "10.0.0.2:6379"  # the flag wins


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_nobody_answers_is_one_clear_error_before_ray_starts(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(ray_init.ClusterUnreachable, match=f"cannot reach the Ray cluster at {address}"):
        ray_init.init(address, num_cpus=1)
    assert time.monotonic() - started < 5
    err = ray_init.ClusterUnreachable("x")
    assert isinstance(err, Failure) and exit_code(err) == 1


def test_forms_ray_resolves_itself_are_left_to_ray():
    for address in ("auto", "ray://10.0.0.1:10001", "http://127.0.0.1:8265"):
        ray_init.check_reachable(address, timeout_s=0.01)  # no exception, no connection


def test_known_notices_of_rays_own_processes_are_dropped_and_everything_else_passes():
    from workers.ray_init import _without_notices

    shown = []
    handle = _without_notices(shown.append)
    notice = "core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' has constructor arguments in the object store and max_restarts > 0."
    handle({"pid": 1, "actor_name": "TrainController", "lines": [notice, "step 1/4  loss 5.5"]})
    handle({"pid": 2, "actor_name": "TrainController", "lines": [notice]})
    cleaner = ["Traceback (most recent call last):", "ConnectionError: Found multiple active Ray instances: {...}"]
    handle({"pid": 3, "actor_name": "PlacementGroupCleaner", "lines": cleaner})
    handle({"pid": 4, "actor_name": "RayTrainWorker", "lines": cleaner})  # another actor's: shown
    assert [(d["pid"], d["lines"]) for d in shown] == [(1, ["step 1/4  loss 5.5"]), (4, cleaner)]
