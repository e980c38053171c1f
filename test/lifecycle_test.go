package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/testconsul"
	"github.com/vxnet/vxnet/internal/testnet"
	"github.com/vxnet/vxnet/overlay"
)

// pingLoss pings for the given time at 20 per second from ns and returns
// the loss percentage ping reports.
func pingLoss(t *testing.T, ns, addr string, d time.Duration) (chan string, func()) {
	count := int(d / (50 * time.Millisecond))
	cmd := exec.Command("ip", "netns", "exec", ns, "ping", "-i", "0.05", "-c", fmt.Sprint(count), "-W", "1", addr)
	res := make(chan string, 1)
	go func() {
		out, _ := cmd.CombinedOutput()
		res <- string(out)
	}()
	return res, func() { cmd.Process.Kill() }
}

var lossRE = regexp.MustCompile(`(\d+(?:\.\d+)?)% packet loss`)

// Stopping or killing the agent never touches the datapath: no packet is
// lost while it is down and while it starts again.
func TestRestartLosesNoPackets(t *testing.T) {
	c := newCluster(t, 2)
	a1, a2 := c.agents[0], c.agents[1]
	a1.mustVxnet("network", "create", "n", "--subnet", "10.3.0.0/24")
	c1, c2 := c.net.AddNS("c1"), c.net.AddNS("c2")
	a1.mustVxnet("attach", "n", c1, "--ip", "10.3.0.10")
	a2.mustVxnet("attach", "n", c2, "--ip", "10.3.0.20")
	eventually(t, 5*time.Second, "c1 reaches c2", func() error { return testnet.Ping(c1, "10.3.0.20") })

	res, _ := pingLoss(t, c1, "10.3.0.20", 3*time.Second)
	a1.stop(syscall.SIGTERM)
	a2.stop(syscall.SIGKILL)
	time.Sleep(500 * time.Millisecond)
	a1.start()
	a2.start()
	out := <-res
	m := lossRE.FindStringSubmatch(out)
	if m == nil || m[1] != "0" {
		t.Fatalf("packets lost across agent restarts:\n%s", out)
	}
}

// A host that dies is removed everywhere once its session expires; its
// addresses stay reserved; when it comes back it republishes its running
// endpoints and peers program them again.
func TestHostDeathAndReturn(t *testing.T) {
	c := newCluster(t, 2)
	a1, a2 := c.agents[0], c.agents[1]
	a1.mustVxnet("network", "create", "n", "--subnet", "10.4.0.0/29")
	c1, c2 := c.net.AddNS("c1"), c.net.AddNS("c2")
	a1.mustVxnet("attach", "n", c1)
	var e2 api.Endpoint
	a2.jsonOut(&e2, "attach", "n", c2)
	// A network with an endpoint on host2 only: it is removed while host2
	// is away.
	a1.mustVxnet("network", "create", "m", "--subnet", "10.4.1.0/29", "--internal")
	c4 := c.net.AddNS("c4")
	a2.mustVxnet("attach", "m", c4)
	eventually(t, 5*time.Second, "c1 reaches c2", func() error { return testnet.Ping(c1, e2.IP) })
	ns := func() string {
		var d []api.NetworkDetail
		a1.jsonOut(&d, "network", "inspect", "n")
		return nsName(d[0].ID)
	}()

	died := time.Now()
	a2.stop(syscall.SIGKILL)
	// Consul may take up to twice the TTL (10s) to expire the session.
	eventually(t, 30*time.Second, "host1 drops host2's entries", func() error {
		out, _ := a1.inNS(ns, "ip", "neigh", "show", "dev", "vxlan1")
		if strings.Contains(out, e2.IP+" ") {
			return fmt.Errorf("still there: %s", out)
		}
		return nil
	})
	t.Logf("host2's entries removed %s after it died", time.Since(died).Round(100*time.Millisecond))
	var nodes []api.Node
	a1.jsonOut(&nodes, "node", "ls")
	for _, n := range nodes {
		if n.Name == "host2" && n.State != "down" {
			t.Errorf("node ls shows host2 as %q", n.State)
		}
	}
	var eps []api.Endpoint
	a1.jsonOut(&eps, "endpoint", "ls")
	if len(eps) != 1 {
		t.Errorf("endpoints while host2 is gone: %+v", eps)
	}
	// Its address is not handed out while it may still be in use.
	c3 := c.net.AddNS("c3")
	var e3 api.Endpoint
	a1.jsonOut(&e3, "attach", "n", c3)
	if e3.IP == e2.IP {
		t.Fatalf("the address of a gone host's endpoint was reused: %s", e3.IP)
	}

	// An operator declares host2 gone for good: its records and addresses
	// are released; a live node cannot be removed.
	if out, err := a1.vxnet("node", "rm", "host1"); err == nil || !strings.Contains(out, "this node") {
		t.Errorf("node rm of itself: %v %s", err, out)
	}
	a1.mustVxnet("node", "rm", "host2")
	a1.jsonOut(&nodes, "node", "ls")
	if len(nodes) != 1 {
		t.Errorf("nodes after node rm: %+v", nodes)
	}
	a1.mustVxnet("network", "rm", "m")

	// host2 was not gone after all: it comes back, holds its address again
	// and republishes its running endpoint.
	back := time.Now()
	a2.start()
	eventually(t, 10*time.Second, "host1 programs host2's endpoint again", func() error { return testnet.Ping(c1, e2.IP) })
	t.Logf("host2's endpoint reachable again %s after its agent restarted", time.Since(back).Round(100*time.Millisecond))
	// Its endpoint of the network removed meanwhile is not republished
	// but removed, with its interface and the network's namespace.
	eventually(t, 10*time.Second, "host2 removes the endpoint of the removed network", func() error {
		if out, err := testnet.Exec(c4, "ip", "-o", "link", "show", "eth0"); err == nil {
			return fmt.Errorf("c4 still has eth0: %s", out)
		}
		if nss := a2.overlayNamespaces(); len(nss) != 1 {
			return fmt.Errorf("host2's overlay namespaces: %v", nss)
		}
		return nil
	})
	if !strings.Contains(a2.log(), "network was removed while this host was away") {
		t.Error("host2 did not say why it removed the endpoint")
	}
	a1.jsonOut(&eps, "endpoint", "ls")
	for _, e := range eps {
		if e.Network == "m" {
			t.Errorf("endpoint of the removed network republished: %+v", e)
		}
	}
	a1.jsonOut(&nodes, "node", "ls")
	for _, n := range nodes {
		if n.State != "up" {
			t.Errorf("node %s is %s after return", n.Name, n.State)
		}
	}

	// A live node cannot be removed.
	if out, err := a1.vxnet("node", "rm", "host2"); err == nil || !strings.Contains(out, "alive") {
		t.Errorf("node rm of a live node: %v %s", err, out)
	}
}

// Whatever an operator (or anything else) deletes of the datapath comes
// back within a resync interval (2s in these tests).
func TestDriftRepair(t *testing.T) {
	c := newCluster(t, 2)
	a1, a2 := c.agents[0], c.agents[1]
	a1.mustVxnet("network", "create", "n", "--subnet", "10.5.0.0/24")
	c1, c2 := c.net.AddNS("c1"), c.net.AddNS("c2")
	var e1 api.Endpoint
	a1.jsonOut(&e1, "attach", "n", c1)
	a2.mustVxnet("attach", "n", c2, "--ip", "10.5.0.20")
	var d []api.NetworkDetail
	a1.jsonOut(&d, "network", "inspect", "n")
	ns := nsName(d[0].ID)
	eventually(t, 5*time.Second, "c1 reaches c2", func() error { return testnet.Ping(c1, "10.5.0.20") })

	host := c.hosts[0].Name
	vethOut, _ := a1.inNS(ns, "ip", "-o", "link", "show", "type", "veth")
	veth := strings.TrimSpace(strings.Split(strings.Split(vethOut, ": ")[1], "@")[0])
	drifts := []struct {
		what string
		do   []string // command, run in the overlay namespace unless it starts with "host:"
	}{
		{"neighbor entry", []string{"ip", "neigh", "del", "10.5.0.20", "dev", "vxlan1"}},
		{"fdb entry", []string{"bridge", "fdb", "del", "02:42:0a:05:00:14", "dev", "vxlan1", "dst", "192.168.77.2", "self"}},
		{"br0 address", []string{"ip", "addr", "flush", "dev", "br0"}},
		{"vxlan device", []string{"ip", "link", "del", "vxlan1"}},
		{"bridge", []string{"ip", "link", "del", "br0"}},
		{"endpoint veth", []string{"ip", "link", "del", veth}},
		{"NAT rule", []string{"host:", "iptables", "-t", "nat", "-F", "VXNET-POSTROUTING"}},
		{"gateway interface", []string{"host:", "sh", "-c", "ip -o link show master vxnet_gwbridge | cut -d: -f2 | cut -d@ -f1 | xargs -n1 ip link del"}},
	}
	for _, dr := range drifts {
		var out []byte
		var err error
		if dr.do[0] == "host:" {
			out, err = exec.Command("ip", append([]string{"netns", "exec", host}, dr.do[1:]...)...).CombinedOutput()
		} else {
			var s string
			s, err = a1.inNS(ns, dr.do...)
			out = []byte(s)
		}
		if err != nil {
			t.Fatalf("delete %s: %v %s", dr.what, err, out)
		}
		start := time.Now()
		eventually(t, 8*time.Second, "repair of "+dr.what, func() error {
			if err := testnet.Ping(c1, "10.5.0.20"); err != nil {
				return err
			}
			switch dr.what {
			case "neighbor entry":
				if out, _ := a1.inNS(ns, "ip", "neigh", "show", "dev", "vxlan1"); !strings.Contains(out, "10.5.0.20 lladdr") {
					return fmt.Errorf("neighbor not back")
				}
			case "fdb entry":
				if out, _ := a1.inNS(ns, "bridge", "fdb", "show", "dev", "vxlan1"); !testnet.LineHas(out, "02:42:0a:05:00:14 dst 192.168.77.2") {
					return fmt.Errorf("fdb entry not back")
				}
			case "br0 address":
				if out, _ := a1.inNS(ns, "ip", "addr", "show", "br0"); !strings.Contains(out, "10.5.0.1/24") {
					return fmt.Errorf("address not back")
				}
			}
			if dr.what == "NAT rule" {
				out, _ := exec.Command("ip", "netns", "exec", host, "iptables", "-t", "nat", "-S", "VXNET-POSTROUTING").CombinedOutput()
				if !strings.Contains(string(out), "MASQUERADE") {
					return fmt.Errorf("rule not back")
				}
			}
			if dr.what == "gateway interface" {
				out, _ := exec.Command("ip", "-n", c1, "route").CombinedOutput()
				if !strings.Contains(string(out), "default via") {
					return fmt.Errorf("no default route yet")
				}
			}
			return nil
		})
		t.Logf("%s repaired in %s", dr.what, time.Since(start).Round(100*time.Millisecond))
	}
	if log := a1.log(); !strings.Contains(log, "level=WARN") || !strings.Contains(log, "repaired") {
		t.Errorf("repairs were not logged as warnings")
	}
}

// A SIGKILL at any step of attach or detach leaves, after a restart,
// either a complete endpoint or no trace of it.
func TestCrashConsistency(t *testing.T) {
	c := newCluster(t, 1)
	a := c.agents[0]
	a.mustVxnet("network", "create", "n", "--subnet", "10.6.0.0/28")
	var d []api.NetworkDetail
	a.jsonOut(&d, "network", "inspect", "n")
	ns := nsName(d[0].ID)

	check := func(point string) {
		t.Helper()
		var eps []api.Endpoint
		a.jsonOut(&eps, "endpoint", "ls")
		veths := 0
		if out, err := a.inNS(ns, "ip", "-o", "link", "show", "type", "veth"); err == nil {
			veths = strings.Count(out, "\n")
		}
		files, _ := filepath.Glob(filepath.Join(a.dir, "state", "endpoints", "n", "*.json"))
		gws, _ := exec.Command("ip", "-n", c.hosts[0].Name, "-o", "link", "show", "master", "vxnet_gwbridge").Output()
		ngw := strings.Count(string(gws), "\n")
		if veths != len(eps) || len(files) != len(eps) || ngw != len(eps) {
			t.Errorf("after a crash at %s: %d endpoints in the store, %d veths, %d state files, %d gateway veths",
				point, len(eps), veths, len(files), ngw)
		}
		// The lowest free address is the first one no endpoint holds: no
		// address is held by a vanished endpoint.
		used := map[string]bool{}
		for _, e := range eps {
			used[e.IP] = true
		}
		want := ""
		for i := 2; i < 15; i++ {
			if ip := fmt.Sprintf("10.6.0.%d", i); !used[ip] {
				want = ip
				break
			}
		}
		probe := c.net.AddNS("probe")
		var e api.Endpoint
		a.jsonOut(&e, "attach", "n", probe)
		if e.IP != want {
			t.Errorf("after a crash at %s: a new endpoint got %s, want %s (an address leaked)", point, e.IP, want)
		}
		a.mustVxnet("detach", "n", probe)
		c.net.DelNS(probe)
	}

	for i, point := range overlay.CrashPoints {
		ctr := c.net.AddNS(fmt.Sprintf("k%d", i))
		detachPoint := strings.HasPrefix(point, "detach") || strings.HasPrefix(point, "purge")
		if detachPoint {
			a.mustVxnet("attach", "n", ctr, "--name", "victim")
		}
		a.stop(syscall.SIGTERM)
		a.env = []string{"VXNETD_TEST_CRASH_AT=" + point}
		a.start()
		a.env = nil
		var err error
		if detachPoint {
			_, err = a.vxnet("detach", "n", "victim")
		} else {
			_, err = a.vxnet("attach", "n", ctr, "--name", "victim")
		}
		if err == nil {
			t.Fatalf("crash point %s was not reached", point)
		}
		a.waitExit(10 * time.Second)
		a.start()
		time.Sleep(200 * time.Millisecond) // one reconcile after ready
		check(point)
		// Leave no victim for the next round.
		if out, err := a.vxnet("detach", "n", "victim"); err != nil && !strings.Contains(out, "not found") {
			t.Fatalf("detach after %s: %v %s", point, err, out)
		}
		c.net.DelNS(ctr)
	}
	if entries, _ := os.ReadDir(filepath.Join(a.dir, "state", "endpoints", "n")); len(entries) != 0 {
		t.Errorf("state files left: %v", entries)
	}
}

// With the store down the datapath keeps working, mutations fail fast and
// clearly, and the agent resyncs by itself when the store is back.
func TestStoreOutage(t *testing.T) {
	c := newCluster(t, 2, testconsul.WithPersistence())
	a1, a2 := c.agents[0], c.agents[1]
	a1.mustVxnet("network", "create", "n", "--subnet", "10.7.0.0/24")
	c1, c2 := c.net.AddNS("c1"), c.net.AddNS("c2")
	a1.mustVxnet("attach", "n", c1)
	a2.mustVxnet("attach", "n", c2, "--ip", "10.7.0.20")
	eventually(t, 5*time.Second, "c1 reaches c2", func() error { return testnet.Ping(c1, "10.7.0.20") })

	c.consul.Stop()
	if err := testnet.Ping(c1, "10.7.0.20"); err != nil {
		t.Errorf("datapath broke with the store down: %v", err)
	}
	start := time.Now()
	out, err := a1.vxnet("network", "create", "m")
	if err == nil || !strings.Contains(out, "unavailable") {
		t.Errorf("create with the store down: %v %s", err, out)
	}
	if d := time.Since(start); d > 6*time.Second {
		t.Errorf("create with the store down took %s", d)
	}
	eventually(t, 10*time.Second, "status says the store is unreachable", func() error {
		out := a1.mustVxnet("status")
		if !strings.Contains(out, "UNREACHABLE") || !strings.Contains(out, "since") {
			return fmt.Errorf("%s", out)
		}
		return nil
	})
	// Listings answer from the agent's own view, saying so.
	if out, err := a1.vxnet("network", "ls"); err != nil || !strings.Contains(out, "10.7.0.0/24") || !strings.Contains(out, "Warning: the store does not answer") {
		t.Errorf("network ls with the store down: %v\n%s", err, out)
	}
	if out, err := a1.vxnet("endpoint", "ls"); err != nil || !strings.Contains(out, c1) || !strings.Contains(out, "only this host's endpoints") {
		t.Errorf("endpoint ls with the store down: %v\n%s", err, out)
	}
	// An agent restarted during the outage keeps the datapath as it was.
	a2.stop(syscall.SIGKILL)
	a2.startNoWait()
	time.Sleep(time.Second)
	if err := testnet.Ping(c1, "10.7.0.20"); err != nil {
		t.Errorf("datapath broke after an agent restart during the outage: %v", err)
	}

	c.consul.Restart()
	eventually(t, 20*time.Second, "agents resync after the store is back", func() error {
		for _, a := range []*agent{a1, a2} {
			out, _ := a.vxnet("status")
			if !strings.Contains(out, "reachable") || strings.Contains(out, "UNREACHABLE") {
				return fmt.Errorf("%s: %s", a.node, out)
			}
		}
		return nil
	})
	c3 := c.net.AddNS("c3")
	var e3 api.Endpoint
	a2.jsonOut(&e3, "attach", "n", c3)
	eventually(t, 5*time.Second, "c1 reaches a container attached after the outage", func() error { return testnet.Ping(c1, e3.IP) })
}

// A host cut off from Consul (its packets dropped, not refused: the
// blocking queries hang as in a real partition) is noticed by itself within
// a session renewal and by its peers once its session expires; when the
// partition heals it registers again and republishes its endpoints.
func TestPartitionAndHeal(t *testing.T) {
	c := newCluster(t, 2)
	a1, a2 := c.agents[0], c.agents[1]
	a1.mustVxnet("network", "create", "p", "--subnet", "10.5.0.0/29", "--internal")
	c1, c2 := c.net.AddNS("c1"), c.net.AddNS("c2")
	a1.mustVxnet("attach", "p", c1)
	var e2 api.Endpoint
	a2.jsonOut(&e2, "attach", "p", c2)
	eventually(t, 5*time.Second, "c1 reaches c2", func() error { return testnet.Ping(c1, e2.IP) })
	var d []api.NetworkDetail
	a1.jsonOut(&d, "network", "inspect", "p")
	ns := nsName(d[0].ID)

	_, port, _ := strings.Cut(c.consul.Addr(), ":")
	rule := []string{"OUTPUT", "-d", c.net.SwitchAddr().String(), "-p", "tcp", "--dport", port, "-j", "DROP"}
	iptables := func(op string) {
		t.Helper()
		if out, err := testnet.Exec(c.hosts[1].Name, append([]string{"iptables", op}, rule...)...); err != nil {
			t.Fatalf("iptables %s: %v: %s", op, err, out)
		}
	}
	iptables("-I")
	cut := time.Now()
	healed := false
	defer func() {
		if !healed {
			iptables("-D")
		}
	}()

	// The cut-off host says so within a renewal (TTL/3) and a request
	// timeout, and refuses changes within a request timeout.
	eventually(t, 15*time.Second, "host2 reports the store unreachable", func() error {
		var s api.Status
		a2.jsonOut(&s, "status")
		if s.StoreReachable {
			return fmt.Errorf("status: %+v", s)
		}
		return nil
	})
	t.Logf("host2 reported the store unreachable %s after the cut", time.Since(cut).Round(100*time.Millisecond))
	start := time.Now()
	if out, err := a2.vxnet("network", "create", "q"); err == nil {
		t.Errorf("create while cut off succeeded: %s", out)
	}
	if d := time.Since(start); d > 8*time.Second {
		t.Errorf("create while cut off took %s", d)
	}

	// Its peers drop its entries once its session expires (<= 2 x TTL).
	eventually(t, 30*time.Second, "host1 drops host2's entries", func() error {
		if out, _ := a1.inNS(ns, "ip", "neigh", "show", "dev", "vxlan1"); strings.Contains(out, e2.IP+" ") {
			return fmt.Errorf("still there: %s", out)
		}
		return nil
	})
	t.Logf("host1 dropped host2's entries %s after the cut", time.Since(cut).Round(100*time.Millisecond))
	// Its own datapath is untouched: the container keeps its interface.
	if out, err := testnet.Exec(c2, "ip", "-o", "addr", "show", "eth0"); err != nil || !strings.Contains(out, e2.IP) {
		t.Errorf("host2's container lost its interface while cut off: %v %s", err, out)
	}

	iptables("-D")
	healed = true
	back := time.Now()
	eventually(t, 20*time.Second, "c1 reaches c2 after the partition healed", func() error { return testnet.Ping(c1, e2.IP) })
	t.Logf("host2's endpoint reachable again %s after the partition healed", time.Since(back).Round(100*time.Millisecond))
	eventually(t, 10*time.Second, "host2 reports the store reachable", func() error {
		var s api.Status
		a2.jsonOut(&s, "status")
		if !s.StoreReachable {
			return fmt.Errorf("status: %+v", s)
		}
		return nil
	})
	var nodes []api.Node
	a1.jsonOut(&nodes, "node", "ls")
	for _, n := range nodes {
		if n.State != "up" {
			t.Errorf("node %s is %s after the partition healed", n.Name, n.State)
		}
	}
}
