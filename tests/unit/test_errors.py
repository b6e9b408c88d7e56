"""One error model: every project error carries its exit code, and every door maps it alike."""

import pytest

from service import errors
from service.config import ConfigError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errors.UsageError("x"), 2),
        (ConfigError("optim.lr", "bad"), 2),
        (errors.RunExistsError("x"), 2),
        (errors.Failure("x"), 1),
        (errors.DataError("x"), 1),
        (errors.CheckpointError("x"), 1),
        (errors.CatalogError("x"), 1),
        (errors.ActorRestarted("x"), 1),
        (OSError("disk"), 1),
        (KeyboardInterrupt(), 130),
        (RuntimeError("a bug"), None),
    ],
)
def test_exit_codes(err, code):
    assert errors.exit_code(err) == code


def test_run_main_prints_one_line_and_exits_with_the_errors_code(capsys):
    def main() -> int:
        raise errors.CheckpointError("s3://b/run/checkpoint-00000002 is not a checkpoint")

    with pytest.raises(SystemExit) as exited:
        errors.run_main(main, own_process=False)
    assert exited.value.code == 1
    assert capsys.readouterr().err == "cmacc: error: s3://b/run/checkpoint-00000002 is not a checkpoint\n"


def test_run_main_keeps_the_traceback_of_a_bug():
    def main() -> int:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        errors.run_main(main, own_process=False)


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`cmacc ... | head -1`: the writer exits 141 (as a shell reports SIGPIPE), with nothing
    on stderr, instead of "error: [Errno 32] Broken pipe"."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "from service import errors\n"
        "def main():\n"
        "    for i in range(100_000):\n"
        "        print('line', i)\n"
        "    return 0\n"
        "errors.run_main(main)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "line 0\n"
    process.stdout.close()
    code = process.wait(timeout=60)
    assert code == errors.PIPE_CLOSED and process.stderr.read() == ""
