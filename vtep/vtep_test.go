package vtep

import (
	"context"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vxnet/vxnet/internal/testnet"
)

// hostManager makes a Manager whose host namespace is h's.
func hostManager(t *testing.T, h *testnet.Host) *Manager {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "netns")
	var m *Manager
	err := WithNetNS(h.Path, func() error {
		var err error
		m, err = New(Config{NetNSDir: dir, Local: h.Addr})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			DeleteNetNS(filepath.Join(dir, e.Name()))
		}
		m.Close()
	})
	return m
}

func mac(ip string) net.HardwareAddr {
	b := netip.MustParseAddr(ip).As4()
	return net.HardwareAddr{2, 0x42, b[0], b[1], b[2], b[3]}
}

func run(t *testing.T, ns string, args ...string) string {
	t.Helper()
	out, err := testnet.Exec(ns, args...)
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func inNS(t *testing.T, path string, args ...string) string {
	t.Helper()
	out, err := execIn(path, args...)
	if err != nil {
		t.Fatalf("%s in %s: %v\n%s", strings.Join(args, " "), path, err, out)
	}
	return out
}

var spec = NetworkSpec{Name: "1-0123456789", VNI: 256, Gateway: netip.MustParsePrefix("10.0.0.1/24"), MTU: 1450}

func TestDatapathAcrossHosts(t *testing.T) {
	tn := testnet.New(t)
	h1, h2 := tn.AddHost("h1"), tn.AddHost("h2")
	m1, m2 := hostManager(t, h1), hostManager(t, h2)
	c1, c2 := tn.AddNS("c1"), tn.AddNS("c2")
	ctx := context.Background()

	for _, m := range []*Manager{m1, m2} {
		changes, err := m.EnsureNetwork(ctx, spec)
		if err != nil || len(changes) == 0 {
			t.Fatalf("EnsureNetwork: %v %v", changes, err)
		}
	}
	e1 := EndpointSpec{Network: spec.Name, ContainerNS: "/var/run/netns/" + c1, HostVeth: "veth1111111",
		Addr: netip.MustParsePrefix("10.0.0.2/24"), MAC: mac("10.0.0.2"), MTU: 1450}
	e2 := EndpointSpec{Network: spec.Name, ContainerNS: "/var/run/netns/" + c2, HostVeth: "veth2222222",
		Addr: netip.MustParsePrefix("10.0.0.3/24"), MAC: mac("10.0.0.3"), MTU: 1450}
	if name, err := m1.AddEndpoint(ctx, e1); err != nil || name != "eth0" {
		t.Fatalf("AddEndpoint c1: %q %v", name, err)
	}
	if _, err := m2.AddEndpoint(ctx, e2); err != nil {
		t.Fatal(err)
	}
	p1 := Peer{IP: netip.MustParseAddr("10.0.0.2"), MAC: mac("10.0.0.2"), VTEP: h1.Addr}
	p2 := Peer{IP: netip.MustParseAddr("10.0.0.3"), MAC: mac("10.0.0.3"), VTEP: h2.Addr}
	if a, r, err := m1.SyncPeers(ctx, spec.Name, []Peer{p2}); err != nil || a != 2 || r != 0 {
		t.Fatalf("SyncPeers h1: %d %d %v", a, r, err)
	}
	if _, _, err := m2.SyncPeers(ctx, spec.Name, []Peer{p1}); err != nil {
		t.Fatal(err)
	}
	if err := testnet.Ping(c1, "10.0.0.3"); err != nil {
		t.Fatal(err)
	}

	// The device is what the Docker overlay had.
	ns1 := m1.NetNSPath(spec.Name)
	out := inNS(t, ns1, "ip", "-d", "link", "show", VXLANName)
	for _, want := range []string{"vxlan id 256", "local 192.168.77.1", "dstport 4789", "nolearning", "proxy", "master br0", "mtu 1450"} {
		if !strings.Contains(out, want) {
			t.Errorf("vxlan1 lacks %q:\n%s", want, out)
		}
	}
	out = run(t, c1, "ip", "addr", "show", "eth0")
	for _, want := range []string{"mtu 1450", "02:42:0a:00:00:02", "10.0.0.2/24"} {
		if !strings.Contains(out, want) {
			t.Errorf("eth0 lacks %q:\n%s", want, out)
		}
	}
	if out := inNS(t, ns1, "bridge", "fdb", "show", "dev", VXLANName); !testnet.LineHas(out, "02:42:0a:00:00:03 dst 192.168.77.2", "self permanent") {
		t.Errorf("fdb:\n%s", out)
	}

	// Idempotent: nothing to do a second time.
	if changes, err := m1.EnsureNetwork(ctx, spec); err != nil || len(changes) != 0 {
		t.Errorf("second EnsureNetwork: %v %v", changes, err)
	}
	if a, r, err := m1.SyncPeers(ctx, spec.Name, []Peer{p2}); err != nil || a+r != 0 {
		t.Errorf("second SyncPeers: %d %d %v", a, r, err)
	}
	if name, err := m1.AddEndpoint(ctx, e1); err != nil || name != "eth0" {
		t.Errorf("AddEndpoint again adopts: %q %v", name, err)
	}

	// Without the peer entries, nothing crosses.
	if a, r, err := m1.SyncPeers(ctx, spec.Name, nil); err != nil || a != 0 || r != 2 {
		t.Fatalf("SyncPeers(nil): %d %d %v", a, r, err)
	}
	if err := testnet.Ping(c1, "10.0.0.3"); err == nil {
		t.Error("ping crossed without peer entries")
	}
	if out := inNS(t, ns1, "ip", "neigh", "show", "dev", VXLANName); strings.Contains(out, "10.0.0.3") {
		t.Errorf("neighbor left: %s", out)
	}

	// Drift is repaired and reported.
	m1.SyncPeers(ctx, spec.Name, []Peer{p2})
	inNS(t, ns1, "ip", "addr", "flush", "dev", BridgeName)
	inNS(t, ns1, "ip", "link", "set", "veth1111111", "nomaster")
	inNS(t, ns1, "ip", "neigh", "del", "10.0.0.3", "dev", VXLANName)
	changes, err := m1.EnsureNetwork(ctx, spec)
	if err != nil || !strings.Contains(strings.Join(changes, ";"), "10.0.0.1/24") {
		t.Errorf("repair br0 address: %v %v", changes, err)
	}
	if changes, err := m1.CheckEndpoint(ctx, e1); err != nil || len(changes) == 0 {
		t.Errorf("repair veth master: %v %v", changes, err)
	}
	if a, _, err := m1.SyncPeers(ctx, spec.Name, []Peer{p2}); err != nil || a != 1 {
		t.Errorf("repair neighbor: %d %v", a, err)
	}
	if err := testnet.Ping(c1, "10.0.0.3"); err != nil {
		t.Errorf("after repairs: %v", err)
	}
	inNS(t, ns1, "ip", "link", "del", VXLANName)
	changes, err = m1.EnsureNetwork(ctx, spec)
	if err != nil || !strings.Contains(strings.Join(changes, ";"), "created vxlan1") {
		t.Errorf("recreate vxlan1: %v %v", changes, err)
	}

	// An incompatible device is replaced.
	other := spec
	other.VNI = 300
	changes, err = m1.EnsureNetwork(ctx, other)
	if err != nil || !strings.Contains(strings.Join(changes, ";"), "vni 256 != 300") {
		t.Errorf("replace vxlan1: %v %v", changes, err)
	}

	// Removing an endpoint removes both ends; a second time is fine.
	if err := m1.RemoveEndpoint(ctx, spec.Name, "veth1111111"); err != nil {
		t.Fatal(err)
	}
	if err := m1.RemoveEndpoint(ctx, spec.Name, "veth1111111"); err != nil {
		t.Fatal(err)
	}
	if out := run(t, c1, "ip", "link"); strings.Contains(out, "eth0") {
		t.Errorf("container side left:\n%s", out)
	}
	if _, err := m1.CheckEndpoint(ctx, e1); err == nil {
		t.Error("CheckEndpoint of a removed endpoint: want ErrEndpointGone")
	}
	if err := m1.DeleteNetwork(ctx, spec.Name); err != nil {
		t.Fatal(err)
	}
	if names, _ := m1.Networks(); len(names) != 0 {
		t.Errorf("networks left: %v", names)
	}
}

func TestAddEndpointRollback(t *testing.T) {
	tn, m := networkWorld(t)
	ctx := context.Background()
	c := tn.AddNS("c")
	cpath := "/var/run/netns/" + c
	good := EndpointSpec{Network: spec.Name, ContainerNS: cpath, HostVeth: "vethaaaaaaa",
		Addr: netip.MustParsePrefix("10.0.0.2/24"), MAC: mac("10.0.0.2"), MTU: 1450}
	if _, err := m.AddEndpoint(ctx, good); err != nil {
		t.Fatal(err)
	}
	notNS := filepath.Join(t.TempDir(), "plain")
	os.WriteFile(notNS, nil, 0o644)
	bad := []EndpointSpec{
		{Network: spec.Name, ContainerNS: notNS, HostVeth: "vethbbbbbbb", Addr: netip.MustParsePrefix("10.0.0.3/24"), MAC: mac("10.0.0.3"), MTU: 1450},
		{Network: spec.Name, ContainerNS: cpath, HostVeth: "vethccccccc", IfName: "eth0", Addr: netip.MustParsePrefix("10.0.0.4/24"), MAC: mac("10.0.0.4"), MTU: 1450},
		{Network: "1-missing", ContainerNS: cpath, HostVeth: "vetheeeeeee", Addr: netip.MustParsePrefix("10.0.0.6/24"), MAC: mac("10.0.0.6"), MTU: 1450},
	}
	for _, s := range bad {
		if _, err := m.AddEndpoint(ctx, s); err == nil {
			t.Errorf("AddEndpoint %+v succeeded", s)
		}
	}
	if names, _ := m.Endpoints(ctx, spec.Name); len(names) != 1 {
		t.Errorf("veths in the network after failures: %v", names)
	}
	if out := run(t, c, "ip", "-o", "link"); strings.Count(out, ": eth") != 1 {
		t.Errorf("container links after failures:\n%s", out)
	}
	// A second network's interface in the same container is eth1.
	s2 := NetworkSpec{Name: "1-abcdefabcd", VNI: 257, Gateway: netip.MustParsePrefix("10.0.1.1/24"), MTU: 1450}
	if _, err := m.EnsureNetwork(ctx, s2); err != nil {
		t.Fatal(err)
	}
	name, err := m.AddEndpoint(ctx, EndpointSpec{Network: s2.Name, ContainerNS: cpath, HostVeth: "vethfffffff",
		Addr: netip.MustParsePrefix("10.0.1.2/24"), MAC: mac("10.0.1.2"), MTU: 1450})
	if err != nil || name != "eth1" {
		t.Errorf("second interface: %q %v", name, err)
	}
}

// A VXLAN device stranded in the host namespace by a crash is removed,
// and nothing else is.
func TestRemoveStrays(t *testing.T) {
	tn := testnet.New(t)
	h := tn.AddHost("h")
	m := hostManager(t, h)
	run(t, h.Name, "ip", "link", "add", "vx-000100", "type", "vxlan", "id", "256", "dstport", "4789", "nolearning")
	run(t, h.Name, "ip", "link", "add", "vx-other", "type", "vxlan", "id", "257", "dstport", "4790")
	removed, err := m.RemoveStrays(context.Background())
	if err != nil || len(removed) != 1 || removed[0] != "vx-000100" {
		t.Fatalf("RemoveStrays: %v %v", removed, err)
	}
	if out := run(t, h.Name, "ip", "link"); !strings.Contains(out, "vx-other") || strings.Contains(out, "vx-000100") {
		t.Errorf("host links:\n%s", out)
	}
}

func TestNetNSLifecycle(t *testing.T) {
	testnet.RequireRoot(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "ns")
	t.Cleanup(func() { DeleteNetNS(p) })
	// A plain file left by a crash is replaced.
	os.WriteFile(p, nil, 0o444)
	if CheckNetNS(p) == nil {
		t.Fatal("plain file taken for a namespace")
	}
	if err := CreateNetNS(p); err != nil || CheckNetNS(p) != nil {
		t.Fatalf("CreateNetNS: %v", err)
	}
	if err := CreateNetNS(p); err != nil {
		t.Fatalf("CreateNetNS twice: %v", err)
	}
	if CheckNetNS("/proc/self/ns/mnt") == nil {
		t.Error("a mount namespace taken for a network namespace")
	}
	if err := DeleteNetNS(p); err != nil {
		t.Fatal(err)
	}
	if err := DeleteNetNS(p); err != nil {
		t.Fatalf("DeleteNetNS twice: %v", err)
	}
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Errorf("file left: %v", err)
	}
}

func execIn(path string, args ...string) (string, error) {
	out, err := exec.Command("nsenter", append([]string{"--net=" + path}, args...)...).CombinedOutput()
	return string(out), err
}

// networkWorld is a simulated host with a manager and the test network
// spec built on it.
func networkWorld(t *testing.T) (*testnet.Net, *Manager) {
	t.Helper()
	tn := testnet.New(t)
	m := hostManager(t, tn.AddHost("h"))
	if _, err := m.EnsureNetwork(context.Background(), spec); err != nil {
		t.Fatal(err)
	}
	return tn, m
}

// br0 keeps the MAC it is given as ports come: left to the kernel, a
// bridge takes its lowest port's, and the containers' ARP entries for the
// gateway (and its DNS server) would point at a MAC no longer its.
func TestBridgeMACStays(t *testing.T) {
	tn := testnet.New(t)
	m := hostManager(t, tn.AddHost("h"))
	ctx := context.Background()
	s := spec
	s.BridgeMAC = mac("10.0.0.1")
	if _, err := m.EnsureNetwork(ctx, s); err != nil {
		t.Fatal(err)
	}
	c := tn.AddNS("c")
	if _, err := m.AddEndpoint(ctx, EndpointSpec{Network: s.Name, ContainerNS: "/var/run/netns/" + c, HostVeth: "veth0000000",
		Addr: netip.MustParsePrefix("10.0.0.2/24"), MAC: mac("10.0.0.2")}); err != nil {
		t.Fatal(err)
	}
	// A port whose MAC sorts below br0's: a bridge left to the kernel
	// would take it.
	if out, err := exec.Command("nsenter", "--net="+m.NetNSPath(s.Name), "ip", "link", "set", "veth0000000", "address", "02:00:00:00:00:02").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	out, err := exec.Command("nsenter", "--net="+m.NetNSPath(s.Name), "ip", "link", "show", BridgeName).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "link/ether "+s.BridgeMAC.String()) {
		t.Errorf("br0 after a port came: %v\n%s", err, out)
	}
	// One set by hand is put back.
	exec.Command("nsenter", "--net="+m.NetNSPath(s.Name), "ip", "link", "set", BridgeName, "address", "02:00:00:00:00:01").Run()
	changes, err := m.EnsureNetwork(ctx, s)
	if err != nil || len(changes) != 1 || !strings.Contains(changes[0], "mac") {
		t.Errorf("repair: %v %v", changes, err)
	}
}
