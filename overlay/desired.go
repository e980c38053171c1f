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

// desiredState computes, from the store's view and this host's own records,
// every network this host must have and its peers. It is pure so that the
// rules ("a host programs a network only while it has local endpoints of
// it", "peers are the endpoints of other hosts") are tested without a kernel.
//
// A local endpoint whose network is missing from the store keeps its network
// as recorded at attach time: losing the store must never break a running
// container.
//
// An endpoint of another host that cannot be a peer of its network (see
// peerError) is left out and listed in Dropped: the datapath refuses a peer
// list with one bad entry, so one bad record must not cost the network all
// of its peers.
func desiredState(node string, endpoints map[string]*Endpoint, locals map[string]*localEndpoint, localMTU int) map[string]*netPlan {
	plans := map[string]*netPlan{}
	for _, l := range locals {
		if l.Phase != phaseAttached {
			continue
		}
		ns := l.Net.NamespaceName()
		p := plans[ns]
		if p == nil {
			mtu := l.MTU
			if mtu == 0 {
				mtu = networkMTU(&l.Net, localMTU)
			}
			p = &netPlan{
				Net: l.Net,
				Spec: vtep.NetworkSpec{
					Name:    ns,
					VNI:     l.Net.VNI,
					Gateway: netip.PrefixFrom(l.Net.Gateway, l.Net.Subnet.Bits()),
					MTU:     mtu,
				},
			}
			plans[ns] = p
		}
		p.Locals = append(p.Locals, l)
	}
	byID := map[string]*netPlan{}
	for _, p := range plans {
		byID[p.Net.ID] = p
		slices.SortFunc(p.Locals, func(a, b *localEndpoint) int { return cmp.Compare(a.Endpoint.Name, b.Endpoint.Name) })
	}
	localIPs := map[*netPlan]map[netip.Addr]bool{}
	for _, p := range byID {
		ips := make(map[netip.Addr]bool, len(p.Locals))
		for _, l := range p.Locals {
			ips[l.Endpoint.IP] = true
		}
		localIPs[p] = ips
	}
	for _, e := range endpoints {
		if e.Node == node {
			continue
		}
		p := byID[e.NetworkID]
		if p == nil {
			continue
		}
		if err := peerError(&p.Net, e, localIPs[p]); err != nil {
			p.Dropped = append(p.Dropped, fmt.Errorf("endpoint %s/%s of node %s: %w", e.Network, e.Name, e.Node, err))
			continue
		}
		p.Peers = append(p.Peers, vtep.Peer{IP: e.IP, MAC: net.HardwareAddr(e.MAC), VTEP: e.VTEP})
	}
	for _, p := range plans {
		slices.SortFunc(p.Peers, func(a, b vtep.Peer) int { return a.IP.Compare(b.IP) })
		slices.SortFunc(p.Dropped, func(a, b error) int { return cmp.Compare(a.Error(), b.Error()) })
	}
	return plans
}

// peerError says why an endpoint of another host cannot be programmed as a
// peer on network n, or returns nil. The record itself passed check() when
// it was decoded; what needs the network or this host is checked here: the
// address must be one an endpoint of the subnet may have, and not the
// address of one of our own endpoints (its MAC, derived from the address,
// would then be sent to the other host's VTEP).
func peerError(n *Network, e *Endpoint, localIPs map[netip.Addr]bool) error {
	if err := ipam.ValidateAddr(ipam.NetworkLease{Subnet: n.Subnet, Gateway: n.Gateway}, e.IP); err != nil {
		return err
	}
	if localIPs[e.IP] {
		return fmt.Errorf("ip %s is the address of an endpoint on this host", e.IP)
	}
	return nil
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
