"""`python -m jobs.bench train|reader|sampler ...` (the arguments: `jobs.bench.cli`)."""

from jobs.bench.cli import main
from service import errors

errors.run_main(main)
