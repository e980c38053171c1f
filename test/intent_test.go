package test

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/testnet"
)

// Teardown needs intent: what the store merely lacks (it lost its state,
// a key was deleted by hand) is put back from the hosts' journals, and the
// datapath is never touched on the way.

// networkBack waits until every agent lists the network with its old id
// and the endpoints by name, and says how long that took.
func recordsBack(t *testing.T, agents []*agent, network, id string, endpoints ...string) time.Duration {
	t.Helper()
	start := time.Now()
	eventually(t, 20*time.Second, "the records are back in the store", func() error {
		for _, a := range agents {
			var nets []api.Network
			out, err := a.vxnet("-o", "json", "network", "ls")
			if err != nil || jsonDecode(out, &nets) != nil {
				return fmt.Errorf("%s: network ls: %v %s", a.node, err, out)
			}
			if !slices.ContainsFunc(nets, func(n api.Network) bool { return n.Name == network && n.ID == id }) {
				return fmt.Errorf("%s: network %s (%s) not listed: %+v", a.node, network, id[:12], nets)
			}
			var eps []api.Endpoint
			out, err = a.vxnet("-o", "json", "endpoint", "ls", "--network", network)
			if err != nil || jsonDecode(out, &eps) != nil {
				return fmt.Errorf("%s: endpoint ls: %v %s", a.node, err, out)
			}
			var names []string
			for _, e := range eps {
				names = append(names, e.Name)
			}
			slices.Sort(names)
			if !slices.Equal(names, endpoints) {
				return fmt.Errorf("%s: endpoints %v, want %v", a.node, names, endpoints)
			}
		}
		return nil
	})
	return time.Since(start)
}

// pingingPair is two hosts on network name (subnet net.0/24), endpoint e1
// on the first host and e2 (net.20) on the second, c1 reaching c2.
func pingingPair(t *testing.T, name, net string) (*cluster, api.Network, string, string) {
	t.Helper()
	c := newCluster(t, 2)
	var n api.Network
	c.agents[0].jsonOut(&n, "network", "create", name, "--subnet", net+".0/24")
	c1, c2 := c.net.AddNS("c1"), c.net.AddNS("c2")
	c.agents[0].mustVxnet("attach", name, c1, "--name", "e1")
	c.agents[1].mustVxnet("attach", name, c2, "--name", "e2", "--ip", net+".20")
	eventually(t, 5*time.Second, "c1 reaches c2", func() error { return testnet.Ping(c1, net+".20") })
	return c, n, c1, c2
}

func lossOf(t *testing.T, res chan string) string {
	t.Helper()
	out := <-res
	m := lossRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("ping output:\n%s", out)
	}
	return m[1]
}

// A Consul that comes back empty (a -dev server restarted; the same as a
// lost raft or an old snapshot), and then a recursive delete of the whole
// prefix: pings between two hosts lose nothing, and every record is back
// within seconds, with the same ids, VNI, subnet and addresses.
func TestStoreLostKeepsDatapath(t *testing.T) {
	c, n, c1, c2 := pingingPair(t, "lost", "10.12.0")
	a2 := c.agents[1]

	res, stop := pingLoss(t, c1, "10.12.0.20", 12*time.Second)
	defer stop()
	time.Sleep(time.Second)
	c.consul.Restart() // -dev: empty
	t.Logf("store back empty: records back after %s", recordsBack(t, c.agents, "lost", n.ID, "e1", "e2").Round(100*time.Millisecond))

	if _, err := c.consul.Request("DELETE", "/v1/kv/vxnet/?recurse", ""); err != nil {
		t.Fatal(err)
	}
	t.Logf("prefix deleted: records back after %s", recordsBack(t, c.agents, "lost", n.ID, "e1", "e2").Round(100*time.Millisecond))
	if loss := lossOf(t, res); loss != "0" {
		t.Errorf("%s%% of the pings lost while the store lost its state", loss)
	}
	for _, a := range c.agents {
		if !strings.Contains(a.log(), "lost its state") {
			t.Errorf("%s did not log that the store lost its state", a.node)
		}
		if strings.Contains(a.log(), "removing an endpoint") || strings.Contains(a.log(), "removed while this host was away") {
			t.Errorf("%s tore an endpoint down:\n%s", a.node, a.logTail())
		}
	}
	// The containers kept their interfaces, the gateway one included.
	for _, ns := range []string{c1, c2} {
		if out, _ := testnet.Exec(ns, "ip", "-o", "-4", "addr"); !strings.Contains(out, "eth0") || !strings.Contains(out, "eth1") {
			t.Errorf("%s lost interfaces:\n%s", ns, out)
		}
	}
	// The restored reservations still protect the subnet and the VNI.
	if out, err := a2.vxnet("network", "create", "again", "--subnet", "10.12.0.0/24"); err == nil || !strings.Contains(out, "overlaps") {
		t.Errorf("create over a restored subnet: %v %s", err, out)
	}
	if out, err := a2.vxnet("network", "create", "again", "--vni", fmt.Sprint(n.VNI)); err == nil {
		t.Errorf("create with a restored VNI: %s", out)
	}
	c3 := c.net.AddNS("c3")
	var e3 api.Endpoint
	a2.jsonOut(&e3, "attach", "lost", c3)
	if e3.IP == "10.12.0.20" || e3.IP == "10.12.0.2" {
		t.Errorf("a restored address was handed out again: %s", e3.IP)
	}
}

// One network key deleted by hand: the datapath stays and the network
// reappears as it was; a tampered reservation key cannot hand its subnet
// or VNI out twice, the records being the truth.
func TestNetworkKeyDeletedByHand(t *testing.T) {
	c, n, c1, _ := pingingPair(t, "cnet", "10.13.0")
	a1, a2 := c.agents[0], c.agents[1]

	res, stop := pingLoss(t, c1, "10.13.0.20", 8*time.Second)
	defer stop()
	if _, err := c.consul.Request("DELETE", "/v1/kv/vxnet/networks/cnet", ""); err != nil {
		t.Fatal(err)
	}
	t.Logf("network back after %s", recordsBack(t, c.agents, "cnet", n.ID, "e1", "e2").Round(100*time.Millisecond))
	if loss := lossOf(t, res); loss != "0" {
		t.Errorf("%s%% of the pings lost after the network key was deleted", loss)
	}
	for _, a := range c.agents {
		if strings.Contains(a.log(), "removing an endpoint") {
			t.Errorf("%s tore an endpoint down:\n%s", a.node, a.logTail())
		}
	}

	// Empty the reservations: the network record still holds its subnet
	// and VNI.
	if _, err := c.consul.Request("PUT", "/v1/kv/vxnet/ipam/networks", `{"version":1,"networks":{}}`); err != nil {
		t.Fatal(err)
	}
	if out, err := a1.vxnet("network", "create", "dup", "--subnet", "10.13.0.0/24"); err == nil || !strings.Contains(out, "overlaps") {
		t.Errorf("create over a network whose reservation was lost: %v %s", err, out)
	}
	if out, err := a1.vxnet("network", "create", "dup", "--vni", fmt.Sprint(n.VNI)); err == nil {
		t.Errorf("create with the VNI of a network whose reservation was lost: %s", out)
	}
	// A removed network is gone for good, its subnet free again.
	a1.mustVxnet("detach", "cnet", "e1")
	a2.mustVxnet("detach", "cnet", "e2")
	a1.mustVxnet("network", "rm", "cnet")
	a1.mustVxnet("network", "create", "cnet", "--subnet", "10.13.0.0/24")
}

// attachStorm runs n attaches at once on a's network f and calls disrupt
// once they are under way. Every attach must end within 10 s; the failed
// ones must say the store is unavailable. It returns the namespaces and
// which attaches failed.
func attachStorm(t *testing.T, c *cluster, a *agent, n int, disrupt func()) ([]string, map[int]bool) {
	t.Helper()
	nss := make([]string, n)
	for i := range nss {
		nss[i] = c.net.AddNS(fmt.Sprintf("z%d", i))
	}
	type result struct {
		out  string
		err  error
		took time.Duration
	}
	results := make([]result, n)
	var wg sync.WaitGroup
	for i := range nss {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			out, err := a.vxnet("attach", "f", nss[i], "--name", fmt.Sprintf("z%d", i))
			results[i] = result{out, err, time.Since(start)}
		}()
	}
	time.Sleep(100 * time.Millisecond) // some attaches are under way
	disrupt()
	wg.Wait()
	failed := map[int]bool{}
	for i, r := range results {
		if r.took > 10*time.Second {
			t.Errorf("attach z%d took %s", i, r.took.Round(100*time.Millisecond))
		}
		if r.err != nil {
			failed[i] = true
			if !strings.Contains(r.out, "unavailable") {
				t.Errorf("attach z%d failed without saying the store is unavailable: %s", i, r.out)
			}
		}
	}
	t.Logf("%d of %d attaches failed", len(failed), n)
	if len(failed) == 0 {
		t.Fatal("no attach met the disrupted store")
	}
	return nss, failed
}

// noTrace checks that the namespaces of failed attaches have no interface
// but lo and no route.
func noTrace(t *testing.T, when string, nss []string, failed map[int]bool) {
	t.Helper()
	for i := range failed {
		if out, _ := testnet.Exec(nss[i], "ip", "-o", "link"); strings.Contains(out, "eth") {
			t.Errorf("%s: failed attach z%d left an interface:\n%s", when, i, out)
		}
		if out, _ := testnet.Exec(nss[i], "ip", "route"); strings.TrimSpace(out) != "" {
			t.Errorf("%s: failed attach z%d left routes:\n%s", when, i, out)
		}
	}
}

// endpointsAndAddrs waits until the network has want endpoints and the
// store holds an address for each and no more.
func endpointsAndAddrs(t *testing.T, c *cluster, a *agent, want int) {
	t.Helper()
	eventually(t, 20*time.Second, "the failed attaches leave no record and no address", func() error {
		var eps []api.Endpoint
		out, err := a.vxnet("-o", "json", "endpoint", "ls", "--network", "f")
		if err != nil || jsonDecode(out, &eps) != nil {
			return fmt.Errorf("endpoint ls: %v %s", err, out)
		}
		if len(eps) != want {
			return fmt.Errorf("%d endpoints, want %d", len(eps), want)
		}
		if keys := c.consul.Keys("vxnet/ipam/addrs/"); len(keys) != len(eps) {
			return fmt.Errorf("%d addresses held for %d endpoints", len(keys), len(eps))
		}
		return nil
	})
}

// Attaches while Consul is frozen (SIGSTOP: connections accepted, never
// answered) fail within 10 s with "store unavailable" and leave nothing:
// no interface, no route, and once the store is back no record and no
// address.
func TestFrozenStoreFailsAttachesCleanly(t *testing.T) {
	c := newCluster(t, 1)
	a := c.agents[0]
	a.mustVxnet("network", "create", "f", "--subnet", "10.14.0.0/24")
	a.mustVxnet("attach", "f", c.net.AddNS("first")) // the network's namespace exists

	const n = 24
	nss, failed := attachStorm(t, c, a, n, func() { c.consul.Signal(syscall.SIGSTOP) })
	defer c.consul.Signal(syscall.SIGCONT)
	time.Sleep(4 * time.Second) // passes with the store frozen: nothing may appear
	noTrace(t, "store frozen", nss, failed)

	c.consul.Signal(syscall.SIGCONT)
	endpointsAndAddrs(t, c, a, n+1-len(failed))
	noTrace(t, "store back", nss, failed)
	for i := range failed {
		a.mustVxnet("attach", "f", nss[i], "--name", fmt.Sprintf("z%d", i))
	}
}

// The same with Consul killed in the middle (connections refused): and
// since it comes back empty (-dev), what succeeded is republished, what
// failed is not.
func TestKilledStoreFailsAttachesCleanly(t *testing.T) {
	c := newCluster(t, 1)
	a := c.agents[0]
	a.mustVxnet("network", "create", "f", "--subnet", "10.14.0.0/24")
	a.mustVxnet("attach", "f", c.net.AddNS("first"))

	const n = 24
	nss, failed := attachStorm(t, c, a, n, func() { c.consul.Signal(syscall.SIGKILL) })
	time.Sleep(3 * time.Second)
	noTrace(t, "store killed", nss, failed)

	c.consul.Restart()
	endpointsAndAddrs(t, c, a, n+1-len(failed))
	noTrace(t, "store back", nss, failed)
}

// A corrupt network record is listed, refused as a name and removable; an
// endpoint record of a node that never registered can be removed with
// node rm, after which network rm goes through.
func TestCorruptAndOrphanRecordsRemovable(t *testing.T) {
	c := newCluster(t, 1)
	a := c.agents[0]
	if _, err := c.consul.Request("PUT", "/v1/kv/vxnet/networks/bad", "{not json"); err != nil {
		t.Fatal(err)
	}
	out := a.mustVxnet("network", "ls")
	if !strings.Contains(out, "bad") {
		t.Errorf("network ls hides the corrupt record:\n%s", out)
	}
	if out, err := a.vxnet("network", "create", "bad"); err == nil || !strings.Contains(out, "unreadable") || !strings.Contains(out, "network rm bad") {
		t.Errorf("create over a corrupt record: %v %s", err, out)
	}
	a.mustVxnet("network", "rm", "bad")
	a.mustVxnet("network", "create", "bad", "--subnet", "10.15.0.0/24")

	var n api.Network
	a.jsonOut(&n, "network", "create", "orph", "--subnet", "10.15.1.0/24")
	ghost := fmt.Sprintf(`{"version":1,"id":"%s","name":"g1","network":"orph","network_id":"%s","node":"ghost","vtep":"192.168.77.250","ip":"10.15.1.9","mac":"02:42:0a:0f:01:09","interface":"eth0","created":"2026-01-01T00:00:00Z"}`,
		strings.Repeat("ab", 32), n.ID)
	if _, err := c.consul.Request("PUT", "/v1/kv/vxnet/endpoints/orph/g1", ghost); err != nil {
		t.Fatal(err)
	}
	if out, err := a.vxnet("network", "rm", "orph"); err == nil || !strings.Contains(out, "ghost") {
		t.Errorf("network rm with a ghost node's endpoint: %v %s", err, out)
	}
	a.mustVxnet("node", "rm", "ghost")
	a.mustVxnet("network", "rm", "orph")
	if out, err := a.vxnet("node", "rm", "ghost"); err == nil || !strings.Contains(out, "not found") {
		t.Errorf("node rm of nothing: %v %s", err, out)
	}
}

// A network removed and made again at once is there at once, on every
// host: the agents read their own writes.
func TestRecreateNetworkAtOnce(t *testing.T) {
	c := newCluster(t, 2)
	a1, a2 := c.agents[0], c.agents[1]
	for i := range 3 {
		var n api.Network
		a1.jsonOut(&n, "network", "create", "re", "--subnet", "10.16.0.0/24")
		ns1, ns2 := c.net.AddNS(fmt.Sprintf("r%d", i)), c.net.AddNS(fmt.Sprintf("s%d", i))
		a2.mustVxnet("attach", "re", ns2, "--name", "s")
		a1.mustVxnet("attach", "re", ns1, "--name", "r")
		var d []api.NetworkDetail
		a2.jsonOut(&d, "network", "inspect", "re")
		if d[0].ID != n.ID || len(d[0].Endpoints) != 2 {
			t.Fatalf("round %d: inspect on host2: %+v", i, d)
		}
		a1.mustVxnet("detach", "re", "r")
		a2.mustVxnet("detach", "re", "s")
		a2.mustVxnet("network", "rm", "re")
	}
}
