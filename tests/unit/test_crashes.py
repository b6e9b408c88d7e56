"""Crash notes (workers/distributed/crashes.py): a process that dies leaves where it was
reading; a crash that repeats at the same row is named; anything else is not blamed on rows."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service import storage
from workers.distributed.crashes import ReadingNote, collect_notes, note_dir, record_crash, repeated_crash

pytestmark = pytest.mark.unit

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def notes_here(tmp_path, monkeypatch):
    monkeypatch.setenv("CMACC_CRASH_NOTES_DIR", str(tmp_path / "notes"))


def die_while_decoding(run_uri: str, rank: int, step: int, rows: list[tuple], how: str) -> subprocess.CompletedProcess:
    """A separate process that opens a note, reaches `step`, starts `rows` and dies."""
    script = textwrap.dedent(f"""
        import os, signal
        from workers.distributed.crashes import ReadingNote
        note = ReadingNote({run_uri!r}, {rank})
        note.at_step({step})
        for i, (shard, row, clip) in enumerate({rows!r}):
            note.started(i, shard, row, clip)
        note.started(99, "shard-x.parquet", 0, "done-clip")
        note.finished(99)
        {"os.abort()" if how == "abort" else "os.kill(os.getpid(), signal.SIGKILL)"}
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=PROJECT, capture_output=True, text=True, check=False)


def test_a_process_that_dies_leaves_its_note_with_the_rows_it_was_decoding(tmp_path):
    run = str(tmp_path / "runs" / "r1")
    died = die_while_decoding(run, 1, 7, [("shard-00002.parquet", 5, "clip-a")], "abort")
    assert died.returncode != 0
    notes = collect_notes(run)
    assert len(notes) == 1
    note = notes[0]
    assert (note["rank"], note["step"]) == (1, 7)
    assert note["rows"] == [["shard-00002.parquet", 5, "clip-a"]]  # the finished row is gone
    assert note["fatal"].startswith("Fatal Python error: Aborted")
    assert collect_notes(run) == [], "a note is collected once"
    assert not any(note_dir(run).iterdir())


def test_a_killed_process_leaves_a_note_without_a_fatal_report(tmp_path):
    run = str(tmp_path / "runs" / "r2")
    die_while_decoding(run, 0, 3, [("s.parquet", 1, "c")], "kill")
    (note,) = collect_notes(run)
    assert note["step"] == 3 and not note.get("fatal")


def test_a_rank_that_ends_normally_leaves_nothing_and_one_that_raises_says_so(tmp_path):
    run = str(tmp_path / "runs" / "r3")
    note = ReadingNote(run, 0)
    note.started(1, "s.parquet", 2, "c")
    note.close()
    assert collect_notes(run) == []
    note = ReadingNote(run, 0)
    note.raised(ValueError("upload failed"))
    note.close()
    (left,) = collect_notes(run)
    assert left["raised"] == "ValueError: upload failed"


def crash(*notes: dict) -> dict:
    return {"found_at": "t", "notes": list(notes)}


def note(rank: int, step: int, rows: list[list], fatal: str = "", raised: str = "") -> dict:
    out = {"rank": rank, "step": step, "rows": rows, "fatal": fatal}
    if raised:
        out["raised"] = raised
    return out


POISON = ["shard-00001.parquet", 4, "clip-17"]


def test_the_same_row_twice_is_named_with_its_shard_row_clip_and_the_remedy():
    history = [
        crash(
            note(0, 5, [POISON, ["shard-00001.parquet", 5, "clip-18"]], "Fatal Python error: Aborted"), note(1, 5, [])
        ),
        crash(
            note(0, 6, [["shard-00001.parquet", 3, "clip-16"], POISON], "Fatal Python error: Aborted"), note(1, 6, [])
        ),
    ]
    message = repeated_crash(history)
    assert "rank 0 died twice (Fatal Python error: Aborted)" in message
    assert "shard-00001.parquet row 4 (clip clip-17)" in message and "clip-18" not in message
    assert "steps 5 and 6" in message
    assert "--resume --set data.exclude_clips=clip-17" in message


def test_rows_of_ranks_killed_because_another_died_are_not_blamed():
    innocent = ["shard-00003.parquet", 1, "clip-40"]
    history = [
        crash(note(0, 5, [POISON], "Fatal Python error: Segmentation fault"), note(1, 5, [innocent])),
        crash(note(0, 5, [POISON], "Fatal Python error: Segmentation fault"), note(1, 5, [innocent])),
    ]
    assert "clip-40" not in repeated_crash(history)


def test_a_peer_that_lost_its_partner_is_a_victim_not_a_cause():
    """The surviving rank's collective raises when the other dies: the dead rank is named,
    killed (no fatal report, out of memory say) or not."""
    lost = "RuntimeError: [gloo/transport/tcp/pair.cc:547] Connection closed by peer [127.0.0.1]:9089"
    victim_rows = [["shard-00003.parquet", 1, "clip-40"]]
    for fatal in ("Fatal Python error: Aborted", ""):
        history = [
            crash(note(0, 0, [POISON], fatal), note(1, 0, victim_rows, raised=lost)),
            crash(note(0, 4, [POISON], fatal), note(1, 4, victim_rows, raised=lost)),
        ]
        message = repeated_crash(history)
        assert message.startswith("rank 0 died twice") and "clip-17" in message and "clip-40" not in message


def test_different_rows_a_single_crash_or_a_python_error_end_nothing():
    assert repeated_crash([crash(note(0, 5, [POISON]))]) == ""
    assert repeated_crash([crash(note(0, 5, [POISON])), crash(note(0, 5, [["s", 0, "other"]]))]) == ""
    raised = [crash(note(0, 5, [POISON]), note(1, 5, [], raised="OSError: x")), crash(note(0, 5, [POISON]))]
    assert repeated_crash(raised) == ""


def test_a_fatal_signal_at_the_same_step_with_no_row_in_flight_is_named_by_step():
    fatal = "Fatal Python error: Segmentation fault"
    message = repeated_crash([crash(note(1, 9, [], fatal)), crash(note(1, 9, [], fatal))])
    assert message.startswith("rank 1 died twice (Fatal Python error: Segmentation fault) at step 9")


def test_the_history_lives_in_the_run_folder_and_keeps_the_newest(tmp_path):
    run = str(tmp_path / "run")
    storage.write_bytes(storage.join(run, "run.json"), b"{}")
    for step in range(12):
        history = record_crash(run, [note(0, step, [POISON])])
    assert [c["notes"][0]["step"] for c in history] == list(range(2, 12))
    saved = json.loads(Path(run, "crashes.json").read_text())
    assert saved["crashes"] == history
