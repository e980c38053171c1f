// Package vtep makes the kernel look like a given per-network spec: a
// network namespace holding a bridge br0 and a VXLAN device, veth pairs to
// containers, and static neighbor and FDB entries for remote endpoints. It
// knows nothing of the store: it takes plain specs, so it is tested in
// namespaces with no store at all.
package vtep

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Device names inside a network's namespace, as in Docker's overlay.
const (
	BridgeName = "br0"
	VXLANName  = "vxlan1"
)

// ErrEndpointGone is returned by CheckEndpoint when an endpoint's veth is
// missing entirely.
var ErrEndpointGone = errors.New("endpoint interface gone")

// Config describes the host.
type Config struct {
	// NetNSDir is where per-network namespaces are bind-mounted.
	NetNSDir string
	// Local is the host's underlay address: the VXLAN source.
	Local     netip.Addr
	VXLANPort int
}

// Manager drives one host's overlay datapath. The namespace that is
// current when New is called is the host namespace: VXLAN devices are
// created there so that their UDP sockets live on the underlay.
type Manager struct {
	cfg   Config
	host  netns.NsHandle
	hostH *netlink.Handle
}

// New opens a handle on the calling thread's namespace.
func New(cfg Config) (*Manager, error) {
	if cfg.VXLANPort == 0 {
		cfg.VXLANPort = 4789
	}
	if cfg.NetNSDir == "" {
		return nil, errors.New("vtep: NetNSDir is required")
	}
	if err := os.MkdirAll(cfg.NetNSDir, 0o700); err != nil {
		return nil, fmt.Errorf("vtep: %w", err)
	}
	host, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("vtep: host netns: %w", err)
	}
	h, err := netlink.NewHandleAt(host)
	if err != nil {
		host.Close()
		return nil, fmt.Errorf("vtep: netlink handle: %w", err)
	}
	return &Manager{cfg: cfg, host: host, hostH: h}, nil
}

// Close releases the host handle.
func (m *Manager) Close() {
	m.hostH.Close()
	m.host.Close()
}

// UnderlayMTU is the MTU of the interface holding local in the calling
// thread's namespace.
func UnderlayMTU(local netip.Addr) (int, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return 0, err
	}
	for _, l := range links {
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			continue
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok && ip == local {
				return l.Attrs().MTU, nil
			}
		}
	}
	return 0, fmt.Errorf("no interface holds %s", local)
}

// NetNSPath is where a network's namespace is mounted.
func (m *Manager) NetNSPath(name string) string { return filepath.Join(m.cfg.NetNSDir, name) }

// Networks lists the namespaces present under NetNSDir.
func (m *Manager) Networks() ([]string, error) {
	entries, err := os.ReadDir(m.cfg.NetNSDir)
	if err != nil {
		return nil, fmt.Errorf("list network namespaces: %w", err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out, nil
}

// nsHandle opens a netlink handle inside a network's namespace.
func (m *Manager) nsHandle(name string) (*netlink.Handle, netns.NsHandle, error) {
	ns, err := netns.GetFromPath(m.NetNSPath(name))
	if err != nil {
		return nil, 0, err
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		return nil, 0, err
	}
	return h, ns, nil
}

// NetworkSpec is one overlay network on this host.
type NetworkSpec struct {
	Name    string       // namespace file name
	VNI     uint32       // VXLAN network identifier
	Gateway netip.Prefix // br0's address, with the subnet's length
	MTU     int
}

// EnsureNetwork creates or repairs a network's namespace, br0 and vxlan1.
// It returns what it had to change, empty when all was right.
func (m *Manager) EnsureNetwork(ctx context.Context, s NetworkSpec) ([]string, error) {
	var changes []string
	path := m.NetNSPath(s.Name)
	if !IsNetNS(path) {
		if err := CreateNetNS(path); err != nil {
			return nil, err
		}
		changes = append(changes, "created namespace "+s.Name)
	}
	h, ns, err := m.nsHandle(s.Name)
	if err != nil {
		return changes, fmt.Errorf("network %s: %w", s.Name, err)
	}
	defer ns.Close()
	defer h.Close()
	if err := ctx.Err(); err != nil {
		return changes, err
	}
	if lo, err := h.LinkByName("lo"); err == nil && lo.Attrs().Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(lo); err != nil {
			return changes, fmt.Errorf("network %s: lo up: %w", s.Name, err)
		}
	}
	br, c, err := ensureBridge(h, s)
	changes = append(changes, c...)
	if err != nil {
		return changes, fmt.Errorf("network %s: %w", s.Name, err)
	}
	c, err = m.ensureVXLAN(h, ns, br, s)
	changes = append(changes, c...)
	if err != nil {
		return changes, fmt.Errorf("network %s: %w", s.Name, err)
	}
	return changes, nil
}

func ensureBridge(h *netlink.Handle, s NetworkSpec) (netlink.Link, []string, error) {
	var changes []string
	br, err := h.LinkByName(BridgeName)
	if err == nil && br.Type() != "bridge" {
		if err := h.LinkDel(br); err != nil {
			return nil, changes, fmt.Errorf("remove non-bridge %s: %w", BridgeName, err)
		}
		changes = append(changes, fmt.Sprintf("replaced %s: was a %s", BridgeName, br.Type()))
		br = nil
	}
	if br == nil {
		attrs := netlink.NewLinkAttrs()
		attrs.Name, attrs.MTU = BridgeName, s.MTU
		if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil {
			return nil, changes, fmt.Errorf("create %s: %w", BridgeName, err)
		}
		if br, err = h.LinkByName(BridgeName); err != nil {
			return nil, changes, err
		}
		changes = append(changes, "created "+BridgeName)
	}
	if br.Attrs().MTU != s.MTU {
		if err := h.LinkSetMTU(br, s.MTU); err != nil {
			return nil, changes, fmt.Errorf("set %s mtu %d: %w", BridgeName, s.MTU, err)
		}
		changes = append(changes, fmt.Sprintf("%s mtu %d -> %d", BridgeName, br.Attrs().MTU, s.MTU))
	}
	c, err := ensureAddr(h, br, s.Gateway)
	changes = append(changes, c...)
	if err != nil {
		return nil, changes, err
	}
	if br.Attrs().Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(br); err != nil {
			return nil, changes, fmt.Errorf("%s up: %w", BridgeName, err)
		}
		changes = append(changes, BridgeName+" set up")
	}
	return br, changes, nil
}

// ensureAddr makes want the link's only IPv4 address.
func ensureAddr(h *netlink.Handle, link netlink.Link, want netip.Prefix) ([]string, error) {
	var changes []string
	addrs, err := h.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", link.Attrs().Name, err)
	}
	found := false
	for _, a := range addrs {
		if prefixOf(a.IPNet) == want {
			found = true
			continue
		}
		if err := h.AddrDel(link, &a); err != nil {
			return changes, fmt.Errorf("remove %s from %s: %w", a.IPNet, link.Attrs().Name, err)
		}
		changes = append(changes, fmt.Sprintf("removed stray address %s from %s", a.IPNet, link.Attrs().Name))
	}
	if !found {
		if err := h.AddrAdd(link, &netlink.Addr{IPNet: ipNet(want)}); err != nil {
			return changes, fmt.Errorf("add %s to %s: %w", want, link.Attrs().Name, err)
		}
		changes = append(changes, fmt.Sprintf("added %s to %s", want, link.Attrs().Name))
	}
	return changes, nil
}

// vxlanMismatch says why an existing VXLAN device cannot be kept.
func (m *Manager) vxlanMismatch(l netlink.Link, vni uint32) string {
	vx, ok := l.(*netlink.Vxlan)
	switch {
	case !ok:
		return "not a vxlan device (" + l.Type() + ")"
	case vx.VxlanId != int(vni):
		return fmt.Sprintf("vni %d != %d", vx.VxlanId, vni)
	case vx.Port != m.cfg.VXLANPort:
		return fmt.Sprintf("port %d != %d", vx.Port, m.cfg.VXLANPort)
	case vx.Learning:
		return "learning on"
	case !vx.Proxy:
		return "proxy off"
	case m.cfg.Local.IsValid() && !vx.SrcAddr.Equal(net.IP(m.cfg.Local.AsSlice())):
		return fmt.Sprintf("local %s != %s", vx.SrcAddr, m.cfg.Local)
	}
	return ""
}

func (m *Manager) ensureVXLAN(h *netlink.Handle, ns netns.NsHandle, br netlink.Link, s NetworkSpec) ([]string, error) {
	var changes []string
	vx, err := h.LinkByName(VXLANName)
	if err == nil {
		if why := m.vxlanMismatch(vx, s.VNI); why != "" {
			if err := h.LinkDel(vx); err != nil {
				return changes, fmt.Errorf("remove incompatible %s: %w", VXLANName, err)
			}
			changes = append(changes, fmt.Sprintf("replaced %s: %s", VXLANName, why))
			vx = nil
		}
	} else {
		vx = nil
	}
	if vx == nil {
		if vx, err = m.createVXLAN(h, ns, s); err != nil {
			return changes, err
		}
		changes = append(changes, fmt.Sprintf("created %s (vni %d)", VXLANName, s.VNI))
	}
	a := vx.Attrs()
	if a.MTU != s.MTU {
		if err := h.LinkSetMTU(vx, s.MTU); err != nil {
			return changes, fmt.Errorf("set %s mtu: %w", VXLANName, err)
		}
		if len(changes) == 0 || !strings.HasPrefix(changes[len(changes)-1], "created "+VXLANName) {
			changes = append(changes, fmt.Sprintf("%s mtu %d -> %d", VXLANName, a.MTU, s.MTU))
		}
	}
	if a.MasterIndex != br.Attrs().Index {
		if err := h.LinkSetMasterByIndex(vx, br.Attrs().Index); err != nil {
			return changes, fmt.Errorf("enslave %s to %s: %w", VXLANName, BridgeName, err)
		}
		changes = append(changes, VXLANName+" attached to "+BridgeName)
	}
	if a.Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(vx); err != nil {
			return changes, fmt.Errorf("%s up: %w", VXLANName, err)
		}
		changes = append(changes, VXLANName+" set up")
	}
	return changes, nil
}

// createVXLAN makes the device in the host namespace, where its UDP socket
// is bound on the underlay, and then moves it into the network's
// namespace. The temporary name is derived from the VNI so that a remnant
// of a crash between the two steps is recognised and replaced.
func (m *Manager) createVXLAN(h *netlink.Handle, ns netns.NsHandle, s NetworkSpec) (netlink.Link, error) {
	tmp := fmt.Sprintf("vx-%06x", s.VNI)
	if old, err := m.hostH.LinkByName(tmp); err == nil {
		m.hostH.LinkDel(old)
	}
	attrs := netlink.NewLinkAttrs()
	attrs.Name, attrs.MTU = tmp, s.MTU
	vx := &netlink.Vxlan{LinkAttrs: attrs, VxlanId: int(s.VNI), Port: m.cfg.VXLANPort, Learning: false, Proxy: true}
	if m.cfg.Local.IsValid() {
		vx.SrcAddr = net.IP(m.cfg.Local.AsSlice())
	}
	// EEXIST can also mean a device of a namespace that is being destroyed
	// still holds the VNI: that clears by itself within moments.
	var err error
	for try := 0; try < 20; try++ {
		if err = m.hostH.LinkAdd(vx); !errors.Is(err, unix.EEXIST) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		return nil, fmt.Errorf("create vxlan %s (vni %d): %w", tmp, s.VNI, err)
	}
	link, err := m.hostH.LinkByName(tmp)
	if err == nil {
		err = m.hostH.LinkSetNsFd(link, int(ns))
	}
	if err != nil {
		m.hostH.LinkDel(vx)
		return nil, fmt.Errorf("move vxlan %s into %s: %w", tmp, s.Name, err)
	}
	link, err = h.LinkByName(tmp)
	if err == nil {
		err = h.LinkSetName(link, VXLANName)
	}
	if err == nil {
		link, err = h.LinkByName(VXLANName)
	}
	if err != nil {
		if l, lerr := h.LinkByName(tmp); lerr == nil {
			h.LinkDel(l)
		}
		return nil, fmt.Errorf("rename vxlan %s in %s: %w", tmp, s.Name, err)
	}
	return link, nil
}

// RemoveStrays deletes VXLAN devices left in the host namespace by a crash
// between creating one and moving it into its network's namespace. Only
// call it when no EnsureNetwork is running.
func (m *Manager) RemoveStrays(ctx context.Context) ([]string, error) {
	links, err := m.hostH.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list host links: %w", err)
	}
	var removed []string
	for _, l := range links {
		var vni uint32
		if _, ok := l.(*netlink.Vxlan); !ok {
			continue
		}
		if n, _ := fmt.Sscanf(l.Attrs().Name, "vx-%06x", &vni); n != 1 || l.Attrs().Name != fmt.Sprintf("vx-%06x", vni) {
			continue
		}
		if err := m.hostH.LinkDel(l); err != nil {
			return removed, fmt.Errorf("remove stray %s: %w", l.Attrs().Name, err)
		}
		removed = append(removed, l.Attrs().Name)
	}
	return removed, nil
}

// DeleteNetwork removes a network's namespace; its devices, and the veth
// pairs to containers, go with it.
func (m *Manager) DeleteNetwork(ctx context.Context, name string) error {
	// The kernel destroys a namespace's devices asynchronously; until then
	// the VXLAN device still holds its VNI on the host's UDP socket and a
	// new one for the same VNI fails with EEXIST. Deleting it first makes
	// removal synchronous.
	if h, ns, err := m.nsHandle(name); err == nil {
		if l, err := h.LinkByName(VXLANName); err == nil {
			h.LinkDel(l)
		}
		h.Close()
		ns.Close()
	}
	return DeleteNetNS(m.NetNSPath(name))
}

// EndpointSpec is one container's interface on a network.
type EndpointSpec struct {
	Network     string // NetworkSpec.Name
	ContainerNS string // path to the container's namespace
	HostVeth    string // br0's side, in the network's namespace
	IfName      string // "" = first free ethN in the container
	Addr        netip.Prefix
	MAC         net.HardwareAddr
	MTU         int
}

// AddEndpoint wires a container to the network: all or nothing. An
// existing, matching pair is adopted and repaired.
func (m *Manager) AddEndpoint(ctx context.Context, s EndpointSpec) (string, error) {
	h, ns, err := m.nsHandle(s.Network)
	if err != nil {
		return "", fmt.Errorf("endpoint %s: network %s: %w", s.HostVeth, s.Network, err)
	}
	defer ns.Close()
	defer h.Close()
	cns, err := netns.GetFromPath(s.ContainerNS)
	if err != nil {
		return "", fmt.Errorf("endpoint %s: container netns %s: %w", s.HostVeth, s.ContainerNS, err)
	}
	defer cns.Close()
	ch, err := netlink.NewHandleAt(cns)
	if err != nil {
		return "", fmt.Errorf("endpoint %s: %w", s.HostVeth, err)
	}
	defer ch.Close()
	br, err := h.LinkByName(BridgeName)
	if err != nil {
		return "", fmt.Errorf("endpoint %s: %s: %w", s.HostVeth, BridgeName, err)
	}

	if _, err := h.LinkByName(s.HostVeth); err == nil {
		name, err := findByMAC(ch, s.MAC)
		if err != nil {
			return "", fmt.Errorf("endpoint %s exists but its container side is not in %s: %w", s.HostVeth, s.ContainerNS, err)
		}
		s.IfName = name
		if _, err := m.CheckEndpoint(ctx, s); err != nil {
			return "", err
		}
		return name, nil
	}

	links, err := ch.LinkList()
	if err != nil {
		return "", fmt.Errorf("endpoint %s: list container links: %w", s.HostVeth, err)
	}
	ifName := s.IfName
	if ifName == "" {
		ifName = nextEth(links)
	} else if slices.ContainsFunc(links, func(l netlink.Link) bool { return l.Attrs().Name == ifName }) {
		return "", fmt.Errorf("endpoint %s: interface %s already exists in %s", s.HostVeth, ifName, s.ContainerNS)
	}
	attrs := netlink.NewLinkAttrs()
	attrs.Name, attrs.MTU = s.HostVeth, s.MTU
	veth := &netlink.Veth{LinkAttrs: attrs, PeerName: ifName, PeerHardwareAddr: s.MAC,
		PeerNamespace: netlink.NsFd(int(cns)), PeerMTU: uint32(s.MTU)}
	if err := h.LinkAdd(veth); err != nil {
		return "", fmt.Errorf("endpoint %s: create veth: %w", s.HostVeth, err)
	}
	ok := false
	defer func() {
		if !ok {
			if l, err := h.LinkByName(s.HostVeth); err == nil {
				h.LinkDel(l) // takes the container side with it
			}
		}
	}()
	if err := ctx.Err(); err != nil {
		return "", err
	}
	cl, err := ch.LinkByName(ifName)
	if err != nil {
		return "", fmt.Errorf("endpoint %s: container side %s: %w", s.HostVeth, ifName, err)
	}
	if err := ch.AddrAdd(cl, &netlink.Addr{IPNet: ipNet(s.Addr)}); err != nil {
		return "", fmt.Errorf("endpoint %s: add %s to %s: %w", s.HostVeth, s.Addr, ifName, err)
	}
	if err := ch.LinkSetUp(cl); err != nil {
		return "", fmt.Errorf("endpoint %s: %s up: %w", s.HostVeth, ifName, err)
	}
	if lo, err := ch.LinkByName("lo"); err == nil {
		ch.LinkSetUp(lo)
	}
	hl, err := h.LinkByName(s.HostVeth)
	if err != nil {
		return "", fmt.Errorf("endpoint %s: %w", s.HostVeth, err)
	}
	if err := h.LinkSetMasterByIndex(hl, br.Attrs().Index); err != nil {
		return "", fmt.Errorf("endpoint %s: enslave to %s: %w", s.HostVeth, BridgeName, err)
	}
	if err := h.LinkSetUp(hl); err != nil {
		return "", fmt.Errorf("endpoint %s: up: %w", s.HostVeth, err)
	}
	ok = true
	return ifName, nil
}

func nextEth(links []netlink.Link) string {
	for i := 0; ; i++ {
		name := fmt.Sprintf("eth%d", i)
		if !slices.ContainsFunc(links, func(l netlink.Link) bool { return l.Attrs().Name == name }) {
			return name
		}
	}
}

func findByMAC(h *netlink.Handle, mac net.HardwareAddr) (string, error) {
	links, err := h.LinkList()
	if err != nil {
		return "", err
	}
	for _, l := range links {
		if l.Type() == "veth" && slices.Equal(l.Attrs().HardwareAddr, mac) {
			return l.Attrs().Name, nil
		}
	}
	return "", fmt.Errorf("no interface with mac %s", mac)
}

// RemoveEndpoint deletes an endpoint's veth pair; a missing one is fine.
func (m *Manager) RemoveEndpoint(ctx context.Context, network, hostVeth string) error {
	h, ns, err := m.nsHandle(network)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENOENT) || !IsNetNS(m.NetNSPath(network)) {
			return nil
		}
		return fmt.Errorf("remove endpoint %s: %w", hostVeth, err)
	}
	defer ns.Close()
	defer h.Close()
	l, err := h.LinkByName(hostVeth)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("remove endpoint %s: %w", hostVeth, err)
	}
	if err := h.LinkDel(l); err != nil {
		return fmt.Errorf("remove endpoint %s: %w", hostVeth, err)
	}
	return nil
}

// CheckEndpoint repairs an endpoint in place: the br0 side attached, up,
// with the right MTU; the container side up with its address. It returns
// ErrEndpointGone when the pair no longer exists (for example because the
// container's namespace was deleted).
func (m *Manager) CheckEndpoint(ctx context.Context, s EndpointSpec) ([]string, error) {
	h, ns, err := m.nsHandle(s.Network)
	if err != nil {
		return nil, fmt.Errorf("check endpoint %s: %w", s.HostVeth, ErrEndpointGone)
	}
	defer ns.Close()
	defer h.Close()
	l, err := h.LinkByName(s.HostVeth)
	if err != nil {
		return nil, fmt.Errorf("check endpoint %s: %w", s.HostVeth, ErrEndpointGone)
	}
	var changes []string
	br, err := h.LinkByName(BridgeName)
	if err != nil {
		return nil, fmt.Errorf("check endpoint %s: %s: %w", s.HostVeth, BridgeName, err)
	}
	a := l.Attrs()
	if a.MTU != s.MTU {
		if err := h.LinkSetMTU(l, s.MTU); err != nil {
			return changes, fmt.Errorf("check endpoint %s: mtu: %w", s.HostVeth, err)
		}
		changes = append(changes, fmt.Sprintf("%s mtu %d -> %d", s.HostVeth, a.MTU, s.MTU))
	}
	if a.MasterIndex != br.Attrs().Index {
		if err := h.LinkSetMasterByIndex(l, br.Attrs().Index); err != nil {
			return changes, fmt.Errorf("check endpoint %s: enslave: %w", s.HostVeth, err)
		}
		changes = append(changes, s.HostVeth+" attached to "+BridgeName)
	}
	if a.Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(l); err != nil {
			return changes, fmt.Errorf("check endpoint %s: up: %w", s.HostVeth, err)
		}
		changes = append(changes, s.HostVeth+" set up")
	}
	if s.ContainerNS == "" || s.IfName == "" {
		return changes, nil
	}
	cns, err := netns.GetFromPath(s.ContainerNS)
	if err != nil {
		return changes, fmt.Errorf("check endpoint %s: %w", s.HostVeth, ErrEndpointGone)
	}
	defer cns.Close()
	ch, err := netlink.NewHandleAt(cns)
	if err != nil {
		return changes, err
	}
	defer ch.Close()
	cl, err := ch.LinkByName(s.IfName)
	if err != nil {
		return changes, fmt.Errorf("check endpoint %s: container side %s: %w", s.HostVeth, s.IfName, ErrEndpointGone)
	}
	addrs, err := ch.AddrList(cl, netlink.FAMILY_V4)
	if err != nil {
		return changes, err
	}
	if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return prefixOf(a.IPNet) == s.Addr }) {
		if err := ch.AddrAdd(cl, &netlink.Addr{IPNet: ipNet(s.Addr)}); err != nil {
			return changes, fmt.Errorf("check endpoint %s: add %s: %w", s.HostVeth, s.Addr, err)
		}
		changes = append(changes, fmt.Sprintf("added %s to %s in the container", s.Addr, s.IfName))
	}
	if cl.Attrs().Flags&net.FlagUp == 0 {
		if err := ch.LinkSetUp(cl); err != nil {
			return changes, err
		}
		changes = append(changes, s.IfName+" set up in the container")
	}
	return changes, nil
}

// Endpoints lists the br0-side veths in a network's namespace.
func (m *Manager) Endpoints(ctx context.Context, network string) ([]string, error) {
	h, ns, err := m.nsHandle(network)
	if err != nil {
		return nil, fmt.Errorf("list endpoints of %s: %w", network, err)
	}
	defer ns.Close()
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list endpoints of %s: %w", network, err)
	}
	var out []string
	for _, l := range links {
		if l.Type() == "veth" {
			out = append(out, l.Attrs().Name)
		}
	}
	return out, nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func prefixOf(n *net.IPNet) netip.Prefix {
	if n == nil {
		return netip.Prefix{}
	}
	ip, ok := netip.AddrFromSlice(n.IP.To4())
	if !ok {
		return netip.Prefix{}
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(ip, ones)
}
