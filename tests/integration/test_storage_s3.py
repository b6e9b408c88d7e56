"""Storage through `s3://` against a real S3 endpoint on loopback (moto's server)."""

import time

import pyarrow.fs as pafs
import pytest

from service import storage
from service.storage import StorageError

pytestmark = pytest.mark.integration


def test_fsspec_write_read_list_range_delete(s3_bucket):
    uri = storage.join(s3_bucket, "runs", "a", "blob.bin")
    payload = bytes(range(256)) * 64
    storage.write_bytes(uri, payload)

    assert storage.exists(uri)
    assert storage.read_bytes(uri) == payload
    assert storage.size(uri) == len(payload)
    assert storage.read_range(uri, 1000, 300) == payload[1000:1300]
    storage.write_bytes(storage.join(s3_bucket, "runs", "b", "x"), b"x")
    assert storage.list_dir(storage.join(s3_bucket, "runs")) == ["a", "b"]

    storage.remove(storage.join(s3_bucket, "runs", "a"), recursive=True)
    assert not storage.exists(uri)
    assert storage.list_dir(storage.join(s3_bucket, "runs")) == ["b"]
    with pytest.raises(FileNotFoundError, match=uri):
        storage.read_bytes(uri)


def test_pyarrow_filesystem_writes_what_fsspec_reads_and_back(s3_bucket):
    fs, path = storage.arrow_filesystem(storage.join(s3_bucket, "ckpt"))
    assert not path.startswith("s3://")
    assert path == s3_bucket.removeprefix("s3://") + "/ckpt"

    fs.create_dir(f"{path}/step-1")
    with fs.open_output_stream(f"{path}/step-1/model.pt") as out:
        out.write(b"weights" * 1000)
    assert storage.read_bytes(storage.join(s3_bucket, "ckpt", "step-1", "model.pt")) == b"weights" * 1000

    storage.write_bytes(storage.join(s3_bucket, "ckpt", "other.txt"), b"hello world")
    with fs.open_input_file(f"{path}/other.txt") as f:
        assert f.read_at(5, 6) == b"world"
    names = sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    assert names == ["model.pt", "other.txt", "step-1"]
    fs.delete_file(f"{path}/other.txt")
    assert fs.get_file_info(f"{path}/other.txt").type == pafs.FileType.NotFound


def test_stopped_endpoint_fails_with_the_uri_after_bounded_retries(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    server.stop()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    uri = "s3://gone-bucket/some/object.bin"
    started = time.perf_counter()
    with pytest.raises(StorageError) as info:
        storage.read_bytes(uri, retry_budget_s=3.0)  # a run passes its storage.retry_budget_s
    elapsed = time.perf_counter() - started
    message = str(info.value)
    assert uri in message
    assert f"read {uri} failed" in message
    assert "testing" not in message  # credentials never appear in errors
    assert elapsed < 30, f"gave up only after {elapsed:.1f} s"


def test_transient_errors_are_retried_then_succeed():
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert storage.retry("read", "s3://b/k", flaky, base_delay_s=0.001) == "ok"
    assert len(calls) == 3


def test_retries_last_as_long_as_the_budget_and_are_counted():
    calls = []

    def down() -> None:
        calls.append(time.monotonic())
        raise ConnectionResetError("connection reset by peer")

    before = storage.RETRIES["read"]
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"read s3://b/k failed after \d+ attempts in"):
        storage.retry("read", "s3://b/k", down, budget_s=1.0, base_delay_s=0.01)
    assert 0.5 < time.monotonic() - started <= 1.5
    assert len(calls) >= 6  # 0.01, 0.02, 0.04, ... s apart until the second runs out
    assert storage.RETRIES["read"] - before == len(calls) - 1


def test_permanent_errors_are_not_retried():
    calls = []

    def denied() -> None:
        calls.append(1)
        raise PermissionError("Access Denied")

    with pytest.raises(StorageError, match="s3://b/k"):
        storage.retry("read", "s3://b/k", denied, base_delay_s=0.001)
    assert len(calls) == 1


def test_conditional_writes_on_s3_let_exactly_one_writer_win(s3_bucket):
    """The run lease's compare-and-swap, decided by the store: create-if-absent and
    replace-if-unchanged (If-None-Match / If-Match)."""
    import threading

    from service.errors import RunBusyError
    from service.lease import RunLease, read_lease

    uri = storage.join(s3_bucket, "cas", "object.json")
    token = storage.write_if(uri, b"first", token=None)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if(uri, b"again", token=None)  # it exists now
    newer = storage.write_if(uri, b"second", token=token)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if(uri, b"stale", token=token)  # changed since that read
    assert storage.read_bytes(uri) == b"second" and storage.read_with_token(uri)[1] == newer

    run = storage.join(s3_bucket, "cas", "run")
    leases = [RunLease(run, run_id="run", ttl_s=60) for _ in range(4)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(leases))

    def take(lease: RunLease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            outcomes.append(lease.record.owner)
        except RunBusyError:
            outcomes.append("refused")

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if o != "refused"]
    assert len(winners) == 1 and read_lease(run).owner == winners[0]
    for lease in leases:
        lease.release()


def test_the_fault_proxy_breaks_requests_only_in_its_window(s3_bucket, fault_proxy):
    """The proxy the checkpoint fault tests stand on: transparent outside its window, every
    request reset inside it (botocore's own retries span about a second or two, so the
    window outlasts them), and storage's retries carry an operation across a short one."""
    proxy = fault_proxy(mode="reset", window_s=6.0)
    uri = storage.join(s3_bucket, "proxied", "blob.bin")
    storage.write_bytes(uri, b"through the proxy", endpoint_url=proxy.url)
    assert storage.read_bytes(uri, endpoint_url=proxy.url) == b"through the proxy"
    proxy.open_window()
    with pytest.raises(StorageError):
        storage.retry(
            "read",
            uri,
            lambda: storage.filesystem(uri, endpoint_url=proxy.url)[0].cat_file(storage.split_uri(uri)[1]),
            budget_s=0.5,
        )
    assert proxy.faulted >= 1
    while proxy.in_window():
        time.sleep(0.1)
    proxy.window_s = 2.0
    proxy.open_window()  # a 2 s outage inside a 10 s budget: retried through
    started = time.monotonic()
    data = storage.retry(
        "read",
        uri,
        lambda: storage.filesystem(uri, endpoint_url=proxy.url)[0].cat_file(storage.split_uri(uri)[1]),
        budget_s=10.0,
    )
    assert data == b"through the proxy" and time.monotonic() - started >= 1.5


def test_ray_trains_pickled_filesystem_keeps_its_retries(s3_bucket, fault_proxy):
    """Ray Train pickles the filesystem into its controller and workers; pyarrow's own
    S3FileSystem loses its retry strategy on the way (a 2.5 s outage failed the controller's
    snapshot write). Ours keeps it: a write through a 4 s outage succeeds after unpickling."""
    import pickle

    proxy = fault_proxy(mode="reset", window_s=4.0)
    fs, path = storage.arrow_filesystem(storage.join(s3_bucket, "pickled"), endpoint_url=proxy.url)
    fs = pickle.loads(pickle.dumps(fs))
    assert isinstance(fs, pafs.S3FileSystem)  # Ray Train's S3 special cases still apply
    proxy.open_window()
    started = time.monotonic()
    with fs.open_output_stream(f"{path}/snapshot.json") as out:
        out.write(b"{}")
    assert proxy.faulted > 0 and time.monotonic() - started >= 3.5
    assert storage.read_bytes(storage.join(s3_bucket, "pickled", "snapshot.json")) == b"{}"
