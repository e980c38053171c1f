package overlay

import (
	"bytes"
	"cmp"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vxnet/vxnet/ipam"
	"github.com/vxnet/vxnet/vtep"
)

// netPlan is what one network should look like on this host.
type netPlan struct {
	Spec   vtep.NetworkSpec
	Net    Network
	Locals []*localEndpoint
	Peers  []vtep.Peer
	// Dropped says why endpoints of other hosts were left out of Peers,
	// one error per record, sorted.
	Dropped []error
}

// desiredState computes, from the peer views and this host's own records,
// the networks this host must have and their peers: every network with an
// attached local endpoint, or only those in only when it is not nil (a
// light pass works on the networks that changed). peers holds, by network
// id, the endpoints of other hosts. It is pure so that the rules ("a host
// programs a network only while it has local endpoints of it", "peers are
// the endpoints of other hosts") are tested without a kernel.
//
// A local endpoint whose network is missing from the store keeps its network
// as recorded at attach time: losing the store must never break a running
// container.
//
// An address that cannot be a peer of its network (see peerError) is left
// out and listed in Dropped: the datapath refuses a peer list with one bad
// entry, so one bad record must not cost the network all of its peers.
func desiredState(peers map[string][]PeerAddr, locals map[string]*localEndpoint, localMTU int, only map[string]bool) map[string]*netPlan {
	plans := map[string]*netPlan{}
	for _, l := range locals {
		if l.Phase != phaseAttached || only != nil && !only[l.Net.ID] {
			continue
		}
		ns := l.Net.NamespaceName()
		p := plans[ns]
		if p == nil {
			mtu := l.MTU
			if mtu == 0 {
				mtu = networkMTU(&l.Net, localMTU)
			}
			p = &netPlan{Net: l.Net, Spec: networkSpec(&l.Net, mtu)}
			plans[ns] = p
		}
		p.Locals = append(p.Locals, l)
	}
	for _, p := range plans {
		slices.SortFunc(p.Locals, func(a, b *localEndpoint) int { return cmp.Compare(a.Endpoint.Name, b.Endpoint.Name) })
		localIPs := make(map[netip.Addr]bool, len(p.Locals))
		for _, l := range p.Locals {
			localIPs[l.Endpoint.IP] = true
		}
		for _, e := range peers[p.Net.ID] {
			if err := peerError(&p.Net, e.IP, localIPs); err != nil {
				p.Dropped = append(p.Dropped, fmt.Errorf("address %s of node %s: %w", e.IP, e.Node, err))
				continue
			}
			p.Peers = append(p.Peers, vtep.Peer{IP: e.IP, MAC: ipam.MACFromIP(e.IP), VTEP: e.VTEP})
		}
		slices.SortFunc(p.Peers, func(a, b vtep.Peer) int { return a.IP.Compare(b.IP) })
		slices.SortFunc(p.Dropped, func(a, b error) int { return cmp.Compare(a.Error(), b.Error()) })
	}
	return plans
}

// peerError says why an address of another host's endpoint cannot be
// programmed as a peer on network n, or returns nil: it must be one an
// endpoint of the subnet may have, and not the address of one of our own
// endpoints (its MAC, derived from the address, would then be sent to the
// other host's VTEP).
func peerError(n *Network, ip netip.Addr, localIPs map[netip.Addr]bool) error {
	if err := ipam.ValidateAddr(ipam.NetworkLease{Subnet: n.Subnet, Gateway: n.Gateway}, ip); err != nil {
		return err
	}
	if localIPs[ip] {
		return fmt.Errorf("ip %s is the address of an endpoint on this host", ip)
	}
	return nil
}

// networkSpec is what the kernel is to hold of a network on this host.
// br0 gets a MAC of its own, derived from the gateway address as the
// endpoints' are from theirs, so that it does not change as ports come
// and go.
func networkSpec(n *Network, mtu int) vtep.NetworkSpec {
	s := vtep.NetworkSpec{Name: n.NamespaceName(), VNI: n.VNI, Gateway: netip.PrefixFrom(n.Gateway, n.Subnet.Bits()), MTU: mtu}
	if n.Gateway.Is4() { // a record that says otherwise is refused by vtep, not a crash here
		s.BridgeMAC = net.HardwareAddr(ipam.MACFromIP(n.Gateway))
	}
	return s
}

func networkMTU(n *Network, localMTU int) int {
	if n.MTU != 0 {
		return n.MTU
	}
	return localMTU
}

// samePeers reports whether two peer lists, sorted as desiredState sorts
// them, are the same, so that event-driven passes can skip networks whose
// peers did not change.
func samePeers(a, b []vtep.Peer) bool {
	return slices.EqualFunc(a, b, func(x, y vtep.Peer) bool {
		return x.IP == y.IP && x.VTEP == y.VTEP && bytes.Equal(x.MAC, y.MAC)
	})
}
