import pyarrow.fs as pafs
import pytest

from service import storage
from service.storage import StorageError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/a/b/", ("s3", "bucket/a/b")),
        ("memory://x/y", ("memory", "/x/y")),
        ("file:///tmp/x", ("file", "/tmp/x")),
        ("/abs/path", ("file", "/abs/path")),
    ],
)
def test_split_uri(uri, expected):
    assert storage.split_uri(uri) == expected


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.split_uri("runs/x") == ("file", str(tmp_path / "runs" / "x"))


def test_bad_uris_are_rejected_by_name():
    with pytest.raises(StorageError, match="no bucket"):
        storage.split_uri("s3://")
    with pytest.raises(StorageError, match="expected a storage URI"):
        storage.split_uri("")


def test_join_keeps_the_scheme():
    assert storage.join("s3://b/runs/", "r1", "/ckpt") == "s3://b/runs/r1/ckpt"


@pytest.mark.parametrize("root_kind", ["local", "memory"])
def test_round_trip_on_local_and_memory(root_kind, tmp_path):
    root = str(tmp_path) if root_kind == "local" else "memory://unit-test-root"
    uri = storage.join(root, "d", "f.bin")
    storage.write_bytes(uri, b"0123456789")
    assert storage.read_bytes(uri) == b"0123456789"
    assert storage.read_range(uri, 2, 3) == b"234"
    assert storage.list_dir(storage.join(root, "d")) == ["f.bin"]
    assert storage.list_dir(storage.join(root, "nothing-here")) == []
    storage.remove(uri)
    assert not storage.exists(uri)


def test_local_arrow_filesystem(tmp_path):
    fs, path = storage.arrow_filesystem(str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path)


def test_missing_local_file_names_the_path(tmp_path):
    uri = str(tmp_path / "absent.bin")
    with pytest.raises(FileNotFoundError, match=r"absent\.bin"):
        storage.read_bytes(uri)


def test_absolute_makes_local_paths_absolute_and_leaves_other_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("./runs") == str(tmp_path / "runs")
    assert storage.absolute("file://rel/x") == str(tmp_path / "rel" / "x")
    assert storage.absolute("s3://bucket/runs") == "s3://bucket/runs"
    assert storage.absolute("memory://a/b") == "memory://a/b"


def test_a_transient_failure_is_retried_within_the_budget_and_a_long_retry_says_so(capsys):
    """Storage that keeps timing out: retried with backoff until the budget is spent, one
    warning on stderr once the retrying outlasts RETRY_NOTICE_S, then an error naming the
    operation, the URI and the time spent. A failure that is not transient is not retried."""
    calls = []

    def flaky():
        calls.append(1)
        raise TimeoutError("read timeout")

    before = storage.RETRIES["read"]
    with pytest.raises(StorageError, match=r"read s3://b/k failed after \d+ attempts in [\d.]+ s: TimeoutError"):
        storage.retry("read", "s3://b/k", flaky, budget_s=6.0, base_delay_s=0.2)
    assert len(calls) >= 3 and storage.RETRIES["read"] - before == len(calls) - 1
    err = capsys.readouterr().err
    assert err.count("retrying for up to 6 s (storage.retry_budget_s)") == 1 and "s3://b/k" in err

    calls.clear()

    def broken():
        calls.append(1)
        raise ValueError("bad request")

    with pytest.raises(StorageError, match="bad request"):
        storage.retry("read", "s3://b/k", broken, budget_s=3.0)
    assert len(calls) == 1
