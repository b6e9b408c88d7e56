#!/usr/bin/env bash
# A real S3 endpoint on 127.0.0.1 for local experiments (the tests start their own).
# Usage: infra/moto-server.sh [PORT]; then export AWS_ENDPOINT_URL_S3=http://127.0.0.1:PORT
set -euo pipefail
port="${1:-9000}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
exec "$(dirname "$0")/../.venv/bin/moto_server" -H 127.0.0.1 -p "$port"
