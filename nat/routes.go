package nat

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/vxnet/vxnet/internal/netnsutil"
)

// Route is a container's own IPv4 default route that AddGateway removed to
// put the gateway's in its place (GatewaySpec.ReplaceDefault), recorded
// with what the kernel needs to add it back as it was. Devices are kept by
// name, not ifindex, because that is what survives in the operator's view;
// the namespace by path and identity, so that a route is never put into
// another container's namespace mounted on the same path since.
type Route struct {
	Netns    string `json:"netns"`
	NetnsDev uint64 `json:"netns_dev"`
	NetnsIno uint64 `json:"netns_ino"`

	Dev      string     `json:"dev,omitempty"` // "" for routes without one (unreachable, multipath)
	Gateway  netip.Addr `json:"gateway,omitzero"`
	Src      netip.Addr `json:"src,omitzero"`
	Priority int        `json:"priority,omitempty"` // the metric
	Table    int        `json:"table,omitempty"`
	Protocol int        `json:"protocol,omitempty"`
	Scope    int        `json:"scope,omitempty"`
	Type     int        `json:"type,omitempty"`
	Tos      int        `json:"tos,omitempty"`
	Flags    int        `json:"flags,omitempty"` // onlink and such
	MTU      int        `json:"mtu,omitempty"`
	AdvMSS   int        `json:"advmss,omitempty"`
	Hoplimit int        `json:"hoplimit,omitempty"`
	NextHops []NextHop  `json:"nexthops,omitempty"`
}

// NextHop is one path of a multipath default route.
type NextHop struct {
	Dev     string     `json:"dev"`
	Gateway netip.Addr `json:"gateway,omitzero"`
	Hops    int        `json:"hops,omitempty"` // weight - 1, as the kernel keeps it
	Flags   int        `json:"flags,omitempty"`
}

func (r Route) String() string {
	var b strings.Builder
	b.WriteString("default")
	if r.Gateway.IsValid() {
		b.WriteString(" via " + r.Gateway.String())
	}
	if r.Dev != "" {
		b.WriteString(" dev " + r.Dev)
	}
	for _, nh := range r.NextHops {
		fmt.Fprintf(&b, " nexthop via %s dev %s weight %d", nh.Gateway, nh.Dev, nh.Hops+1)
	}
	if r.Src.IsValid() {
		b.WriteString(" src " + r.Src.String())
	}
	if r.Priority != 0 {
		fmt.Fprintf(&b, " metric %d", r.Priority)
	}
	if r.Table != 0 && r.Table != unix.RT_TABLE_MAIN {
		fmt.Fprintf(&b, " table %d", r.Table)
	}
	return b.String() + " in " + r.Netns
}

func addrOf(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip.To4())
	return a
}

// isOurRoute tells the gateway's default route (or a stale copy of it on
// another interface) from a container's own: it leads into the gateway
// subnet, which only this manager hands out.
func (m *Manager) isOurRoute(r netlink.Route) bool {
	return len(r.MultiPath) == 0 && r.Gw != nil && m.cfg.Subnet.Contains(addrOf(r.Gw))
}

// recordRoute describes r, a default route in the namespace ch is open on,
// for restoreRoute.
func recordRoute(ch *netlink.Handle, path string, id netnsutil.ID, r netlink.Route) (Route, error) {
	devName := func(idx int) (string, error) {
		l, err := ch.LinkByIndex(idx)
		if err != nil {
			return "", fmt.Errorf("device of route %s (ifindex %d): %w", r.String(), idx, err)
		}
		return l.Attrs().Name, nil
	}
	out := Route{Netns: path, NetnsDev: id.Dev, NetnsIno: id.Ino,
		Gateway: addrOf(r.Gw), Src: addrOf(r.Src), Priority: r.Priority, Table: r.Table,
		Protocol: int(r.Protocol), Scope: int(r.Scope), Type: r.Type, Tos: r.Tos, Flags: r.Flags,
		MTU: r.MTU, AdvMSS: r.AdvMSS, Hoplimit: r.Hoplimit}
	if r.LinkIndex > 0 {
		n, err := devName(r.LinkIndex)
		if err != nil {
			return Route{}, err
		}
		out.Dev = n
	}
	for _, nh := range r.MultiPath {
		n, err := devName(nh.LinkIndex)
		if err != nil {
			return Route{}, err
		}
		out.NextHops = append(out.NextHops, NextHop{Dev: n, Gateway: addrOf(nh.Gw), Hops: nh.Hops, Flags: nh.Flags})
	}
	return out, nil
}

// netlinkRoute turns r back into a kernel route in the namespace ch is
// open on. A device that no longer exists is a reason not to restore, not
// an error.
func netlinkRoute(ch *netlink.Handle, r Route) (nr *netlink.Route, skip string, err error) {
	index := func(dev string) (int, string, error) {
		l, err := ch.LinkByName(dev)
		if isNotFound(err) {
			return 0, fmt.Sprintf("device %s no longer exists", dev), nil
		}
		if err != nil {
			return 0, "", fmt.Errorf("look up %s: %w", dev, err)
		}
		return l.Attrs().Index, "", nil
	}
	nr = &netlink.Route{
		Dst:      &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
		Priority: r.Priority, Table: r.Table, Protocol: netlink.RouteProtocol(r.Protocol),
		Scope: netlink.Scope(r.Scope), Type: r.Type, Tos: r.Tos, Flags: r.Flags,
		MTU: r.MTU, AdvMSS: r.AdvMSS, Hoplimit: r.Hoplimit,
	}
	if r.Gateway.IsValid() {
		nr.Gw = r.Gateway.AsSlice()
	}
	if r.Src.IsValid() {
		nr.Src = r.Src.AsSlice()
	}
	if r.Dev != "" {
		if nr.LinkIndex, skip, err = index(r.Dev); skip != "" || err != nil {
			return nil, skip, err
		}
	}
	for _, nh := range r.NextHops {
		idx, skip, err := index(nh.Dev)
		if skip != "" || err != nil {
			return nil, skip, err
		}
		n := &netlink.NexthopInfo{LinkIndex: idx, Hops: nh.Hops, Flags: nh.Flags}
		if nh.Gateway.IsValid() {
			n.Gw = nh.Gateway.AsSlice()
		}
		nr.MultiPath = append(nr.MultiPath, n)
	}
	return nr, "", nil
}

// restoreRoute adds r back into its namespace. It returns why it did not
// (the namespace or a device is gone, or the same slot is taken, which is
// also what a second restore finds) or an error when that cannot be told.
func restoreRoute(r Route) (skip string, err error) {
	ns, err := netns.GetFromPath(r.Netns)
	if errors.Is(err, unix.ENOENT) {
		return "the container namespace is gone", nil
	}
	if err != nil {
		return "", fmt.Errorf("open container network namespace %s: %w", r.Netns, err)
	}
	defer ns.Close()
	id, err := netnsutil.IDOfHandle(ns)
	if err != nil {
		return "", err
	}
	if (r.NetnsDev != 0 || r.NetnsIno != 0) && id != (netnsutil.ID{Dev: r.NetnsDev, Ino: r.NetnsIno}) {
		return "another namespace is mounted on its path now", nil
	}
	ch, err := netnsutil.Handle(ns)
	if err != nil {
		return "", fmt.Errorf("netlink handle in container namespace %s: %w", r.Netns, err)
	}
	defer ch.Close()
	nr, skip, err := netlinkRoute(ch, r)
	if skip != "" || err != nil {
		return skip, err
	}
	err = ch.RouteAdd(nr)
	if errors.Is(err, unix.EEXIST) {
		// Same table, metric and TOS: either a previous restore did it,
		// or the container has a default route of its own there now;
		// neither is ours to replace.
		return "a default route with the same metric is already there", nil
	}
	if err != nil {
		return "", fmt.Errorf("add %s: %w", r, err)
	}
	return "", nil
}
