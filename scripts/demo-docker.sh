# The article's Docker half, sourced by demo.sh --docker once the hosts,
# Consul and the vxnetd (each serving the Docker plugin) run.

bold "An image made offline from Debian's static busybox"
mkdir -p "$work/rootfs/bin"
cp /bin/busybox "$work/rootfs/bin/"
for c in sh sleep ip ping cat; do ln -s busybox "$work/rootfs/bin/$c"; done
tar -C "$work/rootfs" -cf "$work/busybox.tar" .

bold "A dockerd on h1 and h2, in the host's namespaces, finding vxnet's plugin in /run/docker/plugins"
dhosts=(h1 h2)
for h in "${dhosts[@]}"; do
  d="$work/$h/docker"
  # dockerd mounts containers' namespaces under its exec root: shared,
  # the agent sees them too.
  mount --bind "$d/exec" "$d/exec" && mount --make-shared "$d/exec"
  mkdir -p /run/docker/plugins /etc/docker
  nsenter --net="/var/run/netns/$p-$h" unshare --mount --propagation unchanged sh -c \
    "mount --bind $d/plugins /run/docker/plugins && mount --bind $d/etc /etc/docker && exec dockerd --data-root $d/data --exec-root $d/exec -H unix://$d/docker.sock --pidfile $d/run/docker.pid --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs" \
    >"$d/dockerd.log" 2>&1 &
  pids+=($!)
done
for h in "${dhosts[@]}"; do
  for _ in $(seq 150); do
    DOCKER_HOST="unix://$work/$h/docker/docker.sock" /usr/bin/docker version >/dev/null 2>&1 && break
    sleep 0.2
  done
  DOCKER_HOST="unix://$work/$h/docker/docker.sock" /usr/bin/docker import "$work/busybox.tar" busybox >/dev/null
done
dk() { local h=$1; shift; printf '\033[36m[%s]$ docker %s\033[0m\n' "$h" "$*"; DOCKER_HOST="unix://$work/$h/docker/docker.sock" /usr/bin/docker "$@"; }
dkq() { local h=$1; shift; DOCKER_HOST="unix://$work/$h/docker/docker.sock" /usr/bin/docker "$@"; }

bold "net1 created on h1, net2 on h2; each Docker needs the network too: the same command joins it"
dk h1 network create -d vxnet --ipam-driver vxnet --subnet 10.0.0.0/24 net1
dk h2 network create -d vxnet --ipam-driver vxnet --subnet 10.0.1.0/24 net2
dk h2 network create -d vxnet --ipam-driver vxnet --subnet 10.0.0.0/24 net1
dk h1 network create -d vxnet --ipam-driver vxnet --subnet 10.0.1.0/24 net2
dk h1 network ls
dk h1 network inspect net1
on h3 network ls

bold "Four containers: net1c1 (h1) and net1c2 (h2) on net1, net2c1 (h2) and net2c2 (h1) on net2"
echo "(--dns: Docker's embedded DNS asks the network's vxnet DNS server, on its gateway, for the containers of other hosts)"
dk h1 run -d --name net1c1 --net net1 --dns 10.0.0.1 busybox sleep 3600
dk h2 run -d --name net1c2 --net net1 --dns 10.0.0.1 busybox sleep 3600
dk h2 run -d --name net2c1 --net net2 --dns 10.0.1.1 busybox sleep 3600
dk h1 run -d --name net2c2 --net net2 --dns 10.0.1.1 busybox sleep 3600
on h3 endpoint ls

bold "Inside net1c1"
dk h1 exec net1c1 ip addr
dk h1 exec net1c1 ip route

declare -A at=([net1c1]=h1 [net1c2]=h2 [net2c1]=h2 [net2c2]=h1)
declare -A ip
for c in "${!at[@]}"; do
  n=net${c:3:1}
  ip[$c]=$(dkq "${at[$c]}" inspect "$c" --format "{{(index .NetworkSettings.Networks \"$n\").IPAddress}}")
done
bold "net1c1 (h1) pings net1c2 (h2) across the VXLAN tunnel"
dk h1 exec net1c1 ping -c 3 "${ip[net1c2]}"

bold "By name, as in the article: net1c1 (h1) pings net1c2 (h2)"
for _ in $(seq 50); do dkq h1 exec net1c1 ping -c 1 -W 1 net1c2 >/dev/null 2>&1 && break; sleep 0.1; done
dk h1 exec net1c1 ping -c 2 net1c2
printf '\033[36m[h1]$ docker exec net1c1 ping -c 1 -W 1 net2c1\033[0m\n'
if dkq h1 exec net1c1 ping -c 1 -W 1 net2c1; then echo "UNEXPECTED: net1c1 reaches net2c1 by name" >&2; exit 1; fi
echo "(net2c1 is on net2: no such name on net1)"

bold "Ping matrix: same network across hosts works, across networks fails"
dk_ping() { dkq "${at[$1]}" exec "$1" ping -c 1 -W 1 "$2"; }
ping_matrix dk_ping

bold "net1c1 reaches the outside (the switch, 192.168.77.254) through h1's gateway bridge and NAT"
dk h1 exec net1c1 ping -c 2 192.168.77.254

bold "docker rm and docker network rm: vxnet keeps nothing of them"
dk h1 rm -f net1c1 net2c2
dk h2 rm -f net1c2 net2c1
for h in h1 h2; do dk "$h" network rm net1 net2; done
on h3 endpoint ls
on h3 network ls
bold "Demo done; cleaning up"
