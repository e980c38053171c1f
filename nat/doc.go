// Package nat owns the host side of container egress: the gateway bridge
// (Docker 1.9's docker_gwbridge) and the iptables chains that NAT and police
// traffic crossing it.
//
// In Docker's multi-host overlay every container has two interfaces: eth0 on
// the overlay (VXLAN) network, which only reaches other containers of that
// overlay, and a second one (eth1) on a host-local bridge whose first address
// is the container's default gateway. Everything that is not overlay traffic
// leaves the container through that second interface, is routed by the host
// and masqueraded behind the host's own address. This package reproduces that
// second half.
//
// # The rules and why each exists
//
// All rules live in chains named after Config.ChainPrefix so that they can be
// compared, rewritten and removed as a unit without touching anyone else's
// rules. Built-in chains only get one jump each:
//
//	nat    POSTROUTING -j VXNET-POSTROUTING
//	nat    PREROUTING and OUTPUT -j VXNET-DNAT (see published ports below)
//	filter FORWARD     -j VXNET-FORWARD      (inserted at position 1)
//
// The FORWARD jump goes first because other software (a firewall, Docker
// itself) commonly sets the FORWARD policy to DROP or appends a catch-all
// reject; gateway traffic must be decided before that. It is inserted once and
// not moved afterwards: if another tool later inserts its own rule ahead of
// it, fighting over position 1 on every reconcile would make both tools flap.
//
// nat VXNET-POSTROUTING:
//
//	-s <subnet> ! -o <bridge> -j MASQUERADE
//
// Container gateway addresses are private and only meaningful on this host;
// anything from the gateway subnet that leaves through another interface
// must carry the address of that interface or the replies never come back.
// MASQUERADE (not SNAT) because the uplink address may be dynamic. Traffic
// staying on the bridge (container to host via the bridge address) is not
// rewritten so the host sees the real container address.
//
// filter VXNET-FORWARD:
//
//	-j VXNET-ISOLATION
//	-j VXNET-PUBLISH
//	-i <bridge> -o <bridge> -j DROP
//	-i <bridge> ! -o <bridge> -j ACCEPT
//	-o <bridge> -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
//	-j RETURN
//
// The isolation jump comes first so that isolation policy can never be
// bypassed by a later ACCEPT. The DROP is Docker's icc=false: containers must
// not talk to each other over the gateway bridge, only over the overlays
// they share, or overlay isolation would be pointless. It only sees bridged
// frames when br_netfilter is active (net.bridge.bridge-nf-call-iptables=1),
// so every gateway port is additionally marked as an isolated bridge port
// (IFLA_BRPORT_ISOLATED), which enforces the same thing at layer 2 whether or
// not br_netfilter is loaded. The first ACCEPT lets containers out, the
// second lets only replies (and related ICMP errors) back in, so the outside
// world cannot open connections to containers. The final RETURN hands
// everything else back to FORWARD and its policy; it is explicit so that the
// chain's intent is visible in iptables-save.
//
// Published ports (vxnet attach --publish) add two chains:
//
//	nat    PREROUTING -m addrtype --dst-type LOCAL -j VXNET-DNAT
//	nat    OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j VXNET-DNAT
//	nat    VXNET-DNAT:    ! -i <bridge> -p P -m P --dport HOST -j DNAT --to-destination ADDR:PORT
//	filter VXNET-PUBLISH: -d ADDR/32 ! -i <bridge> -o <bridge> -p P -m P --dport PORT -j ACCEPT
//
// DNAT applies to any local destination address, so a published port works
// on every address of the host, and from the host itself (OUTPUT); not
// through loopback, which the kernel will not route to another interface.
// Traffic coming from the bridge is left alone: containers reach each other
// over their overlays, not by hairpinning through the host. VXNET-PUBLISH is
// jumped to from VXNET-FORWARD before its DROP and reply-only ACCEPT, and it
// opens exactly the forwarded port of exactly that container. No MASQUERADE
// is added: the container sees the real client address.
//
// filter VXNET-ISOLATION:
//
//	-j RETURN
//
// Kept as the single place for isolation rules, mirroring Docker's
// DOCKER-ISOLATION chain. It is empty on purpose: overlay networks are
// isolated from each other by construction (each overlay lives in its own
// namespace with its own bridge and VXLAN device, and no route exists between
// them), and the only shared segment, the gateway bridge, is covered by the
// DROP above and by port isolation.
//
// Nothing is added to INPUT: like Docker, containers may reach the host itself
// through the bridge address (DNS forwarders, published services on the
// host), and the host firewall remains in charge of that.
//
// Ensure makes each chain contain exactly the wanted rules and rewrites a chain
// (flush and refill) only when its content differs, so restarting the agent
// never duplicates rules and reports no changes when nothing drifted.
package nat
