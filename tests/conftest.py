"""Shared fixtures: a real S3 endpoint on loopback, one local Ray per test process, storage roots.

Markers: `unit` (pure, fast), `integration` (Ray and/or S3 on loopback), `slow` (minutes),
`gpu` (skipped without CUDA).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The experiment trackers never reach a network from the tests: W&B writes offline runs,
# quietly; MLflow sends no telemetry. Set before any Ray starts, so every worker has them.
for _name, _value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("MLFLOW_DISABLE_TELEMETRY", "true")):
    os.environ.setdefault(_name, _value)


def pytest_configure(config: pytest.Config) -> None:
    """`make test` runs the tests on several pytest-xdist workers, each with its own local Ray
    (`ray_session`), started at about the same moment. A local Ray makes Ray's token file
    (~/.ray/auth_token) when there is none, and two starting at once could each write their
    own: the token is made here first, once, by the process that starts the workers."""
    if hasattr(config, "workerinput"):
        # A worker shares the cores with the others: torch's threads (one per core by
        # default) of two workers on the same cores wait on each other in every operation,
        # many times slower. Set before any test imports torch; Ray's workers get 1 anyway.
        share = (os.cpu_count() or 1) // int(config.workerinput["workercount"])
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, share)))
        return
    if not getattr(config.option, "numprocesses", None):
        return  # no workers
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path.home() / ".ray" / "auth_token").is_file():
        return
    ray_cli = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray_cli), "get-auth-token", "--generate"], capture_output=True, check=True, timeout=120)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The slow tests first (in their order): with several workers the short ones then fill
    # the gaps at the end, instead of one worker finishing a long module while the other idles.
    items.sort(key=lambda item: "slow" not in item.keywords)
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; this machine has no GPU")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real spoken digits, handwritten digits, one real video)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto's server) on 127.0.0.1 with an OS-chosen port.

    Sets the standard AWS variables for the whole session, so every s3fs, pyarrow and
    boto3 client in this process (and in Ray workers started after it) uses it.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
        }
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the loopback endpoint, as an `s3://` URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_endpoint: str):
    """One local Ray for the whole test session (starting Ray costs seconds).

    Started after the S3 endpoint, so its workers inherit the AWS variables pointing at it.
    """
    import ray

    # Ray Train polls its workers this often (default 2 s): reports, checkpoints and failures
    # are noticed sooner, which shortens every fit() of the suite.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def storage_root(tmp_path: Path) -> str:
    """A temporary local storage root URI."""
    root = tmp_path / "storage"
    root.mkdir()
    return str(root)


@pytest.fixture(scope="session")
def free_ports():
    """`free_ports(n)`: n TCP ports on 127.0.0.1 that were free a moment ago (bound, then
    released), for servers the tests start (Ray heads, S3 endpoints)."""

    def pick(count: int) -> list[int]:
        sockets = [socket.socket() for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in sockets]
        for s in sockets:
            s.close()
        return ports

    return pick


@pytest.fixture
def fault_proxy(s3_endpoint: str):
    """A factory of fault-injecting TCP proxies in front of the S3 endpoint
    (`tests/faultproxy.py`): `fault_proxy(mode=..., window_s=..., trigger=b"...")` or `schedule=[(trigger, mode), ...]`."""
    import importlib.util
    from urllib.parse import urlparse

    spec = importlib.util.spec_from_file_location("cmacc_faultproxy", Path(__file__).with_name("faultproxy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    target = urlparse(s3_endpoint)
    proxies = []

    def make(**settings):
        proxy = module.FaultProxy((target.hostname, target.port), **settings)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
