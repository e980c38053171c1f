#!/usr/bin/env bash
# The cluster benchmark: N simulated hosts (default 10) with one vxnetd each
# and a real Consul, E endpoints per host (default 50), and one table of
# attach and convergence latency, cold start, cost and datapath figures.
#
#   scripts/bench.sh                      # 10 hosts x 50 endpoints
#   scripts/bench.sh --hosts 2,5,10,20    # one column per cluster size
#   scripts/bench.sh --endpoints 20 --parallel 2 --out /tmp/bench.txt
#   scripts/bench.sh --hosts 2 --tune "ip netns exec {h1} ethtool -K eth0 gro on"
#   scripts/bench.sh --virtual-hosts 100,1000   # peer records of N simulated
#                                               # hosts x 50, churning, 3 real agents
#   scripts/bench.sh --virtual-hosts 100 --other-networks 20
#   scripts/bench.sh --liveness 3   # how long a dead host's entries stay,
#                                   # TTL alone and with a Consul agent per host
#   scripts/bench.sh --dns 50       # name resolution beside peer entries,
#                                   # after attach and after detach
#
# It reports; it does not judge. Everything it makes is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
export VXNET_BENCH=1
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) export VXNET_BENCH_HOSTS="$2"; shift 2 ;;
    --endpoints) export VXNET_BENCH_ENDPOINTS="$2"; shift 2 ;;
    --parallel) export VXNET_BENCH_PARALLEL="$2"; shift 2 ;;
    --idle) export VXNET_BENCH_IDLE="$2"; shift 2 ;;
    --iperf) export VXNET_BENCH_IPERF="$2"; shift 2 ;;
    --tune) export VXNET_BENCH_TUNE="$2"; shift 2 ;;
    --trace) export VXNET_BENCH_TRACE=1; shift ;;
    --virtual-hosts) export VXNET_BENCH_VHOSTS="$2"; shift 2 ;;
    --churn) export VXNET_BENCH_CHURN="$2"; shift 2 ;;
    --other-networks) export VXNET_BENCH_OTHER_NETWORKS="$2"; shift 2 ;;
    --liveness) export VXNET_BENCH_LIVENESS="$2"; shift 2 ;;
    --dns) export VXNET_BENCH_DNS="$2"; shift 2 ;;
    --out) export VXNET_BENCH_OUT="$(realpath -m "$2")"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "bench: unknown argument $1" >&2; usage 2 >&2 ;;
  esac
done
CONSUL_BIN=$(scripts/deps.sh | tail -n 1)
export CONSUL_BIN
# -v: the progress lines and the table stream as they come.
run='^TestBenchmarkMesh$'
[ -n "${VXNET_BENCH_VHOSTS:-}" ] && run='^TestBenchmarkVirtualHosts$'
[ -n "${VXNET_BENCH_LIVENESS:-}" ] && run='^TestBenchmarkLiveness$'
[ -n "${VXNET_BENCH_DNS:-}" ] && run='^TestBenchmarkDNS$'
go test -v -count=1 -timeout 60m -run "$run" ./test/
