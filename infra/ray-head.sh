#!/usr/bin/env bash
# A Ray head on this machine with its dashboard on 127.0.0.1, for trying `cmacc submit` by hand.
# Usage: infra/ray-head.sh [DASHBOARD_PORT]; then export RAY_ADDRESS=http://127.0.0.1:PORT.
# Token authentication is on when a token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
# ~/.ray/auth_token; `ray get-auth-token --generate` writes one); cmacc finds it the same way.
# Stop it with Ctrl-C (--block keeps it in the foreground).
set -euo pipefail
port="${1:-8265}"
venv="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
export PATH="$venv:$PATH"  # the jobs' `python` is the project's environment
exec "$venv/ray" start --head --block --node-ip-address=127.0.0.1 --include-dashboard=true \
  --dashboard-host=127.0.0.1 --dashboard-port="$port"
