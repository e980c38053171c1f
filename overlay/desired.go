package overlay

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"net"
	"net/netip"
	"slices"

	"github.com/vxnet/vxnet/vtep"
)

// netPlan is what one network should look like on this host.
type netPlan struct {
	Spec   vtep.NetworkSpec
	Net    Network
	Locals []*localEndpoint
	Peers  []vtep.Peer
}

// desiredState computes, from the store's view and this host's own records,
// every network this host must have and its peers. It is pure so that the
// rules ("a host programs a network only while it has local endpoints of
// it", "peers are the endpoints of other hosts") are tested without a kernel.
//
// A local endpoint whose network is missing from the store keeps its network
// as recorded at attach time: losing the store must never break a running
// container.
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
	for _, e := range endpoints {
		if e.Node == node {
			continue
		}
		if p := byID[e.NetworkID]; p != nil {
			p.Peers = append(p.Peers, vtep.Peer{IP: e.IP, MAC: net.HardwareAddr(e.MAC), VTEP: e.VTEP})
		}
	}
	for _, p := range plans {
		slices.SortFunc(p.Peers, func(a, b vtep.Peer) int { return a.IP.Compare(b.IP) })
	}
	return plans
}

func networkMTU(n *Network, localMTU int) int {
	if n.MTU != 0 {
		return n.MTU
	}
	return localMTU
}

// peersHash identifies a peer set so that event-driven passes can skip
// networks whose peers did not change; periodic passes ignore it.
func peersHash(peers []vtep.Peer) string {
	h := sha256.New()
	for _, p := range peers {
		h.Write(p.IP.AsSlice())
		h.Write(p.MAC)
		h.Write(p.VTEP.AsSlice())
	}
	return hex.EncodeToString(h.Sum(nil))
}
