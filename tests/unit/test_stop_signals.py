"""The job's stop handling (`workers.supervision.StopSignals`), with real signals sent to this
process: before the first step a stop ends the job at the next check; afterwards the first
stop asks the workers for a checkpoint and the previous handlers come back for a second."""

import os
import signal
import threading
import time

import pytest

from workers.supervision import StoppedBeforeStart, StopSignals, fit_in_thread

pytestmark = pytest.mark.unit


class FakeClient:
    def __init__(self):
        self.stops = 0

    def request_stop(self):
        self.stops += 1


def test_a_stop_before_the_first_step_ends_the_job_at_the_next_check():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        stop.client = FakeClient()
        stop.check()  # nothing asked yet
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        with pytest.raises(StoppedBeforeStart):
            stop.check()
        assert stop.client.stops == 0
    assert signal.getsignal(signal.SIGTERM) == previous


def test_after_the_first_step_a_stop_asks_for_a_checkpoint_and_restores_the_handlers():
    previous = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        stop.client = FakeClient()
        stop.started = True
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        stop.check()  # no exception: training goes on to its checkpoint
        assert stop.client.stops == 1
        assert signal.getsignal(signal.SIGINT) is previous  # a second Ctrl-C aborts as before
    assert signal.getsignal(signal.SIGINT) is previous


def test_fit_in_thread_returns_at_once_when_stopped_before_the_first_step():
    release = threading.Event()

    class Trainer:  # a fit() that waits for resources forever
        def fit(self):
            release.wait(30)

    with StopSignals() as stop:
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        with pytest.raises(StoppedBeforeStart):
            fit_in_thread(Trainer(), stop, poll=lambda: None)
        assert time.monotonic() - started < 3
    release.set()


def test_a_stop_that_arrives_with_the_first_step_becomes_a_graceful_stop():
    """The signal lands while rank 0's first report is on its way: once that report is seen,
    the stop asks for a checkpoint instead of abandoning the steps trained."""
    with StopSignals() as stop:
        stop.client = FakeClient()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested
        stop.mark_started()
        stop.check()  # no StoppedBeforeStart any more
        assert stop.client.stops == 1 and not stop.requested
