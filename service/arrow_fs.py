"""pyarrow's S3 filesystem with a retry strategy that survives pickling.

Ray Train pickles the `storage_filesystem` it is given into its controller and workers, and
`pyarrow.fs.S3FileSystem` pickles without its `retry_strategy`: there, every request got
arrow's default of 3 attempts, and a 2.5-second storage outage failed the controller's
write of its checkpoint snapshot, which ends the whole run (measured with the fault proxy of
tests/faultproxy.py). This subclass rebuilds itself with the same strategy wherever it is
unpickled; it stays an `S3FileSystem`, so Ray Train's special cases for S3 still apply.

Imported lazily by `service.storage.arrow_filesystem` (pyarrow loads only then).
"""

from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs


class RetryingS3FileSystem(pafs.S3FileSystem):
    """`S3FileSystem(**options)` whose requests retry with AWS's standard strategy (exponential
    backoff, capped at 20 s) up to `max_attempts` times, in every process it is pickled to."""

    def __init__(self, *, max_attempts: int, **options: Any):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **options)
        self._rebuild_args = (max_attempts, options)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, self._rebuild_args)


def _rebuild(max_attempts: int, options: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts=max_attempts, **options)
