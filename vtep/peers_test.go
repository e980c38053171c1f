package vtep

import (
	"fmt"
	"net"
	"net/netip"
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
