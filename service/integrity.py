"""Checkpoints that can prove they are whole (docs/architecture.md, "Checkpoints").

Every rank writes, last in its part of a checkpoint folder, a record of the files it wrote
(`files-%05d.json`: each file's size in bytes and sha256). A checkpoint is intact when
rank 0's `meta.json` parses, a record exists for each of its `world_size` ranks, and every
recorded file is there with its recorded size and hash. All of that is checked by reading
bytes, never by unpickling: a damaged checkpoint is known before `torch.load` sees it.

A checkpoint written before the records existed (no record at all) is checked as far as its
files allow (`meta.json` parses, `train.pt` is not empty) and says so; the readers of its
`.pt` files (`workers.tensors.load_tensors`) still refuse one that does not load.

Torch-free: the CLI and the driver use it before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from service import layout, storage

RECORD_PREFIX = "files-"
_RECORD_NAME = re.compile(r"^files-(\d{5})\.json$")
RECORD_FORMAT = 1


def record_file(rank: int) -> str:
    """The name of rank `rank`'s record of its files in a checkpoint folder."""
    return f"{RECORD_PREFIX}{rank:05d}.json"


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_record(folder: str, rank: int) -> dict[str, Any]:
    """Record every file of this rank's local checkpoint `folder` (size, sha256); written last,
    after the files it lists. Returns the record."""
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or _RECORD_NAME.match(name):
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        files[name] = {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}
    record = {"format": RECORD_FORMAT, "rank": rank, "files": files}
    tmp = os.path.join(folder, f".{record_file(rank)}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(folder, record_file(rank)))
    return record


@dataclass(kw_only=True)
class Verdict:
    """What a checkpoint's files say of it. `problem` names the first damaged file ("" when
    intact); `recorded` is False for a checkpoint written before the records existed."""

    uri: str
    problem: str = ""
    recorded: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # the files the records list

    @property
    def intact(self) -> bool:
        return not self.problem

    def note(self) -> str:
        """One line for a checkpoint that loads but could not prove it is whole ("" otherwise)."""
        if self.intact and not self.recorded:
            return (
                f"checkpoint {self.uri} was written before checkpoints recorded their files: verified as far "
                f"as its files allow ({layout.CHECKPOINT_META} parses, {layout.TRAIN_FILE} is not empty)"
            )
        return ""


class _Damaged(Exception):
    pass


def _read(uri: str, endpoint_url: str, retry_budget_s: float) -> bytes:
    try:
        return storage.read_bytes(uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
    except FileNotFoundError:
        raise _Damaged(f"{uri} is missing") from None
    except (IsADirectoryError, PermissionError) as err:
        raise _Damaged(f"{uri} cannot be read as a file ({type(err).__name__})") from None
    except OSError as err:
        if _is_directory(uri, endpoint_url):
            raise _Damaged(f"{uri} is a folder, not a file") from None
        raise _Damaged(f"{uri} cannot be read: {err}") from None


def _is_directory(uri: str, endpoint_url: str) -> bool:
    try:
        fs, path = storage.filesystem(uri, endpoint_url=endpoint_url)
        return bool(fs.isdir(path))
    except Exception:  # a question asked only to word an error better
        return False


def _json(uri: str, data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:  # UnicodeDecodeError included
        raise _Damaged(f"{uri} is not valid JSON ({len(data)} bytes)") from None
    if not isinstance(value, dict):
        raise _Damaged(f"{uri} is not a JSON object")
    return value


def verify(
    uri: str,
    *,
    endpoint_url: str = "",
    retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S,
    hash_files: bool = True,
) -> Verdict:
    """Check the checkpoint folder at `uri` against its records without unpickling anything.
    `hash_files=False` checks presence and sizes only (no download of the `.pt` files)."""
    uri = uri.rstrip("/")
    verdict = Verdict(uri=uri)
    try:
        meta = _json(
            storage.join(uri, layout.CHECKPOINT_META),
            _read(storage.join(uri, layout.CHECKPOINT_META), endpoint_url, retry_budget_s),
        )
        verdict.meta = meta
        try:
            names = storage.list_dir(uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
        except FileNotFoundError:
            names = []
        record_names = sorted(name for name in names if _RECORD_NAME.match(name))
        if not record_names:
            verdict.recorded = False  # written before the records: as far as its files allow
            train = storage.join(uri, layout.TRAIN_FILE)
            if train.rsplit("/", 1)[-1] in names and not _read(train, endpoint_url, retry_budget_s):
                raise _Damaged(f"{train} is empty")
            return verdict
        world_size = meta.get("world_size")
        if isinstance(world_size, int) and world_size > 0:
            missing = [record_file(rank) for rank in range(world_size) if record_file(rank) not in record_names]
            if missing:
                raise _Damaged(f"{storage.join(uri, missing[0])} is missing (the checkpoint of {world_size} ranks)")
        expected: dict[str, dict[str, Any]] = {}
        for name in record_names:
            record_uri = storage.join(uri, name)
            record = _json(record_uri, _read(record_uri, endpoint_url, retry_budget_s))
            files = record.get("files")
            if not isinstance(files, dict):
                raise _Damaged(f"{record_uri} lists no files")
            expected.update(files)
        verdict.files = sorted(expected)
        _check_files(uri, expected, endpoint_url, retry_budget_s, hash_files=hash_files)
    except _Damaged as err:
        verdict.problem = str(err)
    return verdict


def _check_files(
    uri: str, expected: dict[str, dict[str, Any]], endpoint_url: str, retry_budget_s: float, *, hash_files: bool
) -> None:
    def check(name: str) -> str:
        want = expected[name]
        file_uri = storage.join(uri, name)
        if not isinstance(want, dict) or not isinstance(want.get("bytes"), int):
            return f"the record of {file_uri} is not valid"
        if hash_files:
            try:
                data = _read(file_uri, endpoint_url, retry_budget_s)
            except _Damaged as err:
                return str(err)
            if len(data) != want["bytes"]:
                return f"{file_uri} is {len(data)} bytes, its record says {want['bytes']}"
            if file_digest(data) != want.get("sha256"):
                return f"{file_uri} does not match its recorded sha256 (same size, other bytes)"
            return ""
        try:
            found = storage.size(file_uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
        except FileNotFoundError:
            return f"{file_uri} is missing"
        except OSError as err:
            return f"{file_uri} cannot be read: {err}"
        return "" if found == want["bytes"] else f"{file_uri} is {found} bytes, its record says {want['bytes']}"

    names = sorted(expected)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        problems = [problem for problem in pool.map(check, names) if problem]
    if problems:
        raise _Damaged(problems[0])


def damaged_error_text(verdict: Verdict, *, intact: str | None) -> str:
    """The one line that refuses a damaged checkpoint, naming its file and the newest intact
    checkpoint of the same run (`intact`, or None when it has none)."""
    hint = f"; the newest intact checkpoint of the run is {intact}" if intact else "; the run has no intact checkpoint"
    return f"checkpoint {verdict.uri} is damaged: {verdict.problem}{hint}"


def registered_names(
    run_uri: str, *, endpoint_url: str = "", retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S
) -> list[str]:
    """The checkpoint folder names Ray Train registered for the run (its snapshot), oldest
    first; [] when there is no snapshot or it cannot be read."""
    try:
        data = storage.read_bytes(
            storage.join(run_uri, layout.SNAPSHOT_FILE), endpoint_url=endpoint_url, retry_budget_s=retry_budget_s
        )
    except OSError:
        return []
    return sorted(layout.checkpoint_names_in(data.decode(errors="replace")))


def newest_intact(
    run_uri: str,
    *,
    below: int | None = None,
    endpoint_url: str = "",
    retry_budget_s: float = storage.DEFAULT_RETRY_BUDGET_S,
) -> tuple[Verdict | None, list[Verdict]]:
    """(the newest registered checkpoint of the run that verifies, the newer ones that did
    not, newest first). `below`: only checkpoints before that step."""
    passed: list[Verdict] = []
    for name in reversed(registered_names(run_uri, endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)):
        step = layout.checkpoint_step(name)
        if step is None or (below is not None and step >= below):
            continue
        verdict = verify(storage.join(run_uri, name), endpoint_url=endpoint_url, retry_budget_s=retry_budget_s)
        if verdict.intact:
            return verdict, passed
        passed.append(verdict)
    return None, passed


def verify_local(folder: str, where: str) -> Verdict:
    """`verify` for a checkpoint downloaded into the local `folder`; the messages name the
    checkpoint's URI `where` instead of the local folder."""
    verdict = verify(folder, retry_budget_s=0.0)
    where = where.rstrip("/")
    verdict.problem = verdict.problem.replace(folder.rstrip("/"), where)
    verdict.uri = where
    return verdict
