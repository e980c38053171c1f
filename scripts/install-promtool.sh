#!/usr/bin/env bash
# Installs promtool (Debian's prometheus package) when missing, for the test
# that checks the agent's metrics; nothing else needs it. Prints its path.
set -euo pipefail
if ! command -v promtool >/dev/null; then
  echo "install-promtool: installing prometheus for promtool (apt-get; its output in /tmp/vxnet-apt-prometheus.log)" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } >/tmp/vxnet-apt-prometheus.log 2>&1; then
    tail -n 20 /tmp/vxnet-apt-prometheus.log >&2
    exit 1
  fi
fi
command -v promtool
