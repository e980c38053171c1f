package overlay

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/vxnet/vxnet/dnsserver"
)

// A host's endpoints on one network, as every other host with endpoints
// there needs them: its VTEP and their addresses (the MAC derives from the
// address). One record per (network, host), written by that host alone and
// bound to its session, so that a change costs the watchers of one network
// a record of a few bytes per endpoint instead of every endpoint record of
// the cluster.
//
//	peers/<network-id>/<node>   PeerRecord
const peersPrefix = "peers/"

func peerKey(networkID, node string) string { return peersPrefix + networkID + "/" + node }
func peersOf(networkID string) string       { return peersPrefix + networkID + "/" }

// PeerRecord is the stored peer record.
type PeerRecord struct {
	Version int        `json:"version"`
	Node    string     `json:"node"`
	VTEP    netip.Addr `json:"vtep"`
	// IPs are the endpoints' IPv4 addresses, 4 bytes each, sorted (in
	// JSON: base64, 5.3 bytes an endpoint).
	IPs []byte `json:"ips"`
	// Names are the endpoints' DNS names, one string per address in the
	// order of IPs, its names separated by spaces (the endpoint's name,
	// then its aliases). They make the record about four times larger,
	// but spare every host a watch of the endpoint records: the peers'
	// names come with their addresses. Records written before names
	// have none.
	Names []string `json:"names,omitempty"`
}

func (r *PeerRecord) check() error {
	switch {
	case r.Version != recordVersion:
		return fmt.Errorf("unsupported record version %d", r.Version)
	case r.Node == "":
		return errors.New("missing node")
	case !IsUnicastIPv4(r.VTEP):
		return fmt.Errorf("vtep %s is not a unicast IPv4 address", r.VTEP)
	case len(r.IPs)%4 != 0:
		return fmt.Errorf("addresses: %d bytes, not a multiple of 4", len(r.IPs))
	}
	// A names list that does not match the addresses is ignored
	// (Entries), not a reason to drop the host's peers.
	return nil
}

// Entries are the record's addresses with their names.
func (r *PeerRecord) Entries() []dnsserver.Entry {
	ips := r.Addrs()
	out := make([]dnsserver.Entry, 0, len(ips))
	named := len(r.Names) == len(ips)
	for i, ip := range ips {
		e := dnsserver.Entry{IP: ip}
		if named {
			e.Names = strings.Fields(r.Names[i])
		}
		out = append(out, e)
	}
	return out
}

// Addrs decodes the addresses.
func (r *PeerRecord) Addrs() []netip.Addr {
	out := make([]netip.Addr, 0, len(r.IPs)/4)
	for i := 0; i+4 <= len(r.IPs); i += 4 {
		out = append(out, netip.AddrFrom4([4]byte(r.IPs[i:i+4])))
	}
	return out
}

// packAddrs encodes addresses for a PeerRecord: sorted, without
// duplicates, so that the same set always makes the same value and an
// unchanged set is never written again.
func packAddrs(ips []netip.Addr) []byte {
	s := slices.Clone(ips)
	slices.SortFunc(s, netip.Addr.Compare)
	s = slices.Compact(s)
	out := make([]byte, 0, 4*len(s))
	for _, ip := range s {
		b := ip.As4()
		out = append(out, b[:]...)
	}
	return out
}
