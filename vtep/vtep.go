// Package vtep makes the kernel look like a given per-network spec: a
// network namespace holding a bridge br0 and a VXLAN device, veth pairs to
// containers, and static neighbor and FDB entries for remote endpoints. It
// knows nothing of the store: it takes plain specs, so it is tested in
// namespaces with no store at all.
package vtep

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/vxnet/vxnet/internal/netnsutil"
)

// Device names inside a network's namespace, as in Docker's overlay.
const (
	BridgeName = "br0"
	VXLANName  = "vxlan1"
)

// DefaultVXLANPort is the IANA port, which Docker's overlay uses too.
const DefaultVXLANPort = 4789

// VXLANOverhead is what encapsulation adds to a frame: the default network
// MTU is the underlay's minus this.
const VXLANOverhead = 50

// ErrEndpointGone is returned by CheckEndpoint when an endpoint's veth is
// verifiably missing: the kernel said there is no such link, the network's
// or the container's namespace file does not exist or is not a network
// namespace, or the veth's peer is not in the container's namespace. A
// failed syscall (EMFILE, EACCES, a timeout) never is: callers remove
// endpoints on this error.
var ErrEndpointGone = errors.New("endpoint interface gone")

// Config describes the host.
type Config struct {
	// NetNSDir is where per-network namespaces are bind-mounted. Each
	// agent on a machine needs its own.
	NetNSDir string
	// Local is the host's underlay address: the VXLAN source.
	Local netip.Addr
	// VXLANPort is the UDP port of the VTEPs; 0 means DefaultVXLANPort.
	VXLANPort int
}

// Manager drives one host's overlay datapath. The namespace that is
// current when New is called is the host namespace: VXLAN devices are
// created there so that their UDP sockets live on the underlay. A Manager
// is safe for concurrent use; calls on the same network are serialized.
type Manager struct {
	cfg   Config
	host  netns.NsHandle
	hostH *netlink.Handle
	// hostMu guards the temporary VXLAN names in the host namespace, which
	// RemoveStrays would otherwise take for crash remnants mid-creation.
	hostMu sync.Mutex
	nets   keyedMutex
	// failAt, set by tests only, injects an error at a named step so that
	// every rollback path can be exercised against the kernel.
	failAt func(step string) error
}

// New opens a handle on the calling thread's namespace, which becomes the
// host namespace, and creates NetNSDir.
func New(cfg Config) (*Manager, error) {
	if cfg.VXLANPort == 0 {
		cfg.VXLANPort = DefaultVXLANPort
	}
	if cfg.VXLANPort < 0 || cfg.VXLANPort > 65535 {
		return nil, fmt.Errorf("vtep: vxlan port %d out of range", cfg.VXLANPort)
	}
	if cfg.NetNSDir == "" {
		return nil, errors.New("vtep: NetNSDir is required")
	}
	if cfg.Local.IsValid() {
		cfg.Local = cfg.Local.Unmap()
	}
	if err := os.MkdirAll(cfg.NetNSDir, 0o700); err != nil {
		return nil, fmt.Errorf("vtep: create netns dir: %w", err)
	}
	host, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("vtep: host netns: %w", err)
	}
	h, err := netnsutil.Handle(host)
	if err != nil {
		host.Close()
		return nil, fmt.Errorf("vtep: netlink handle on host netns: %w", err)
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
	return underlayMTU(nil, local)
}

// underlayMTU looks local up through h; nil means the calling thread's
// namespace (a zero Handle has no sockets of its own and uses it).
func underlayMTU(h *netlink.Handle, local netip.Addr) (int, error) {
	if h == nil {
		h = &netlink.Handle{}
	}
	addrs, err := h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return 0, fmt.Errorf("underlay mtu: list addresses: %w", err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == local.Unmap() {
			l, err := h.LinkByIndex(a.LinkIndex)
			if err != nil {
				return 0, fmt.Errorf("underlay mtu: interface of %s: %w", local, err)
			}
			return l.Attrs().MTU, nil
		}
	}
	return 0, fmt.Errorf("underlay mtu: no interface holds %s", local)
}

// NetNSPath is where a network's namespace is mounted.
func (m *Manager) NetNSPath(name string) string { return filepath.Join(m.cfg.NetNSDir, name) }

// Networks lists the namespaces present under NetNSDir. A file that is
// not a namespace mount (a crash remnant) is listed too, so that the
// caller deletes or repairs it like any unwanted network.
func (m *Manager) Networks() ([]string, error) {
	entries, err := os.ReadDir(m.cfg.NetNSDir)
	if err != nil {
		return nil, fmt.Errorf("list network namespaces: %w", err)
	}
	var out []string
	for _, e := range entries {
		if !e.IsDir() {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// nsHandle opens a netlink handle inside a network's namespace.
func (m *Manager) nsHandle(name string) (*netlink.Handle, netns.NsHandle, error) {
	path := m.NetNSPath(name)
	ns, err := openNetNS(path)
	if err != nil {
		return nil, 0, fmt.Errorf("open netns %s: %w", path, err)
	}
	h, err := netnsutil.Handle(ns)
	if err != nil {
		ns.Close()
		return nil, 0, fmt.Errorf("netlink handle in %s: %w", path, err)
	}
	return h, ns, nil
}

// step runs the test hook, if any, and checks the context: the points
// between kernel changes where giving up is safe.
func (m *Manager) step(ctx context.Context, name string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("before %s: %w", name, err)
	}
	if m.failAt != nil {
		if err := m.failAt(name); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	return nil
}

// NetworkSpec is one overlay network on this host.
type NetworkSpec struct {
	Name    string       // namespace file name
	VNI     uint32       // VXLAN network identifier
	Gateway netip.Prefix // br0's address, with the subnet's length
	MTU     int          // 0 = the underlay's MTU minus VXLANOverhead
	// BridgeMAC is br0's address; nil leaves it to the kernel, which
	// gives a bridge its lowest port's and changes it as ports come and
	// go, under the containers' ARP caches (the gateway, and its DNS
	// server, then stop answering them until their entries expire).
	BridgeMAC net.HardwareAddr
}

func (s *NetworkSpec) check() error {
	switch {
	case s.Name == "" || s.Name == "." || s.Name == ".." || strings.ContainsRune(s.Name, '/'):
		return fmt.Errorf("invalid network name %q", s.Name)
	case s.VNI >= 1<<24:
		return fmt.Errorf("vni %d does not fit 24 bits", s.VNI)
	case !s.Gateway.IsValid() || !s.Gateway.Addr().Unmap().Is4():
		return fmt.Errorf("gateway %s is not an IPv4 prefix", s.Gateway)
	case s.MTU != 0 && (s.MTU < 68 || s.MTU > 65535):
		return fmt.Errorf("mtu %d out of range", s.MTU)
	}
	s.Gateway = netip.PrefixFrom(s.Gateway.Addr().Unmap(), s.Gateway.Bits())
	return nil
}

// EnsureNetwork creates or repairs a network's namespace, br0 and vxlan1.
// It returns what it had to change, empty when all was right. A namespace
// it created is removed again if a later step fails.
func (m *Manager) EnsureNetwork(ctx context.Context, s NetworkSpec) (changes []string, err error) {
	if err := s.check(); err != nil {
		return nil, fmt.Errorf("network %s: %w", s.Name, err)
	}
	if s.MTU == 0 {
		mtu, err := underlayMTU(m.hostH, m.cfg.Local)
		if err != nil {
			return nil, fmt.Errorf("network %s: default mtu: %w", s.Name, err)
		}
		s.MTU = mtu - VXLANOverhead
	}
	defer m.nets.lock(s.Name)()
	defer func() {
		if err != nil {
			err = fmt.Errorf("network %s: %w", s.Name, err)
		}
	}()
	if err := m.step(ctx, "create namespace"); err != nil {
		return nil, err
	}
	path := m.NetNSPath(s.Name)
	switch cerr := CheckNetNS(path); {
	case cerr == nil:
	case !isAbsentNetNS(cerr):
		// EMFILE and the like say nothing about the namespace, which
		// is most likely alive and in use: try again at the next pass.
		return nil, fmt.Errorf("check namespace: %w", cerr)
	default:
		if err := CreateNetNS(path); err != nil {
			return nil, err
		}
		changes = append(changes, "created namespace "+s.Name)
		defer func() {
			if err != nil {
				if derr := m.deleteNetwork(s.Name); derr != nil {
					err = errors.Join(err, fmt.Errorf("roll back: %w", derr))
				}
			}
		}()
	}
	h, ns, err := m.nsHandle(s.Name)
	if err != nil {
		return changes, err
	}
	defer ns.Close()
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return changes, fmt.Errorf("lo: %w", err)
	}
	if lo.Attrs().Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(lo); err != nil {
			return changes, fmt.Errorf("set lo up: %w", err)
		}
	}
	if err := m.step(ctx, "bridge"); err != nil {
		return changes, err
	}
	br, c, err := ensureBridge(h, s)
	changes = append(changes, c...)
	if err != nil {
		return changes, err
	}
	if err := m.step(ctx, "vxlan"); err != nil {
		return changes, err
	}
	c, err = m.ensureVXLAN(ctx, h, ns, br, s)
	changes = append(changes, c...)
	return changes, err
}

func ensureBridge(h *netlink.Handle, s NetworkSpec) (netlink.Link, []string, error) {
	var changes []string
	br, err := h.LinkByName(BridgeName)
	switch {
	case isNotFound(err):
		br = nil
	case err != nil:
		return nil, nil, fmt.Errorf("look up %s: %w", BridgeName, err)
	case br.Type() != "bridge":
		if err := h.LinkDel(br); err != nil {
			return nil, changes, fmt.Errorf("remove non-bridge %s: %w", BridgeName, err)
		}
		changes = append(changes, fmt.Sprintf("replaced %s: was a %s", BridgeName, br.Type()))
		br = nil
	}
	if br == nil {
		attrs := netlink.NewLinkAttrs()
		attrs.Name, attrs.MTU, attrs.HardwareAddr = BridgeName, s.MTU, s.BridgeMAC
		if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil {
			return nil, changes, fmt.Errorf("create %s: %w", BridgeName, err)
		}
		if br, err = h.LinkByName(BridgeName); err != nil {
			return nil, changes, fmt.Errorf("look up new %s: %w", BridgeName, err)
		}
		changes = append(changes, "created "+BridgeName)
	}
	// An MTU set explicitly sticks: the kernel no longer lowers a bridge's
	// MTU to its smallest port's once the user has chosen one.
	if br.Attrs().MTU != s.MTU {
		if err := h.LinkSetMTU(br, s.MTU); err != nil {
			return nil, changes, fmt.Errorf("set %s mtu %d: %w", BridgeName, s.MTU, err)
		}
		changes = append(changes, fmt.Sprintf("%s mtu %d -> %d", BridgeName, br.Attrs().MTU, s.MTU))
	}
	if s.BridgeMAC != nil && !bytes.Equal(br.Attrs().HardwareAddr, s.BridgeMAC) {
		// Set, it sticks: the kernel no longer follows the ports.
		if err := h.LinkSetHardwareAddr(br, s.BridgeMAC); err != nil {
			return nil, changes, fmt.Errorf("set %s mac %s: %w", BridgeName, s.BridgeMAC, err)
		}
		changes = append(changes, fmt.Sprintf("%s mac %s -> %s", BridgeName, br.Attrs().HardwareAddr, s.BridgeMAC))
	}
	c, err := ensureAddr(h, br, s.Gateway)
	changes = append(changes, c...)
	if err != nil {
		return nil, changes, err
	}
	if br.Attrs().Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(br); err != nil {
			return nil, changes, fmt.Errorf("set %s up: %w", BridgeName, err)
		}
		changes = append(changes, BridgeName+" set up")
	}
	return br, changes, nil
}

// ensureAddr makes want the link's only IPv4 address: a stale gateway
// left from an earlier subnet would answer for addresses no longer ours.
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

// vxlanMismatch says why an existing VXLAN device cannot be kept, "" if it
// can. Only a new device can fix these: the kernel refuses to change most
// VXLAN attributes in place, and the socket's namespace never moves.
func (m *Manager) vxlanMismatch(h *netlink.Handle, l netlink.Link, vni uint32) string {
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
	case vx.NetNsID < 0:
		// No link netns: it was created inside the network namespace,
		// so its UDP socket is there too, off the underlay.
		return "socket not in the host namespace"
	}
	if id, err := h.GetNetNsIdByFd(int(m.host)); err == nil && id >= 0 && id != vx.NetNsID {
		return fmt.Sprintf("socket in netns id %d, host is %d", vx.NetNsID, id)
	}
	return ""
}

func (m *Manager) ensureVXLAN(ctx context.Context, h *netlink.Handle, ns netns.NsHandle, br netlink.Link, s NetworkSpec) ([]string, error) {
	var changes []string
	vx, err := h.LinkByName(VXLANName)
	switch {
	case isNotFound(err):
		vx = nil
	case err != nil:
		return nil, fmt.Errorf("look up %s: %w", VXLANName, err)
	default:
		if why := m.vxlanMismatch(h, vx, s.VNI); why != "" {
			if err := h.LinkDel(vx); err != nil {
				return changes, fmt.Errorf("remove incompatible %s (%s): %w", VXLANName, why, err)
			}
			changes = append(changes, fmt.Sprintf("recreated %s: %s", VXLANName, why))
			vx = nil
		}
	}
	created := vx == nil
	if created {
		if vx, err = m.createVXLAN(ctx, h, ns, s); err != nil {
			return changes, err
		}
		if len(changes) == 0 {
			changes = append(changes, fmt.Sprintf("created %s (vni %d)", VXLANName, s.VNI))
		}
	}
	// A new device is configured like a repaired one, but its steps are
	// not drift and so not reported.
	report := func(c string) {
		if !created {
			changes = append(changes, c)
		}
	}
	a := vx.Attrs()
	if a.MTU != s.MTU {
		if err := h.LinkSetMTU(vx, s.MTU); err != nil {
			return changes, fmt.Errorf("set %s mtu %d: %w", VXLANName, s.MTU, err)
		}
		report(fmt.Sprintf("%s mtu %d -> %d", VXLANName, a.MTU, s.MTU))
	}
	if a.MasterIndex != br.Attrs().Index {
		if err := h.LinkSetMasterByIndex(vx, br.Attrs().Index); err != nil {
			return changes, fmt.Errorf("enslave %s to %s: %w", VXLANName, BridgeName, err)
		}
		report(VXLANName + " attached to " + BridgeName)
	}
	if a.Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(vx); err != nil {
			return changes, fmt.Errorf("set %s up: %w", VXLANName, err)
		}
		report(VXLANName + " set up")
	}
	return changes, nil
}

// tempVXLANName is the host-namespace name of a VXLAN device between its
// creation and its move, derived from the VNI so that a remnant of a crash
// in between is recognised.
func tempVXLANName(vni uint32) string { return fmt.Sprintf("vx-%06x", vni) }

// createVXLAN makes the device in the host namespace, where its UDP socket
// is bound on the underlay, and then moves it into the network's
// namespace; the socket stays behind in the host namespace, as intended.
func (m *Manager) createVXLAN(ctx context.Context, h *netlink.Handle, ns netns.NsHandle, s NetworkSpec) (netlink.Link, error) {
	m.hostMu.Lock()
	defer m.hostMu.Unlock()
	tmp := tempVXLANName(s.VNI)
	if old, err := m.hostH.LinkByName(tmp); err == nil {
		if err := m.hostH.LinkDel(old); err != nil {
			return nil, fmt.Errorf("remove leftover %s from the host namespace: %w", tmp, err)
		}
	}
	attrs := netlink.NewLinkAttrs()
	attrs.Name, attrs.MTU = tmp, s.MTU
	vx := &netlink.Vxlan{LinkAttrs: attrs, VxlanId: int(s.VNI), Port: m.cfg.VXLANPort, Learning: false, Proxy: true}
	if m.cfg.Local.IsValid() {
		vx.SrcAddr = net.IP(m.cfg.Local.AsSlice())
	}
	// EEXIST here means another device on the same socket has the VNI.
	// It can be one of a namespace being destroyed, which the kernel
	// cleans up asynchronously, so wait a little before giving up.
	var err error
	for try := 0; ; try++ {
		if err = m.hostH.LinkAdd(vx); !errors.Is(err, unix.EEXIST) || try == 20 {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("create vxlan %s (vni %d): %w (gave up: %w)", tmp, s.VNI, err, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err != nil {
		return nil, fmt.Errorf("create vxlan %s (vni %d): %w", tmp, s.VNI, err)
	}
	moved := false
	defer func() {
		if !moved {
			if l, err := m.hostH.LinkByName(tmp); err == nil {
				m.hostH.LinkDel(l)
			}
		}
	}()
	if err := m.step(ctx, "move vxlan"); err != nil {
		return nil, err
	}
	link, err := m.hostH.LinkByName(tmp)
	if err != nil {
		return nil, fmt.Errorf("look up new vxlan %s: %w", tmp, err)
	}
	if err := m.hostH.LinkSetNsFd(link, int(ns)); err != nil {
		return nil, fmt.Errorf("move vxlan %s into %s: %w", tmp, s.Name, err)
	}
	moved = true
	renamed := false
	defer func() {
		if !renamed {
			if l, err := h.LinkByName(tmp); err == nil {
				h.LinkDel(l)
			}
		}
	}()
	if err := m.step(ctx, "rename vxlan"); err != nil {
		return nil, err
	}
	if link, err = h.LinkByName(tmp); err != nil {
		return nil, fmt.Errorf("look up moved vxlan %s in %s: %w", tmp, s.Name, err)
	}
	if err := h.LinkSetName(link, VXLANName); err != nil {
		return nil, fmt.Errorf("rename vxlan %s to %s in %s: %w", tmp, VXLANName, s.Name, err)
	}
	renamed = true
	if link, err = h.LinkByName(VXLANName); err != nil {
		return nil, fmt.Errorf("look up %s in %s: %w", VXLANName, s.Name, err)
	}
	return link, nil
}

// RemoveStrays deletes VXLAN devices left in the host namespace by a crash
// between creating one and moving it into its network's namespace.
func (m *Manager) RemoveStrays(ctx context.Context) ([]string, error) {
	m.hostMu.Lock()
	defer m.hostMu.Unlock()
	links, err := dump(m.hostH.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list host links: %w", err)
	}
	var removed []string
	for _, l := range links {
		vx, ok := l.(*netlink.Vxlan)
		if !ok || vx.VxlanId < 0 || l.Attrs().Name != tempVXLANName(uint32(vx.VxlanId)) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return removed, err
		}
		if err := m.hostH.LinkDel(l); err != nil {
			return removed, fmt.Errorf("remove stray %s: %w", l.Attrs().Name, err)
		}
		removed = append(removed, l.Attrs().Name)
	}
	return removed, nil
}

// DeleteNetwork removes a network's namespace; its devices, and the veth
// pairs to containers, go with it. A missing network is fine.
func (m *Manager) DeleteNetwork(ctx context.Context, name string) error {
	if name == "" || strings.ContainsRune(name, '/') || name == "." || name == ".." {
		return fmt.Errorf("delete network: invalid name %q", name)
	}
	defer m.nets.lock(name)()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("delete network %s: %w", name, err)
	}
	return m.deleteNetwork(name)
}

func (m *Manager) deleteNetwork(name string) error {
	// The kernel destroys a namespace's devices asynchronously; until then
	// the VXLAN device still holds its VNI on the host's UDP socket and a
	// new one for the same VNI fails with EEXIST. Deleting it first makes
	// that part synchronous. A namespace that cannot be opened for another
	// reason than its absence is left for the next attempt rather than
	// unmounted half-done.
	h, ns, err := m.nsHandle(name)
	switch {
	case err == nil:
		defer ns.Close()
		defer h.Close()
		l, err := h.LinkByName(VXLANName)
		if err == nil {
			err = h.LinkDel(l)
		}
		if err != nil && !isNotFound(err) {
			return fmt.Errorf("delete network %s: remove %s: %w", name, VXLANName, err)
		}
	case !isAbsentNetNS(err):
		return fmt.Errorf("delete network %s: %w", name, err)
	}
	if err := DeleteNetNS(m.NetNSPath(name)); err != nil {
		return fmt.Errorf("delete network %s: %w", name, err)
	}
	return nil
}

// isNotFound reports whether err says a link does not exist, by the typed
// answers only; nat decides absence by the same shared rule.
func isNotFound(err error) bool { return netnsutil.IsLinkNotFound(err) }

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

// keyedMutex serializes work per network name; entries live only while
// held or awaited, so deleted networks leave nothing behind.
type keyedMutex struct {
	mu sync.Mutex
	m  map[string]*refMutex
}

type refMutex struct {
	sync.Mutex
	n int
}

func (k *keyedMutex) lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[string]*refMutex{}
	}
	r := k.m[key]
	if r == nil {
		r = &refMutex{}
		k.m[key] = r
	}
	r.n++
	k.mu.Unlock()
	r.Lock()
	return func() {
		r.Unlock()
		k.mu.Lock()
		if r.n--; r.n == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
}
