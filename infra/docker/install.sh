#!/usr/bin/env bash
# The image's two install steps, run by infra/docker/Dockerfile and, in a fresh virtual
# environment, by tests/integration/test_image.py (so the test runs the same commands):
#
#   install.sh deps PYPROJECT [PIP OPTIONS]   the dependencies pinned in pyproject.toml
#                                             (torch, Ray, ...: the big layer)
#   install.sh project SRC [PIP OPTIONS]      the project itself, without dependencies
#
# `python` is the environment's (the first on PATH).
set -euo pipefail
step="${1:?usage: install.sh deps PYPROJECT | project SRC}"
target="${2:?usage: install.sh deps PYPROJECT | project SRC}"
shift 2
case "$step" in
  deps)
    requirements="$(mktemp)"
    python -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
      "$target" >"$requirements"
    python -m pip install -r "$requirements" "$@"
    rm -f "$requirements"
    ;;
  project)
    python -m pip install --no-deps "$target" "$@"
    ;;
  *)
    echo "install.sh: unknown step $step (deps or project)" >&2
    exit 2
    ;;
esac
