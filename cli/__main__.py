"""`python -m cli`: the same as the `cmacc` console script."""

from cli.main import entry

entry()
