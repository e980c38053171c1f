package nat

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// ErrGatewayGone says a container's gateway interface no longer exists (the
// container, or someone, deleted it); the caller should re-attach or forget
// the endpoint.
var ErrGatewayGone = errors.New("gateway interface gone")

// GatewaySpec describes one container's interface on the gateway bridge.
type GatewaySpec struct {
	ContainerNS string       // path to the container's network namespace
	HostVeth    string       // host-side veth name, in the manager's namespace
	IfName      string       // container-side name; "" = first free ethN
	Addr        netip.Prefix // container address, with the gateway subnet's length
	MTU         int          // 0 = the bridge's MTU, or 1500
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

// containerHandle opens the container's namespace and a netlink handle in
// it. The namespace is closed before returning: the handle's sockets keep
// it alive.
func containerHandle(path string) (*netlink.Handle, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open container network namespace %s: %w", path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink handle in container namespace %s: %w", path, err)
	}
	return h, nil
}

// AddGateway connects a container to the gateway bridge and makes it its
// default route. It either completes or leaves nothing behind; a gateway that
// already exists for the same container is adopted (and repaired).
func (m *Manager) AddGateway(ctx context.Context, s GatewaySpec) (ifName string, err error) {
	if err := m.validateSpec(s); err != nil {
		return "", fmt.Errorf("nat: add gateway %s: %w", s.HostVeth, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return "", fmt.Errorf("nat: add gateway %s: %w", s.HostVeth, err)
	}
	ifName, err = m.addGateway(ctx, s)
	if err != nil {
		return "", fmt.Errorf("nat: add gateway %s: %w", s.HostVeth, err)
	}
	return ifName, nil
}

func (m *Manager) addGateway(ctx context.Context, s GatewaySpec) (string, error) {
	br, err := m.bridge()
	if err != nil {
		return "", err
	}
	ch, err := containerHandle(s.ContainerNS)
	if err != nil {
		return "", err
	}
	defer ch.Close()

	if host, err := m.nl.LinkByName(s.HostVeth); err == nil {
		peer, err := m.findPeer(ch, host)
		if err != nil {
			return "", err
		}
		if peer != nil {
			if s.IfName != "" && peer.Attrs().Name != s.IfName {
				return "", fmt.Errorf("existing gateway's container interface is %s, not %s", peer.Attrs().Name, s.IfName)
			}
			changes, err := m.repair(ch, br, host, peer, s)
			if err != nil {
				return "", fmt.Errorf("adopt existing gateway: %w", err)
			}
			m.log.Info("adopted existing gateway", "host_veth", s.HostVeth, "ifname", peer.Attrs().Name, "repairs", changes)
			return peer.Attrs().Name, nil
		}
	} else if !isNotFound(err) {
		return "", fmt.Errorf("look up %s: %w", s.HostVeth, err)
	}

	// Check everything that can be checked before creating anything, so
	// that most failures need no rollback at all.
	links, err := retryDump(ch.LinkList)
	if err != nil {
		return "", fmt.Errorf("list container links: %w", err)
	}
	ifName := s.IfName
	if ifName == "" {
		ifName = nextEthName(links)
	} else if slices.ContainsFunc(links, func(l netlink.Link) bool { return l.Attrs().Name == ifName }) {
		return "", fmt.Errorf("container already has an interface named %s", ifName)
	}
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return ch.AddrList(nil, netlink.FAMILY_V4) })
	if err != nil {
		return "", fmt.Errorf("list container addresses: %w", err)
	}
	for _, a := range addrs {
		if p, ok := prefixOf(a.IPNet); ok && p.Addr() == s.Addr.Addr() {
			return "", fmt.Errorf("address %s already assigned in the container (link index %d)", p.Addr(), a.LinkIndex)
		}
	}
	oldDefaults, err := defaultRoutes(ch)
	if err != nil {
		return "", err
	}
	mtu := s.MTU
	if mtu == 0 {
		mtu = br.Attrs().MTU
	}
	if mtu == 0 {
		mtu = 1500
	}

	cns, err := netns.GetFromPath(s.ContainerNS)
	if err != nil {
		return "", fmt.Errorf("open container network namespace %s: %w", s.ContainerNS, err)
	}
	defer cns.Close()
	// Creating the peer directly inside the container avoids a temporary
	// name in the host, where "eth1" almost certainly exists already.
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: s.HostVeth, MTU: mtu},
		PeerName:      ifName,
		PeerNamespace: netlink.NsFd(cns),
	}
	if err := m.nl.LinkAdd(veth); err != nil {
		return "", fmt.Errorf("create veth %s/%s: %w", s.HostVeth, ifName, err)
	}
	ok := false
	defer func() {
		if ok {
			return
		}
		// Deleting either end deletes the pair, and with it the address
		// and the routes through it.
		if err := m.nl.LinkDel(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: s.HostVeth}}); err != nil && !isNotFound(err) {
			m.log.Error("rollback: delete veth", "host_veth", s.HostVeth, "err", err)
		}
		for _, r := range oldDefaults {
			if err := ch.RouteReplace(&r); err != nil {
				m.log.Error("rollback: restore container default route", "route", r.String(), "err", err)
			}
		}
	}()
	if testHookAfterVeth != nil {
		if err := testHookAfterVeth(); err != nil {
			return "", err
		}
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	host, err := m.nl.LinkByName(s.HostVeth)
	if err != nil {
		return "", fmt.Errorf("look up new veth %s: %w", s.HostVeth, err)
	}
	peer, err := ch.LinkByName(ifName)
	if err != nil {
		return "", fmt.Errorf("look up new container interface %s: %w", ifName, err)
	}
	if _, err := m.repair(ch, br, host, peer, s); err != nil {
		return "", err
	}
	ok = true
	m.log.Info("added gateway", "host_veth", s.HostVeth, "ifname", ifName, "addr", s.Addr, "ns", s.ContainerNS)
	return ifName, nil
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

// repair converges both ends of an existing gateway pair.
func (m *Manager) repair(ch *netlink.Handle, br, host, peer netlink.Link, s GatewaySpec) ([]string, error) {
	hc, err := m.repairHost(br, host)
	if err != nil {
		return hc, err
	}
	cc, err := m.repairContainer(ch, peer, s)
	return append(hc, cc...), err
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
	// br_netfilter. Re-read protinfo since enslaving may just have
	// happened.
	pi, err := retryDump(func() (netlink.Protinfo, error) { return m.nl.LinkGetProtinfo(host) })
	if err != nil {
		return changes, fmt.Errorf("read bridge port flags of %s: %w", name, err)
	}
	if !pi.Isolated {
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

func (m *Manager) repairContainer(ch *netlink.Handle, peer netlink.Link, s GatewaySpec) ([]string, error) {
	var changes []string
	name := peer.Attrs().Name
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return ch.AddrList(peer, netlink.FAMILY_V4) })
	if err != nil {
		return changes, fmt.Errorf("list addresses of container %s: %w", name, err)
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
				return changes, fmt.Errorf("delete stale %s from container %s: %w", p, name, err)
			}
			changes = append(changes, fmt.Sprintf("removed stale %s from container %s", p, name))
		}
	}
	if !have {
		if err := ch.AddrAdd(peer, &netlink.Addr{IPNet: ipNet(s.Addr)}); err != nil {
			return changes, fmt.Errorf("add %s to container %s: %w", s.Addr, name, err)
		}
		changes = append(changes, fmt.Sprintf("added %s to container %s", s.Addr, name))
	}
	if peer.Attrs().Flags&net.FlagUp == 0 {
		if err := ch.LinkSetUp(peer); err != nil {
			return changes, fmt.Errorf("set container %s up: %w", name, err)
		}
		changes = append(changes, fmt.Sprintf("set container %s up", name))
	}
	defs, err := defaultRoutes(ch)
	if err != nil {
		return changes, err
	}
	gw := m.GatewayAddr()
	right := len(defs) == 1 && defs[0].LinkIndex == peer.Attrs().Index && defs[0].Gw != nil && defs[0].Gw.Equal(gw.AsSlice())
	if !right {
		// All non-overlay traffic must leave through the gateway, like
		// Docker's eth1; a default route elsewhere would bypass the NAT.
		for _, r := range defs {
			if r.LinkIndex == peer.Attrs().Index && r.Gw != nil && r.Gw.Equal(gw.AsSlice()) {
				continue
			}
			if err := ch.RouteDel(&r); err != nil && !isNotFound(err) {
				return changes, fmt.Errorf("delete container default route %s: %w", r.String(), err)
			}
		}
		route := &netlink.Route{
			LinkIndex: peer.Attrs().Index,
			Dst:       &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
			Gw:        gw.AsSlice(),
		}
		if err := ch.RouteReplace(route); err != nil {
			return changes, fmt.Errorf("set container default route via %s dev %s: %w", gw, name, err)
		}
		changes = append(changes, fmt.Sprintf("set container default route via %s dev %s", gw, name))
	}
	return changes, nil
}

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

// nextEthName returns the lowest ethN not used in links.
func nextEthName(links []netlink.Link) string {
	used := map[string]bool{}
	for _, l := range links {
		used[l.Attrs().Name] = true
	}
	for i := 0; ; i++ {
		if n := "eth" + strconv.Itoa(i); !used[n] {
			return n
		}
	}
}

// RemoveGateway deletes a gateway veth pair; an absent one is fine.
func (m *Manager) RemoveGateway(ctx context.Context, hostVeth string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("nat: remove gateway %s: %w", hostVeth, err)
	}
	l, err := m.nl.LinkByName(hostVeth)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("nat: remove gateway %s: look up: %w", hostVeth, err)
	}
	if l.Type() != "veth" {
		return fmt.Errorf("nat: remove gateway %s: refusing to delete a %s", hostVeth, l.Type())
	}
	if err := m.nl.LinkDel(l); err != nil && !isNotFound(err) {
		return fmt.Errorf("nat: remove gateway %s: %w", hostVeth, err)
	}
	m.log.Info("removed gateway", "host_veth", hostVeth)
	return nil
}

// CheckGateway verifies a gateway and repairs what drifted: always the host
// side (bridge membership, port isolation, link up) and, when ContainerNS is
// set, the container side (address, link up, default route). It returns
// ErrGatewayGone when the pair or the container namespace no longer exists.
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
		ch, err := containerHandle(s.ContainerNS)
		if errors.Is(err, os.ErrNotExist) {
			return changes, fmt.Errorf("nat: check gateway %s: %w: %w", s.HostVeth, ErrGatewayGone, err)
		}
		if err != nil {
			return changes, fmt.Errorf("nat: check gateway %s: %w", s.HostVeth, err)
		}
		defer ch.Close()
		links, err := retryDump(ch.LinkList)
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
		cc, err := m.repairContainer(ch, peer, s)
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
