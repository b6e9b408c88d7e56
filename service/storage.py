"""Every persistent path is a URI; this module maps URIs to filesystems.

* `s3://bucket/prefix`: s3fs (fsspec) for data, `pyarrow.fs.S3FileSystem` for Ray Train.
  The endpoint comes from the argument, else `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`,
  else AWS itself. Credentials come from the standard AWS chain and are never printed.
* A local path or `file://` URI: the local filesystem (relative paths become absolute).
* `memory://`: fsspec's in-memory filesystem (unit tests).
* Any other `scheme://` is handed to fsspec as it is.

Paths stay `str` so `s3://` is never mangled by `pathlib`. Transient errors (connection
reset or refused, time-outs, HTTP 5xx, throttling) are retried with exponential backoff
within a time budget; the error that finally escapes is a `StorageError` naming the URI.
The budget is an argument of every operation (`retry_budget_s`): a run passes its
`storage.retry_budget_s` down to the clients it makes; without one it is
`DEFAULT_RETRY_BUDGET_S`.

Imported by the CLI: fsspec, s3fs and pyarrow are imported lazily, never torch or ray.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_BASE_DELAY_S = 0.25
MAX_DELAY_S = 8.0  # the longest wait between two tries
RETRY_NOTICE_S = 2.0  # retrying longer than this: one warning on stderr says what and why
# The time one operation may spend retrying, unless its caller passes its own
# (`storage.retry_budget_s` of a run). A throttling burst or a short outage of the store
# costs that much time, not the operation.
DEFAULT_RETRY_BUDGET_S = 60.0
# Retries made by this process, by operation (reported in the training metrics).
RETRIES: collections.Counter[str] = collections.Counter()


class StorageError(OSError):
    """An object-store or filesystem operation failed; the message names the URI."""


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://b/p` -> ("s3", "b/p"); `./x` -> ("file", "/abs/x"); `memory://x` -> ("memory", "/x")."""
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"expected a storage URI, got {uri!r}")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "file", os.path.abspath(os.path.expanduser(uri))
    scheme = scheme.lower()
    if scheme == "file":
        return "file", os.path.abspath(rest)
    if scheme == "memory":
        return "memory", "/" + rest.lstrip("/")
    if scheme in ("s3", "s3a"):
        rest = rest.strip("/")
        if not rest:
            raise StorageError(f"{uri!r} names no bucket")
        return "s3", rest
    return scheme, rest


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/', keeping its scheme."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_local(uri: str) -> bool:
    return split_uri(uri)[0] == "file"


def absolute(uri: str) -> str:
    """A local path or `file://` URI as an absolute path (other processes, such as Ray
    workers, run in other folders); any other URI as it is."""
    return split_uri(uri)[1] if is_local(uri) else uri


def s3_endpoint(endpoint_url: str = "") -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(uri: str, *, endpoint_url: str = "") -> tuple[Any, str]:
    """An fsspec filesystem and the path inside it for `uri`."""
    scheme, path = split_uri(uri)
    import fsspec

    if scheme == "s3":
        import s3fs

        endpoint = s3_endpoint(endpoint_url)
        # botocore's adaptive mode retries throttling a few times with client-side rate
        # limiting; longer outages are retried here, within the budget, with the URI in hand.
        # No listings cache: s3fs answers `exists` from a cached listing of the folder, so a
        # process that listed a run folder kept seeing it as it was (a checkpoint registered
        # since then, Ray Train's snapshot written since then, looked absent).
        fs = s3fs.S3FileSystem(
            endpoint_url=endpoint,
            use_listings_cache=False,
            config_kwargs={
                "retries": {"mode": "adaptive", "max_attempts": 3},
                "connect_timeout": 5,
                "read_timeout": 60,
            },
        )
        return fs, path
    if scheme == "file":
        return fsspec.filesystem("file"), path
    return fsspec.filesystem(scheme), path


def arrow_filesystem(
    uri: str, *, endpoint_url: str = "", retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
) -> tuple[Any, str]:
    """A `pyarrow.fs.FileSystem` and the path inside it, as Ray Train's `storage_filesystem`
    and `storage_path` want them (no `s3://` in the path); its S3 retries span about
    `retry_budget_s`."""
    import pyarrow.fs as pafs

    scheme, path = split_uri(uri)
    if scheme == "s3":
        endpoint = s3_endpoint(endpoint_url)
        from service.arrow_fs import RetryingS3FileSystem

        kwargs: dict[str, Any] = {"connect_timeout": 5, "request_timeout": 60}
        if endpoint:
            scheme_part, _, host = endpoint.partition("://")
            kwargs["endpoint_override"] = host or scheme_part
            kwargs["scheme"] = scheme_part if host else "https"
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        # Ray Train's checkpoint uploads and snapshots go through this filesystem, outside
        # `retry`: AWS's standard strategy (exponential backoff capped at 20 s) with enough
        # attempts to span about the retry budget, kept when Ray pickles it (service.arrow_fs).
        return RetryingS3FileSystem(max_attempts=max(3, round(retry_budget_s / 6)), **kwargs), path
    if scheme == "file":
        return pafs.LocalFileSystem(), path
    import fsspec

    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme))), path


# --- retries --------------------------------------------------------------------------------

_HTTP_5XX = re.compile(r"\b50[0234]\b")
_TRANSIENT_WORDS = (
    "connection reset",
    "connection refused",
    "connection aborted",
    "could not connect",
    "connect timeout",
    "timed out",
    "timeout",
    "throttl",
    "slowdown",
    "slow down",
    "service unavailable",
    "internal error",
    "internalerror",
    "broken pipe",
    "temporarily",
)


def is_transient(err: BaseException) -> bool:
    """True for errors worth retrying: network failures, 5xx responses and throttling."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(err).__name__} {err}".lower()
    if "endpointconnectionerror" in text or "connecttimeout" in text or "readtimeout" in text:
        return True
    return any(word in text for word in _TRANSIENT_WORDS) or _HTTP_5XX.search(text) is not None


def retry(
    op: str,
    uri: str,
    fn: Callable[[], T],
    *,
    budget_s: float = DEFAULT_RETRY_BUDGET_S,
    base_delay_s: float = DEFAULT_BASE_DELAY_S,
) -> T:
    """Run `fn`, retrying transient failures with exponential backoff and jitter (0.25 s,
    0.5 s, ... at most `MAX_DELAY_S` apart) for as long as the retry budget `budget_s` lasts.

    A missing object raises `FileNotFoundError` naming the URI at once; any other failure
    that survives the retries raises `StorageError` naming the operation, the URI and the
    time spent.
    """
    budget = budget_s
    started = time.monotonic()
    attempt = 0
    noticed = False
    while True:
        attempt += 1
        try:
            return fn()
        except FileNotFoundError:
            raise FileNotFoundError(f"{op}: no such file or object: {uri}") from None
        except StorageError:  # already ours (it names its URI and was retried where it arose)
            raise
        except Exception as err:
            delay = min(base_delay_s * 2 ** (attempt - 1), MAX_DELAY_S) * (1 + random.random() / 2)
            spent = time.monotonic() - started
            if not is_transient(err) or spent + delay > budget:
                tries = f" after {attempt} attempts in {spent:.1f} s" if attempt > 1 else ""
                raise StorageError(f"{op} {uri} failed{tries}: {type(err).__name__}: {err}") from err
            RETRIES[op] += 1
            if spent + delay >= RETRY_NOTICE_S and not noticed:  # say why a command seems to hang
                noticed = True
                print(
                    f"cmacc: warning: {op} {uri}: {type(err).__name__}: {err}; retrying for up to {budget:.0f} s "
                    "(storage.retry_budget_s)",
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(delay)


# --- small helpers every caller needs -------------------------------------------------------


def read_bytes(uri: str, *, endpoint_url: str = "", retry_budget_s: float = DEFAULT_RETRY_BUDGET_S) -> bytes:
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    return retry("read", uri, lambda: fs.cat_file(path), budget_s=retry_budget_s)


def read_range(
    uri: str, start: int, length: int, *, endpoint_url: str = "", retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
) -> bytes:
    """Bytes [start, start + length) of an object."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    return retry(
        "read range of", uri, lambda: fs.cat_file(path, start=start, end=start + length), budget_s=retry_budget_s
    )


def write_bytes(
    uri: str, data: bytes, *, endpoint_url: str = "", retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
) -> None:
    """Write an object whole. Local files are written to a temporary name, then renamed,
    so a reader never sees half a file."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url)

    def write() -> None:
        if split_uri(uri)[0] == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data)

    retry("write", uri, write, budget_s=retry_budget_s)


def exists(uri: str, *, endpoint_url: str = "", retry_budget_s: float = DEFAULT_RETRY_BUDGET_S) -> bool:
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    return retry("check", uri, lambda: fs.exists(path), budget_s=retry_budget_s)


def list_dir(uri: str, *, endpoint_url: str = "", retry_budget_s: float = DEFAULT_RETRY_BUDGET_S) -> list[str]:
    """Names (not paths) directly under a folder URI, sorted; [] when it does not exist."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url)

    def ls() -> list[str]:
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})

    return retry("list", uri, ls, budget_s=retry_budget_s)


def remove(
    uri: str, *, recursive: bool = False, endpoint_url: str = "", retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
) -> None:
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    retry("delete", uri, lambda: fs.rm(path, recursive=recursive), budget_s=retry_budget_s)


def size(uri: str, *, endpoint_url: str = "", retry_budget_s: float = DEFAULT_RETRY_BUDGET_S) -> int:
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    return retry("stat", uri, lambda: int(fs.size(path)), budget_s=retry_budget_s)


# --- compare-and-swap for small objects (the run lease) -----------------------------------


class PreconditionFailed(StorageError):
    """A conditional write lost: the object was created or changed by another writer since
    it was read."""


def content_token(data: bytes) -> str:
    """The version token of an object's bytes: their MD5, which is also S3's ETag of an object
    written by a single PUT (and therefore what `If-Match` compares against)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def read_with_token(
    uri: str, *, endpoint_url: str = "", retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
) -> tuple[bytes, str] | None:
    """An object's bytes and their version token, or None when it does not exist."""
    try:
        data = read_bytes(uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    except FileNotFoundError:
        return None
    return data, content_token(data)


def write_if(
    uri: str, data: bytes, *, token: str | None, endpoint_url: str = "", retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
) -> str:
    """Write a small object only if it is still as read: absent when `token` is None, else
    unchanged since the read that gave `token`. Returns the new token; PreconditionFailed when
    another writer got there first.

    S3: a conditional PUT (`If-None-Match: *` / `If-Match: <ETag>`), decided by the store.
    Local files: the check and the rename happen under an exclusive `flock` of `<file>.lock`.
    Other fsspec schemes: checked, then written (not atomic; a narrow window remains).
    """
    scheme, path = split_uri(uri)
    fs, _ = filesystem(uri, endpoint_url=endpoint_url)
    lost = PreconditionFailed(f"{uri} was {'created' if token is None else 'changed'} by another writer")

    def current_token() -> str | None:
        try:
            return content_token(fs.cat_file(path))
        except FileNotFoundError:
            return None

    def write() -> None:
        if scheme == "s3":
            try:
                if token is None:
                    fs.pipe_file(path, data, mode="create")
                else:
                    fs.pipe_file(path, data, IfMatch=token)
            except FileNotFoundError:  # If-Match on an object that is gone
                raise lost from None
            except OSError as err:
                if isinstance(err, FileExistsError) or _precondition_failed(err):
                    raise lost from None
                raise
        elif scheme == "file":
            import fcntl

            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(f"{path}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if current_token() != token:
                    raise lost
                tmp = f"{path}.tmp-{os.getpid()}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
        else:
            if current_token() != token:
                raise lost
            fs.pipe_file(path, data)

    retry("write", uri, write, budget_s=retry_budget_s)
    return content_token(data)


def _precondition_failed(err: BaseException) -> bool:
    """S3's answer to a conditional write that lost: 412 PreconditionFailed, or 409
    ConditionalRequestConflict while another conditional write of the object is in flight."""
    text = f"{err} {err.__cause__ or ''}"
    return any(word in text for word in ("PreconditionFailed", "pre-conditions", "ConditionalRequestConflict"))
