package nat

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	nlsock "github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/vxnet/vxnet/internal/netnsutil"
)

// ErrGatewayGone says a container's gateway interface no longer exists (the
// container, or someone, deleted it); the caller should re-attach or forget
// the endpoint.
var ErrGatewayGone = errors.New("gateway interface gone")

// GatewaySpec describes one container's interface on the gateway bridge.
type GatewaySpec struct {
	ContainerNS string       // path to the container's network namespace
	HostVeth    string       // host-side veth name, in the manager's namespace
	IfName      string       // container-side name; "" = first free ethN, N >= 1; never eth0
	Addr        netip.Prefix // container address, with the gateway subnet's length
	MTU         int          // 0 = the bridge's MTU, or 1500
	// ReplaceDefault says what happens to a default route the container
	// has of its own (one not through the gateway subnet). false: it is
	// kept, and the container gets no default route of ours (its
	// gateway interface and address are made all the same). true:
	// AddGateway removes it, returns it for RemoveGateway to restore,
	// and puts the gateway's in its place.
	ReplaceDefault bool
}

// testHookAfterVeth, when set, runs right after the veth pair is created so
// tests can force the rollback path.
var testHookAfterVeth func() error

func (m *Manager) validateSpec(s GatewaySpec) error {
	var errs []error
	if s.HostVeth == "" || len(s.HostVeth) > maxIfName || strings.ContainsAny(s.HostVeth, " /") {
		errs = append(errs, fmt.Errorf("host veth name %q must be 1-%d characters without spaces or slashes", s.HostVeth, maxIfName))
	}
	if len(s.IfName) > maxIfName || strings.ContainsAny(s.IfName, " /") {
		errs = append(errs, fmt.Errorf("interface name %q must be at most %d characters without spaces or slashes", s.IfName, maxIfName))
	}
	if s.IfName == "eth0" {
		// Docker's convention, which users and tools rely on: eth0 is
		// the overlay's, the gateway comes after it.
		errs = append(errs, errors.New("interface name eth0 is the overlay's, not the gateway's"))
	}
	sub := m.cfg.Subnet
	switch {
	case !s.Addr.IsValid():
		errs = append(errs, errors.New("no container address"))
	case s.Addr.Bits() != sub.Bits() || !sub.Contains(s.Addr.Addr()):
		errs = append(errs, fmt.Errorf("container address %s not in gateway subnet %s", s.Addr, sub))
	case s.Addr.Addr() == m.GatewayAddr():
		errs = append(errs, fmt.Errorf("container address %s is the gateway's", s.Addr))
	case s.Addr.Addr() == sub.Addr() || s.Addr.Addr() == lastAddr(sub):
		errs = append(errs, fmt.Errorf("container address %s is the subnet's network or broadcast address", s.Addr))
	}
	if s.MTU < 0 || (s.MTU > 0 && s.MTU < 68) {
		errs = append(errs, fmt.Errorf("MTU %d out of range", s.MTU))
	}
	return errors.Join(errs...)
}

// bridge returns the gateway bridge, which AddGateway and CheckGateway need
// but do not create: creating it is Ensure's job, with its address and rules.
func (m *Manager) bridge() (netlink.Link, error) {
	l, err := m.nl.LinkByName(m.cfg.Bridge)
	if isNotFound(err) {
		return nil, fmt.Errorf("gateway bridge %s does not exist (Ensure not run?): %w", m.cfg.Bridge, err)
	}
	if err != nil {
		return nil, fmt.Errorf("look up gateway bridge %s: %w", m.cfg.Bridge, err)
	}
	if l.Type() != "bridge" {
		return nil, fmt.Errorf("%s is a %s, not a bridge (Ensure not run?)", m.cfg.Bridge, l.Type())
	}
	return l, nil
}

// container is an open container namespace: the namespace itself (to
// create a veth's peer in it), a netlink handle in it, and its identity.
type container struct {
	path string
	ns   netns.NsHandle
	h    *netlink.Handle
	id   netnsutil.ID
}

// openContainer opens the container's namespace. An error wraps
// fs.ErrNotExist only when the path does not exist.
func openContainer(path string) (*container, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open container network namespace %s: %w", path, err)
	}
	id, err := netnsutil.IDOfHandle(ns)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("container network namespace %s: %w", path, err)
	}
	h, err := netnsutil.Handle(ns)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("netlink handle in container namespace %s: %w", path, err)
	}
	return &container{path: path, ns: ns, h: h, id: id}, nil
}

func (c *container) close() {
	c.h.Close()
	c.ns.Close()
}

// AddGateway connects a container to the gateway bridge and, unless the
// container has a default route of its own and ReplaceDefault is false,
// makes the gateway its default route. It returns the container-side
// interface name and the container's own default routes it removed
// (ReplaceDefault only), for RemoveGateway to put back. It either completes
// or leaves nothing behind, removed routes included; a gateway that
// already exists for the same container is adopted (and repaired).
func (m *Manager) AddGateway(ctx context.Context, s GatewaySpec) (ifName string, replaced []Route, err error) {
	if err := m.validateSpec(s); err != nil {
		return "", nil, fmt.Errorf("nat: add gateway %s: %w", s.HostVeth, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return "", nil, fmt.Errorf("nat: add gateway %s: %w", s.HostVeth, err)
	}
	ifName, replaced, err = m.addGateway(ctx, s)
	if err != nil {
		return "", nil, fmt.Errorf("nat: add gateway %s: %w", s.HostVeth, err)
	}
	return ifName, replaced, nil
}

// restoreAll puts back routes a failed AddGateway removed.
func (m *Manager) restoreAll(rs []Route) {
	for _, r := range rs {
		if skip, err := restoreRoute(r); err != nil || skip != "" {
			m.log.Error("rollback: restore container default route", "route", r.String(), "skipped", skip, "err", err)
		}
	}
}

func (m *Manager) addGateway(ctx context.Context, s GatewaySpec) (string, []Route, error) {
	br, err := m.bridge()
	if err != nil {
		return "", nil, err
	}
	c, err := openContainer(s.ContainerNS)
	if err != nil {
		return "", nil, err
	}
	defer c.close()
	ch := c.h

	if host, err := m.nl.LinkByName(s.HostVeth); err == nil {
		peer, err := m.findPeer(ch, host)
		if err != nil {
			return "", nil, err
		}
		if peer != nil {
			if s.IfName != "" && peer.Attrs().Name != s.IfName {
				return "", nil, fmt.Errorf("existing gateway's container interface is %s, not %s", peer.Attrs().Name, s.IfName)
			}
			changes, replaced, err := m.repair(c, br, host, peer, s, s.ReplaceDefault)
			if err != nil {
				m.restoreAll(replaced)
				return "", nil, fmt.Errorf("adopt existing gateway: %w", err)
			}
			m.log.Info("adopted existing gateway", "host_veth", s.HostVeth, "ifname", peer.Attrs().Name, "repairs", changes)
			return peer.Attrs().Name, replaced, nil
		}
	} else if !isNotFound(err) {
		return "", nil, fmt.Errorf("look up %s: %w", s.HostVeth, err)
	}

	// Check everything that can be checked before creating anything, so
	// that most failures need no rollback at all.
	links, err := retryDump(ch.LinkList)
	if err != nil {
		return "", nil, fmt.Errorf("list container links: %w", err)
	}
	ifName := s.IfName
	if ifName == "" {
		// From eth1: eth0 is left to the overlay even when it is missing
		// (a failed attach, a gateway recreated first), since a gateway
		// on eth0 would take the place users and tools expect the
		// overlay's interface at.
		ifName = netnsutil.NextEth(links, 1)
	} else if slices.ContainsFunc(links, func(l netlink.Link) bool { return l.Attrs().Name == ifName }) {
		return "", nil, fmt.Errorf("container already has an interface named %s", ifName)
	}
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return ch.AddrList(nil, netlink.FAMILY_V4) })
	if err != nil {
		return "", nil, fmt.Errorf("list container addresses: %w", err)
	}
	for _, a := range addrs {
		if p, ok := prefixOf(a.IPNet); ok && p.Addr() == s.Addr.Addr() {
			return "", nil, fmt.Errorf("address %s already assigned in the container (link index %d)", p.Addr(), a.LinkIndex)
		}
	}
	mtu := s.MTU
	if mtu == 0 {
		mtu = br.Attrs().MTU
	}
	if mtu == 0 {
		mtu = 1500
	}

	// Creating the peer directly inside the container avoids a temporary
	// name in the host, where "eth1" almost certainly exists already.
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: s.HostVeth, MTU: mtu},
		PeerName:      ifName,
		PeerNamespace: netlink.NsFd(c.ns),
	}
	if err := m.nl.LinkAdd(veth); err != nil {
		return "", nil, fmt.Errorf("create veth %s/%s: %w", s.HostVeth, ifName, err)
	}
	ok := false
	var replaced []Route
	defer func() {
		if ok {
			return
		}
		// Deleting either end deletes the pair, and with it the address
		// and the routes through it.
		if err := m.nl.LinkDel(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: s.HostVeth}}); err != nil && !isNotFound(err) {
			m.log.Error("rollback: delete veth", "host_veth", s.HostVeth, "err", err)
		}
		m.restoreAll(replaced)
	}()
	if testHookAfterVeth != nil {
		if err := testHookAfterVeth(); err != nil {
			return "", nil, err
		}
	}
	if err := ctx.Err(); err != nil {
		return "", nil, err
	}
	host, err := m.nl.LinkByName(s.HostVeth)
	if err != nil {
		return "", nil, fmt.Errorf("look up new veth %s: %w", s.HostVeth, err)
	}
	peer, err := ch.LinkByName(ifName)
	if err != nil {
		return "", nil, fmt.Errorf("look up new container interface %s: %w", ifName, err)
	}
	if _, replaced, err = m.repair(c, br, host, peer, s, s.ReplaceDefault); err != nil {
		return "", nil, err
	}
	ok = true
	m.log.Info("added gateway", "host_veth", s.HostVeth, "ifname", ifName, "addr", s.Addr, "ns", s.ContainerNS, "replaced_default", replaced)
	return ifName, replaced, nil
}

// findPeer returns host's veth peer if it lives in the container namespace,
// nil if the pair is a leftover whose peer never left the host (deleted so
// the caller can start over), and an error if it belongs to someone else.
func (m *Manager) findPeer(ch *netlink.Handle, host netlink.Link) (netlink.Link, error) {
	name := host.Attrs().Name
	if host.Type() != "veth" {
		return nil, fmt.Errorf("%s exists and is a %s, not a veth", name, host.Type())
	}
	links, err := retryDump(ch.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list container links: %w", err)
	}
	// ifindexes are per namespace, so a match must hold in both directions
	// to be more than a coincidence.
	for _, l := range links {
		if l.Type() == "veth" && l.Attrs().Index == host.Attrs().ParentIndex && l.Attrs().ParentIndex == host.Attrs().Index {
			return l, nil
		}
	}
	if p, err := m.nl.LinkByIndex(host.Attrs().ParentIndex); err == nil && p.Attrs().ParentIndex == host.Attrs().Index && host.Attrs().NetNsID < 0 {
		if err := m.nl.LinkDel(host); err != nil {
			return nil, fmt.Errorf("delete half-made veth pair %s/%s: %w", name, p.Attrs().Name, err)
		}
		m.log.Warn("deleted half-made gateway veth pair", "host_veth", name, "peer", p.Attrs().Name)
		return nil, nil
	}
	return nil, fmt.Errorf("%s exists but its peer is not in the given container namespace", name)
}

// repair converges both ends of an existing gateway pair. replace allows
// it to remove the container's own default routes (see repairRoute); it
// returns those it removed, also with an error.
func (m *Manager) repair(c *container, br, host, peer netlink.Link, s GatewaySpec, replace bool) ([]string, []Route, error) {
	hc, err := m.repairHost(br, host)
	if err != nil {
		return hc, nil, err
	}
	cc, replaced, err := m.repairContainer(c, peer, s, replace)
	return append(hc, cc...), replaced, err
}

func (m *Manager) repairHost(br, host netlink.Link) ([]string, error) {
	var changes []string
	name := host.Attrs().Name
	if host.Attrs().MasterIndex != br.Attrs().Index {
		if err := m.nl.LinkSetMaster(host, br); err != nil {
			return changes, fmt.Errorf("enslave %s to %s: %w", name, m.cfg.Bridge, err)
		}
		changes = append(changes, fmt.Sprintf("enslaved %s to %s", name, m.cfg.Bridge))
	}
	// Isolated ports cannot exchange frames with each other, only with the
	// bridge itself: icc=false enforced at layer 2, with or without
	// br_netfilter. Read from the kernel, not from host, since enslaving
	// may just have happened.
	isolated, err := m.portIsolated(host)
	if err != nil {
		return changes, fmt.Errorf("read bridge port flags of %s: %w", name, err)
	}
	if !isolated {
		if err := m.nl.LinkSetIsolated(host, true); err != nil {
			return changes, fmt.Errorf("isolate bridge port %s: %w", name, err)
		}
		changes = append(changes, fmt.Sprintf("isolated bridge port %s", name))
	}
	if host.Attrs().Flags&net.FlagUp == 0 {
		if err := m.nl.LinkSetUp(host); err != nil {
			return changes, fmt.Errorf("set %s up: %w", name, err)
		}
		changes = append(changes, fmt.Sprintf("set %s up", name))
	}
	return changes, nil
}

// portIsolated reads a bridge port's isolated flag from the port's own
// link message (the bridge's slave data in IFLA_LINKINFO): one request,
// where the library's LinkGetProtinfo dumps every port of every bridge to
// find one, which made a full pass over n gateways cost n².
func (m *Manager) portIsolated(port netlink.Link) (bool, error) {
	req := nlsock.NewNetlinkRequest(unix.RTM_GETLINK, unix.NLM_F_ACK)
	msg := nlsock.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(port.Attrs().Index)
	req.AddData(msg)
	req.Sockets = m.route
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWLINK)
	if err != nil {
		return false, err
	}
	for _, raw := range msgs {
		if len(raw) < unix.SizeofIfInfomsg {
			continue
		}
		v, err := nestedAttr(raw[unix.SizeofIfInfomsg:], unix.IFLA_LINKINFO, unix.IFLA_INFO_SLAVE_DATA, unix.IFLA_BRPORT_ISOLATED)
		if err != nil {
			return false, err
		}
		if len(v) > 0 {
			return v[0] != 0, nil
		}
	}
	return false, fmt.Errorf("ifindex %d: no bridge port flags in its link message", port.Attrs().Index)
}

// nestedAttr follows path through nested netlink attributes in b and
// returns the value of the last; nil when one on the way is absent.
func nestedAttr(b []byte, path ...uint16) ([]byte, error) {
	for _, typ := range path {
		attrs, err := nlsock.ParseRouteAttr(b)
		if err != nil {
			return nil, err
		}
		i := slices.IndexFunc(attrs, func(a syscall.NetlinkRouteAttr) bool { return a.Attr.Type&^unix.NLA_F_NESTED == typ })
		if i < 0 {
			return nil, nil
		}
		b = attrs[i].Value
	}
	return b, nil
}

func (m *Manager) repairContainer(c *container, peer netlink.Link, s GatewaySpec, replace bool) ([]string, []Route, error) {
	var changes []string
	ch, name := c.h, peer.Attrs().Name
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return ch.AddrList(peer, netlink.FAMILY_V4) })
	if err != nil {
		return changes, nil, fmt.Errorf("list addresses of container %s: %w", name, err)
	}
	have := false
	for _, a := range addrs {
		p, ok := prefixOf(a.IPNet)
		if !ok {
			continue
		}
		if p == s.Addr {
			have = true
			continue
		}
		// Stale gateway addresses would answer for an address the book
		// may hand to another container.
		if m.cfg.Subnet.Overlaps(p) {
			if err := ch.AddrDel(peer, &a); err != nil {
				return changes, nil, fmt.Errorf("delete stale %s from container %s: %w", p, name, err)
			}
			changes = append(changes, fmt.Sprintf("removed stale %s from container %s", p, name))
		}
	}
	if !have {
		if err := ch.AddrAdd(peer, &netlink.Addr{IPNet: ipNet(s.Addr)}); err != nil {
			return changes, nil, fmt.Errorf("add %s to container %s: %w", s.Addr, name, err)
		}
		changes = append(changes, fmt.Sprintf("added %s to container %s", s.Addr, name))
	}
	if peer.Attrs().Flags&net.FlagUp == 0 {
		if err := ch.LinkSetUp(peer); err != nil {
			return changes, nil, fmt.Errorf("set container %s up: %w", name, err)
		}
		changes = append(changes, fmt.Sprintf("set container %s up", name))
	}
	rc, replaced, err := m.repairRoute(c, peer, s, replace)
	return append(changes, rc...), replaced, err
}

// repairRoute converges the container's default routes. Ours goes via
// the gateway address on peer; copies of it on other interfaces are stale
// and removed. A container with a default route of its own keeps it and
// gets none of ours, unless s.ReplaceDefault: then, when replace is set
// (an attach, which records what it removed), its own are removed and
// returned and ours is added; without replace (a periodic check) a route
// that appeared since is left alone, since nothing would restore it.
func (m *Manager) repairRoute(c *container, peer netlink.Link, s GatewaySpec, replace bool) ([]string, []Route, error) {
	var changes []string
	ch, name := c.h, peer.Attrs().Name
	defs, err := defaultRoutes(ch)
	if err != nil {
		return nil, nil, err
	}
	gw := m.GatewayAddr()
	var ours, stale, own []netlink.Route
	for _, r := range defs {
		switch {
		case m.isOurRoute(r) && r.LinkIndex == peer.Attrs().Index && addrOf(r.Gw) == gw:
			ours = append(ours, r)
		case m.isOurRoute(r):
			stale = append(stale, r)
		default:
			own = append(own, r)
		}
	}
	wantOurs := len(own) == 0 || s.ReplaceDefault
	if !wantOurs {
		stale = append(stale, ours...)
		ours = nil
	}
	for _, r := range stale {
		if err := ch.RouteDel(&r); err != nil && !isNoSuchRoute(err) {
			return changes, nil, fmt.Errorf("delete container default route %s: %w", r.String(), err)
		}
		why := "stale"
		if !wantOurs {
			why = "the container has its own"
		}
		changes = append(changes, fmt.Sprintf("removed container default route via %s (%s)", addrOf(r.Gw), why))
	}
	var replaced []Route
	if wantOurs && replace && len(own) > 0 {
		for _, r := range own {
			// Recorded before it goes: what cannot be described cannot
			// be put back, so it stays.
			rec, err := recordRoute(ch, c.path, c.id, r)
			if err != nil {
				return changes, replaced, err
			}
			if err := ch.RouteDel(&r); err != nil && !isNoSuchRoute(err) {
				return changes, replaced, fmt.Errorf("delete container default route %s: %w", rec, err)
			}
			replaced = append(replaced, rec)
			changes = append(changes, "replaced container default route "+rec.String())
		}
		own = nil
	}
	if !wantOurs || len(ours) > 0 {
		return changes, replaced, nil
	}
	route := &netlink.Route{
		LinkIndex: peer.Attrs().Index,
		Dst:       &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
		Gw:        gw.AsSlice(),
	}
	// Add, not replace: a route of the container's own in the same slot
	// (table, metric) must not be overwritten unrecorded.
	err = ch.RouteAdd(route)
	if errors.Is(err, unix.EEXIST) && len(own) > 0 {
		m.log.Warn("container's own default route holds the gateway's place; leaving it (attach again to replace it)",
			"ns", c.path, "ifname", name)
		return changes, replaced, nil
	}
	if err != nil {
		return changes, replaced, fmt.Errorf("set container default route via %s dev %s: %w", gw, name, err)
	}
	changes = append(changes, fmt.Sprintf("set container default route via %s dev %s", gw, name))
	return changes, replaced, nil
}

// isNoSuchRoute: a route that went between listing and deleting is what
// deleting wanted.
func isNoSuchRoute(err error) bool { return errors.Is(err, unix.ESRCH) }

// defaultRoutes lists the IPv4 default routes of the main table.
func defaultRoutes(h *netlink.Handle) ([]netlink.Route, error) {
	routes, err := retryDump(func() ([]netlink.Route, error) { return h.RouteList(nil, netlink.FAMILY_V4) })
	if err != nil {
		return nil, fmt.Errorf("list container routes: %w", err)
	}
	var out []netlink.Route
	for _, r := range routes {
		if r.Dst == nil || r.Dst.IP.IsUnspecified() && isZeroMask(r.Dst.Mask) {
			out = append(out, r)
		}
	}
	return out, nil
}

func isZeroMask(m net.IPMask) bool {
	ones, _ := m.Size()
	return ones == 0
}

// RemoveGateway deletes a gateway veth pair, an absent one being fine,
// and then puts back the container default routes in restore (what
// AddGateway returned as replaced). A route is skipped, with a logged
// reason, when its namespace or device is gone or its place is taken
// (also what a repeated call finds): so RemoveGateway can be called again
// until it succeeds. Failures that say nothing about the route (EMFILE
// opening the namespace) are returned.
func (m *Manager) RemoveGateway(ctx context.Context, hostVeth string, restore []Route) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("nat: remove gateway %s: %w", hostVeth, err)
	}
	l, err := m.nl.LinkByName(hostVeth)
	switch {
	case isNotFound(err):
	case err != nil:
		return fmt.Errorf("nat: remove gateway %s: look up: %w", hostVeth, err)
	case l.Type() != "veth":
		return fmt.Errorf("nat: remove gateway %s: refusing to delete a %s", hostVeth, l.Type())
	default:
		if err := m.nl.LinkDel(l); err != nil && !isNotFound(err) {
			return fmt.Errorf("nat: remove gateway %s: %w", hostVeth, err)
		}
		m.log.Info("removed gateway", "host_veth", hostVeth)
	}
	// After the veth, whose route held the slot the restored one takes.
	var errs []error
	for _, r := range restore {
		skip, err := restoreRoute(r)
		switch {
		case err != nil:
			errs = append(errs, err)
		case skip != "":
			m.log.Info("not restoring container default route", "host_veth", hostVeth, "route", r.String(), "reason", skip)
		default:
			m.log.Info("restored container default route", "host_veth", hostVeth, "route", r.String())
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("nat: remove gateway %s: restore default routes: %w", hostVeth, err)
	}
	return nil
}

// CheckGateway verifies a gateway and repairs what drifted: always the host
// side (bridge membership, port isolation, link up) and, when ContainerNS is
// set, the container side (address, link up, default route; see
// GatewaySpec.ReplaceDefault, though a check never removes a default route
// of the container's own). It returns ErrGatewayGone only when that is
// verified: no link of that name, a non-veth in its place, a missing
// container namespace file, or the peer not among the container's links.
func (m *Manager) CheckGateway(ctx context.Context, s GatewaySpec) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("nat: check gateway %s: %w", s.HostVeth, err)
	}
	host, err := m.nl.LinkByName(s.HostVeth)
	if isNotFound(err) {
		return nil, fmt.Errorf("nat: check gateway %s: %w", s.HostVeth, ErrGatewayGone)
	}
	if err != nil {
		return nil, fmt.Errorf("nat: check gateway %s: look up: %w", s.HostVeth, err)
	}
	if host.Type() != "veth" {
		return nil, fmt.Errorf("nat: check gateway %s: is a %s: %w", s.HostVeth, host.Type(), ErrGatewayGone)
	}
	br, err := m.bridge()
	if err != nil {
		return nil, fmt.Errorf("nat: check gateway %s: %w", s.HostVeth, err)
	}
	changes, err := m.repairHost(br, host)
	if err != nil {
		return changes, fmt.Errorf("nat: check gateway %s: %w", s.HostVeth, err)
	}
	if s.ContainerNS != "" {
		if err := m.validateSpec(s); err != nil {
			return changes, fmt.Errorf("nat: check gateway %s: %w", s.HostVeth, err)
		}
		c, err := openContainer(s.ContainerNS)
		if errors.Is(err, fs.ErrNotExist) {
			return changes, fmt.Errorf("nat: check gateway %s: %w: %w", s.HostVeth, ErrGatewayGone, err)
		}
		if err != nil {
			return changes, fmt.Errorf("nat: check gateway %s: %w", s.HostVeth, err)
		}
		defer c.close()
		links, err := retryDump(c.h.LinkList)
		if err != nil {
			return changes, fmt.Errorf("nat: check gateway %s: list container links: %w", s.HostVeth, err)
		}
		var peer netlink.Link
		for _, l := range links {
			if l.Type() == "veth" && l.Attrs().Index == host.Attrs().ParentIndex && l.Attrs().ParentIndex == host.Attrs().Index {
				peer = l
			}
		}
		if peer == nil {
			return changes, fmt.Errorf("nat: check gateway %s: peer not in %s: %w", s.HostVeth, s.ContainerNS, ErrGatewayGone)
		}
		cc, _, err := m.repairContainer(c, peer, s, false)
		changes = append(changes, cc...)
		if err != nil {
			return changes, fmt.Errorf("nat: check gateway %s: %w", s.HostVeth, err)
		}
	}
	for _, c := range changes {
		m.log.Info("repaired gateway", "host_veth", s.HostVeth, "change", c)
	}
	return changes, nil
}

// HasOwnDefaultRoute reports whether the container has an IPv4 default
// route of its own in its main table: one not through the gateway subnet.
// Replies to a published port leave by such a route, not through the NAT,
// which is why the agent asks.
func (m *Manager) HasOwnDefaultRoute(ctx context.Context, containerNS string) (bool, error) {
	var has bool
	err := m.withOwnDefaults(ctx, containerNS, func(_ *container, own []netlink.Route) error {
		has = len(own) > 0
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("nat: default route of %s: %w", containerNS, err)
	}
	return has, nil
}

// OwnDefaultRoutes records the container's IPv4 default routes of its own
// (not through the gateway subnet) as AddGateway with ReplaceDefault would
// record what it replaces: a caller that keeps them before the gateway is
// added can put them back even if it dies half way.
func (m *Manager) OwnDefaultRoutes(ctx context.Context, containerNS string) ([]Route, error) {
	var out []Route
	err := m.withOwnDefaults(ctx, containerNS, func(c *container, own []netlink.Route) error {
		for _, r := range own {
			rec, err := recordRoute(c.h, c.path, c.id, r)
			if err != nil {
				return err
			}
			out = append(out, rec)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("nat: default routes of %s: %w", containerNS, err)
	}
	return out, nil
}

// withOwnDefaults opens the container and hands fn its IPv4 default routes
// that do not go through the gateway subnet.
func (m *Manager) withOwnDefaults(ctx context.Context, containerNS string, fn func(c *container, own []netlink.Route) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c, err := openContainer(containerNS)
	if err != nil {
		return err
	}
	defer c.close()
	defs, err := defaultRoutes(c.h)
	if err != nil {
		return err
	}
	return fn(c, slices.DeleteFunc(defs, m.isOurRoute))
}

// Gateways lists the host-side veths enslaved to the bridge, so the agent can
// delete those no endpoint accounts for.
func (m *Manager) Gateways(ctx context.Context) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("nat: list gateways: %w", err)
	}
	br, err := m.nl.LinkByName(m.cfg.Bridge)
	if isNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("nat: list gateways: look up bridge: %w", err)
	}
	ports, err := m.ports(br)
	if err != nil {
		return nil, fmt.Errorf("nat: list gateways: %w", err)
	}
	names := make([]string, 0, len(ports))
	for _, p := range ports {
		names = append(names, p.Attrs().Name)
	}
	slices.Sort(names)
	return names, nil
}

// lastAddr is the subnet's broadcast address.
func lastAddr(p netip.Prefix) netip.Addr {
	p = p.Masked()
	b := p.Addr().As4()
	host := 32 - p.Bits()
	for i := 3; i >= 0 && host > 0; i-- {
		n := min(host, 8)
		b[i] |= byte(1<<n - 1)
		host -= n
	}
	return netip.AddrFrom4(b)
}
