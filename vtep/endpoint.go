package vtep

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/vxnet/vxnet/internal/netnsutil"
)

// EndpointSpec is one container's interface on a network.
type EndpointSpec struct {
	Network     string // NetworkSpec.Name
	ContainerNS string // path to the container's namespace
	HostVeth    string // br0's side, in the network's namespace
	IfName      string // "" = first free ethN in the container
	Addr        netip.Prefix
	MAC         net.HardwareAddr // nil = chosen by the kernel
	MTU         int              // 0 = br0's
	// Handoff: the container side is for a container runtime (Docker) to
	// move and configure. It is made in the host namespace under IfName,
	// down and without address; ContainerNS is ignored.
	Handoff bool
}

// ValidIfName reports whether n can name a network interface.
func ValidIfName(n string) bool {
	return n != "" && len(n) < unix.IFNAMSIZ && n != "." && n != ".." &&
		!strings.ContainsAny(n, "/: \t\n")
}

func (s *EndpointSpec) check() error {
	switch {
	case !ValidIfName(s.HostVeth):
		return fmt.Errorf("invalid host veth name %q", s.HostVeth)
	case s.IfName != "" && !ValidIfName(s.IfName):
		return fmt.Errorf("invalid interface name %q", s.IfName)
	case s.Handoff && s.IfName == "":
		return errors.New("a handed-off interface needs a name")
	case s.ContainerNS == "" && !s.Handoff:
		return errors.New("no container namespace")
	case !s.Addr.IsValid() || !s.Addr.Addr().Unmap().Is4():
		return fmt.Errorf("address %s is not an IPv4 prefix", s.Addr)
	case s.MAC != nil && (len(s.MAC) != 6 || s.MAC[0]&1 != 0):
		return fmt.Errorf("mac %s is not a unicast ethernet address", s.MAC)
	case s.MTU != 0 && (s.MTU < 68 || s.MTU > 65535):
		return fmt.Errorf("mtu %d out of range", s.MTU)
	}
	s.Addr = netip.PrefixFrom(s.Addr.Addr().Unmap(), s.Addr.Bits())
	return nil
}

// endpointCtx holds the handles an endpoint operation needs. The
// container handle is opened only when a step needs it.
type endpointCtx struct {
	h   *netlink.Handle // network namespace
	ns  netns.NsHandle
	br  netlink.Link
	ch  *netlink.Handle // container namespace
	cns netns.NsHandle
}

func (e *endpointCtx) close() {
	e.closeContainer()
	e.h.Close()
	e.ns.Close()
}

// closeContainer closes the container handle, if open.
func (e *endpointCtx) closeContainer() {
	if e.ch != nil {
		e.ch.Close()
		e.cns.Close()
		e.ch = nil
	}
}

// openContainer opens the container's namespace, refusing anything that
// is not one: a plain file would make netlink act on the wrong namespace
// or fail half-way.
func (e *endpointCtx) openContainer(path string) error {
	cns, err := openNetNS(path)
	if err != nil {
		return fmt.Errorf("open container netns %s: %w", path, err)
	}
	ch, err := netnsutil.Handle(cns)
	if err != nil {
		cns.Close()
		return fmt.Errorf("netlink handle in container netns %s: %w", path, err)
	}
	e.ch, e.cns = ch, cns
	return nil
}

// openNetwork opens a network's namespace and finds its bridge.
func (m *Manager) openNetwork(network string) (*endpointCtx, error) {
	h, ns, err := m.nsHandle(network)
	if err != nil {
		return nil, err
	}
	e := &endpointCtx{h: h, ns: ns}
	if e.br, err = h.LinkByName(BridgeName); err != nil {
		e.close()
		return nil, fmt.Errorf("network %s: %s: %w", network, BridgeName, err)
	}
	return e, nil
}

// AddEndpoint wires a container to the network, all or nothing, and
// returns the container-side interface name. An existing pair whose peer
// is in ContainerNS with the wanted MAC and address is adopted and
// repaired; any other interface named HostVeth is an error.
func (m *Manager) AddEndpoint(ctx context.Context, s EndpointSpec) (string, error) {
	if err := s.check(); err != nil {
		return "", fmt.Errorf("add endpoint %s: %w", s.HostVeth, err)
	}
	defer m.nets.lock(s.Network)()
	name, err := m.addEndpoint(ctx, s)
	if err != nil {
		return "", fmt.Errorf("add endpoint %s to %s: %w", s.HostVeth, s.Network, err)
	}
	return name, nil
}

func (m *Manager) addEndpoint(ctx context.Context, s EndpointSpec) (string, error) {
	e, err := m.openNetwork(s.Network)
	if err != nil {
		return "", err
	}
	defer e.close()
	if s.Handoff {
		return m.addHandoff(ctx, e, s)
	}
	if err := e.openContainer(s.ContainerNS); err != nil {
		return "", err
	}
	if s.MTU == 0 {
		s.MTU = e.br.Attrs().MTU
	}
	existing, err := e.h.LinkByName(s.HostVeth)
	switch {
	case err == nil:
		return m.adopt(ctx, e, existing, s)
	case !isNotFound(err):
		return "", fmt.Errorf("look up %s: %w", s.HostVeth, err)
	}
	if err := m.step(ctx, "create veth"); err != nil {
		return "", err
	}
	// The same address twice in one container would make its replies
	// leave by either interface: a bookkeeping error upstream.
	addrs, err := dump(func() ([]netlink.Addr, error) { return e.ch.AddrList(nil, netlink.FAMILY_V4) })
	if err != nil {
		return "", fmt.Errorf("list container addresses: %w", err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok && ip == s.Addr.Addr() {
			return "", fmt.Errorf("address %s already in use in %s", ip, s.ContainerNS)
		}
	}

	ifName, err := m.createVeth(e, s)
	if err != nil {
		return "", err
	}
	ok := false
	defer func() {
		if !ok {
			// Deleting one end removes both, wherever the peer is.
			if l, err := e.h.LinkByName(s.HostVeth); err == nil {
				e.h.LinkDel(l)
			}
		}
	}()
	if err := m.step(ctx, "container address"); err != nil {
		return "", err
	}
	cl, err := e.ch.LinkByName(ifName)
	if err != nil {
		return "", fmt.Errorf("container side %s: %w", ifName, err)
	}
	// The subnet route comes with the address, so no route is added.
	if err := e.ch.AddrAdd(cl, &netlink.Addr{IPNet: ipNet(s.Addr)}); err != nil {
		return "", fmt.Errorf("add %s to %s in the container: %w", s.Addr, ifName, err)
	}
	if err := m.step(ctx, "container up"); err != nil {
		return "", err
	}
	if err := e.ch.LinkSetUp(cl); err != nil {
		return "", fmt.Errorf("set %s up in the container: %w", ifName, err)
	}
	if lo, err := e.ch.LinkByName("lo"); err == nil && lo.Attrs().Flags&net.FlagUp == 0 {
		if err := e.ch.LinkSetUp(lo); err != nil {
			return "", fmt.Errorf("set lo up in the container: %w", err)
		}
	}
	if err := m.step(ctx, "attach"); err != nil {
		return "", err
	}
	hl, err := e.h.LinkByName(s.HostVeth)
	if err != nil {
		return "", fmt.Errorf("look up new %s: %w", s.HostVeth, err)
	}
	if err := e.h.LinkSetMasterByIndex(hl, e.br.Attrs().Index); err != nil {
		return "", fmt.Errorf("enslave %s to %s: %w", s.HostVeth, BridgeName, err)
	}
	if err := m.step(ctx, "host up"); err != nil {
		return "", err
	}
	if err := e.h.LinkSetUp(hl); err != nil {
		return "", fmt.Errorf("set %s up: %w", s.HostVeth, err)
	}
	ok = true
	return ifName, nil
}

// addHandoff makes a pair whose container side stays in the host
// namespace, for a runtime to move into its container and configure
// (Docker's Join): only MTU and MAC are set on it. An existing HostVeth
// that is a veth is kept, wherever its peer went: the runtime may have
// moved it already.
func (m *Manager) addHandoff(ctx context.Context, e *endpointCtx, s EndpointSpec) (string, error) {
	if s.MTU == 0 {
		s.MTU = e.br.Attrs().MTU
	}
	hl, err := e.h.LinkByName(s.HostVeth)
	switch {
	case err == nil:
		if _, ok := hl.(*netlink.Veth); !ok {
			return "", fmt.Errorf("existing %s is a %s, not a veth", s.HostVeth, hl.Type())
		}
		_, err := m.checkEndpoint(ctx, e, hl, nil, s)
		return s.IfName, err
	case !isNotFound(err):
		return "", fmt.Errorf("look up %s: %w", s.HostVeth, err)
	}
	if err := m.step(ctx, "create veth"); err != nil {
		return "", err
	}
	// The host namespace the manager was made in, where the runtime
	// looks: not this thread's, which may be anywhere.
	attrs := netlink.NewLinkAttrs()
	attrs.Name, attrs.MTU = s.HostVeth, s.MTU
	veth := &netlink.Veth{LinkAttrs: attrs, PeerName: s.IfName, PeerHardwareAddr: s.MAC,
		PeerNamespace: netlink.NsFd(int(m.host)), PeerMTU: uint32(s.MTU)}
	if err := e.h.LinkAdd(veth); err != nil {
		return "", fmt.Errorf("create veth %s (peer %s for the runtime): %w", s.HostVeth, s.IfName, err)
	}
	if hl, err = e.h.LinkByName(s.HostVeth); err == nil {
		_, err = m.checkEndpoint(ctx, e, hl, nil, s) // on br0 and up
	}
	if err != nil {
		if l, lerr := e.h.LinkByName(s.HostVeth); lerr == nil {
			e.h.LinkDel(l) // takes the peer with it
		}
		return "", fmt.Errorf("attach %s: %w", s.HostVeth, err)
	}
	return s.IfName, nil
}

// FindPeer looks for the container side of an endpoint's veth in the
// namespace at containerNS: its name and whether it holds addr. A peer
// that is not there (not moved in yet) is found=false, not an error.
func (m *Manager) FindPeer(ctx context.Context, network, hostVeth, containerNS string, addr netip.Prefix) (name string, hasAddr, found bool, err error) {
	defer m.nets.lock(network)()
	if err := ctx.Err(); err != nil {
		return "", false, false, err
	}
	e, err := m.openNetwork(network)
	if err != nil {
		return "", false, false, err
	}
	defer e.close()
	l, err := e.h.LinkByName(hostVeth)
	if err != nil {
		return "", false, false, fmt.Errorf("look up %s: %w", hostVeth, err)
	}
	if err := e.openContainer(containerNS); err != nil {
		return "", false, false, err
	}
	peer, err := peerOf(e, l, containerNS)
	if errors.Is(err, errPeerElsewhere) {
		return "", false, false, nil
	}
	if err != nil {
		return "", false, false, err
	}
	addrs, err := e.ch.AddrList(peer, netlink.FAMILY_V4)
	if err != nil {
		return "", false, false, fmt.Errorf("addresses of %s: %w", peer.Attrs().Name, err)
	}
	has := slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return prefixOf(a.IPNet) == addr })
	return peer.Attrs().Name, has, true, nil
}

// createVeth makes the pair in one request, the peer directly in the
// container's namespace under its final name: nothing is ever visible
// half-made in the network namespace. It returns the container-side name.
func (m *Manager) createVeth(e *endpointCtx, s EndpointSpec) (string, error) {
	for try := 0; ; try++ {
		links, err := dump(e.ch.LinkList)
		if err != nil {
			return "", fmt.Errorf("list container links: %w", err)
		}
		ifName := s.IfName
		if ifName == "" {
			// From eth0: the overlay's interface is the one users and
			// tools expect there (nat's gateway starts at eth1 for that).
			ifName = netnsutil.NextEth(links, 0)
		} else if slices.ContainsFunc(links, func(l netlink.Link) bool { return l.Attrs().Name == ifName }) {
			return "", fmt.Errorf("interface %s already exists in %s", ifName, s.ContainerNS)
		}
		attrs := netlink.NewLinkAttrs()
		attrs.Name, attrs.MTU = s.HostVeth, s.MTU
		veth := &netlink.Veth{LinkAttrs: attrs, PeerName: ifName, PeerHardwareAddr: s.MAC,
			PeerNamespace: netlink.NsFd(int(e.cns)), PeerMTU: uint32(s.MTU)}
		err = e.h.LinkAdd(veth)
		if err == nil {
			return ifName, nil
		}
		// An attach to another network of the same container can take
		// the same ethN between our listing and our request; the kernel
		// then creates neither end, so just pick again.
		if s.IfName != "" || !errors.Is(err, unix.EEXIST) || try == 4 {
			return "", fmt.Errorf("create veth %s (peer %s in %s): %w", s.HostVeth, ifName, s.ContainerNS, err)
		}
	}
}

// adopt checks that an existing HostVeth is the pair AddEndpoint would
// have made, and repairs it. The peer is found by the ifindex and
// namespace id the kernel reports for the veth, not by name or MAC, which
// an unrelated interface could share.
func (m *Manager) adopt(ctx context.Context, e *endpointCtx, l netlink.Link, s EndpointSpec) (string, error) {
	peer, err := peerOf(e, l, s.ContainerNS)
	if err != nil {
		return "", fmt.Errorf("existing %s: %w", s.HostVeth, err)
	}
	name := peer.Attrs().Name
	if s.MAC != nil && !slices.Equal(peer.Attrs().HardwareAddr, s.MAC) {
		return "", fmt.Errorf("existing %s: peer %s has mac %s, want %s", s.HostVeth, name, peer.Attrs().HardwareAddr, s.MAC)
	}
	if s.IfName != "" && name != s.IfName {
		return "", fmt.Errorf("existing %s: peer is %s, want %s", s.HostVeth, name, s.IfName)
	}
	addrs, err := e.ch.AddrList(peer, netlink.FAMILY_V4)
	if err != nil {
		return "", fmt.Errorf("existing %s: list addresses of %s: %w", s.HostVeth, name, err)
	}
	var others []string
	for _, a := range addrs {
		if prefixOf(a.IPNet) != s.Addr {
			others = append(others, a.IPNet.String())
		}
	}
	// No address at all is a pair cut short by a crash, which the repair
	// below completes; another address belongs to someone else.
	if len(others) > 0 {
		return "", fmt.Errorf("existing %s: peer %s has %s, want %s", s.HostVeth, name, strings.Join(others, ", "), s.Addr)
	}
	s.IfName = name
	if _, err := m.checkEndpoint(ctx, e, l, peer, s); err != nil {
		return "", err
	}
	return name, nil
}

// errPeerElsewhere says the kernel's own answers show that a veth's peer
// is not in the given container namespace (or that it is no veth at all).
var errPeerElsewhere = errors.New("peer not in the container namespace")

// peerOf finds the container side of the veth l, which must be in the
// container namespace e.ch is open on. Its error wraps errPeerElsewhere
// only when that is verified; a failed lookup is just an error.
func peerOf(e *endpointCtx, l netlink.Link, containerNS string) (netlink.Link, error) {
	if _, ok := l.(*netlink.Veth); !ok {
		return nil, fmt.Errorf("is a %s, not a veth: %w", l.Type(), errPeerElsewhere)
	}
	a := l.Attrs()
	// The kernel allocated the container namespace an id in the network
	// namespace when it reported the veth, so the lookup finds one.
	id, err := e.h.GetNetNsIdByFd(int(e.cns))
	if err != nil {
		return nil, fmt.Errorf("id of %s: %w", containerNS, err)
	}
	if a.NetNsID < 0 || id < 0 || a.NetNsID != id {
		return nil, fmt.Errorf("%s: %w", containerNS, errPeerElsewhere)
	}
	peer, err := e.ch.LinkByIndex(a.ParentIndex)
	if isNotFound(err) {
		err = fmt.Errorf("%w (%w)", errPeerElsewhere, err)
	}
	if err != nil {
		return nil, fmt.Errorf("its peer (ifindex %d) in %s: %w", a.ParentIndex, containerNS, err)
	}
	if _, ok := peer.(*netlink.Veth); !ok || peer.Attrs().ParentIndex != a.Index {
		return nil, fmt.Errorf("ifindex %d in %s is not its peer: %w", a.ParentIndex, containerNS, errPeerElsewhere)
	}
	return peer, nil
}

// RemoveEndpoint deletes an endpoint's veth pair; a missing one, or a
// missing network, is fine.
func (m *Manager) RemoveEndpoint(ctx context.Context, network, hostVeth string) error {
	defer m.nets.lock(network)()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("remove endpoint %s: %w", hostVeth, err)
	}
	h, ns, err := m.nsHandle(network)
	if err != nil {
		if isAbsentNetNS(err) {
			return nil // the namespace took the pair with it
		}
		return fmt.Errorf("remove endpoint %s: %w", hostVeth, err)
	}
	defer ns.Close()
	defer h.Close()
	l, err := h.LinkByName(hostVeth)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove endpoint %s: %w", hostVeth, err)
	}
	if _, ok := l.(*netlink.Veth); !ok {
		return fmt.Errorf("remove endpoint %s: is a %s, not a veth", hostVeth, l.Type())
	}
	if err := h.LinkDel(l); err != nil && !isNotFound(err) {
		return fmt.Errorf("remove endpoint %s: %w", hostVeth, err)
	}
	return nil
}

// CheckEndpoint repairs an endpoint in place: the br0 side attached, up,
// with the right MTU; the container side up with its address. It returns
// an error wrapping ErrEndpointGone when the pair no longer exists (for
// example because the container's namespace was deleted), or when the
// container namespace at ContainerNS is not where its peer is.
func (m *Manager) CheckEndpoint(ctx context.Context, s EndpointSpec) ([]string, error) {
	defer m.nets.lock(s.Network)()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("check endpoint %s: %w", s.HostVeth, err)
	}
	e, err := m.openNetwork(s.Network)
	if err != nil {
		return nil, fmt.Errorf("check endpoint %s: %w", s.HostVeth, goneIfAbsent(err))
	}
	defer e.close()
	l, err := e.h.LinkByName(s.HostVeth)
	if isNotFound(err) {
		return nil, fmt.Errorf("check endpoint %s: %w", s.HostVeth, ErrEndpointGone)
	}
	if err != nil {
		return nil, fmt.Errorf("check endpoint %s: %w", s.HostVeth, err)
	}
	return m.checkLink(ctx, e, l, s)
}

// EndpointCheck is what CheckEndpoints found of one endpoint, as
// CheckEndpoint returns it.
type EndpointCheck struct {
	Changes []string
	Err     error
}

// CheckEndpoints is CheckEndpoint for endpoints of one network, by index
// of specs: the network's namespace is opened and its links listed once,
// not once per endpoint, for a full pass over a network's endpoints.
func (m *Manager) CheckEndpoints(ctx context.Context, network string, specs []EndpointSpec) []EndpointCheck {
	out := make([]EndpointCheck, len(specs))
	fail := func(err error) []EndpointCheck {
		for i, s := range specs {
			out[i].Err = fmt.Errorf("check endpoint %s: %w", s.HostVeth, err)
		}
		return out
	}
	defer m.nets.lock(network)()
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	e, err := m.openNetwork(network)
	if err != nil {
		return fail(goneIfAbsent(err))
	}
	defer e.close()
	links, err := dump(e.h.LinkList)
	if err != nil {
		return fail(fmt.Errorf("list links of %s: %w", network, err))
	}
	byName := make(map[string]netlink.Link, len(links))
	for _, l := range links {
		byName[l.Attrs().Name] = l
	}
	for i, s := range specs {
		if err := ctx.Err(); err != nil {
			out[i].Err = fmt.Errorf("check endpoint %s: %w", s.HostVeth, err)
			continue
		}
		if s.Network != network {
			out[i].Err = fmt.Errorf("check endpoint %s: of network %s, not %s", s.HostVeth, s.Network, network)
			continue
		}
		l, ok := byName[s.HostVeth]
		if !ok {
			out[i].Err = fmt.Errorf("check endpoint %s: %w", s.HostVeth, ErrEndpointGone)
			continue
		}
		out[i].Changes, out[i].Err = m.checkLink(ctx, e, l, s)
	}
	return out
}

// goneIfAbsent marks a network namespace that does not exist as an
// endpoint that is gone.
func goneIfAbsent(err error) error {
	if isAbsentNetNS(err) {
		return fmt.Errorf("%w (%w)", ErrEndpointGone, err)
	}
	return err
}

// checkLink checks and repairs one endpoint whose host side is l, in the
// network e is open on; the container side is looked up, and closed
// again, here.
func (m *Manager) checkLink(ctx context.Context, e *endpointCtx, l netlink.Link, s EndpointSpec) ([]string, error) {
	var peer netlink.Link
	if s.ContainerNS != "" {
		c := &endpointCtx{h: e.h, ns: e.ns, br: e.br}
		if err := c.openContainer(s.ContainerNS); err != nil {
			return nil, fmt.Errorf("check endpoint %s: %w", s.HostVeth, goneIfAbsent(err))
		}
		defer c.closeContainer()
		var err error
		if peer, err = peerOf(c, l, s.ContainerNS); err != nil {
			if errors.Is(err, errPeerElsewhere) {
				err = fmt.Errorf("%w (%w)", ErrEndpointGone, err)
			}
			return nil, fmt.Errorf("check endpoint %s: %w", s.HostVeth, err)
		}
		e = c
	} else if _, ok := l.(*netlink.Veth); !ok {
		return nil, fmt.Errorf("check endpoint %s: is a %s, not a veth", s.HostVeth, l.Type())
	}
	changes, err := m.checkEndpoint(ctx, e, l, peer, s)
	if err != nil {
		return changes, fmt.Errorf("check endpoint %s: %w", s.HostVeth, err)
	}
	return changes, nil
}

// checkEndpoint repairs the host side l and, if known, the container side
// peer.
func (m *Manager) checkEndpoint(ctx context.Context, e *endpointCtx, l, peer netlink.Link, s EndpointSpec) ([]string, error) {
	var changes []string
	if s.MTU == 0 {
		s.MTU = e.br.Attrs().MTU
	}
	a := l.Attrs()
	if a.MTU != s.MTU {
		if err := e.h.LinkSetMTU(l, s.MTU); err != nil {
			return changes, fmt.Errorf("set %s mtu %d: %w", s.HostVeth, s.MTU, err)
		}
		changes = append(changes, fmt.Sprintf("%s mtu %d -> %d", s.HostVeth, a.MTU, s.MTU))
	}
	if a.MasterIndex != e.br.Attrs().Index {
		if err := e.h.LinkSetMasterByIndex(l, e.br.Attrs().Index); err != nil {
			return changes, fmt.Errorf("enslave %s to %s: %w", s.HostVeth, BridgeName, err)
		}
		changes = append(changes, s.HostVeth+" attached to "+BridgeName)
	}
	if a.Flags&net.FlagUp == 0 {
		if err := e.h.LinkSetUp(l); err != nil {
			return changes, fmt.Errorf("set %s up: %w", s.HostVeth, err)
		}
		changes = append(changes, s.HostVeth+" set up")
	}
	if peer == nil {
		return changes, nil
	}
	if err := ctx.Err(); err != nil {
		return changes, err
	}
	pa, name := peer.Attrs(), peer.Attrs().Name
	if pa.MTU != s.MTU {
		if err := e.ch.LinkSetMTU(peer, s.MTU); err != nil {
			return changes, fmt.Errorf("set %s mtu %d in the container: %w", name, s.MTU, err)
		}
		changes = append(changes, fmt.Sprintf("%s mtu %d -> %d in the container", name, pa.MTU, s.MTU))
	}
	addrs, err := e.ch.AddrList(peer, netlink.FAMILY_V4)
	if err != nil {
		return changes, fmt.Errorf("list addresses of %s in the container: %w", name, err)
	}
	if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return prefixOf(a.IPNet) == s.Addr }) {
		if err := e.ch.AddrAdd(peer, &netlink.Addr{IPNet: ipNet(s.Addr)}); err != nil {
			return changes, fmt.Errorf("add %s to %s in the container: %w", s.Addr, name, err)
		}
		changes = append(changes, fmt.Sprintf("added %s to %s in the container", s.Addr, name))
	}
	if pa.Flags&net.FlagUp == 0 {
		if err := e.ch.LinkSetUp(peer); err != nil {
			return changes, fmt.Errorf("set %s up in the container: %w", name, err)
		}
		changes = append(changes, name+" set up in the container")
	}
	return changes, nil
}

// Endpoints lists the br0-side veths in a network's namespace.
func (m *Manager) Endpoints(ctx context.Context, network string) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("list endpoints of %s: %w", network, err)
	}
	h, ns, err := m.nsHandle(network)
	if err != nil {
		return nil, fmt.Errorf("list endpoints of %s: %w", network, err)
	}
	defer ns.Close()
	defer h.Close()
	links, err := dump(h.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list endpoints of %s: %w", network, err)
	}
	var out []string
	for _, l := range links {
		if _, ok := l.(*netlink.Veth); ok {
			out = append(out, l.Attrs().Name)
		}
	}
	return out, nil
}

// dump retries a netlink dump that a concurrent change interrupted: its
// partial result may lack entries that exist. It is the package's short
// name for netnsutil.RetryDump, which nat uses too.
func dump[T any](f func() (T, error)) (T, error) { return netnsutil.RetryDump(f) }
