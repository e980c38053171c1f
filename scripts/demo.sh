#!/usr/bin/env bash
# The multi-host demo: the experiment of Docker 1.9's overlay article, on
# three simulated hosts (network namespaces on one underlay switch), with a
# real Consul and one vxnetd per host. Everything it makes is removed at
# the end, also on failure or Ctrl-C.
#
#   scripts/demo.sh                 # every vxnetd talks to the Consul server
#   scripts/demo.sh --local-consul  # a Consul client agent on every host, as
#                                   # Consul is usually run; vxnetd asks it
#   scripts/demo.sh --docker        # the article's Docker commands: a dockerd
#                                   # per host using vxnet's Docker plugin
set -euo pipefail
cd "$(dirname "$0")/.."
local_consul=
docker_mode=
case "${1:-}" in
  "") ;;
  --local-consul) local_consul=1 ;;
  --docker) docker_mode=1 ;;
  *) echo "demo: unknown argument $1 (try --local-consul or --docker)" >&2; exit 2 ;;
esac
CONSUL_BIN=$(scripts/deps.sh | tail -n 1)
[ -z "$docker_mode" ] || scripts/install-runtimes.sh

p="vxdemo$$"              # prefix of everything the demo creates
work=$(mktemp -d /tmp/vxnet-demo.XXXXXX)
sw="$p-sw"
hosts=(h1 h2 h3)
pids=()
declare -A agent_pid # vxnetd's pid by host

bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }
run() { printf '\033[36m$ %s\033[0m\n' "$*"; "$@"; }

cleanup() {
  set +e
  # A second Ctrl-C must not cut the removal short and leave namespaces behind.
  trap '' INT TERM
  for h in "${hosts[@]}"; do
    # Docker's containers first, while its daemon and the plugin answer.
    if [ -S "$work/$h/docker/docker.sock" ]; then
      ids=$(DOCKER_HOST="unix://$work/$h/docker/docker.sock" /usr/bin/docker ps -aq 2>/dev/null)
      [ -z "$ids" ] || DOCKER_HOST="unix://$work/$h/docker/docker.sock" /usr/bin/docker rm -f $ids >/dev/null 2>&1
    fi
  done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
  wait 2>/dev/null
  for h in "${hosts[@]}"; do
    [ -d "$work/$h/docker/exec" ] && umount -R "$work/$h/docker/exec" 2>/dev/null
  done
  for h in "${hosts[@]}"; do
    for m in "$work/$h/run/netns/"*; do [ -e "$m" ] && umount -l "$m" 2>/dev/null; done
  done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$p-"); do ip netns del "$ns"; done
  rm -rf /etc/netns/"$p"-*
  rmdir /etc/netns 2>/dev/null
  rm -rf "$work"
}
# cleanup only on EXIT: as a handler of INT or TERM too it would run and
# then the script would go on (and run it again at the end). The signals
# just exit, with the usual 128+N status, and the EXIT trap cleans up once.
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bold "Building vxnetd and vxnet"
go build -o "$work/bin/" ./cmd/vxnetd ./cmd/vxnet
export PATH="$work/bin:$PATH"

bold "Underlay: a switch and three hosts, 192.168.77.0/24"
ip netns add "$sw"
ip -n "$sw" link set lo up
ip -n "$sw" link add br0 type bridge
ip -n "$sw" addr add 192.168.77.254/24 dev br0
ip -n "$sw" link set br0 up
i=1
for h in "${hosts[@]}"; do
  ip netns add "$p-$h"
  ip -n "$p-$h" link set lo up
  ip -n "$sw" link add "p$i" type veth peer name eth0 netns "$p-$h"
  ip -n "$sw" link set "p$i" master br0 up
  ip -n "$p-$h" addr add "192.168.77.$i/24" dev eth0
  ip -n "$p-$h" link set eth0 up
  echo "  $h: 192.168.77.$i"
  i=$((i + 1))
done

bold "Consul on the switch, 192.168.77.254:8500"
ip netns exec "$sw" "$CONSUL_BIN" agent -dev -bind 192.168.77.254 -client 192.168.77.254 \
  -dns-port -1 -grpc-port -1 -grpc-tls-port -1 -hcl 'disable_update_check = true' >"$work/consul.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  ip netns exec "$sw" curl -sf http://192.168.77.254:8500/v1/status/leader 2>/dev/null | grep -q : && break
  sleep 0.2
done

store=consul://192.168.77.254:8500
if [ -n "$local_consul" ]; then
  bold "A Consul client agent per host, joined to the server, on 127.0.0.1:8500 of its host"
  i=1
  for h in "${hosts[@]}"; do
    mkdir -p "$work/$h/consul"
    nsenter --net="/var/run/netns/$p-$h" "$CONSUL_BIN" agent -node "$h" -bind "192.168.77.$i" -client 127.0.0.1 \
      -retry-join 192.168.77.254 -data-dir "$work/$h/consul" -dns-port -1 -grpc-port -1 -grpc-tls-port -1 \
      -hcl 'disable_update_check = true' >"$work/$h/consul.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
  done
  for h in "${hosts[@]}"; do
    for _ in $(seq 150); do
      nsenter --net="/var/run/netns/$p-$h" curl -sf http://127.0.0.1:8500/v1/status/leader 2>/dev/null | grep -q : && break
      sleep 0.2
    done
  done
  store=consul://127.0.0.1:8500
fi

bold "One vxnetd per host"
i=1
for h in "${hosts[@]}"; do
  mkdir -p "$work/$h"
  extra=()
  if [ -n "$docker_mode" ]; then
    mkdir -p "$work/$h/docker/"{plugins,etc,data,exec,run}
    extra=(--docker-plugin-socket "$work/$h/docker/plugins/vxnet.sock" --docker-host "unix://$work/$h/docker/docker.sock")
  fi
  nsenter --net="/var/run/netns/$p-$h" vxnetd --store "$store" \
    --node "$h" --advertise "192.168.77.$i" --state-dir "$work/$h/state" --run-dir "$work/$h/run" \
    --socket "$work/$h/vxnet.sock" "${extra[@]}" >"$work/$h/vxnetd.log" 2>&1 &
  pids+=($!)
  agent_pid[$h]=$!
  i=$((i + 1))
done
for h in "${hosts[@]}"; do
  for _ in $(seq 100); do vxnet -H "unix://$work/$h/vxnet.sock" status >/dev/null 2>&1 && break; sleep 0.1; done
done
# ping_matrix PING: PING SRC ADDR pings from container SRC; the table of
# net1c1..net2c2 against each other (ip[]: their addresses) must show
# same-network pairs ok and the others blocked.
ping_matrix() {
  local ping=$1 ctrs=(net1c1 net1c2 net2c1 net2c2) bad=0 s d r same
  printf '  %-8s' "from\\to"; for d in "${ctrs[@]}"; do printf '%-9s' "$d"; done; echo
  for s in "${ctrs[@]}"; do
    printf '  %-8s' "$s"
    for d in "${ctrs[@]}"; do
      if [ "$s" = "$d" ]; then printf '%-9s' "-"; continue; fi
      if "$ping" "$s" "${ip[$d]}" >/dev/null 2>&1; then r=ok; else r=blocked; fi
      printf '%-9s' "$r"
      same=$([ "${s:0:4}" = "${d:0:4}" ] && echo ok || echo blocked)
      [ "$r" = "$same" ] || bad=1
    done
    echo
  done
  [ "$bad" = 0 ] || { echo "UNEXPECTED ping matrix" >&2; exit 1; }
}
on() { local h=$1; shift; printf '\033[36m[%s]$ vxnet %s\033[0m\n' "$h" "$*"; vxnet -H "unix://$work/$h/vxnet.sock" "$@"; }

if [ -n "$docker_mode" ]; then
  . scripts/demo-docker.sh
  exit 0
fi

on h1 node ls
bold "Create two overlay networks, on different hosts; every host sees both"
on h1 network create net1 --subnet 10.0.0.0/24
on h2 network create net2 --subnet 10.0.1.0/24
on h3 network ls

bold "Four containers: net1c1 (h1) and net1c2 (h2) on net1, net2c1 (h2) and net2c2 (h1) on net2"
for c in net1c1 net1c2 net2c1 net2c2; do ip netns add "$p-$c"; done
# --resolv-conf: ip netns exec puts /etc/netns/NAME/resolv.conf in place
# of /etc/resolv.conf, naming the network's DNS server (its gateway).
on h1 attach net1 "$p-net1c1" --name net1c1 --resolv-conf "/etc/netns/$p-net1c1/resolv.conf"
on h2 attach net1 "$p-net1c2" --name net1c2 --resolv-conf "/etc/netns/$p-net1c2/resolv.conf"
on h2 attach net2 "$p-net2c1" --name net2c1 --resolv-conf "/etc/netns/$p-net2c1/resolv.conf"
on h1 attach net2 "$p-net2c2" --name net2c2 --resolv-conf "/etc/netns/$p-net2c2/resolv.conf"
on h3 endpoint ls

bold "Inside net1c1 (as 'docker exec net1c1 ip addr' in the article)"
run ip netns exec "$p-net1c1" ip addr show eth0
run ip netns exec "$p-net1c1" ip route

id=$(vxnet -H "unix://$work/h1/vxnet.sock" network inspect net1 | sed -n 's/.*"id": "\([0-9a-f]\{10\}\).*/\1/p' | head -1)
ns="1-$id"
bold "h1's overlay namespace $ns: br0 with the gateway, vxlan1 and a veth"
run nsenter --net="$work/h1/run/netns/$ns" ip -d link show vxlan1
run nsenter --net="$work/h1/run/netns/$ns" ip addr show br0
run nsenter --net="$work/h1/run/netns/$ns" bridge link
bold "Static ARP and FDB entries for net1c2 on h1 (the article's 'arp -a')"
run nsenter --net="$work/h1/run/netns/$ns" ip neigh show dev vxlan1
run nsenter --net="$work/h1/run/netns/$ns" bridge fdb show dev vxlan1
bold "h3 has no endpoint, so no overlay namespace"
run ls "$work/h3/run/netns/"

bold "net1c1 (h1) pings net1c2 (h2) across the VXLAN tunnel"
run ip netns exec "$p-net1c1" ping -c 3 -i 0.2 10.0.0.3

bold "By name, as in the article: net1's DNS server (10.0.0.1 on h1) knows net1c2 on h2, and not net2c1"
run cat "/etc/netns/$p-net1c1/resolv.conf"
run ip netns exec "$p-net1c1" getent hosts net1c2
run ip netns exec "$p-net1c1" ping -c 2 -i 0.2 net1c2
printf '\033[36m$ ip netns exec %s getent hosts net2c1\033[0m\n' "$p-net1c1"
if ip netns exec "$p-net1c1" getent hosts net2c1; then echo "UNEXPECTED: net1c1 resolves net2c1" >&2; exit 1; fi
echo "(not found: net2c1 is on net2)"

bold "Ping matrix: same network across hosts works, across networks fails"
declare -A ip=([net1c1]=10.0.0.2 [net1c2]=10.0.0.3 [net2c1]=10.0.1.2 [net2c2]=10.0.1.3)
ns_ping() { ip netns exec "$p-$1" ping -c 1 -W 1 "$2"; }
ping_matrix ns_ping

bold "Egress: net1c1's eth1 on h1's gateway bridge, default route, MASQUERADE"
run ip netns exec "$p-net1c1" ip -4 addr show eth1
run ip -n "$p-h1" link show vxnet_gwbridge
run ip netns exec "$p-h1" iptables -t nat -S VXNET-POSTROUTING
bold "net1c1 reaches the outside (the switch, 192.168.77.254) through h1's NAT"
run ip netns exec "$p-net1c1" ping -c 2 -i 0.2 192.168.77.254

bold "Published port: a web container on h1 with -p 8080:5201, reached from the switch at h1's address"
ip netns add "$p-web"
on h1 attach net1 "$p-web" --name web -p 8080:5201
ip netns exec "$p-web" iperf3 -s -1 >/dev/null 2>&1 &
pids+=($!)
sleep 0.3
run ip netns exec "$p-h1" iptables -t nat -S VXNET-DNAT
run ip netns exec "$sw" iperf3 -c 192.168.77.1 -p 8080 -t 1 -f m
on h1 detach net1 web

bold "Detach net1c2; h1 drops its entries"
on h2 detach net1 net1c2
sleep 0.5
run nsenter --net="$work/h1/run/netns/$ns" ip neigh show dev vxlan1
bold "Stop h1's agent and remove its egress rules and bridge (vxnetd --cleanup)"
kill "${agent_pid[h1]}"; wait "${agent_pid[h1]}" 2>/dev/null || true
run nsenter --net="/var/run/netns/$p-h1" vxnetd --cleanup --state-dir "$work/h1/state"
run ip netns exec "$p-h1" iptables -t nat -S
bold "Demo done; cleaning up"
