package dnsserver

import (
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/miekg/dns"
)

// fakeWriter is the query's client, over UDP.
type fakeWriter struct{ dns.ResponseWriter }

func (fakeWriter) RemoteAddr() net.Addr { return &net.UDPAddr{IP: net.IPv4(10, 1, 0, 9), Port: 5353} }

// What a network's server answers from its zone, and what it never
// forwards: no kernel, no sockets.
func TestAnswers(t *testing.T) {
	z := NewZone()
	z.SetNode("h1", []Entry{{IP: netip.MustParseAddr("10.1.0.2"), Names: []string{"web", "www"}}})
	z.SetNode("h2", []Entry{{IP: netip.MustParseAddr("10.1.0.3"), Names: []string{"db"}}, {IP: netip.MustParseAddr("10.1.0.4"), Names: []string{"api.v1"}}})
	m := NewManager(Config{Forward: false, IsNetwork: func(n string) bool { return n == "net1" || n == "net2" || n == "prod.eu" },
		IsOverlayAddr: func(ip netip.Addr) bool { return netip.MustParsePrefix("10.0.0.0/8").Contains(ip) }})
	s := &server{spec: Spec{Network: "net1", Subnet: netip.MustParsePrefix("10.1.0.0/24"), Zone: z},
		sem: make(chan struct{}, 1), fwd: make(chan struct{}, 1)}
	q := new(dns.Msg)
	q.SetQuestion("nope.", dns.TypeA)
	if out := m.answer(s, fakeWriter{}, q); out.Rcode != dns.RcodeServerFailure {
		t.Errorf("a name not found before the other hosts' are known: %s, want SERVFAIL", dns.RcodeToString[out.Rcode])
	}
	z.SetComplete()
	ask := func(name string, qtype uint16) (int, []string) {
		t.Helper()
		q := new(dns.Msg)
		q.SetQuestion(name, qtype)
		out := m.answer(s, fakeWriter{}, q)
		var got []string
		for _, rr := range out.Answer {
			switch v := rr.(type) {
			case *dns.A:
				got = append(got, v.A.String())
			case *dns.PTR:
				got = append(got, v.Ptr)
			}
		}
		return out.Rcode, got
	}
	for _, c := range []struct {
		name  string
		qtype uint16
		rcode int
		want  []string
	}{
		{"web.", dns.TypeA, dns.RcodeSuccess, []string{"10.1.0.2"}},
		{"WWW.net1.", dns.TypeA, dns.RcodeSuccess, []string{"10.1.0.2"}},
		{"db.net1.", dns.TypeA, dns.RcodeSuccess, []string{"10.1.0.3"}},
		{"db.net1.", dns.TypeAAAA, dns.RcodeSuccess, nil},
		{"nope.", dns.TypeA, dns.RcodeNameError, nil},
		{"nope.net1.", dns.TypeA, dns.RcodeNameError, nil},
		{"db.net2.", dns.TypeA, dns.RcodeNameError, nil},   // another network's: never forwarded
		{"a.db.net1.", dns.TypeA, dns.RcodeNameError, nil}, // deeper in this one
		{"2.0.1.10.in-addr.arpa.", dns.TypePTR, dns.RcodeSuccess, []string{"web.net1.", "www.net1."}},
		{"9.0.1.10.in-addr.arpa.", dns.TypePTR, dns.RcodeNameError, nil},
		{"example.com.", dns.TypeA, dns.RcodeRefused, nil},                  // forwarding off
		{"api.v1.", dns.TypeA, dns.RcodeSuccess, []string{"10.1.0.4"}},      // a name with a dot
		{"api.v1.net1.", dns.TypeA, dns.RcodeSuccess, []string{"10.1.0.4"}}, // and its network
		{"x.prod.eu.", dns.TypeA, dns.RcodeNameError, nil},                  // a network with a dot
		{"9.0.2.10.in-addr.arpa.", dns.TypePTR, dns.RcodeNameError, nil},    // another overlay's subnet
	} {
		rcode, got := ask(c.name, c.qtype)
		if rcode != c.rcode || !slices.Equal(got, c.want) {
			t.Errorf("%s %s: %s %v, want %s %v", c.name, dns.TypeToString[c.qtype], dns.RcodeToString[rcode], got, dns.RcodeToString[c.rcode], c.want)
		}
	}
	// A host's record written again without one of its names.
	z.SetNode("h1", []Entry{{IP: netip.MustParseAddr("10.1.0.2"), Names: []string{"web"}}})
	if rcode, _ := ask("www.", dns.TypeA); rcode != dns.RcodeNameError {
		t.Errorf("a removed alias: %s", dns.RcodeToString[rcode])
	}
	z.SetNode("h2", nil)
	if rcode, _ := ask("db.", dns.TypeA); rcode != dns.RcodeNameError || z.Len() != 1 {
		t.Errorf("a gone host's name: %s, %d names left", dns.RcodeToString[rcode], z.Len())
	}
}

// captureWriter keeps what serve writes.
type captureWriter struct {
	fakeWriter
	out *dns.Msg
}

func (c *captureWriter) WriteMsg(m *dns.Msg) error { c.out = m; return nil }

// A UDP answer larger than the client takes is truncated, so that it
// asks again over TCP: 512 bytes without EDNS0, its size with.
func TestTruncatedOverUDP(t *testing.T) {
	z := NewZone()
	var es []Entry
	for i := range 60 {
		es = append(es, Entry{IP: netip.AddrFrom4([4]byte{10, 1, 0, byte(10 + i)}), Names: []string{"many"}})
	}
	z.SetNode("h1", es)
	z.SetComplete()
	m := NewManager(Config{})
	s := &server{spec: Spec{Network: "net1", Subnet: netip.MustParsePrefix("10.1.0.0/24"), Zone: z},
		sem: make(chan struct{}, 1), fwd: make(chan struct{}, 1)}
	for _, edns := range []uint16{0, 4096} {
		q := new(dns.Msg)
		q.SetQuestion("many.net1.", dns.TypeA)
		if edns > 0 {
			q.SetEdns0(edns, false)
		}
		w := &captureWriter{}
		m.serve(s, w, q)
		packed, err := w.out.Pack()
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case edns == 0 && (!w.out.Truncated || len(packed) > dns.MinMsgSize):
			t.Errorf("without EDNS0: %d bytes, truncated %v", len(packed), w.out.Truncated)
		case edns > 0 && (w.out.Truncated || len(w.out.Answer) != 60 || w.out.IsEdns0() == nil):
			t.Errorf("with EDNS0 %d: %d answers, truncated %v, opt %v", edns, len(w.out.Answer), w.out.Truncated, w.out.IsEdns0())
		}
	}
}
