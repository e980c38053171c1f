package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vxnet/vxnet/internal/testconsul"
	"github.com/vxnet/vxnet/kvstore"
)

func boltStore(t testing.TB) kvstore.Store {
	s, err := kvstore.NewBolt(filepath.Join(t.TempDir(), "s.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

var bg = context.Background()

func TestPureValidation(t *testing.T) {
	for _, bad := range []string{"10.0.0.5/24", "10.0.0.0/31", "10.0.0.0/32", "fd00::/64"} {
		if err := ValidateSubnet(netip.MustParsePrefix(bad)); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v", bad, err)
		}
	}
	if err := ValidateSubnet(netip.MustParsePrefix("10.0.0.5/24")); err == nil || !strings.Contains(err.Error(), "10.0.0.0/24") {
		t.Errorf("host bits error should name the canonical form: %v", err)
	}
	if err := ValidateSubnet(netip.MustParsePrefix("10.0.0.0/30")); err != nil {
		t.Errorf("/30: %v", err)
	}
	l := NetworkLease{Subnet: netip.MustParsePrefix("10.0.0.0/24"), Gateway: netip.MustParseAddr("10.0.0.1")}
	for ip, want := range map[string]string{"10.0.0.0": "network", "10.0.0.255": "broadcast", "10.0.0.1": "gateway", "10.0.1.2": "outside"} {
		err := ValidateAddr(l, netip.MustParseAddr(ip))
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v", ip, err)
		}
	}
	if got := MACFromIP(netip.MustParseAddr("10.0.0.4")).String(); got != "02:42:0a:00:00:04" {
		t.Errorf("MAC: %s", got)
	}
}

func TestFirstFreeSubnet(t *testing.T) {
	pool := netip.MustParsePrefix("10.0.0.0/8")
	taken := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24"), netip.MustParsePrefix("10.0.1.128/25"), netip.MustParsePrefix("10.0.2.0/23")}
	got, err := firstFreeSubnet(pool, 24, taken)
	if err != nil || got.String() != "10.0.4.0/24" {
		t.Errorf("got %s %v, want 10.0.4.0/24", got, err)
	}
	// A large taken network is skipped in one go.
	got, err = firstFreeSubnet(pool, 24, []netip.Prefix{netip.MustParsePrefix("10.0.0.0/9")})
	if err != nil || got.String() != "10.128.0.0/24" {
		t.Errorf("after a /9: %s %v", got, err)
	}
	small := netip.MustParsePrefix("192.168.0.0/23")
	if _, err := firstFreeSubnet(small, 24, []netip.Prefix{netip.MustParsePrefix("192.168.0.0/24"), netip.MustParsePrefix("192.168.1.0/24")}); !errors.Is(err, ErrExhausted) {
		t.Errorf("full pool: %v", err)
	}
}

func TestNetworks(t *testing.T) {
	a := New(boltStore(t), Options{})
	l1, err := a.AllocateNetwork(bg, "n1", NetworkRequest{}, nil)
	if err != nil || l1.Subnet.String() != "10.0.0.0/24" || l1.Gateway.String() != "10.0.0.1" || l1.VNI != 256 {
		t.Fatalf("first network: %+v %v", l1, err)
	}
	l2, err := a.AllocateNetwork(bg, "n2", NetworkRequest{Subnet: netip.MustParsePrefix("10.5.0.0/16"), Gateway: netip.MustParseAddr("10.5.255.254"), VNI: 5000}, nil)
	if err != nil || l2.VNI != 5000 || l2.Gateway.String() != "10.5.255.254" {
		t.Fatalf("explicit network: %+v %v", l2, err)
	}
	cases := []struct {
		req  NetworkRequest
		want error
	}{
		{NetworkRequest{Subnet: netip.MustParsePrefix("10.5.3.0/24")}, ErrInUse},
		{NetworkRequest{Subnet: netip.MustParsePrefix("10.0.0.0/16")}, ErrInUse},
		{NetworkRequest{VNI: 5000}, ErrInUse},
		{NetworkRequest{VNI: 1 << 24}, ErrInvalid},
		{NetworkRequest{Subnet: netip.MustParsePrefix("10.9.0.0/24"), Gateway: netip.MustParseAddr("10.9.1.1")}, ErrInvalid},
		{NetworkRequest{Subnet: netip.MustParsePrefix("10.9.0.0/24"), Gateway: netip.MustParseAddr("10.9.0.255")}, ErrInvalid},
	}
	for _, c := range cases {
		if _, err := a.AllocateNetwork(bg, "bad", c.req, nil); !errors.Is(err, c.want) {
			t.Errorf("%+v: %v, want %v", c.req, err, c.want)
		}
	}
	// The auto subnet skips the taken ones; the auto VNI is the lowest free.
	l3, err := a.AllocateNetwork(bg, "n3", NetworkRequest{}, nil)
	if err != nil || l3.Subnet.String() != "10.0.1.0/24" || l3.VNI != 257 {
		t.Fatalf("third: %+v %v", l3, err)
	}
	// extra ops commit with the reservation, or abort it.
	_, err = a.AllocateNetwork(bg, "n4", NetworkRequest{}, func(NetworkLease) ([]kvstore.Op, error) {
		return []kvstore.Op{{Kind: kvstore.OpCheckIndex, Key: "missing", Index: 99}}, nil
	})
	if !errors.Is(err, kvstore.ErrConflict) {
		t.Errorf("failing extra op: %v", err)
	}
	if nets, _ := a.Networks(bg); len(nets) != 3 {
		t.Errorf("a failed reservation left a trace: %v", nets)
	}
	if err := a.ReleaseNetwork(bg, "n1", nil); err != nil {
		t.Fatal(err)
	}
	l5, _ := a.AllocateNetwork(bg, "n5", NetworkRequest{}, nil)
	if l5.Subnet != l1.Subnet || l5.VNI != l1.VNI {
		t.Errorf("released subnet and VNI are reused: %+v", l5)
	}
}

func TestAddrs(t *testing.T) {
	a := New(boltStore(t), Options{})
	l, _ := a.AllocateNetwork(bg, "n", NetworkRequest{Subnet: netip.MustParsePrefix("10.1.0.0/29")}, nil)
	own := func(e string) AddrOwner { return AddrOwner{Node: "h", Endpoint: e} }
	var got []string
	for i := range 5 {
		ip, err := a.AllocateAddr(bg, "n", l, netip.Addr{}, own(fmt.Sprint(i)))
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, ip.String())
	}
	if fmt.Sprint(got) != "[10.1.0.2 10.1.0.3 10.1.0.4 10.1.0.5 10.1.0.6]" {
		t.Errorf("sequence: %v", got)
	}
	if _, err := a.AllocateAddr(bg, "n", l, netip.Addr{}, own("x")); !errors.Is(err, ErrExhausted) {
		t.Errorf("full subnet: %v", err)
	}
	if _, err := a.AllocateAddr(bg, "n", l, netip.MustParseAddr("10.1.0.3"), own("x")); !errors.Is(err, ErrInUse) {
		t.Errorf("taken address: %v", err)
	}
	if err := a.ReleaseAddr(bg, "n", netip.MustParseAddr("10.1.0.3"), own("other")); !errors.Is(err, ErrInUse) {
		t.Errorf("release by a non-owner: %v", err)
	}
	if err := a.ReleaseAddr(bg, "n", netip.MustParseAddr("10.1.0.3"), own("1")); err != nil {
		t.Fatal(err)
	}
	if err := a.ReleaseAddr(bg, "n", netip.MustParseAddr("10.1.0.3"), own("1")); err != nil {
		t.Errorf("second release: %v", err)
	}
	ip, err := a.AllocateAddr(bg, "n", l, netip.MustParseAddr("10.1.0.3"), own("y"))
	if err != nil || ip.String() != "10.1.0.3" {
		t.Errorf("requested freed address: %s %v", ip, err)
	}
	addrs, _ := a.Addrs(bg, "n")
	if len(addrs) != 5 || addrs[netip.MustParseAddr("10.1.0.3")] != own("y") {
		t.Errorf("Addrs: %v", addrs)
	}
	if err := a.ReleaseNetwork(bg, "n", nil); err != nil {
		t.Fatal(err)
	}
	if addrs, _ := a.Addrs(bg, "n"); len(addrs) != 0 {
		t.Errorf("addresses of a released network: %v", addrs)
	}
}

// Many allocators, each with its own Consul client, on one network: no
// address is ever handed out twice, and every allocation is recorded.
func TestConcurrentAllocationConsul(t *testing.T) {
	srv := testconsul.Start(t)
	prefix := fmt.Sprintf("ipam-%d", time.Now().UnixNano())
	const allocators, each = 8, 200
	open := func() *Allocator {
		s, err := kvstore.Open(srv.URL(prefix), kvstore.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return New(s, Options{})
	}
	l, err := open().AllocateNetwork(bg, "busy", NetworkRequest{Subnet: netip.MustParsePrefix("10.20.0.0/20")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	seen := map[netip.Addr]string{}
	var wg sync.WaitGroup
	errs := make(chan error, allocators)
	start := time.Now()
	for g := range allocators {
		a := open()
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				owner := AddrOwner{Node: fmt.Sprint("h", g), Endpoint: fmt.Sprint("e", i)}
				ip, err := a.AllocateAddr(bg, "busy", l, netip.Addr{}, owner)
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				if prev, dup := seen[ip]; dup {
					mu.Unlock()
					errs <- fmt.Errorf("%s handed out twice: %s and %s/%s", ip, prev, owner.Node, owner.Endpoint)
					return
				}
				seen[ip] = owner.Node + "/" + owner.Endpoint
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	if len(seen) != allocators*each {
		t.Fatalf("%d addresses, want %d", len(seen), allocators*each)
	}
	addrs, err := open().Addrs(bg, "busy")
	if err != nil || len(addrs) != allocators*each {
		t.Fatalf("stored: %d %v", len(addrs), err)
	}
	t.Logf("%d allocations by %d allocators in %s (%.0f/s)", len(seen), allocators, elapsed.Round(time.Millisecond), float64(len(seen))/elapsed.Seconds())

	// Networks too: concurrent creates get distinct subnets and VNIs.
	var nwg sync.WaitGroup
	leases := make([]NetworkLease, allocators)
	nerrs := make([]error, allocators)
	for g := range allocators {
		a := open()
		nwg.Add(1)
		go func() {
			defer nwg.Done()
			leases[g], nerrs[g] = a.AllocateNetwork(bg, fmt.Sprint("net", g), NetworkRequest{}, nil)
		}()
	}
	nwg.Wait()
	subnets, vnis := map[netip.Prefix]bool{}, map[uint32]bool{}
	for g, l := range leases {
		if nerrs[g] != nil {
			t.Fatal(nerrs[g])
		}
		if subnets[l.Subnet] || vnis[l.VNI] {
			t.Fatalf("duplicate lease %+v", l)
		}
		subnets[l.Subnet], vnis[l.VNI] = true, true
	}
}

// FuzzPickAddr checks the pure picking: never the network, broadcast or
// gateway address, never a taken one, always inside the subnet.
func FuzzPickAddr(f *testing.F) {
	f.Add(uint32(0x0a000000), uint8(24), uint32(1), uint64(0), uint8(0))
	f.Add(uint32(0xc0a80000), uint8(30), uint32(2), uint64(0b11), uint8(3))
	f.Fuzz(func(t *testing.T, base uint32, bits uint8, gwOff uint32, takenMask uint64, skip uint8) {
		if bits < 22 || bits > 30 {
			return
		}
		p := netip.PrefixFrom(addr(base), int(bits)).Masked()
		first, last := hostRange(p)
		gw := addr(first + gwOff%(last-first+1))
		l := NetworkLease{Subnet: p, Gateway: gw}
		taken := map[netip.Addr]bool{}
		for i := range 64 {
			if takenMask&(1<<i) != 0 && first+uint32(i) <= last {
				taken[addr(first+uint32(i))] = true
			}
		}
		ip, ok := pickAddr(l, taken, int(skip))
		if !ok {
			free := 0
			for v := first; v <= last; v++ {
				if a := addr(v); a != gw && !taken[a] {
					free++
				}
			}
			if free > 0 {
				t.Fatalf("nothing picked with %d free", free)
			}
			return
		}
		if err := ValidateAddr(l, ip); err != nil || taken[ip] {
			t.Fatalf("picked %s in %s (gw %s, taken %v): %v", ip, p, gw, taken[ip], err)
		}
	})
}

func BenchmarkAllocateAddr(b *testing.B) {
	srv := testconsul.Start(b)
	for _, n := range []int{1, 8} {
		b.Run(fmt.Sprintf("allocators=%d", n), func(b *testing.B) {
			prefix := fmt.Sprintf("bench-%d", time.Now().UnixNano())
			allocs := make([]*Allocator, n)
			for i := range allocs {
				s, err := kvstore.Open(srv.URL(prefix), kvstore.Options{})
				if err != nil {
					b.Fatal(err)
				}
				allocs[i] = New(s, Options{})
			}
			l, err := allocs[0].AllocateNetwork(bg, "n", NetworkRequest{Subnet: netip.MustParsePrefix("10.64.0.0/12")}, nil)
			if err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			start := time.Now()
			var wg sync.WaitGroup
			per := (b.N + n - 1) / n
			for g := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range per {
						if _, err := allocs[g].AllocateAddr(bg, "n", l, netip.Addr{}, AddrOwner{Node: fmt.Sprint(g), Endpoint: fmt.Sprint(i)}); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			b.ReportMetric(float64(per*n)/time.Since(start).Seconds(), "allocs/s")
		})
	}
}

func BenchmarkPickAddr(b *testing.B) {
	l := NetworkLease{Subnet: netip.MustParsePrefix("10.0.0.0/16"), Gateway: netip.MustParseAddr("10.0.0.1")}
	taken := map[netip.Addr]bool{}
	for i := range 1000 {
		taken[addr(u32(netip.MustParseAddr("10.0.0.2"))+uint32(i))] = true
	}
	for b.Loop() {
		pickAddr(l, taken, 3)
	}
}
