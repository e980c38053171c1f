package vtep

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vishvananda/netns"
	"github.com/vxnet/vxnet/internal/testnet"
	"golang.org/x/sys/unix"
)

var errInjected = errors.New("injected failure")

// failAt makes m fail at the named step.
func failAt(m *Manager, step string) {
	m.failAt = func(s string) error {
		if s == step {
			return errInjected
		}
		return nil
	}
}

func joined(changes []string) string { return strings.Join(changes, "; ") }

func TestEnsureNetworkRepairs(t *testing.T) {
	tn := testnet.New(t)
	h := tn.AddHost("h")
	m := hostManager(t, h)
	ctx := context.Background()
	ns := m.NetNSPath(spec.Name)

	// A crash remnant in the host namespace is no obstacle.
	run(t, h.Name, "ip", "link", "add", "vx-000100", "type", "vxlan", "id", "256", "dstport", "4789")
	// MTU 0 is the underlay's (testnet: 1500) minus the VXLAN overhead.
	auto := spec
	auto.MTU = 0
	changes, err := m.EnsureNetwork(ctx, auto)
	if err != nil || len(changes) == 0 {
		t.Fatalf("first EnsureNetwork: %v %v", changes, err)
	}
	if changes, err := m.EnsureNetwork(ctx, spec); err != nil || len(changes) != 0 {
		t.Fatalf("second EnsureNetwork (mtu 1450 explicit): %q %v", changes, err)
	}
	if out := run(t, h.Name, "ip", "-o", "link"); strings.Contains(out, "vx-") {
		t.Errorf("temporary device left in the host namespace:\n%s", out)
	}
	if out := inNS(t, ns, "ip", "-o", "link", "show", "lo"); !strings.Contains(out, "UP") {
		t.Errorf("lo not up: %s", out)
	}

	cases := []struct {
		name  string
		drift []string // ip commands in the network namespace
		want  string
	}{
		{"vxlan1 deleted", []string{"link del vxlan1"}, "created vxlan1 (vni 256)"},
		{"br0 address flushed", []string{"addr flush dev br0"}, "added 10.0.0.1/24 to br0"},
		{"stray br0 address", []string{"addr add 10.9.9.9/24 dev br0"}, "removed stray address 10.9.9.9/24 from br0"},
		{"br0 down", []string{"link set br0 down"}, "br0 set up"},
		{"br0 mtu", []string{"link set br0 mtu 1400"}, "br0 mtu 1400 -> 1450"},
		{"vxlan1 detached", []string{"link set vxlan1 nomaster"}, "vxlan1 attached to br0"},
		{"vxlan1 down", []string{"link set vxlan1 down"}, "vxlan1 set up"},
		{"vxlan1 mtu", []string{"link set vxlan1 mtu 1300"}, "vxlan1 mtu 1300 -> 1450"},
		{"learning on", []string{"link del vxlan1", "link add vxlan1 type vxlan id 256 dstport 4789 local 192.168.77.1 proxy learning"},
			"recreated vxlan1: learning on"},
		// Made inside the namespace, the device's socket is there too,
		// where no underlay is: it must be replaced though every
		// attribute is right.
		{"socket in the wrong namespace", []string{"link del vxlan1", "link add vxlan1 type vxlan id 256 dstport 4789 local 192.168.77.1 proxy nolearning"},
			"recreated vxlan1: socket not in the host namespace"},
		{"wrong port", []string{"link del vxlan1", "link add vxlan1 type vxlan id 256 dstport 4790 nolearning proxy"}, "recreated vxlan1: port 4790 != 4789"},
		{"br0 not a bridge", []string{"link del br0", "link add br0 type veth peer name br0p"}, "replaced br0: was a veth"},
	}
	for _, c := range cases {
		for _, cmd := range c.drift {
			inNS(t, ns, append([]string{"ip"}, strings.Fields(cmd)...)...)
		}
		changes, err := m.EnsureNetwork(ctx, spec)
		if err != nil || !strings.Contains(joined(changes), c.want) {
			t.Errorf("%s: changes %q, err %v; want %q", c.name, changes, err, c.want)
		}
		if changes, err := m.EnsureNetwork(ctx, spec); err != nil || len(changes) != 0 {
			t.Errorf("%s: not repaired for good: %q %v", c.name, changes, err)
		}
	}
	out := inNS(t, ns, "ip", "-d", "link", "show", VXLANName)
	for _, want := range []string{"vxlan id 256", "link-netns", "local 192.168.77.1", "dstport 4789", "nolearning", "proxy", "master br0", "mtu 1450", "UP"} {
		if !strings.Contains(out, want) {
			t.Errorf("vxlan1 after repairs lacks %q:\n%s", want, out)
		}
	}

	// A plain file where the namespace should be (a crash between
	// creating the file and mounting on it) is replaced.
	if err := m.DeleteNetwork(ctx, spec.Name); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ns, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	if names, _ := m.Networks(); len(names) != 1 {
		t.Errorf("Networks should list a stale file for removal: %v", names)
	}
	if changes, err := m.EnsureNetwork(ctx, spec); err != nil || !strings.Contains(joined(changes), "created namespace") {
		t.Errorf("EnsureNetwork over a stale file: %q %v", changes, err)
	}
	if CheckNetNS(ns) != nil {
		t.Error("stale file not replaced by a namespace")
	}
	if err := m.DeleteNetwork(ctx, spec.Name); err != nil {
		t.Fatal(err)
	}
	if err := m.DeleteNetwork(ctx, spec.Name); err != nil {
		t.Errorf("DeleteNetwork of a missing network: %v", err)
	}

	if _, err := m.EnsureNetwork(ctx, NetworkSpec{Name: "../x", VNI: 1, Gateway: spec.Gateway}); err == nil {
		t.Error("a name with a slash accepted")
	}
	if _, err := m.EnsureNetwork(ctx, NetworkSpec{Name: "x", VNI: 1 << 24, Gateway: spec.Gateway}); err == nil {
		t.Error("a 25-bit VNI accepted")
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := m.EnsureNetwork(cctx, spec); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled context: %v", err)
	}
	if names, _ := m.Networks(); len(names) != 0 {
		t.Errorf("networks left: %v", names)
	}
}

// A new network that fails half-way is removed again, in the network's
// namespace and the host's.
func TestEnsureNetworkRollback(t *testing.T) {
	tn := testnet.New(t)
	h := tn.AddHost("h")
	m := hostManager(t, h)
	ctx := context.Background()
	for _, step := range []string{"bridge", "vxlan", "move vxlan", "rename vxlan"} {
		failAt(m, step)
		if _, err := m.EnsureNetwork(ctx, spec); !errors.Is(err, errInjected) {
			t.Errorf("%s: want the injected error, got %v", step, err)
		}
		if names, _ := m.Networks(); len(names) != 0 {
			t.Errorf("%s: namespace left: %v", step, names)
		}
		if out := run(t, h.Name, "ip", "-o", "link"); strings.Contains(out, "vx-") {
			t.Errorf("%s: temporary device left in the host namespace:\n%s", step, out)
		}
	}
	// On an existing network, a failure keeps the namespace and leaves
	// no temporary device anywhere.
	m.failAt = nil
	if _, err := m.EnsureNetwork(ctx, spec); err != nil {
		t.Fatal(err)
	}
	ns := m.NetNSPath(spec.Name)
	for _, step := range []string{"move vxlan", "rename vxlan"} {
		execIn(ns, "ip", "link", "del", VXLANName) // absent after the first round
		failAt(m, step)
		if _, err := m.EnsureNetwork(ctx, spec); !errors.Is(err, errInjected) {
			t.Errorf("%s: want the injected error, got %v", step, err)
		}
		if CheckNetNS(ns) != nil {
			t.Fatalf("%s: existing namespace removed", step)
		}
		if out := run(t, h.Name, "ip", "-o", "link") + inNS(t, ns, "ip", "-o", "link"); strings.Contains(out, "vx-") {
			t.Errorf("%s: temporary device left:\n%s", step, out)
		}
	}
	m.failAt = nil
	if changes, err := m.EnsureNetwork(ctx, spec); err != nil || !strings.Contains(joined(changes), "created vxlan1") {
		t.Errorf("after failures: %q %v", changes, err)
	}
}

func TestAddEndpointFailuresLeaveNothing(t *testing.T) {
	tn, m := networkWorld(t)
	ctx := context.Background()
	c := tn.AddNS("c")
	cpath := "/var/run/netns/" + c
	ep := func(veth, ip string) EndpointSpec {
		return EndpointSpec{Network: spec.Name, ContainerNS: cpath, HostVeth: veth,
			Addr: netip.MustParsePrefix(ip + "/24"), MAC: mac(ip), MTU: 1450}
	}
	check := func(what string, wantVeths, wantEths int) {
		t.Helper()
		if names, err := m.Endpoints(ctx, spec.Name); err != nil || len(names) != wantVeths {
			t.Errorf("%s: veths in the network: %v %v", what, names, err)
		}
		if out := run(t, c, "ip", "-o", "link"); strings.Count(out, ": eth") != wantEths {
			t.Errorf("%s: container links:\n%s", what, out)
		}
	}
	for _, step := range []string{"create veth", "container address", "container up", "attach", "host up"} {
		failAt(m, step)
		if _, err := m.AddEndpoint(ctx, ep("vethbbbbbbb", "10.0.0.3")); !errors.Is(err, errInjected) {
			t.Errorf("%s: want the injected error, got %v", step, err)
		}
		check("failure at "+step, 0, 0)
	}
	m.failAt = nil
	good := ep("vethaaaaaaa", "10.0.0.2")
	if name, err := m.AddEndpoint(ctx, good); err != nil || name != "eth0" {
		t.Fatalf("AddEndpoint: %q %v", name, err)
	}
	out := run(t, c, "ip", "-o", "addr", "show", "eth0")
	if !strings.Contains(out, "10.0.0.2/24") {
		t.Errorf("eth0: %s", out)
	}
	if out := run(t, c, "ip", "route"); !strings.Contains(out, "10.0.0.0/24 dev eth0") {
		t.Errorf("subnet route: %s", out)
	}

	// The same address twice, a host name taken by a non-veth, a
	// container name taken, a stale container side are refused.
	dupAddr := ep("vethccccccc", "10.0.0.2")
	dupAddr.MAC = mac("10.0.0.9")
	clash := ep("vethddddddd", "10.0.0.4")
	clash.IfName = "eth0"
	brName := ep(BridgeName, "10.0.0.5")
	for _, s := range []EndpointSpec{dupAddr, clash, brName} {
		if _, err := m.AddEndpoint(ctx, s); err == nil {
			t.Errorf("AddEndpoint %s succeeded", s.HostVeth)
		}
	}
	check("refusals", 1, 1)
	if out := inNS(t, m.NetNSPath(spec.Name), "ip", "-o", "link", "show", BridgeName); !strings.Contains(out, "bridge") && !strings.Contains(out, "UP") {
		t.Errorf("br0 harmed: %s", out)
	}

	// Adoption: the same spec again returns the same interface and
	// repairs the host side; a different address or MAC is refused.
	inNS(t, m.NetNSPath(spec.Name), "ip", "link", "set", "vethaaaaaaa", "down", "nomaster")
	if name, err := m.AddEndpoint(ctx, good); err != nil || name != "eth0" {
		t.Errorf("adopt: %q %v", name, err)
	}
	if out := inNS(t, m.NetNSPath(spec.Name), "ip", "-o", "link", "show", "vethaaaaaaa"); !strings.Contains(out, "master br0") || !strings.Contains(out, ",UP") {
		t.Errorf("adopted veth not repaired: %s", out)
	}
	wrongAddr := good
	wrongAddr.Addr = netip.MustParsePrefix("10.0.0.7/24")
	wrongMAC := good
	wrongMAC.MAC = mac("10.0.0.8")
	c2 := tn.AddNS("c2")
	otherNS := good
	otherNS.ContainerNS = "/var/run/netns/" + c2
	for name, s := range map[string]EndpointSpec{"wrong address": wrongAddr, "wrong mac": wrongMAC, "peer elsewhere": otherNS} {
		if _, err := m.AddEndpoint(ctx, s); err == nil {
			t.Errorf("adopt with %s succeeded", name)
		}
	}
	if _, err := m.CheckEndpoint(ctx, otherNS); !errors.Is(err, ErrEndpointGone) {
		t.Errorf("CheckEndpoint with the peer elsewhere: %v", err)
	}
	check("refused adoptions", 1, 1)

	// A container side that lost its address is repaired by CheckEndpoint.
	run(t, c, "ip", "addr", "flush", "dev", "eth0")
	run(t, c, "ip", "link", "set", "eth0", "down")
	changes, err := m.CheckEndpoint(ctx, EndpointSpec{Network: spec.Name, ContainerNS: cpath, HostVeth: "vethaaaaaaa",
		Addr: good.Addr, MTU: 1450})
	if err != nil || !strings.Contains(joined(changes), "added 10.0.0.2/24 to eth0") || !strings.Contains(joined(changes), "eth0 set up") {
		t.Errorf("CheckEndpoint container side: %q %v", changes, err)
	}
	if changes, err := m.CheckEndpoint(ctx, good); err != nil || len(changes) != 0 {
		t.Errorf("CheckEndpoint in order: %q %v", changes, err)
	}

	// Gone: the container namespace deleted takes the pair with it.
	if _, err := m.AddEndpoint(ctx, EndpointSpec{Network: spec.Name, ContainerNS: otherNS.ContainerNS, HostVeth: "vetheeeeeee",
		Addr: netip.MustParsePrefix("10.0.0.10/24"), MAC: mac("10.0.0.10")}); err != nil {
		t.Fatal(err)
	}
	tn.DelNS(c2)
	gone := EndpointSpec{Network: spec.Name, ContainerNS: otherNS.ContainerNS, HostVeth: "vetheeeeeee", Addr: netip.MustParsePrefix("10.0.0.10/24")}
	if _, err := m.CheckEndpoint(ctx, gone); !errors.Is(err, ErrEndpointGone) {
		t.Errorf("CheckEndpoint after the container namespace is gone: %v", err)
	}
	if _, err := m.CheckEndpoint(ctx, EndpointSpec{Network: "1-missing", HostVeth: "vethaaaaaaa"}); !errors.Is(err, ErrEndpointGone) {
		t.Errorf("CheckEndpoint in a missing network: %v", err)
	}
	// The same answers from one batch, each by its index, and a repair
	// in it made as CheckEndpoint makes it.
	run(t, c, "ip", "link", "set", "eth0", "down")
	missing := EndpointSpec{Network: spec.Name, HostVeth: "vethfffffff"}
	res := m.CheckEndpoints(ctx, spec.Name, []EndpointSpec{gone, good, otherNS, missing})
	if len(res) != 4 || !errors.Is(res[0].Err, ErrEndpointGone) || res[1].Err != nil || joined(res[1].Changes) != "eth0 set up in the container" ||
		!errors.Is(res[2].Err, ErrEndpointGone) || !errors.Is(res[3].Err, ErrEndpointGone) {
		t.Errorf("CheckEndpoints: %+v", res)
	}
	if res := m.CheckEndpoints(ctx, "1-missing", []EndpointSpec{{Network: "1-missing", HostVeth: "vethaaaaaaa"}}); !errors.Is(res[0].Err, ErrEndpointGone) {
		t.Errorf("CheckEndpoints in a missing network: %+v", res)
	}
	if err := m.RemoveEndpoint(ctx, "1-missing", "vethaaaaaaa"); err != nil {
		t.Errorf("RemoveEndpoint in a missing network: %v", err)
	}
	if err := m.RemoveEndpoint(ctx, spec.Name, BridgeName); err == nil {
		t.Error("RemoveEndpoint removed br0")
	}
}

// Attaches of one container to several networks at once each get their
// own ethN.
func TestConcurrentAttachesToOneContainer(t *testing.T) {
	tn := testnet.New(t)
	h := tn.AddHost("h")
	m := hostManager(t, h)
	ctx := context.Background()
	c := tn.AddNS("c")
	const n = 4
	var wg sync.WaitGroup
	names := make([]string, n)
	errs := make([]error, n)
	for i := range n {
		s := NetworkSpec{Name: fmt.Sprintf("1-%010d", i), VNI: uint32(300 + i),
			Gateway: netip.MustParsePrefix(fmt.Sprintf("10.%d.0.1/24", i+1)), MTU: 1450}
		if _, err := m.EnsureNetwork(ctx, s); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ip := fmt.Sprintf("10.%d.0.2", i+1)
			names[i], errs[i] = m.AddEndpoint(ctx, EndpointSpec{Network: s.Name, ContainerNS: "/var/run/netns/" + c,
				HostVeth: fmt.Sprintf("veth%07d", i), Addr: netip.MustParsePrefix(ip + "/24"), MAC: mac(ip)})
		}()
	}
	wg.Wait()
	seen := map[string]bool{}
	for i := range n {
		if errs[i] != nil || seen[names[i]] || !strings.HasPrefix(names[i], "eth") {
			t.Errorf("attach %d: %q %v (all: %q)", i, names[i], errs[i], names)
		}
		seen[names[i]] = true
	}
}

func TestSyncPeersOwnsOnlyItsEntries(t *testing.T) {
	_, m := networkWorld(t)
	ctx := context.Background()
	ns := m.NetNSPath(spec.Name)
	p := Peer{IP: netip.MustParseAddr("10.0.0.3"), MAC: mac("10.0.0.3"), VTEP: netip.MustParseAddr("192.168.77.2")}
	if a, r, err := m.SyncPeers(ctx, spec.Name, []Peer{p}); err != nil || a != 2 || r != 0 {
		t.Fatalf("SyncPeers: %d %d %v", a, r, err)
	}
	// Entries an admin or the kernel made (flood entries, a multicast
	// group), a moved peer, a wrong neighbor, a leftover.
	inNS(t, ns, "bridge", "fdb", "append", "00:00:00:00:00:00", "dev", VXLANName, "dst", "192.168.77.9")
	inNS(t, ns, "bridge", "fdb", "append", "01:00:5e:00:00:01", "dev", VXLANName, "dst", "192.168.77.9")
	inNS(t, ns, "bridge", "fdb", "replace", p.MAC.String(), "dev", VXLANName, "dst", "192.168.77.8")
	inNS(t, ns, "ip", "neigh", "replace", "10.0.0.3", "lladdr", "02:00:00:00:00:01", "dev", VXLANName, "nud", "permanent")
	inNS(t, ns, "ip", "neigh", "add", "10.0.0.77", "lladdr", "02:00:00:00:00:02", "dev", VXLANName, "nud", "permanent")
	a, r, err := m.SyncPeers(ctx, spec.Name, []Peer{p})
	if err != nil || a != 2 || r != 1 {
		t.Errorf("SyncPeers after drift: added %d removed %d %v; want 2 rewritten, 1 removed", a, r, err)
	}
	fdb := inNS(t, ns, "bridge", "fdb", "show", "dev", VXLANName)
	if !testnet.LineHas(fdb, "00:00:00:00:00:00", "dst 192.168.77.9") || !testnet.LineHas(fdb, "01:00:5e:00:00:01", "dst 192.168.77.9") {
		t.Errorf("flood entry removed:\n%s", fdb)
	}
	if testnet.LineHas(fdb, p.MAC.String(), "192.168.77.8") || !testnet.LineHas(fdb, p.MAC.String(), "dst 192.168.77.2", "permanent") {
		t.Errorf("fdb for the peer:\n%s", fdb)
	}
	neigh := inNS(t, ns, "ip", "neigh", "show", "dev", VXLANName)
	if strings.Contains(neigh, "10.0.0.77") || !testnet.LineHas(neigh, "10.0.0.3", p.MAC.String(), "PERMANENT") {
		t.Errorf("neighbors:\n%s", neigh)
	}
	if a, r, err := m.SyncPeers(ctx, spec.Name, []Peer{p}); err != nil || a+r != 0 {
		t.Errorf("SyncPeers in sync: %d %d %v", a, r, err)
	}
	bad := p
	bad.MAC = nil
	if _, _, err := m.SyncPeers(ctx, spec.Name, []Peer{p, bad}); err == nil {
		t.Error("a peer without a MAC accepted")
	}
	if _, _, err := m.SyncPeers(ctx, "1-missing", []Peer{p}); err == nil {
		t.Error("SyncPeers on a missing network succeeded")
	}
	if a, r, err := m.SyncPeers(ctx, spec.Name, nil); err != nil || a != 0 || r != 2 {
		t.Errorf("SyncPeers(nil): %d %d %v", a, r, err)
	}
	if fdb := inNS(t, ns, "bridge", "fdb", "show", "dev", VXLANName); !testnet.LineHas(fdb, "00:00:00:00:00:00", "dst 192.168.77.9") {
		t.Errorf("flood entry removed by SyncPeers(nil):\n%s", fdb)
	}
}

func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestNetNSMountsAndThreads(t *testing.T) {
	testnet.RequireRoot(t)
	p := filepath.Join(t.TempDir(), "ns")
	t.Cleanup(func() { DeleteNetNS(p) })
	if err := CreateNetNS(p); err != nil {
		t.Fatal(err)
	}
	// fn runs in the namespace; the caller's thread and the threads
	// WithNetNS used stay where they were.
	self := nsInode(t, "/proc/self/ns/net")
	for range 20 {
		var inside uint64
		err := WithNetNS(p, func() error {
			inside = nsInode(t, "/proc/thread-self/ns/net")
			return nil
		})
		if err != nil || inside != nsInode(t, p) || inside == self {
			t.Fatalf("WithNetNS: inside %d, ns %d, self %d, %v", inside, nsInode(t, p), self, err)
		}
	}
	for range 50 {
		done := make(chan uint64)
		go func() { done <- nsInode(t, "/proc/thread-self/ns/net") }()
		if got := <-done; got != self {
			t.Fatal("a thread was left in another namespace")
		}
	}
	if err := WithNetNS(p, func() error { return errInjected }); !errors.Is(err, errInjected) {
		t.Errorf("fn's error lost: %v", err)
	}
	plain := filepath.Join(t.TempDir(), "plain")
	os.WriteFile(plain, nil, 0o444)
	if err := WithNetNS(plain, func() error { return nil }); err == nil {
		t.Error("WithNetNS on a plain file succeeded")
	}
	if err := WithNetNS(filepath.Join(t.TempDir(), "missing"), func() error { return nil }); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("WithNetNS on a missing file: %v", err)
	}

	// A second mount stacked on the first (two racing creators) is
	// removed too.
	if err := unix.Mount(p, p, "none", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	if err := DeleteNetNS(p); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Errorf("stacked mounts: file left: %v", err)
	}
	// A bind mount of something that is not a namespace is replaced.
	os.WriteFile(p, nil, 0o444)
	if err := unix.Mount(plain, p, "none", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	if err := CreateNetNS(p); err != nil || CheckNetNS(p) != nil {
		t.Fatalf("CreateNetNS over a foreign mount: %v", err)
	}
	h, err := netns.GetFromPath(p)
	if err != nil {
		t.Fatal(err)
	}
	h.Close()
	if err := DeleteNetNS(p); err != nil {
		t.Fatal(err)
	}
	if out, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(out), p) {
		t.Errorf("mounts left on %s", p)
	}
}

// ChangePeers writes and deletes exactly the entries of the change, and
// leaves every other entry alone.
func TestChangePeersTouchesOnlyTheChange(t *testing.T) {
	_, m := networkWorld(t)
	ctx := context.Background()
	ns := m.NetNSPath(spec.Name)
	peer := func(ip, vtep string) Peer {
		return Peer{IP: netip.MustParseAddr(ip), MAC: mac(ip), VTEP: netip.MustParseAddr(vtep)}
	}
	a, b, c := peer("10.0.0.3", "192.168.77.2"), peer("10.0.0.4", "192.168.77.2"), peer("10.0.0.5", "192.168.77.3")
	if _, _, err := m.SyncPeers(ctx, spec.Name, []Peer{a, b}); err != nil {
		t.Fatal(err)
	}
	// An entry someone else made stays: ChangePeers does not read.
	inNS(t, ns, "ip", "neigh", "add", "10.0.0.77", "lladdr", "02:00:00:00:00:02", "dev", VXLANName, "nud", "permanent")
	moved := peer("10.0.0.4", "192.168.77.9")
	if n, r, err := m.ChangePeers(ctx, spec.Name, []Peer{c, moved}, []Peer{a}); err != nil || n != 4 || r != 2 {
		t.Fatalf("ChangePeers: added %d removed %d %v", n, r, err)
	}
	neigh := inNS(t, ns, "ip", "neigh", "show", "dev", VXLANName)
	fdb := inNS(t, ns, "bridge", "fdb", "show", "dev", VXLANName)
	if strings.Contains(neigh, "10.0.0.3 ") || !strings.Contains(neigh, "10.0.0.5 ") || !strings.Contains(neigh, "10.0.0.77 ") {
		t.Errorf("neighbors:\n%s", neigh)
	}
	if testnet.LineHas(fdb, a.MAC.String()) || !testnet.LineHas(fdb, moved.MAC.String(), "dst 192.168.77.9") || !testnet.LineHas(fdb, c.MAC.String(), "dst 192.168.77.3") {
		t.Errorf("fdb:\n%s", fdb)
	}
	// Removing what is already gone is no error.
	if _, _, err := m.ChangePeers(ctx, spec.Name, nil, []Peer{a}); err != nil {
		t.Errorf("removing a gone peer: %v", err)
	}
}
