#!/usr/bin/env bash
# The image's install steps, run by infra/docker/Dockerfile and, in a fresh virtual
# environment, by tests/integration/test_image.py (so the test runs the same commands):
#
#   install.sh requirements PYPROJECT          print the dependencies pinned in pyproject.toml
#   install.sh deps REQUIREMENTS [PIP OPTIONS] install them (torch, Ray, ...: the big layer)
#   install.sh project SRC [PIP OPTIONS]       the project itself, without dependencies
#
# `python` is the environment's (the first on PATH).
set -euo pipefail
usage="usage: install.sh requirements PYPROJECT | deps REQUIREMENTS | project SRC"
step="${1:?$usage}"
target="${2:?$usage}"
shift 2
case "$step" in
  requirements)
    python -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
      "$target"
    ;;
  deps)
    python -m pip install -r "$target" "$@"
    ;;
  project)
    python -m pip install --no-deps "$target" "$@"
    ;;
  *)
    echo "install.sh: unknown step $step; $usage" >&2
    exit 2
    ;;
esac
