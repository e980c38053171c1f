package overlay

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vxnet/vxnet/ipam"
	"github.com/vxnet/vxnet/vtep"
)

func testNet(name, id string, vni uint32, subnet string) Network {
	p := netip.MustParsePrefix(subnet)
	return Network{Version: 1, ID: id, Name: name, VNI: vni, Subnet: p, Gateway: p.Addr().Next()}
}

func testEP(net Network, name, node, ip, vtep string) *Endpoint {
	a := netip.MustParseAddr(ip)
	b := a.As4()
	return &Endpoint{Version: 1, ID: testID(node + "/" + name), Name: name, Network: net.Name, NetworkID: net.ID, Node: node,
		VTEP: netip.MustParseAddr(vtep), IP: a, MAC: HardwareAddr{2, 0x42, b[0], b[1], b[2], b[3]}}
}

// testPeers groups the endpoints of hosts other than node by network id,
// as the peer views give them to desiredState.
func testPeers(node string, eps map[string]*Endpoint) map[string][]PeerAddr {
	out := map[string][]PeerAddr{}
	for _, e := range eps {
		if e.Node != node {
			out[e.NetworkID] = append(out[e.NetworkID], PeerAddr{Node: e.Node, VTEP: e.VTEP, IP: e.IP})
		}
	}
	return out
}

// testID is an id of the form newID makes, stable for a given seed.
func testID(seed string) string {
	sum := sha256.Sum256([]byte(seed))
	return hex.EncodeToString(sum[:])
}

func TestDesiredState(t *testing.T) {
	n1 := testNet("n1", strings.Repeat("a", 64), 256, "10.0.0.0/24")
	n2 := testNet("n2", strings.Repeat("b", 64), 257, "10.0.1.0/24")
	local := &localEndpoint{Phase: phaseAttached, Endpoint: *testEP(n1, "c1", "me", "10.0.0.2", "192.168.0.1"), Net: n1}
	attaching := &localEndpoint{Phase: phaseAttaching, Endpoint: *testEP(n2, "x", "me", "10.0.1.9", "192.168.0.1"), Net: n2}
	eps := map[string]*Endpoint{
		"n1/c1": &local.Endpoint,
		"n1/c2": testEP(n1, "c2", "other", "10.0.0.3", "192.168.0.2"),
		"n1/c3": testEP(n1, "c3", "third", "10.0.0.4", "192.168.0.3"),
		"n2/d1": testEP(n2, "d1", "other", "10.0.1.2", "192.168.0.2"),
	}
	plans := desiredState(testPeers("me", eps), map[string]*localEndpoint{"n1/c1": local, "n2/x": attaching}, 1450, nil)

	if len(plans) != 1 {
		t.Fatalf("want only n1 (n2 has no attached local endpoint), got %d plans", len(plans))
	}
	p := plans["1-aaaaaaaaaa"]
	if p == nil {
		t.Fatalf("plan keyed by namespace name missing: %v", plans)
	}
	if p.Spec.VNI != 256 || p.Spec.Gateway.String() != "10.0.0.1/24" || p.Spec.MTU != 1450 {
		t.Errorf("spec: %+v", p.Spec)
	}
	if len(p.Peers) != 2 || p.Peers[0].IP.String() != "10.0.0.3" || p.Peers[1].VTEP.String() != "192.168.0.3" {
		t.Errorf("peers (own endpoint excluded, sorted by IP): %+v", p.Peers)
	}
	if len(p.Locals) != 1 {
		t.Errorf("locals: %d", len(p.Locals))
	}
}

func TestDesiredStateSurvivesMissingStoreRecord(t *testing.T) {
	n := testNet("n", strings.Repeat("c", 64), 300, "10.5.0.0/24")
	n.MTU = 1400
	l := &localEndpoint{Phase: phaseAttached, Endpoint: *testEP(n, "c", "me", "10.5.0.2", "192.168.0.1"), Net: n}
	plans := desiredState(nil, map[string]*localEndpoint{"n/c": l}, 1450, nil)
	p := plans["1-cccccccccc"]
	if p == nil || p.Spec.MTU != 1400 || len(p.Peers) != 0 {
		t.Fatalf("a local endpoint keeps its network without the store: %+v", p)
	}
}

func TestSamePeersSeesAMovedPeer(t *testing.T) {
	n := testNet("n", strings.Repeat("d", 64), 300, "10.5.0.0/24")
	eps := map[string]*Endpoint{"n/a": testEP(n, "a", "o", "10.5.0.2", "192.168.0.2")}
	l := &localEndpoint{Phase: phaseAttached, Endpoint: *testEP(n, "me", "me", "10.5.0.3", "192.168.0.1"), Net: n}
	locals := map[string]*localEndpoint{"n/me": l}
	p1 := desiredState(testPeers("me", eps), locals, 1450, nil)["1-dddddddddd"].Peers
	if !samePeers(p1, desiredState(testPeers("me", eps), locals, 1450, nil)["1-dddddddddd"].Peers) {
		t.Error("the same view must give the same peers")
	}
	eps["n/a"].VTEP = netip.MustParseAddr("192.168.0.9")
	if samePeers(p1, desiredState(testPeers("me", eps), locals, 1450, nil)["1-dddddddddd"].Peers) {
		t.Error("moving a peer to another host must count as a change")
	}
}

func TestDecodeRecordRejectsForeignValues(t *testing.T) {
	id := testID("n")
	for _, v := range []string{`not json`, `{}`, `{"version":2,"id":"` + id + `","name":"n"}`,
		`{"version":1,"id":"` + id + `","name":"n","vni":0,"subnet":"10.0.0.0/24","gateway":"10.0.0.1"}`,
		`{"version":1,"id":"` + id + `","name":"n","vni":5,"subnet":"10.0.0.0/24","gateway":"10.1.0.1"}`} {
		var n Network
		if err := decodeRecord("networks/n", []byte(v), &n); err == nil {
			t.Errorf("accepted %s", v)
		}
	}
	var n Network
	ok := `{"version":1,"id":"` + id + `","name":"n","vni":5,"subnet":"10.0.0.0/24","gateway":"10.0.0.1","created":"` + time.Now().Format(time.RFC3339) + `"}`
	if err := decodeRecord("networks/n", []byte(ok), &n); err != nil {
		t.Errorf("rejected a good record: %v", err)
	}
}

// A network id is cut into kernel object names: anything but what newID
// makes is refused, and the names never panic on what slips through.
func TestNetworkCheckRequiresFullHexID(t *testing.T) {
	good := testID("n")
	if len(good) != len(newID()) {
		t.Fatalf("test ids are %d characters, newID makes %d", len(good), len(newID()))
	}
	for _, id := range []string{"", "x", good[:10], good[:63], good + "0", strings.ToUpper(good), good[:63] + "g", good[:62] + " a"} {
		n := testNet("n", id, 256, "10.0.0.0/24")
		if err := n.check(); err == nil {
			t.Errorf("id %q accepted", id)
		}
		data, _ := json.Marshal(&n)
		if err := decodeRecord("networks/n", data, &n); err == nil {
			t.Errorf("decode: id %q accepted", id)
		}
		_ = n.NamespaceName() // must not panic
		e := testEP(n, "e", "h", "10.0.0.2", "192.168.0.1")
		e.ID = id
		if err := e.check(); err == nil {
			t.Errorf("endpoint id %q accepted", id)
		}
		_ = e.HostVeth()
	}
	n := testNet("n", good, 256, "10.0.0.0/24")
	if err := n.check(); err != nil {
		t.Errorf("good id refused: %v", err)
	}
	if got, want := n.NamespaceName(), "1-"+good[:10]; got != want {
		t.Errorf("NamespaceName %q, want %q", got, want)
	}
	if got := (&Network{ID: "x"}).NamespaceName(); got != "1-x" {
		t.Errorf("NamespaceName of a short id: %q", got)
	}
	if got := (&Endpoint{ID: "abc"}).HostVeth(); got != "vethabc" {
		t.Errorf("HostVeth of a short id: %q", got)
	}
}

// An endpoint record whose VTEP, MAC or address cannot be programmed is
// refused at decode time, whatever network it claims.
func TestEndpointCheckRefusesUnprogrammableRecords(t *testing.T) {
	n := testNet("n", testID("n"), 256, "10.0.0.0/24")
	if err := testEP(n, "e", "h", "10.0.0.2", "192.168.0.1").check(); err != nil {
		t.Fatalf("good endpoint refused: %v", err)
	}
	cases := map[string]func(e *Endpoint){
		"vtep 0.0.0.0":         func(e *Endpoint) { e.VTEP = netip.IPv4Unspecified() },
		"vtep multicast":       func(e *Endpoint) { e.VTEP = netip.MustParseAddr("239.1.1.1") },
		"vtep broadcast":       func(e *Endpoint) { e.VTEP = netip.MustParseAddr("255.255.255.255") },
		"vtep missing":         func(e *Endpoint) { e.VTEP = netip.Addr{} },
		"vtep ipv6":            func(e *Endpoint) { e.VTEP = netip.MustParseAddr("2001:db8::1") },
		"vtep 4in6":            func(e *Endpoint) { e.VTEP = netip.MustParseAddr("::ffff:192.168.0.1") },
		"ip 0.0.0.0":           func(e *Endpoint) { e.IP, e.MAC = netip.IPv4Unspecified(), HardwareAddr{2, 0x42, 0, 0, 0, 0} },
		"ip multicast":         func(e *Endpoint) { e.IP, e.MAC = netip.MustParseAddr("224.0.0.1"), HardwareAddr{2, 0x42, 224, 0, 0, 1} },
		"mac multicast":        func(e *Endpoint) { e.MAC = HardwareAddr{3, 0x42, 10, 0, 0, 2} },
		"mac zero":             func(e *Endpoint) { e.MAC = HardwareAddr{0, 0, 0, 0, 0, 0} },
		"mac short":            func(e *Endpoint) { e.MAC = HardwareAddr{2, 0x42, 10, 0, 0} },
		"mac not of the ip":    func(e *Endpoint) { e.MAC = HardwareAddr{2, 0x42, 10, 0, 0, 3} },
		"network id not hex":   func(e *Endpoint) { e.NetworkID = "n" },
		"version":              func(e *Endpoint) { e.Version = 2 },
		"no node":              func(e *Endpoint) { e.Node = "" },
		"mac of another range": func(e *Endpoint) { e.MAC = HardwareAddr{2, 0x43, 10, 0, 0, 2} },
	}
	for what, spoil := range cases {
		e := testEP(n, "e", "h", "10.0.0.2", "192.168.0.1")
		spoil(e)
		if err := e.check(); err == nil {
			t.Errorf("%s: accepted %+v", what, e)
		}
		data, _ := json.Marshal(e)
		var d Endpoint
		if err := decodeRecord("endpoints/n/e", data, &d); err == nil {
			t.Errorf("%s: decoded %s", what, data)
		}
	}
}

// One bad address costs only itself: the other peers of its network are
// still programmed, and the bad ones are listed with the reason. A record
// that cannot be programmed at all is refused when decoded.
func TestDesiredStateDropsBadPeersOnly(t *testing.T) {
	n := testNet("n", testID("n"), 256, "10.0.0.0/24")
	l := &localEndpoint{Phase: phaseAttached, Endpoint: *testEP(n, "me", "me", "10.0.0.2", "192.168.0.1"), Net: n}
	good := []string{"10.0.0.3", "10.0.0.4", "10.0.0.5"}
	bad := []string{"10.9.0.7", n.Gateway.String(), "10.0.0.0", "10.0.0.255", l.Endpoint.IP.String()}
	var addrs []PeerAddr
	for _, ip := range append(slices.Clone(good), bad...) {
		addrs = append(addrs, PeerAddr{Node: "h2", VTEP: netip.MustParseAddr("192.168.0.2"), IP: netip.MustParseAddr(ip)})
	}
	// Another network's peers are no concern of this one.
	peers := map[string][]PeerAddr{n.ID: addrs, testID("o"): {{Node: "h2", VTEP: netip.MustParseAddr("192.168.0.2"), IP: netip.MustParseAddr("10.9.0.7")}}}
	p := desiredState(peers, map[string]*localEndpoint{"n/me": l}, 1450, nil)[n.NamespaceName()]
	if p == nil {
		t.Fatal("no plan for the network")
	}
	var got []string
	for _, peer := range p.Peers {
		got = append(got, peer.IP.String())
		if !slices.Equal(peer.MAC, ipam.MACFromIP(peer.IP)) {
			t.Errorf("peer %s has mac %s", peer.IP, peer.MAC)
		}
	}
	if !slices.Equal(got, good) {
		t.Errorf("peers %v, want the good ones %v", got, good)
	}
	if len(p.Dropped) != len(bad) {
		t.Errorf("dropped %d, want %d: %v", len(p.Dropped), len(bad), p.Dropped)
	}
	for _, ip := range bad {
		if !slices.ContainsFunc(p.Dropped, func(err error) bool { return strings.Contains(err.Error(), "address "+ip+" ") }) {
			t.Errorf("%s not reported in %v", ip, p.Dropped)
		}
	}
	for name, v := range map[string]string{
		"vtep0":   `{"version":1,"node":"h","vtep":"0.0.0.0","ips":""}`,
		"mcast":   `{"version":1,"node":"h","vtep":"239.1.1.1","ips":""}`,
		"torn":    `{"version":1,"node":"h","vtep":"192.168.0.2","ips":"CgAA"}`,
		"version": `{"version":2,"node":"h","vtep":"192.168.0.2","ips":""}`,
		"nonode":  `{"version":1,"vtep":"192.168.0.2","ips":""}`,
	} {
		var r PeerRecord
		if err := decodeRecord("peers/x/h", []byte(v), &r); err == nil {
			t.Errorf("%s: record accepted: %s", name, v)
		}
	}
}

// A peer record holds 4 bytes an address, sorted and without duplicates,
// so that the same set always makes the same value.
func TestPeerRecordPacking(t *testing.T) {
	ips := []netip.Addr{netip.MustParseAddr("10.0.0.9"), netip.MustParseAddr("10.0.0.3"), netip.MustParseAddr("10.0.0.9")}
	b := packAddrs(ips)
	if len(b) != 8 {
		t.Fatalf("packed %d bytes", len(b))
	}
	r := PeerRecord{Version: 1, Node: "h", VTEP: netip.MustParseAddr("192.168.0.2"), IPs: b}
	data, _ := json.Marshal(&r)
	var back PeerRecord
	if err := decodeRecord("peers/x/h", data, &back); err != nil {
		t.Fatal(err)
	}
	if got := back.Addrs(); len(got) != 2 || got[0].String() != "10.0.0.3" || got[1].String() != "10.0.0.9" {
		t.Errorf("addresses %v", got)
	}
	// 50 endpoints: what one host's record costs its watchers.
	var many []netip.Addr
	for i := range 50 {
		many = append(many, netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 2)}))
	}
	data, _ = json.Marshal(&PeerRecord{Version: 1, Node: "host12", VTEP: netip.MustParseAddr("192.168.77.12"), IPs: packAddrs(many)})
	if per := float64(len(data)) / 50; per > 8 {
		t.Errorf("%d bytes for 50 endpoints: %.1f an endpoint", len(data), per)
	}
}

func TestValidateName(t *testing.T) {
	for _, ok := range []string{"a", "net1", "my_net.2-x", strings.Repeat("x", 64)} {
		if err := ValidateName("network", ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-a", ".a", "a/b", "a b", "ü", strings.Repeat("x", 65)} {
		if err := ValidateName("network", bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestSanitizeNetnsName(t *testing.T) {
	cases := map[string]string{"/var/run/netns/c1": "c1", "/proc/123/ns/net": "net", "/x/..weird name": "weirdname"}
	for in, want := range cases {
		if got := sanitizeNetnsName(in); got != want {
			t.Errorf("%s: %q, want %q", in, got, want)
		}
	}
}

// FuzzDecodeEndpoint: a record that decodes is usable all the way: its
// names do not panic, and as a peer it is either programmed in a form the
// datapath accepts or dropped, never fatal for the others.
func FuzzDecodeEndpoint(f *testing.F) {
	id, nid := testID("a"), testID("n")
	f.Add([]byte(`{"version":1,"id":"` + id + `","name":"a","network":"n","network_id":"` + nid + `","node":"h","ip":"10.0.0.2","vtep":"1.2.3.4","mac":"02:42:0a:00:00:02"}`))
	f.Add([]byte(`{"version":1,"id":"` + id + `","name":"a","network":"n","network_id":"` + nid + `","node":"h","ip":"10.7.0.2","vtep":"1.2.3.4","mac":"02:42:0a:07:00:02"}`))
	f.Add([]byte(`{"version":1,"id":"x","name":"a","network":"n","network_id":"y","node":"h","ip":"10.0.0.2","vtep":"0.0.0.0","mac":"02:42:0a:00:00:02"}`))
	f.Add([]byte(`{"version":1,"mac":"zz"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var e Endpoint
		if decodeRecord("endpoints/n/a", data, &e) != nil {
			return
		}
		if !e.IP.Is4() || len(e.MAC) != 6 || e.Name == "" || !validID(e.ID) {
			t.Fatalf("accepted an unusable endpoint: %+v", e)
		}
		if v := e.HostVeth(); len(v) != len("veth")+7 {
			t.Fatalf("host veth %q", v)
		}
		// A network of this host with the id the record claims, and one
		// good peer next to it.
		n := testNet("n", e.NetworkID, 256, "10.0.0.0/24")
		l := &localEndpoint{Phase: phaseAttached, Endpoint: *testEP(n, "me", "me", "10.0.0.200", "192.168.0.1"), Net: n}
		good := testEP(n, "good", "other", "10.0.0.201", "192.168.0.2")
		eps := map[string]*Endpoint{"n/me": &l.Endpoint, "n/good": good, "n/a": &e}
		p := desiredState(testPeers("me", eps), map[string]*localEndpoint{"n/me": l}, 1450, nil)[n.NamespaceName()]
		want := 2 // the good peer and the record, as peer or dropped
		if e.Node == "me" {
			want = 1 // our own endpoint is no peer
		}
		if p == nil || len(p.Peers)+len(p.Dropped) != want {
			t.Fatalf("plan %+v", p)
		}
		if !slices.ContainsFunc(p.Peers, func(peer vtep.Peer) bool { return peer.IP == good.IP }) {
			t.Fatalf("the good peer was lost next to %+v: %+v", e, p)
		}
		for _, peer := range p.Peers {
			if len(peer.MAC) != 6 || peer.MAC[0]&1 != 0 || !peer.VTEP.Is4() || peer.VTEP.IsUnspecified() || !n.Subnet.Contains(peer.IP) {
				t.Fatalf("unprogrammable peer %+v from %s", peer, data)
			}
		}
	})
}

// FuzzDecodePeerRecord: a peer record that decodes gives addresses the
// datapath takes or drops one by one, never a fatal one.
func FuzzDecodePeerRecord(f *testing.F) {
	f.Add([]byte(`{"version":1,"node":"h","vtep":"192.168.0.2","ips":"CgAAAwoAAAQ="}`))
	f.Add([]byte(`{"version":1,"node":"h","vtep":"0.0.0.0","ips":"CgAAAw=="}`))
	f.Add([]byte(`{"version":1,"node":"h","vtep":"192.168.0.2","ips":"CgAA"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var r PeerRecord
		if decodeRecord("peers/x/h", data, &r) != nil {
			return
		}
		if !IsUnicastIPv4(r.VTEP) || len(r.IPs)%4 != 0 {
			t.Fatalf("accepted an unusable record: %+v", r)
		}
		n := testNet("n", testID("n"), 256, "10.0.0.0/24")
		l := &localEndpoint{Phase: phaseAttached, Endpoint: *testEP(n, "me", "me", "10.0.0.200", "192.168.0.1"), Net: n}
		var addrs []PeerAddr
		for _, ip := range r.Addrs() {
			addrs = append(addrs, PeerAddr{Node: r.Node, VTEP: r.VTEP, IP: ip})
		}
		p := desiredState(map[string][]PeerAddr{n.ID: addrs}, map[string]*localEndpoint{"n/me": l}, 1450, nil)[n.NamespaceName()]
		if p == nil || len(p.Peers)+len(p.Dropped) != len(addrs) {
			t.Fatalf("plan %+v for %d addresses", p, len(addrs))
		}
		for _, peer := range p.Peers {
			if len(peer.MAC) != 6 || peer.MAC[0]&1 != 0 || !n.Subnet.Contains(peer.IP) {
				t.Fatalf("unprogrammable peer %+v from %s", peer, data)
			}
		}
	})
}

// FuzzDecodeNetwork: a network record that decodes can be given a
// namespace name and planned with endpoints on it, without a panic.
func FuzzDecodeNetwork(f *testing.F) {
	id := testID("n")
	f.Add([]byte(`{"version":1,"id":"` + id + `","name":"n","vni":256,"subnet":"10.0.0.0/24","gateway":"10.0.0.1","mtu":1400}`))
	f.Add([]byte(`{"version":1,"id":"` + id + `","name":"n","vni":5,"subnet":"10.0.0.7/32","gateway":"10.0.0.7"}`))
	f.Add([]byte(`{"version":1,"id":"` + id + `","name":"n","vni":5,"subnet":"2001:db8::/64","gateway":"2001:db8::1"}`))
	f.Add([]byte(`{"version":1,"id":"x","name":"n","vni":5,"subnet":"10.0.0.0/24","gateway":"10.0.0.1"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var n Network
		if decodeRecord("networks/n", data, &n) != nil {
			return
		}
		if ns := n.NamespaceName(); len(ns) != len("1-")+10 {
			t.Fatalf("namespace name %q", ns)
		}
		// Endpoints at the gateway and the next addresses: in the subnet
		// or not, depending on its size and family.
		ip := n.Gateway
		if !ip.Is4() {
			ip = netip.MustParseAddr("10.0.0.2")
		}
		near := ip.Next()
		if !near.IsValid() {
			near = ip.Prev()
		}
		l := &localEndpoint{Phase: phaseAttached, Endpoint: *testEP(n, "me", "me", near.String(), "192.168.0.1"), Net: n}
		eps := map[string]*Endpoint{"n/me": &l.Endpoint}
		for i, a := 0, ip; i < 4 && a.IsValid(); i, a = i+1, a.Next() {
			e := testEP(n, fmt.Sprint("p", i), "other", a.String(), "192.168.0.2")
			eps["n/"+e.Name] = e
		}
		p := desiredState(testPeers("me", eps), map[string]*localEndpoint{"n/me": l}, 1450, nil)[n.NamespaceName()]
		if p == nil {
			t.Fatal("no plan for a network with a local endpoint")
		}
		if len(p.Peers)+len(p.Dropped) != len(eps)-1 {
			t.Fatalf("%d peers + %d dropped of %d records", len(p.Peers), len(p.Dropped), len(eps)-1)
		}
		for _, peer := range p.Peers {
			if !n.Subnet.Contains(peer.IP) || peer.IP == n.Gateway {
				t.Fatalf("peer %s on %s (gateway %s)", peer.IP, n.Subnet, n.Gateway)
			}
		}
	})
}

func BenchmarkDesiredState(b *testing.B) {
	// 20 hosts x 50 endpoints on one network, 50 of them local.
	n := testNet("n", strings.Repeat("e", 64), 256, "10.0.0.0/20")
	eps := map[string]*Endpoint{}
	locals := map[string]*localEndpoint{}
	for h := range 20 {
		for i := range 50 {
			ip := netip.AddrFrom4([4]byte{10, 0, byte(h), byte(i + 2)})
			e := testEP(n, fmt.Sprintf("e%d-%d", h, i), fmt.Sprint("h", h), ip.String(), fmt.Sprintf("192.168.0.%d", h+1))
			eps[n.Name+"/"+e.Name] = e
			if h == 0 {
				locals[n.Name+"/"+e.Name] = &localEndpoint{Phase: phaseAttached, Endpoint: *e, Net: n}
			}
		}
	}
	peers := testPeers("h0", eps)
	b.ReportAllocs()
	for b.Loop() {
		p := desiredState(peers, locals, 1450, nil)
		samePeers(p["1-eeeeeeeeee"].Peers, p["1-eeeeeeeeee"].Peers)
	}
}

func BenchmarkDecodeEndpoint(b *testing.B) {
	n := testNet("n", strings.Repeat("f", 64), 256, "10.0.0.0/24")
	data, _ := json.Marshal(testEP(n, "web", "h1", "10.0.0.2", "192.168.0.1"))
	b.ReportAllocs()
	for b.Loop() {
		var e Endpoint
		if err := decodeRecord("endpoints/n/web", data, &e); err != nil {
			b.Fatal(err)
		}
	}
}
