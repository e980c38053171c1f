#!/usr/bin/env bash
# Installs what vxnet's demo and tests need on a Debian machine, skipping
# what is already there. Prints the Consul binary's path on the last line.
#
#   scripts/deps.sh              # the demo's and the tests' common needs
#   scripts/deps.sh --runtimes   # also docker.io, podman, runc,
#                                # busybox-static, dnsutils and cnitool,
#                                # which only the runtime tests and
#                                # demo.sh --docker need (they install
#                                # them themselves when missing)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" -ne 0 ]; then
  echo "vxnet: the demo and the tests need root (network namespaces, vxlan, iptables)" >&2
  exit 1
fi
command -v go >/dev/null || { echo "vxnet: Go 1.26 is required (https://go.dev/dl)" >&2; exit 1; }

# command -> Debian package
declare -A pkgs=([ip]=iproute2 [bridge]=iproute2 [nsenter]=util-linux [ping]=iputils-ping
  [iptables]=iptables [iperf3]=iperf3 [curl]=curl [ethtool]=ethtool)
missing=()
for c in "${!pkgs[@]}"; do
  command -v "$c" >/dev/null || missing+=("${pkgs[$c]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  log=/tmp/vxnet-apt.log
  echo "vxnet: installing ${missing[*]} (apt-get, log in $log)" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >"$log" 2>&1; then
    echo "vxnet: apt-get failed; the end of $log:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
fi
modprobe vxlan 2>/dev/null || true
if [ "${1:-}" = --runtimes ]; then
  "$here/install-runtimes.sh"
  "$here/install-cnitool.sh" >/dev/null
fi
"$here/install-consul.sh"
