// Package testnet simulates several hosts on one machine for tests and
// scripts: an underlay switch (a bridge in a namespace of its own) and
// "host" namespaces joined to it by veth pairs. Nothing is created in the
// root namespace except the namespace files themselves, and everything is
// removed by Close (registered with t.Cleanup).
package testnet

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// RequireRoot skips a test that needs the kernel when not root; under CI
// it fails instead, so that a CI run never passes by skipping.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("this test needs root (network namespaces), and CI must run it")
	}
	t.Skip("needs root: network namespaces, veth and vxlan")
}

// Net is one simulated underlay.
type Net struct {
	t      testing.TB
	Prefix string
	Switch string // namespace name of the switch
	Subnet netip.Prefix
	mu     sync.Mutex
	nsList []string
	next   int
}

// Host is a simulated host: a namespace with eth0 on the underlay.
type Host struct {
	Name string // namespace name
	Addr netip.Addr
	Path string // /var/run/netns/<name>
}

// New creates the underlay switch with a unique prefix. The switch holds
// the subnet's last address (.254), where services such as Consul listen.
func New(t testing.TB) *Net {
	t.Helper()
	RequireRoot(t)
	prefix := fmt.Sprintf("vxt%d", os.Getpid()%100000)
	n := &Net{t: t, Prefix: prefix, Subnet: netip.MustParsePrefix("192.168.77.0/24"), next: 1}
	t.Cleanup(n.Close)
	n.Switch = n.AddNS("sw")
	// A fixed MAC: a bridge that has none of its own takes the lowest of
	// its ports', so adding a host later would change the switch's MAC
	// under the other hosts' ARP caches and stall their traffic to it
	// (Consul) for seconds.
	n.ip(n.Switch, "link", "add", "br0", "address", "02:00:00:77:00:fe", "type", "bridge")
	n.ip(n.Switch, "addr", "add", n.SwitchAddr().String()+"/24", "dev", "br0")
	n.ip(n.Switch, "link", "set", "br0", "up")
	n.ip(n.Switch, "link", "set", "lo", "up")
	return n
}

// SwitchAddr is the switch's own address on the underlay.
func (n *Net) SwitchAddr() netip.Addr { return netip.AddrFrom4([4]byte{192, 168, 77, 254}) }

// SwitchAddrs gives the switch k addresses (.254 down), for services that
// need one each, such as the servers of a Consul cluster.
func (n *Net) SwitchAddrs(k int) []netip.Addr {
	n.t.Helper()
	var out []netip.Addr
	for i := range k {
		a := netip.AddrFrom4([4]byte{192, 168, 77, byte(254 - i)})
		if i > 0 {
			n.ip(n.Switch, "addr", "add", a.String()+"/24", "dev", "br0")
		}
		out = append(out, a)
	}
	return out
}

// AddNS creates an empty namespace named prefix-suffix and returns its name.
func (n *Net) AddNS(suffix string) string {
	n.t.Helper()
	name := n.Prefix + "-" + suffix
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		n.t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	n.mu.Lock()
	n.nsList = append(n.nsList, name)
	n.mu.Unlock()
	n.ip(name, "link", "set", "lo", "up")
	return name
}

// DelNS deletes a namespace made by AddNS before the end of the test.
func (n *Net) DelNS(name string) {
	exec.Command("ip", "netns", "del", name).Run()
}

// AddHost creates a host joined to the switch, with eth0 = next address.
func (n *Net) AddHost(suffix string) *Host {
	n.t.Helper()
	name := n.AddNS(suffix)
	n.mu.Lock()
	idx := n.next
	n.next++
	n.mu.Unlock()
	addr := netip.AddrFrom4([4]byte{192, 168, 77, byte(idx)})
	peer := fmt.Sprintf("p%d", idx)
	n.ip(n.Switch, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", name)
	n.ip(n.Switch, "link", "set", peer, "master", "br0", "up")
	n.ip(name, "addr", "add", addr.String()+"/24", "dev", "eth0")
	n.ip(name, "link", "set", "eth0", "up")
	return &Host{Name: name, Addr: addr, Path: "/var/run/netns/" + name}
}

// ip runs `ip -n NS args...` and fails the test on error.
func (n *Net) ip(ns string, args ...string) {
	n.t.Helper()
	if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
		n.t.Fatalf("ip -n %s %s: %v: %s", ns, strings.Join(args, " "), err, out)
	}
}

// Exec runs a command inside a namespace and returns its combined output.
func Exec(ns string, args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	return string(out), err
}

// Ping sends count pings from ns to addr, one second apart at most.
func Ping(ns string, addr string) error {
	out, err := Exec(ns, "ping", "-c", "1", "-W", "1", addr)
	if err != nil {
		return fmt.Errorf("ping %s from %s: %v: %s", addr, ns, err, out)
	}
	return nil
}

// Close deletes every namespace the Net made. Deleting a host namespace
// destroys its veth, and with the switch its bridge.
func (n *Net) Close() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for i := len(n.nsList) - 1; i >= 0; i-- {
		exec.Command("ip", "netns", "del", n.nsList[i]).Run()
	}
	n.nsList = nil
}

// LineHas reports whether one line of out has all parts, in any order
// (iproute2 puts "link-netnsid" in the middle of a moved device's fdb
// entries, for one).
func LineHas(out string, parts ...string) bool {
	for _, line := range strings.Split(out, "\n") {
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(line, p)
		}
		if ok {
			return true
		}
	}
	return false
}

// Link looks up the interface name in the network namespace at path,
// failing the test if it is not there.
func Link(t testing.TB, path, name string) netlink.Link {
	t.Helper()
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatalf("%s in %s: %v", name, path, err)
	}
	return l
}
