package vtep

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"testing"
)

func peer(i int, host byte) Peer {
	ip := netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})
	b := ip.As4()
	return Peer{IP: ip, MAC: net.HardwareAddr{2, 0x42, b[0], b[1], b[2], b[3]}, VTEP: netip.AddrFrom4([4]byte{192, 168, 0, host})}
}

func TestPlanPeers(t *testing.T) {
	a, b, c := peer(2, 1), peer(3, 1), peer(4, 2)
	haveNeigh := map[netip.Addr]net.HardwareAddr{a.IP: a.MAC, b.IP: net.HardwareAddr{2, 0x42, 9, 9, 9, 9}, netip.MustParseAddr("10.0.0.99"): c.MAC}
	haveFDB := map[string]netip.Addr{a.MAC.String(): a.VTEP, b.MAC.String(): netip.MustParseAddr("192.168.0.7"), "02:42:0a:00:00:63": c.VTEP}
	p := PlanPeers([]Peer{a, b, c}, haveNeigh, haveFDB)
	if len(p.AddNeigh) != 2 || p.AddNeigh[0].IP != b.IP || p.AddNeigh[1].IP != c.IP {
		t.Errorf("AddNeigh (wrong MAC rewritten, missing added): %+v", p.AddNeigh)
	}
	if len(p.AddFDB) != 2 || p.AddFDB[0].IP != b.IP || p.AddFDB[1].IP != c.IP {
		t.Errorf("AddFDB (moved VTEP rewritten, missing added): %+v", p.AddFDB)
	}
	if len(p.DelNeigh) != 1 || p.DelNeigh[0].String() != "10.0.0.99" {
		t.Errorf("DelNeigh: %v", p.DelNeigh)
	}
	if len(p.DelFDB) != 1 || p.DelFDB[0].String() != "02:42:0a:00:00:63" {
		t.Errorf("DelFDB: %v", p.DelFDB)
	}
	if !PlanPeers(nil, nil, nil).Empty() {
		t.Error("empty plan not empty")
	}
	full := PlanPeers([]Peer{a}, map[netip.Addr]net.HardwareAddr{a.IP: a.MAC}, map[string]netip.Addr{a.MAC.String(): a.VTEP})
	if !full.Empty() {
		t.Errorf("in-sync plan: %+v", full)
	}
}

func BenchmarkPlanPeers(b *testing.B) {
	for _, n := range []int{100, 1000, 10000} {
		b.Run(fmt.Sprintf("peers=%d", n), func(b *testing.B) {
			want := make([]Peer, n)
			haveNeigh := map[netip.Addr]net.HardwareAddr{}
			haveFDB := map[string]netip.Addr{}
			for i := range want {
				want[i] = peer(i+2, byte(i%20))
				if i%10 != 0 { // 10% changed
					haveNeigh[want[i].IP] = want[i].MAC
					haveFDB[want[i].MAC.String()] = want[i].VTEP
				}
			}
			b.ReportAllocs()
			for b.Loop() {
				PlanPeers(want, haveNeigh, haveFDB)
			}
		})
	}
}

// apply does to the maps what SyncPeers does to the kernel.
func apply(p PeerPlan, neigh map[netip.Addr]net.HardwareAddr, fdb map[string]netip.Addr) {
	for _, ip := range p.DelNeigh {
		delete(neigh, ip)
	}
	for _, mac := range p.DelFDB {
		delete(fdb, mac.String())
	}
	for _, w := range p.AddNeigh {
		neigh[w.IP] = w.MAC
	}
	for _, w := range p.AddFDB {
		fdb[w.MAC.String()] = w.VTEP
	}
}

func TestPlanPeersDuplicates(t *testing.T) {
	a := peer(2, 1)
	sameIP := Peer{IP: a.IP, MAC: peer(3, 1).MAC, VTEP: a.VTEP}
	sameMAC := Peer{IP: peer(4, 1).IP, MAC: a.MAC, VTEP: netip.MustParseAddr("192.168.0.9")}
	want := []Peer{a, sameIP, sameMAC}
	neigh, fdb := map[netip.Addr]net.HardwareAddr{}, map[string]netip.Addr{}
	p := PlanPeers(want, neigh, fdb)
	if len(p.AddNeigh) != 2 || len(p.AddFDB) != 2 {
		t.Fatalf("one neighbor per IP, one FDB entry per MAC: %+v", p)
	}
	apply(p, neigh, fdb)
	if !slices.Equal(neigh[a.IP], a.MAC) || fdb[a.MAC.String()] != a.VTEP {
		t.Errorf("the first duplicate should win: %v %v", neigh, fdb)
	}
	if p := PlanPeers(want, neigh, fdb); !p.Empty() {
		t.Errorf("duplicates make every sync rewrite: %+v", p)
	}
}

// Whatever the kernel holds, one plan applied makes it exactly want.
func TestPlanPeersConverges(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for round := range 200 {
		neigh, fdb := map[netip.Addr]net.HardwareAddr{}, map[string]netip.Addr{}
		for range r.IntN(30) {
			q := peer(r.IntN(40), byte(r.IntN(3)))
			neigh[q.IP] = peer(r.IntN(40), 0).MAC
			fdb[q.MAC.String()] = q.VTEP
		}
		var want []Peer
		for range r.IntN(30) {
			want = append(want, peer(r.IntN(40), byte(r.IntN(3))))
		}
		apply(PlanPeers(want, neigh, fdb), neigh, fdb)
		if p := PlanPeers(want, neigh, fdb); !p.Empty() {
			t.Fatalf("round %d: second plan not empty: %+v", round, p)
		}
		wantIP, wantMAC := map[netip.Addr]bool{}, map[string]bool{}
		for _, w := range want {
			wantIP[w.IP], wantMAC[w.MAC.String()] = true, true
		}
		if len(neigh) != len(wantIP) || len(fdb) != len(wantMAC) {
			t.Fatalf("round %d: %d neighbors for %d IPs, %d fdb for %d MACs", round, len(neigh), len(wantIP), len(fdb), len(wantMAC))
		}
	}
}
