#!/usr/bin/env bash
# Turns EC2's spot interruption notice into Ray's preemption notice (docs/scaling.md,
# "Preemption"): polls the instance metadata every 5 s and, when an interruption is
# scheduled, marks this Ray node draining with its deadline. Ray Train then reports the
# preemption to the training loop, which writes a checkpoint at once and trains on.
# Started on every worker node by infra/aws/cluster.yaml (worker_start_ray_commands).
set -u
metadata=http://169.254.169.254/latest
while true; do
  token=$(curl -sf -m 2 -X PUT "$metadata/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 300") || token=""
  notice=$(curl -sf -m 2 -H "X-aws-ec2-metadata-token: $token" "$metadata/meta-data/spot/instance-action") || notice=""
  if [[ -n "$notice" ]]; then
    echo "$(date -u +%FT%TZ) spot interruption: $notice"
    ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message "EC2 spot interruption: $notice" \
      --deadline-remaining-seconds 110
    exit 0
  fi
  sleep 5
done
