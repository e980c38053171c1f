package vtep

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Peer is an endpoint on another host: its overlay address and MAC, and
// the underlay address of its host's VTEP.
type Peer struct {
	IP   netip.Addr
	MAC  net.HardwareAddr
	VTEP netip.Addr
}

// PeerPlan is what SyncPeers changes: the neighbor (ARP) entries and FDB
// entries to write and to delete. Add lists are in the order of the wanted
// peers, delete lists sorted.
type PeerPlan struct {
	AddNeigh []Peer // IP -> MAC
	DelNeigh []netip.Addr
	AddFDB   []Peer // MAC -> VTEP
	DelFDB   []net.HardwareAddr
}

// Empty reports whether the plan changes nothing.
func (p PeerPlan) Empty() bool {
	return len(p.AddNeigh)+len(p.DelNeigh)+len(p.AddFDB)+len(p.DelFDB) == 0
}

// PlanPeers compares the wanted peers with the permanent entries present
// (neighbors: IP -> MAC; FDB: MAC -> VTEP) and lists the differences. An
// entry with a wrong value is rewritten, not deleted and added. The kernel
// holds one entry per IP and one per MAC, so for duplicates in want the
// first wins; otherwise every sync would rewrite the entry back and forth.
func PlanPeers(want []Peer, haveNeigh map[netip.Addr]net.HardwareAddr, haveFDB map[string]netip.Addr) PeerPlan {
	var p PeerPlan
	wantIP := make(map[netip.Addr]struct{}, len(want))
	wantMAC := make(map[string]struct{}, len(want))
	for _, w := range want {
		if _, dup := wantIP[w.IP]; !dup {
			wantIP[w.IP] = struct{}{}
			if cur, ok := haveNeigh[w.IP]; !ok || !slices.Equal(cur, w.MAC) {
				p.AddNeigh = append(p.AddNeigh, w)
			}
		}
		mac := w.MAC.String()
		if _, dup := wantMAC[mac]; !dup {
			wantMAC[mac] = struct{}{}
			if cur, ok := haveFDB[mac]; !ok || cur != w.VTEP {
				p.AddFDB = append(p.AddFDB, w)
			}
		}
	}
	for ip := range haveNeigh {
		if _, ok := wantIP[ip]; !ok {
			p.DelNeigh = append(p.DelNeigh, ip)
		}
	}
	for mac := range haveFDB {
		if _, ok := wantMAC[mac]; !ok {
			hw, err := net.ParseMAC(mac)
			if err != nil {
				continue // not a key readPeers makes
			}
			p.DelFDB = append(p.DelFDB, hw)
		}
	}
	slices.SortFunc(p.DelNeigh, func(a, b netip.Addr) int { return a.Compare(b) })
	slices.SortFunc(p.DelFDB, func(a, b net.HardwareAddr) int { return slices.Compare(a, b) })
	return p
}

func checkPeers(peers []Peer) error {
	for _, p := range peers {
		switch {
		case !p.IP.Unmap().Is4():
			return fmt.Errorf("peer %s: not an IPv4 address", p.IP)
		case len(p.MAC) != 6 || p.MAC[0]&1 != 0:
			return fmt.Errorf("peer %s: mac %s is not a unicast ethernet address", p.IP, p.MAC)
		case !p.VTEP.Unmap().Is4() || p.VTEP.IsUnspecified():
			return fmt.Errorf("peer %s: vtep %s is not an IPv4 address", p.IP, p.VTEP)
		}
	}
	return nil
}

// SyncPeers makes vxlan1's permanent neighbor and FDB entries exactly the
// given peers. Entries the kernel made itself (not permanent, or FDB
// entries without a remote address) are left alone. added counts entries
// written (new or rewritten), removed entries deleted.
func (m *Manager) SyncPeers(ctx context.Context, network string, peers []Peer) (added, removed int, err error) {
	return m.sync(ctx, network, peers, nil, true)
}

// UpdatePeers is SyncPeers for a caller that knows what it programmed last
// (prev): it plans against prev instead of dumping the kernel's tables, so
// one more peer costs one entry written, not a read of every entry. Drift
// made by others is not seen here; SyncPeers, which reads the kernel,
// repairs it.
func (m *Manager) UpdatePeers(ctx context.Context, network string, prev, peers []Peer) (added, removed int, err error) {
	return m.sync(ctx, network, peers, prev, false)
}

// ChangePeers writes the given peers and deletes the removed ones, and
// nothing else: for a caller that knows what changed (one host's record of
// a network), a change costs its own entries, whatever the network's size.
func (m *Manager) ChangePeers(ctx context.Context, network string, add, remove []Peer) (added, removed int, err error) {
	if err := checkPeers(add); err != nil {
		return 0, 0, fmt.Errorf("change peers of %s: %w", network, err)
	}
	defer m.nets.lock(network)()
	h, ns, err := m.nsHandle(network)
	if err != nil {
		return 0, 0, fmt.Errorf("change peers of %s: %w", network, err)
	}
	defer ns.Close()
	defer h.Close()
	vx, err := h.LinkByName(VXLANName)
	if err != nil {
		return 0, 0, fmt.Errorf("change peers of %s: %s: %w", network, VXLANName, err)
	}
	var plan PeerPlan
	fdbDst := map[string]netip.Addr{}
	for _, p := range normalize(remove) {
		plan.DelNeigh = append(plan.DelNeigh, p.IP)
		plan.DelFDB = append(plan.DelFDB, p.MAC)
		fdbDst[p.MAC.String()] = p.VTEP
	}
	add = normalize(add)
	plan.AddNeigh, plan.AddFDB = add, add
	added, removed, err = m.apply(ctx, h, vx.Attrs().Index, plan, fdbDst)
	if err != nil {
		err = fmt.Errorf("change peers of %s: %w", network, err)
	}
	return added, removed, err
}

func (m *Manager) sync(ctx context.Context, network string, peers, prev []Peer, read bool) (added, removed int, err error) {
	if err := checkPeers(peers); err != nil {
		return 0, 0, fmt.Errorf("sync peers of %s: %w", network, err)
	}
	defer m.nets.lock(network)()
	added, removed, err = m.syncPeers(ctx, network, normalize(peers), normalize(prev), read)
	if err != nil {
		err = fmt.Errorf("sync peers of %s: %w", network, err)
	}
	return added, removed, err
}

// normalize unmaps addresses: netip.Addr compares the zone and the 4-in-6
// form too, and the plan must match what the kernel reports.
func normalize(peers []Peer) []Peer {
	norm := make([]Peer, len(peers))
	for i, p := range peers {
		norm[i] = Peer{IP: p.IP.Unmap(), MAC: p.MAC, VTEP: p.VTEP.Unmap()}
	}
	return norm
}

// tables is what a peer list looks like in the kernel: one neighbor entry
// per IP and one FDB entry per MAC, the first peer winning as in PlanPeers.
func tables(peers []Peer) (map[netip.Addr]net.HardwareAddr, map[string]netip.Addr) {
	neigh := make(map[netip.Addr]net.HardwareAddr, len(peers))
	fdb := make(map[string]netip.Addr, len(peers))
	for _, p := range peers {
		if _, dup := neigh[p.IP]; !dup {
			neigh[p.IP] = p.MAC
		}
		if _, dup := fdb[p.MAC.String()]; !dup {
			fdb[p.MAC.String()] = p.VTEP
		}
	}
	return neigh, fdb
}

func (m *Manager) syncPeers(ctx context.Context, network string, peers, prev []Peer, read bool) (added, removed int, err error) {
	h, ns, err := m.nsHandle(network)
	if err != nil {
		return 0, 0, err
	}
	defer ns.Close()
	defer h.Close()
	vx, err := h.LinkByName(VXLANName)
	if err != nil {
		return 0, 0, fmt.Errorf("%s: %w", VXLANName, err)
	}
	idx := vx.Attrs().Index
	haveNeigh, haveFDB := tables(prev)
	if read {
		if haveNeigh, haveFDB, err = readPeers(h, idx); err != nil {
			return 0, 0, err
		}
	}
	return m.apply(ctx, h, idx, PlanPeers(peers, haveNeigh, haveFDB), haveFDB)
}

// apply carries a plan out on the VXLAN device idx; fdbDst gives the
// remote address of each FDB entry to delete.
func (m *Manager) apply(ctx context.Context, h *netlink.Handle, idx int, plan PeerPlan, fdbDst map[string]netip.Addr) (added, removed int, err error) {
	// Delete first, so that an address or MAC that moved to another
	// endpoint is not briefly claimed twice.
	for _, ip := range plan.DelNeigh {
		if err := ctx.Err(); err != nil {
			return added, removed, err
		}
		n := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, IP: net.IP(ip.AsSlice())}
		if err := h.NeighDel(n); err != nil && !isNoEntry(err) {
			return added, removed, fmt.Errorf("delete neighbor %s: %w", ip, err)
		}
		removed++
	}
	for _, mac := range plan.DelFDB {
		if err := ctx.Err(); err != nil {
			return added, removed, err
		}
		n := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, HardwareAddr: mac,
			IP: net.IP(fdbDst[mac.String()].AsSlice())}
		if err := h.NeighDel(n); err != nil && !isNoEntry(err) {
			return added, removed, fmt.Errorf("delete fdb %s: %w", mac, err)
		}
		removed++
	}
	for _, p := range plan.AddNeigh {
		if err := ctx.Err(); err != nil {
			return added, removed, err
		}
		n := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
			IP: net.IP(p.IP.AsSlice()), HardwareAddr: p.MAC}
		if err := h.NeighSet(n); err != nil {
			return added, removed, fmt.Errorf("set neighbor %s lladdr %s: %w", p.IP, p.MAC, err)
		}
		added++
	}
	for _, p := range plan.AddFDB {
		if err := ctx.Err(); err != nil {
			return added, removed, err
		}
		n := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT,
			HardwareAddr: p.MAC, IP: net.IP(p.VTEP.AsSlice())}
		if err := h.NeighSet(n); err != nil {
			return added, removed, fmt.Errorf("set fdb %s dst %s: %w", p.MAC, p.VTEP, err)
		}
		added++
	}
	return added, removed, nil
}

// isNoEntry: an entry that vanished between listing and deleting (the
// kernel, or another writer) is what deleting wanted anyway.
func isNoEntry(err error) bool { return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) }

// readPeers returns vxlan1's permanent neighbor entries and its permanent
// unicast FDB entries that point at a remote VTEP. The kernel keeps one
// remote per unicast MAC (it appends further remotes only to the all-zeros
// and multicast entries), so a MAC maps to one address.
func readPeers(h *netlink.Handle, idx int) (map[netip.Addr]net.HardwareAddr, map[string]netip.Addr, error) {
	neighs, err := dump(func() ([]netlink.Neigh, error) { return h.NeighList(idx, unix.AF_INET) })
	if err != nil {
		return nil, nil, fmt.Errorf("list neighbors: %w", err)
	}
	haveNeigh := map[netip.Addr]net.HardwareAddr{}
	for _, n := range neighs {
		if n.LinkIndex != idx || n.State&netlink.NUD_PERMANENT == 0 {
			continue
		}
		if ip, ok := netip.AddrFromSlice(n.IP.To4()); ok {
			haveNeigh[ip] = n.HardwareAddr
		}
	}
	fdb, err := dump(func() ([]netlink.Neigh, error) { return h.NeighList(idx, unix.AF_BRIDGE) })
	if err != nil {
		return nil, nil, fmt.Errorf("list fdb: %w", err)
	}
	haveFDB := map[string]netip.Addr{}
	for _, n := range fdb {
		// The all-zeros flood entries, multicast groups, entries without
		// a remote and the device's own address are the kernel's or an
		// admin's, never ours.
		if n.LinkIndex != idx || n.Flags&netlink.NTF_SELF == 0 || n.State&netlink.NUD_PERMANENT == 0 || n.IP == nil {
			continue
		}
		ip, ok := netip.AddrFromSlice(n.IP.To4())
		if !ok || ip.IsUnspecified() || len(n.HardwareAddr) != 6 || n.HardwareAddr[0]&1 != 0 || isZeroMAC(n.HardwareAddr) {
			continue
		}
		haveFDB[n.HardwareAddr.String()] = ip
	}
	return haveNeigh, haveFDB, nil
}

func isZeroMAC(mac net.HardwareAddr) bool {
	return !slices.ContainsFunc(mac, func(b byte) bool { return b != 0 })
}

// DiffPeers reads the network's tables and says what SyncPeers would
// change to make them hold exactly peers, changing nothing.
func (m *Manager) DiffPeers(ctx context.Context, network string, peers []Peer) (PeerPlan, error) {
	h, ns, err := m.nsHandle(network)
	if err != nil {
		return PeerPlan{}, err
	}
	defer ns.Close()
	defer h.Close()
	vx, err := h.LinkByName(VXLANName)
	if err != nil {
		return PeerPlan{}, fmt.Errorf("%s: %w", VXLANName, err)
	}
	haveNeigh, haveFDB, err := readPeers(h, vx.Attrs().Index)
	if err != nil {
		return PeerPlan{}, err
	}
	return PlanPeers(normalize(peers), haveNeigh, haveFDB), nil
}
