"""The distributed loop's pure parts: metrics written every `train.log_every` steps, each at
the time its step ended, with the losses read from the device in one copy."""

import pytest

pytestmark = pytest.mark.unit


def test_pending_metrics_write_each_step_at_its_own_time_with_losses_read_at_once():
    import torch

    from workers.distributed.metrics_logger import PendingMetrics

    class Log:
        def __init__(self):
            self.records = []

        def log(self, step, metrics, *, at=None):
            self.records.append((step, metrics, at))

    log = Log()
    pending = PendingMetrics(log)
    pending.add(1, {"train/loss": torch.tensor(2.5), "data/wait_s": 0.1}, at=10.0)
    pending.add(2, {"train/loss": torch.tensor(1.5), "data/wait_s": 0.2}, at=11.0)
    pending.patch(1, {"data/batch_digest": 7.0})  # a batch submitted to the actor a step later
    assert log.records == []  # nothing written before the flush
    written = pending.flush()
    assert written == [
        (1, {"train/loss": 2.5, "data/wait_s": 0.1, "data/batch_digest": 7.0}),
        (2, {"train/loss": 1.5, "data/wait_s": 0.2}),
    ]
    assert log.records == [
        (1, {"train/loss": 2.5, "data/wait_s": 0.1, "data/batch_digest": 7.0}, 10.0),
        (2, {"train/loss": 1.5, "data/wait_s": 0.2}, 11.0),
    ]
    assert pending.flush() == [] and len(log.records) == 2
