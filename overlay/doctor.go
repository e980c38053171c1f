package overlay

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/netnsutil"
	"github.com/vxnet/vxnet/ipam"
	"github.com/vxnet/vxnet/vtep"
)

// Doctor checks this host and says, for each finding, what is wrong and
// what to do. It changes nothing: what it finds in the kernel is what the
// next full pass would repair.
func (a *Agent) Doctor(ctx context.Context) []api.Finding {
	var out []api.Finding
	add := func(f api.Finding) { out = append(out, f) }

	// Kernel features: a module that is loaded shows in /sys/module; a
	// built-in one may not, and then the agent's own devices vouch for it.
	a.mu.Lock()
	nets := a.localNetworks()
	a.unlock()
	for _, mod := range []string{"vxlan", "bridge", "veth"} {
		if _, err := os.Stat("/sys/module/" + mod); err == nil || len(nets) > 0 {
			add(api.Finding{Check: "kernel", OK: true, Message: mod + " available"})
		} else {
			add(api.Finding{Check: "kernel", OK: false, Message: mod + ": no /sys/module/" + mod + " and no network built here yet to show it works",
				Fix: "modprobe " + mod + " (or a kernel with CONFIG_" + strings.ToUpper(mod) + ")"})
		}
	}
	if a.egress != nil {
		data, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		if on := strings.TrimSpace(string(data)) == "1"; err == nil && on {
			add(api.Finding{Check: "kernel", OK: true, Message: "net.ipv4.ip_forward is 1 (egress)"})
		} else {
			add(api.Finding{Check: "kernel", OK: false, Message: "net.ipv4.ip_forward is off: containers cannot reach out through the gateway bridge",
				Fix: "sysctl -w net.ipv4.ip_forward=1 (the agent sets it at its next full pass unless something resets it)"})
		}
	}
	add(a.checkMounts())
	port := a.cfg.VXLANPort
	if port == 0 {
		port = 4789
	}
	switch prog, err := vtep.PortTakenByProgram(port); {
	case err != nil:
		add(api.Finding{Check: "underlay", OK: false, Message: fmt.Sprintf("cannot read the UDP sockets: %v", err)})
	case prog != "":
		add(api.Finding{Check: "underlay", OK: false, Message: fmt.Sprintf("a program holds UDP port %d, the VXLAN port: %s; it takes the overlay's packets", port, prog),
			Fix: fmt.Sprintf("find it with ss -ulpn 'sport = :%d' and stop it, or give every agent another --vxlan-port", port)})
	default:
		add(api.Finding{Check: "underlay", OK: true, Message: fmt.Sprintf("UDP port %d is the VXLAN devices' alone", port)})
	}

	// The datapath, against what the agent programmed; under the kernel
	// lock, so that a pass under way is not taken for drift.
	a.mu.Lock()
	for _, n := range nets {
		for _, f := range a.checkNetworkKernel(ctx, n) {
			add(f)
		}
	}
	vteps := a.peerVTEPs()
	a.unlock()
	if a.dns != nil {
		running := map[string]bool{}
		for _, p := range a.dns.Running() {
			running[p] = true
		}
		for _, ln := range nets {
			n := &ln.net
			if running[a.dp.NetNSPath(n.NamespaceName())] {
				add(api.Finding{Check: "dns", Network: n.Name, OK: true, Message: fmt.Sprintf("DNS server on %s:53", n.Gateway)})
			} else {
				add(api.Finding{Check: "dns", Network: n.Name, OK: false, Message: fmt.Sprintf("no DNS server on %s:53: containers cannot resolve the network's names", n.Gateway),
					Fix: "see the agent's log for why (\"dns server\"); the next pass tries again"})
			}
		}
	}
	if a.egress != nil {
		problems, err := a.egress.CheckRules(ctx)
		switch {
		case err != nil:
			add(api.Finding{Check: "egress", OK: false, Message: "cannot read the iptables rules: " + err.Error()})
		case len(problems) == 0:
			add(api.Finding{Check: "egress", OK: true, Message: "iptables chains and jumps as they should be"})
		}
		for _, p := range problems {
			add(api.Finding{Check: "egress", OK: false, Message: p, Fix: "the next full pass rewrites the chain; run `vxnet doctor` again after --resync-interval"})
		}
	}
	for _, vtepAddr := range vteps {
		if _, err := netlink.RouteGet(vtepAddr.AsSlice()); err != nil {
			add(api.Finding{Check: "underlay", OK: false, Message: fmt.Sprintf("no route to peer VTEP %s: %v", vtepAddr, err), Fix: "check the underlay's routing to that host"})
		}
	}
	if len(vteps) > 0 {
		add(api.Finding{Check: "underlay", OK: true, Message: fmt.Sprintf("%d peer VTEPs routed", len(vteps))})
	}

	// MTU: the overlay's must fit the underlay's minus the VXLAN header.
	for _, n := range nets {
		if n.mtu > a.localMTU() {
			add(api.Finding{Check: "mtu", OK: false, Network: n.net.Name, Message: fmt.Sprintf("MTU %d is over the underlay's %d - 50", n.mtu, a.cfg.UnderlayMTU),
				Fix: "raise the underlay MTU, or recreate the network with a smaller --mtu"})
		} else {
			add(api.Finding{Check: "mtu", OK: true, Network: n.net.Name, Message: fmt.Sprintf("MTU %d fits the underlay's %d", n.mtu, a.cfg.UnderlayMTU)})
		}
	}

	// The store: reachable and how fast, the session, the room left.
	rtt, err := a.probeStore(ctx)
	if err != nil {
		add(api.Finding{Check: "store", OK: false, Message: "the store does not answer: " + err.Error(), Fix: "check the store (Consul) and --store; the datapath keeps its state meanwhile"})
		return out
	}
	add(api.Finding{Check: "store", OK: true, Message: fmt.Sprintf("reachable, %s round trip", rtt.Round(10*time.Microsecond))})
	if id := a.currentSession(); id == "" {
		add(api.Finding{Check: "session", OK: false, Message: "no store session: this host's records are not bound to its life", Fix: "see vxnet status and the agent's log"})
	} else if err := a.store.RenewSession(ctx, id); err != nil {
		add(api.Finding{Check: "session", OK: false, Message: "the session does not renew: " + err.Error(), Fix: "the agent makes a new one; see its log if this stays"})
	} else {
		add(api.Finding{Check: "session", OK: true, Message: "session alive"})
	}
	for _, n := range nets {
		add(a.checkRoom(ctx, n.net))
	}
	return out
}

// localNet is a network with endpoints on this host, as the doctor sees
// it.
type localNet struct {
	net   Network
	mtu   int
	veths []string
}

// localNetworks lists the networks with attached local endpoints (called
// with mu held).
func (a *Agent) localNetworks() []localNet {
	by := map[string]*localNet{}
	for _, l := range a.locals {
		if l.Phase != phaseAttached {
			continue
		}
		n := by[l.Net.ID]
		if n == nil {
			n = &localNet{net: l.Net, mtu: l.MTU}
			by[l.Net.ID] = n
		}
		n.veths = append(n.veths, l.Endpoint.HostVeth())
	}
	out := make([]localNet, 0, len(by))
	for _, n := range by {
		out = append(out, *n)
	}
	slices.SortFunc(out, func(x, y localNet) int { return strings.Compare(x.net.Name, y.net.Name) })
	return out
}

// checkNetworkKernel compares one network's namespace with what the agent
// programmed: the peers' neighbor and FDB entries and the endpoints' veths
// (called with mu held).
func (a *Agent) checkNetworkKernel(ctx context.Context, n localNet) []api.Finding {
	ns := n.net.NamespaceName()
	var out []api.Finding
	bad := func(msg, fix string) {
		out = append(out, api.Finding{Check: "datapath", OK: false, Network: n.net.Name, Message: msg, Fix: fix})
	}
	const resync = "the next full pass repairs it (--resync-interval)"
	if applied, known := a.applied[ns]; known {
		plan, err := a.dp.DiffPeers(ctx, ns, applied.list())
		if err != nil {
			bad("cannot read the peer tables: "+err.Error(), "check the network's namespace "+ns)
			return out
		}
		for _, p := range plan.AddNeigh {
			bad(fmt.Sprintf("neighbor entry of peer %s is missing or wrong", p.IP), resync)
		}
		for _, ip := range plan.DelNeigh {
			bad(fmt.Sprintf("unexpected neighbor entry %s", ip), resync)
		}
		for _, p := range plan.AddFDB {
			bad(fmt.Sprintf("FDB entry of %s (peer %s, VTEP %s) is missing or wrong", p.MAC, p.IP, p.VTEP), resync)
		}
		for _, mac := range plan.DelFDB {
			bad(fmt.Sprintf("unexpected FDB entry %s", mac), resync)
		}
		if plan.Empty() {
			out = append(out, api.Finding{Check: "datapath", OK: true, Network: n.net.Name, Message: fmt.Sprintf("%d peers programmed as they should be", len(applied))})
		}
	}
	have, err := a.dp.Endpoints(ctx, ns)
	if err != nil {
		bad("cannot list the endpoint interfaces: "+err.Error(), "check the network's namespace "+ns)
		return out
	}
	for _, v := range n.veths {
		if !slices.Contains(have, v) {
			bad("the veth "+v+" of a local endpoint is missing", resync)
		}
	}
	for _, v := range have {
		if !slices.Contains(n.veths, v) && !a.vethInFlight(v) {
			bad("the veth "+v+" belongs to no endpoint", resync+" (it removes it)")
		}
	}
	return out
}

// vethInFlight: an attach under way owns it (called with mu held).
func (a *Agent) vethInFlight(v string) bool {
	for key, l := range a.locals {
		if a.inflight[key] && l.Endpoint.HostVeth() == v {
			return true
		}
	}
	return false
}

// peerVTEPs are the other hosts' VTEPs programmed here (called with mu
// held).
func (a *Agent) peerVTEPs() []netip.Addr {
	seen := map[netip.Addr]bool{}
	var out []netip.Addr
	for _, set := range a.applied {
		for _, p := range set {
			if !seen[p.VTEP] {
				seen[p.VTEP] = true
				out = append(out, p.VTEP)
			}
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// checkMounts warns of a private mount namespace: the network namespaces
// the agent mounts would vanish with it.
func (a *Agent) checkMounts() api.Finding {
	private, _, _, err := netnsutil.PrivateMounts()
	switch {
	case err != nil:
		return api.Finding{Check: "mounts", OK: true, Message: "cannot compare the agent's mount namespace with the host's: " + err.Error()}
	case private:
		return api.Finding{Check: "mounts", OK: false, Message: "the agent runs in a mount namespace of its own: its network namespace mounts, and every container's overlay, vanish when it exits",
			Fix: "run it under systemd or with nsenter --net=, not ip netns exec"}
	}
	return api.Finding{Check: "mounts", OK: true, Message: "the agent shares the host's mount namespace"}
}

// checkRoom says how many addresses a network has left.
func (a *Agent) checkRoom(ctx context.Context, n Network) api.Finding {
	addrs, err := a.ipam.Addrs(ctx, n.ID)
	if err != nil {
		return api.Finding{Check: "room", OK: false, Network: n.Name, Message: "cannot count the addresses: " + err.Error()}
	}
	total := ipam.Usable(n.Subnet)
	free := total - len(addrs)
	f := api.Finding{Check: "room", OK: free > 0, Network: n.Name, Message: fmt.Sprintf("%d of %d addresses free", free, total)}
	if free <= 0 {
		f.Fix = "remove endpoints, or create a network with a larger --subnet"
	}
	return f
}
