#!/usr/bin/env bash
# The local development stack: an S3 endpoint on loopback (moto) with one bucket, and a Ray
# head with its dashboard on 127.0.0.1 that offers enough logical CPUs for the demo recipe,
# so `cmacc submit|status|logs|stop|runs` work on a 2-core machine as the README shows.
#
#   infra/local/stack.sh start    start both (idempotent), then: source "$CMACC_LOCAL/env"
#   infra/local/stack.sh status   what runs, and the environment to use
#   infra/local/stack.sh stop     stop both; runs in the bucket are kept until the next start
#
# Settings (environment): CMACC_LOCAL (state folder, default /tmp/cmacc-local), S3_PORT
# (9000), DASHBOARD_PORT (8265), GCS_PORT (6380), RAY_CPUS (logical CPUs of the head,
# default 4: the demo asks for 3), BUCKET (cmacc), RAY_START_ARGS (more `ray start` options,
# for example other agent ports when another Ray runs here). Ray's files go to $CMACC_LOCAL/ray, so
# the head never leaves a "current cluster" record where other commands look.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
project="$(cd "$here/../.." && pwd)"
venv="${CMACC_VENV:-$project/.venv}/bin"
state="${CMACC_LOCAL:-/tmp/cmacc-local}"
s3_port="${S3_PORT:-9000}"
dashboard_port="${DASHBOARD_PORT:-8265}"
gcs_port="${GCS_PORT:-6380}"
cpus="${RAY_CPUS:-4}"
bucket="${BUCKET:-cmacc}"

die() { echo "stack.sh: $*" >&2; exit 1; }

# What the clients and the Ray processes use: the S3 endpoint, placeholder keys for moto.
write_env() {
  cat >"$state/env" <<EOF
export RAY_ADDRESS=http://127.0.0.1:$dashboard_port
export AWS_ENDPOINT_URL_S3=http://127.0.0.1:$s3_port
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
EOF
}

s3_answers() { "$venv/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$s3_port', timeout=2)" 2>/dev/null; }
s3_up() {  # our moto server: the recorded pid is alive and still moto's
  [[ -f "$state/moto.pid" ]] && ps -p "$(cat "$state/moto.pid")" -o args= 2>/dev/null | grep -q moto_server
}
# Up when the dashboard answers at all (401 included: Ray's token authentication is on by
# default; Ray keeps the token in ~/.ray/auth_token, where cmacc finds it).
ray_up() {
  "$venv/python" - "http://127.0.0.1:$dashboard_port/api/version" 2>/dev/null <<'EOF'
import sys
import urllib.error
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1], timeout=3)
except urllib.error.HTTPError:
    pass  # it answered
EOF
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...
  local what="$1" seconds="$2"; shift 2
  for _ in $(seq "$seconds"); do "$@" && return 0; sleep 1; done
  die "$what did not come up within $seconds s (logs in $state)"
}

start() {
  [[ -x "$venv/ray" && -x "$venv/moto_server" ]] || die "no project environment at $venv: run 'make install' first"
  mkdir -p "$state"
  write_env
  # shellcheck source=/dev/null
  source "$state/env"
  if s3_up; then
    echo "S3 endpoint already up at $AWS_ENDPOINT_URL_S3"
  else
    nohup "$venv/moto_server" -H 127.0.0.1 -p "$s3_port" >"$state/moto.log" 2>&1 &
    echo $! >"$state/moto.pid"
    wait_for "the S3 endpoint" 30 s3_answers
    echo "S3 endpoint up at $AWS_ENDPOINT_URL_S3 (log $state/moto.log)"
  fi
  "$venv/python" - "$bucket" <<'EOF'
import sys

import boto3

s3 = boto3.client("s3")
if sys.argv[1] not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
    s3.create_bucket(Bucket=sys.argv[1])
EOF
  if [[ -n "$(ray_pids)" ]] && ray_up; then
    echo "Ray head already up at $RAY_ADDRESS"
  elif ray_up; then
    die "something else answers on 127.0.0.1:$dashboard_port (another Ray?): set DASHBOARD_PORT"
  else
    # Token authentication on: the token is Ray's default file (~/.ray/auth_token, made
    # here when missing), where cmacc finds it. The head's processes inherit this
    # environment: jobs find the S3 endpoint and run the project's `python`.
    "$venv/ray" get-auth-token --generate >/dev/null 2>&1 || die "could not make a Ray token in ~/.ray/auth_token"
    RAY_AUTH_MODE=token PATH="$venv:$PATH" "$venv/ray" start --head --node-ip-address=127.0.0.1 --port="$gcs_port" \
      --num-cpus="$cpus" --include-dashboard=true --dashboard-host=127.0.0.1 \
      --dashboard-port="$dashboard_port" --temp-dir="$state/ray" --disable-usage-stats ${RAY_START_ARGS:-} \
      >"$state/ray-start.log" 2>&1 \
      || { tail -20 "$state/ray-start.log" >&2; die "the Ray head did not start"; }
    wait_for "the Ray dashboard" 120 ray_up
    echo "Ray head up at $RAY_ADDRESS ($cpus logical CPUs; log $state/ray-start.log)"
  fi
  echo "storage for runs: s3://$bucket/runs. Use the stack from a shell with: source $state/env"
}

# This head's processes, and only them (`ray stop` would stop every Ray on the machine):
# programs of this environment whose command line names this stack's Ray temp folder.
ray_pids() { pgrep -u "$(id -u)" -f -- "^$(dirname "$venv")/.*($state/ray/session_[0-9]|temp[-_]dir=$state/ray)" || true; }

stop() {
  local pids
  pids="$(ray_pids)"
  if [[ -n "$pids" ]]; then
    kill $pids 2>/dev/null || true
    for _ in $(seq 20); do [[ -z "$(ray_pids)" ]] && break; sleep 0.5; done
    pids="$(ray_pids)"
    [[ -n "$pids" ]] && kill -9 $pids 2>/dev/null || true
  fi
  rm -f "$state/ray/ray_current_cluster"
  if s3_up; then
    kill "$(cat "$state/moto.pid")" 2>/dev/null || true
  fi
  rm -f "$state/moto.pid"
  echo "local stack stopped"
}

status() {
  if s3_up; then echo "S3 endpoint: up at http://127.0.0.1:$s3_port (bucket s3://$bucket)"; else echo "S3 endpoint: down"; fi
  if [[ -n "$(ray_pids)" ]] && ray_up; then echo "Ray head: up at http://127.0.0.1:$dashboard_port"; else echo "Ray head: down"; fi
  [[ -f "$state/env" ]] && echo "environment: source $state/env"
  return 0
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
