package overlay

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func testNet(name, id string, vni uint32, subnet string) Network {
	p := netip.MustParsePrefix(subnet)
	return Network{Version: 1, ID: id, Name: name, VNI: vni, Subnet: p, Gateway: p.Addr().Next()}
}

func testEP(net Network, name, node, ip, vtep string) *Endpoint {
	a := netip.MustParseAddr(ip)
	b := a.As4()
	return &Endpoint{Version: 1, ID: strings.Repeat(name[:1], 64), Name: name, Network: net.Name, NetworkID: net.ID, Node: node,
		VTEP: netip.MustParseAddr(vtep), IP: a, MAC: HardwareAddr{2, 0x42, b[0], b[1], b[2], b[3]}}
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
	plans := desiredState("me", eps, map[string]*localEndpoint{"n1/c1": local, "n2/x": attaching}, 1450)

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
	plans := desiredState("me", nil, map[string]*localEndpoint{"n/c": l}, 1450)
	p := plans["1-cccccccccc"]
	if p == nil || p.Spec.MTU != 1400 || len(p.Peers) != 0 {
		t.Fatalf("a local endpoint keeps its network without the store: %+v", p)
	}
}

func TestPeersHashChangesWithPeers(t *testing.T) {
	n := testNet("n", strings.Repeat("d", 64), 300, "10.5.0.0/24")
	eps := map[string]*Endpoint{"n/a": testEP(n, "a", "o", "10.5.0.2", "192.168.0.2")}
	l := &localEndpoint{Phase: phaseAttached, Endpoint: *testEP(n, "me", "me", "10.5.0.3", "192.168.0.1"), Net: n}
	locals := map[string]*localEndpoint{"n/me": l}
	h1 := peersHash(desiredState("me", eps, locals, 1450)["1-dddddddddd"].Peers)
	eps["n/a"].VTEP = netip.MustParseAddr("192.168.0.9")
	h2 := peersHash(desiredState("me", eps, locals, 1450)["1-dddddddddd"].Peers)
	if h1 == h2 {
		t.Error("moving a peer to another host must change the hash")
	}
}

func TestDecodeRecordRejectsForeignValues(t *testing.T) {
	for _, v := range []string{`not json`, `{}`, `{"version":2,"id":"x","name":"n"}`,
		`{"version":1,"id":"x","name":"n","vni":0,"subnet":"10.0.0.0/24","gateway":"10.0.0.1"}`,
		`{"version":1,"id":"x","name":"n","vni":5,"subnet":"10.0.0.0/24","gateway":"10.1.0.1"}`} {
		var n Network
		if err := decodeRecord("networks/n", []byte(v), &n); err == nil {
			t.Errorf("accepted %s", v)
		}
	}
	var n Network
	ok := `{"version":1,"id":"x","name":"n","vni":5,"subnet":"10.0.0.0/24","gateway":"10.0.0.1","created":"` + time.Now().Format(time.RFC3339) + `"}`
	if err := decodeRecord("networks/n", []byte(ok), &n); err != nil {
		t.Errorf("rejected a good record: %v", err)
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

func FuzzDecodeEndpoint(f *testing.F) {
	f.Add([]byte(`{"version":1,"name":"a","network":"n","node":"h","ip":"10.0.0.2","vtep":"1.2.3.4","mac":"02:42:0a:00:00:02"}`))
	f.Add([]byte(`{"version":1,"mac":"zz"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var e Endpoint
		if decodeRecord("endpoints/n/a", data, &e) == nil {
			if !e.IP.Is4() || len(e.MAC) != 6 || e.Name == "" {
				t.Fatalf("accepted an unusable endpoint: %+v", e)
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
	b.ReportAllocs()
	for b.Loop() {
		p := desiredState("h0", eps, locals, 1450)
		peersHash(p["1-eeeeeeeeee"].Peers)
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
