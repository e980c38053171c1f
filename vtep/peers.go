package vtep

import (
	"context"
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
// entries to write and to delete.
type PeerPlan struct {
	AddNeigh []Peer
	DelNeigh []netip.Addr
	AddFDB   []Peer
	DelFDB   []net.HardwareAddr
}

// Empty reports whether the plan changes nothing.
func (p PeerPlan) Empty() bool {
	return len(p.AddNeigh)+len(p.DelNeigh)+len(p.AddFDB)+len(p.DelFDB) == 0
}

// PlanPeers compares the wanted peers with the permanent entries present
// (neighbors: IP -> MAC; FDB: MAC -> VTEP) and lists the differences. An
// entry with a wrong value is rewritten, not deleted and added.
func PlanPeers(want []Peer, haveNeigh map[netip.Addr]net.HardwareAddr, haveFDB map[string]netip.Addr) PeerPlan {
	var p PeerPlan
	wantIP := make(map[netip.Addr]bool, len(want))
	wantMAC := make(map[string]bool, len(want))
	for _, w := range want {
		wantIP[w.IP] = true
		mac := w.MAC.String()
		if wantMAC[mac] {
			continue // one FDB entry per MAC: the first wins
		}
		wantMAC[mac] = true
		if cur, ok := haveNeigh[w.IP]; !ok || !slices.Equal(cur, w.MAC) {
			p.AddNeigh = append(p.AddNeigh, w)
		}
		if cur, ok := haveFDB[mac]; !ok || cur != w.VTEP {
			p.AddFDB = append(p.AddFDB, w)
		}
	}
	for ip := range haveNeigh {
		if !wantIP[ip] {
			p.DelNeigh = append(p.DelNeigh, ip)
		}
	}
	for mac := range haveFDB {
		if !wantMAC[mac] {
			hw, _ := net.ParseMAC(mac)
			p.DelFDB = append(p.DelFDB, hw)
		}
	}
	slices.SortFunc(p.DelNeigh, func(a, b netip.Addr) int { return a.Compare(b) })
	slices.SortFunc(p.DelFDB, func(a, b net.HardwareAddr) int { return slices.Compare(a, b) })
	return p
}

// SyncPeers makes vxlan1's permanent neighbor and FDB entries exactly the
// given peers. Entries the kernel made itself (not permanent, or FDB
// entries without a remote address) are left alone.
func (m *Manager) SyncPeers(ctx context.Context, network string, peers []Peer) (added, removed int, err error) {
	h, ns, err := m.nsHandle(network)
	if err != nil {
		return 0, 0, fmt.Errorf("sync peers of %s: %w", network, err)
	}
	defer ns.Close()
	defer h.Close()
	vx, err := h.LinkByName(VXLANName)
	if err != nil {
		return 0, 0, fmt.Errorf("sync peers of %s: %s: %w", network, VXLANName, err)
	}
	idx := vx.Attrs().Index
	haveNeigh, haveFDB, err := readPeers(h, idx)
	if err != nil {
		return 0, 0, fmt.Errorf("sync peers of %s: %w", network, err)
	}
	plan := PlanPeers(peers, haveNeigh, haveFDB)
	// Delete first, so that an address or MAC that moved to another
	// endpoint is not briefly claimed twice.
	for _, ip := range plan.DelNeigh {
		n := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, IP: net.IP(ip.AsSlice())}
		if err := h.NeighDel(n); err != nil {
			return added, removed, fmt.Errorf("sync peers of %s: delete neighbor %s: %w", network, ip, err)
		}
		removed++
	}
	for _, mac := range plan.DelFDB {
		n := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, HardwareAddr: mac, IP: net.IP(haveFDB[mac.String()].AsSlice())}
		if err := h.NeighDel(n); err != nil {
			return added, removed, fmt.Errorf("sync peers of %s: delete fdb %s: %w", network, mac, err)
		}
		removed++
	}
	for _, p := range plan.AddNeigh {
		n := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
			IP: net.IP(p.IP.AsSlice()), HardwareAddr: p.MAC}
		if err := h.NeighSet(n); err != nil {
			return added, removed, fmt.Errorf("sync peers of %s: neighbor %s: %w", network, p.IP, err)
		}
		added++
	}
	for _, p := range plan.AddFDB {
		n := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT,
			HardwareAddr: p.MAC, IP: net.IP(p.VTEP.AsSlice())}
		if err := h.NeighSet(n); err != nil {
			return added, removed, fmt.Errorf("sync peers of %s: fdb %s: %w", network, p.MAC, err)
		}
		added++
	}
	return added, removed, nil
}

// readPeers returns vxlan1's permanent neighbor entries and its FDB entries
// that point at a remote VTEP.
func readPeers(h *netlink.Handle, idx int) (map[netip.Addr]net.HardwareAddr, map[string]netip.Addr, error) {
	neighs, err := h.NeighList(idx, unix.AF_INET)
	if err != nil {
		return nil, nil, fmt.Errorf("list neighbors: %w", err)
	}
	haveNeigh := map[netip.Addr]net.HardwareAddr{}
	for _, n := range neighs {
		if n.State&netlink.NUD_PERMANENT == 0 {
			continue
		}
		if ip, ok := netip.AddrFromSlice(n.IP.To4()); ok {
			haveNeigh[ip] = n.HardwareAddr
		}
	}
	fdb, err := h.NeighList(idx, unix.AF_BRIDGE)
	if err != nil {
		return nil, nil, fmt.Errorf("list fdb: %w", err)
	}
	haveFDB := map[string]netip.Addr{}
	for _, n := range fdb {
		if n.LinkIndex != idx || n.Flags&netlink.NTF_SELF == 0 || n.IP == nil {
			continue
		}
		ip, ok := netip.AddrFromSlice(n.IP.To4())
		if !ok || ip.IsUnspecified() || len(n.HardwareAddr) != 6 {
			continue
		}
		haveFDB[n.HardwareAddr.String()] = ip
	}
	return haveNeigh, haveFDB, nil
}
