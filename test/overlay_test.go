package test

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/testconsul"
	"github.com/vxnet/vxnet/internal/testnet"
)

// cluster is three simulated hosts with an agent each and Consul on the
// underlay switch.
type cluster struct {
	consul *testconsul.Server
	net    *testnet.Net
	hosts  []*testnet.Host
	agents []*agent
}

func newCluster(t *testing.T, n int, opts ...testconsul.Option) *cluster {
	t.Helper()
	return newClusterArgs(t, n, nil, opts...)
}

// newClusterArgs is newCluster with more flags for every agent.
func newClusterArgs(t *testing.T, n int, agentArgs []string, opts ...testconsul.Option) *cluster {
	t.Helper()
	tn := testnet.New(t)
	opts = append(opts, testconsul.WithNetNS("/var/run/netns/"+tn.Switch), testconsul.WithAddr(tn.SwitchAddr().String()))
	consul := testconsul.Start(t, opts...)
	c := &cluster{net: tn, consul: consul}
	for i := range n {
		h := tn.AddHost(fmt.Sprintf("h%d", i+1))
		c.hosts = append(c.hosts, h)
		c.agents = append(c.agents, startAgent(t, h, fmt.Sprintf("host%d", i+1), consul.URL("vxnet/"), append([]string{"--node-ttl", "10s"}, agentArgs...)...))
	}
	return c
}

// pairOn creates a network (subnet NET.0/24) on a1 and attaches a
// container on each host, NET.10 on a1 and NET.20 on a2, and waits until
// the first reaches the second; it returns the network's namespace name
// and the two containers.
func (c *cluster) pairOn(t *testing.T, a1, a2 *agent, name, net string) (ns, c1, c2 string) {
	t.Helper()
	var n api.Network
	a1.jsonOut(&n, "network", "create", name, "--subnet", net+".0/24")
	c1, c2 = c.net.AddNS(name+"-c1"), c.net.AddNS(name+"-c2")
	a1.mustVxnet("attach", name, c1, "--ip", net+".10")
	a2.mustVxnet("attach", name, c2, "--ip", net+".20")
	eventually(t, 5*time.Second, "c1 reaches c2", func() error { return testnet.Ping(c1, net+".20") })
	return nsName(n.ID), c1, c2
}

func TestOverlayAcrossHosts(t *testing.T) {
	c := newCluster(t, 3)
	a1, a2, a3 := c.agents[0], c.agents[1], c.agents[2]

	// A network created on one host is seen on every host.
	var n1 api.Network
	a1.jsonOut(&n1, "network", "create", "net1", "--subnet", "10.0.0.0/24")
	if n1.VNI != 256 || n1.Gateway != "10.0.0.1" || n1.MTU != 1450 || n1.Subnet != "10.0.0.0/24" {
		t.Fatalf("network create: got %+v", n1)
	}
	var nets []api.Network
	a3.jsonOut(&nets, "network", "ls")
	if len(nets) != 1 || nets[0].ID != n1.ID {
		t.Fatalf("network ls on host3: %+v", nets)
	}
	if out := a3.mustVxnet("network", "ls"); !strings.Contains(out, "net1") || !strings.Contains(out, "10.0.0.0/24") {
		t.Fatalf("network ls table:\n%s", out)
	}

	c1, c2 := c.net.AddNS("c1"), c.net.AddNS("c2")
	var e1, e2 api.Endpoint
	a1.jsonOut(&e1, "attach", "net1", c1)
	a2.jsonOut(&e2, "attach", "net1", "/var/run/netns/"+c2, "--name", "web")
	if e1.IP != "10.0.0.2" || e1.MAC != "02:42:0a:00:00:02" || e1.Interface != "eth0" || e1.Node != "host1" || e1.Name != c1 {
		t.Fatalf("attach c1: %+v", e1)
	}
	if e2.IP != "10.0.0.3" || e2.Name != "web" {
		t.Fatalf("attach c2: %+v", e2)
	}

	// The container side looks like the article's: eth0, MTU 1450, the
	// IP-derived MAC, a route for the subnet.
	out, _ := testnet.Exec(c1, "ip", "-d", "addr", "show", "eth0")
	for _, want := range []string{"mtu 1450", "02:42:0a:00:00:02", "10.0.0.2/24"} {
		if !strings.Contains(out, want) {
			t.Errorf("c1 eth0 lacks %q:\n%s", want, out)
		}
	}

	// Packets cross the VTEPs both ways.
	eventually(t, 5*time.Second, "c1 reaches c2", func() error { return testnet.Ping(c1, "10.0.0.3") })
	eventually(t, 5*time.Second, "c2 reaches c1", func() error { return testnet.Ping(c2, "10.0.0.2") })

	// Host2's VTEP: the Docker overlay's shape, static entries for host1.
	ns := nsName(n1.ID)
	out, _ = a2.inNS(ns, "ip", "-d", "link", "show", "vxlan1")
	for _, want := range []string{"vxlan id 256", "dstport 4789", "nolearning", "proxy", "master br0", "mtu 1450"} {
		if !strings.Contains(out, want) {
			t.Errorf("vxlan1 on host2 lacks %q:\n%s", want, out)
		}
	}
	out, _ = a2.inNS(ns, "ip", "neigh", "show", "dev", "vxlan1")
	if !strings.Contains(out, "10.0.0.2 lladdr 02:42:0a:00:00:02 PERMANENT") {
		t.Errorf("host2 neighbor table:\n%s", out)
	}
	out, _ = a2.inNS(ns, "bridge", "fdb", "show", "dev", "vxlan1")
	if !testnet.LineHas(out, "02:42:0a:00:00:02 dst 192.168.77.1", "self permanent") {
		t.Errorf("host2 fdb:\n%s", out)
	}
	out, _ = a2.inNS(ns, "ip", "addr", "show", "br0")
	if !strings.Contains(out, "10.0.0.1/24") {
		t.Errorf("br0 on host2 lacks the gateway:\n%s", out)
	}
	// A host with no endpoint of the network programs nothing for it.
	if got := a3.overlayNamespaces(); len(got) != 0 {
		t.Errorf("host3 has namespaces %v, want none", got)
	}

	// Every host sees both endpoints.
	var eps []api.Endpoint
	a3.jsonOut(&eps, "endpoint", "ls", "--network", "net1")
	if len(eps) != 2 {
		t.Fatalf("endpoint ls on host3: %+v", eps)
	}
	var nodes []api.Node
	a3.jsonOut(&nodes, "node", "ls")
	if len(nodes) != 3 {
		t.Fatalf("node ls: %+v", nodes)
	}

	// Networks are isolated: a second network's container is unreachable.
	a1.mustVxnet("network", "create", "net2")
	c3 := c.net.AddNS("c3")
	var e3 api.Endpoint
	a2.jsonOut(&e3, "attach", "net2", c3)
	if !strings.HasPrefix(e3.IP, "10.0.1.") {
		t.Fatalf("net2 endpoint got %s, want 10.0.1.x", e3.IP)
	}
	if err := testnet.Ping(c1, e3.IP); err == nil {
		t.Errorf("c1 on net1 reached c3 on net2")
	}
	// The same namespace on a second network gets the next free ethN:
	// eth1 is already its gateway interface, as in Docker.
	var e1b api.Endpoint
	a1.jsonOut(&e1b, "attach", "net2", c1)
	if e1b.Interface != "eth2" {
		t.Errorf("second attach of c1: interface %s, want eth2", e1b.Interface)
	}
	eventually(t, 5*time.Second, "c1 reaches c3 over net2", func() error { return testnet.Ping(c1, e3.IP) })

	// Removing a network with endpoints is refused and names them.
	if out, err := a3.vxnet("network", "rm", "net1"); err == nil || !strings.Contains(out, "web") {
		t.Errorf("network rm with endpoints: err %v, out %s", err, out)
	}
	// Detach on the wrong host says where the endpoint lives.
	if out, err := a1.vxnet("detach", "net1", "web"); err == nil || !strings.Contains(out, "host2") {
		t.Errorf("detach on wrong host: err %v, out %s", err, out)
	}

	// The agent restarting (even killed) leaves the datapath alone.
	a1.stop(syscall.SIGKILL)
	if err := testnet.Ping(c1, "10.0.0.3"); err != nil {
		t.Errorf("datapath broke while agent was down: %v", err)
	}
	a1.start()
	if err := testnet.Ping(c1, "10.0.0.3"); err != nil {
		t.Errorf("datapath broke after agent restart: %v", err)
	}
	a1.jsonOut(&eps, "endpoint", "ls")
	if len(eps) != 4 {
		t.Errorf("after restart: %d endpoints, want 4: %+v", len(eps), eps)
	}

	// Detach: peers drop the entries, the host drops the idle namespace.
	a2.mustVxnet("detach", "net1", "web")
	eventually(t, 5*time.Second, "host1 forgets web", func() error {
		out, _ := a1.inNS(ns, "ip", "neigh", "show", "dev", "vxlan1")
		if strings.Contains(out, "10.0.0.3") {
			return fmt.Errorf("neighbor still there: %s", out)
		}
		out, _ = a1.inNS(ns, "bridge", "fdb", "show", "dev", "vxlan1")
		// Only the static "self" entries are ours; br0 may still hold a
		// learned entry that ages out by itself.
		if testnet.LineHas(out, "02:42:0a:00:00:03", "self") {
			return fmt.Errorf("fdb entry still there: %s", out)
		}
		return nil
	})
	if slices.Contains(a2.overlayNamespaces(), ns) {
		t.Errorf("host2 kept net1's namespace after its last endpoint left")
	}
	if out, _ := testnet.Exec(c2, "ip", "link"); strings.Contains(out, "eth0") {
		t.Errorf("c2 still has eth0 after detach:\n%s", out)
	}

	// Tear everything down; every host removes its namespaces.
	a1.mustVxnet("detach", "net1", c1)
	a1.mustVxnet("detach", "net2", c1)
	a2.mustVxnet("detach", "net2", c3)
	a3.mustVxnet("network", "rm", "net1", "net2")
	for _, a := range c.agents {
		eventually(t, 5*time.Second, a.node+" has no namespaces", func() error {
			if got := a.overlayNamespaces(); len(got) > 0 {
				return fmt.Errorf("%v", got)
			}
			return nil
		})
	}
	a1.jsonOut(&nets, "network", "ls")
	if len(nets) != 0 {
		t.Errorf("networks left: %+v", nets)
	}
}

// Bad input is refused with a message naming the problem, and leaves no
// trace: no interface, no address, no record.
func TestAttachRefusals(t *testing.T) {
	c := newCluster(t, 1)
	a := c.agents[0]
	a.mustVxnet("network", "create", "n", "--subnet", "10.9.0.0/29")
	ctr := c.net.AddNS("ctr")
	a.mustVxnet("attach", "n", ctr, "--name", "first")

	other := c.net.AddNS("other")
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"attach", "nope", other}, `network "nope" not found`},
		{[]string{"attach", "n", "/nonexistent/ns"}, "/nonexistent/ns"},
		{[]string{"attach", "n", "/etc/hostname"}, "not a network namespace"},
		{[]string{"attach", "n", "/proc/self/ns/net"}, "agent's own"},
		{[]string{"attach", "n", other, "--ip", "10.9.1.5"}, "10.9.1.5"},
		{[]string{"attach", "n", other, "--ip", "10.9.0.1"}, "gateway"},
		{[]string{"attach", "n", other, "--ip", "10.9.0.2"}, "10.9.0.2"},
		{[]string{"attach", "n", other, "--ip", "banana"}, "banana"},
		{[]string{"attach", "n", other, "--name", "first"}, "already exists"},
		{[]string{"attach", "n", other, "--name", "bad/name"}, "bad/name"},
		{[]string{"attach", "n", ctr, "--name", "again"}, "already attached"},
		{[]string{"network", "create", "n"}, "already exists"},
		{[]string{"network", "create", "m", "--subnet", "10.9.0.0/24"}, "10.9.0.0"},
		{[]string{"network", "create", "m", "--subnet", "10.8.0.0/31"}, "/31"},
		{[]string{"network", "create", "m", "--subnet", "nonsense"}, "nonsense"},
		{[]string{"network", "create", "m", "--vni", "99999999"}, "99999999"},
		{[]string{"network", "create", "m", "--mtu", "100"}, "mtu"},
		{[]string{"network", "create", "m", "--vni", "0"}, "vni 0"},
		{[]string{"network", "create", "m", "--mtu", "0"}, "mtu 0"},
		{[]string{"network", "create", "m", "--subnet", "239.1.1.0/24"}, "multicast"},
		{[]string{"network", "create", "m", "--subnet", "127.5.0.0/24"}, "loopback"},
		{[]string{"network", "create", "m", "--subnet", "0.1.0.0/24"}, "0.0.0.0/8"},
		{[]string{"network", "create", "m", "--subnet", "250.0.0.0/24"}, "class E"},
		{[]string{"network", "create", "m", "--subnet", "169.254.3.0/24"}, "link-local"},
		// The simulated underlay (192.168.77.0/24): a route of the host
		// and the underlay network of a node.
		{[]string{"network", "create", "m", "--subnet", "192.168.77.0/25"}, "192.168.77.0/24"},
		{[]string{"network", "create", "m", "--subnet", "192.168.0.0/16"}, "underlay"},
		{[]string{"detach", "n", "ghost"}, "not found"},
		{[]string{"network", "inspect", "ghost"}, "not found"},
		{[]string{"network", "inspect", "n", "ghost"}, "1 of 2 networks not found"},
		{[]string{"endpoint", "ls", "--network", "ghost"}, `network "ghost" not found`},
		{[]string{"-o", "yaml", "network", "ls"}, "yaml"},
	}
	for _, tc := range cases {
		out, err := a.vxnet(tc.args...)
		if err == nil {
			t.Errorf("vxnet %s: succeeded, want error containing %q", strings.Join(tc.args, " "), tc.want)
			if tc.args[0] == "network" && tc.args[1] == "create" {
				a.vxnet("network", "rm", tc.args[2]) // so the next case meets its own refusal
			}
			continue
		}
		if !strings.Contains(out, tc.want) {
			t.Errorf("vxnet %s: error %q does not mention %q", strings.Join(tc.args, " "), strings.TrimSpace(out), tc.want)
		}
	}
	// As docker does: inspect prints what it found even when another
	// name was not found; -o table gives a summary, not JSON.
	if out, _ := a.vxnet("network", "inspect", "n", "ghost"); !strings.Contains(out, `"name": "n"`) || !strings.Contains(out, `network "ghost" not found`) {
		t.Errorf("inspect of a good and a missing network:\n%s", out)
	}
	if out := a.mustVxnet("-o", "table", "network", "inspect", "n"); !strings.Contains(out, "subnet 10.9.0.0/29") || !strings.Contains(out, "ENDPOINT") || strings.Contains(out, "{") {
		t.Errorf("inspect -o table:\n%s", out)
	}
	// Nothing leaked: "other" has no interface, the pool still has room
	// for exactly the addresses that were free before (.3 .. .6).
	if out, _ := testnet.Exec(other, "ip", "-o", "link"); strings.Contains(out, "eth") {
		t.Errorf("failed attaches left an interface in %s:\n%s", other, out)
	}
	var eps []api.Endpoint
	a.jsonOut(&eps, "endpoint", "ls")
	if len(eps) != 1 {
		t.Errorf("endpoints after refusals: %+v", eps)
	}
	var got []string
	for i := range 5 {
		ns := c.net.AddNS(fmt.Sprintf("fill%d", i))
		var e api.Endpoint
		out, err := a.vxnet("-o", "json", "attach", "n", ns)
		if err != nil {
			if i == 4 && strings.Contains(out, "no free") {
				break
			}
			t.Fatalf("attach fill%d: %v %s", i, err, out)
		}
		_ = jsonDecode(out, &e)
		got = append(got, e.IP)
	}
	if want := []string{"10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"}; !slices.Equal(got, want) {
		t.Errorf("addresses after refusals: %v, want %v", got, want)
	}
}

// With no Consul the agent uses its embedded store: a single host works on
// its own.
func TestEmbeddedStoreSingleHost(t *testing.T) {
	tn := testnet.New(t)
	h := tn.AddHost("solo")
	// The socket is root's and --socket-group's, mode 0660: no one else
	// may drive the agent.
	grp, err := user.LookupGroup("nogroup")
	if err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, h, "solo", "", "--socket-group", "nogroup")
	st, err := os.Stat(a.socket)
	if err != nil || st.Mode().Perm() != 0o660 {
		t.Fatalf("API socket mode: %v %v, want 0660", st.Mode(), err)
	}
	if sys := st.Sys().(*syscall.Stat_t); strconv.Itoa(int(sys.Gid)) != grp.Gid || sys.Uid != 0 {
		t.Errorf("API socket owned by %d:%d, want 0:%s", sys.Uid, sys.Gid, grp.Gid)
	}
	a.mustVxnet("network", "create", "local")
	c1, c2 := tn.AddNS("l1"), tn.AddNS("l2")
	a.mustVxnet("attach", "local", c1)
	var e2 api.Endpoint
	a.jsonOut(&e2, "attach", "local", c2)
	if err := testnet.Ping(c1, e2.IP); err != nil {
		t.Fatal(err)
	}
	out := a.mustVxnet("status")
	if !strings.Contains(out, "reachable") || !strings.Contains(out, "file://") && !strings.Contains(out, "Store:") {
		t.Errorf("status:\n%s", out)
	}
	// A restart of an agent with its embedded store is not the node's
	// death: its session and records survive, nothing is republished.
	a.stop(syscall.SIGTERM)
	a.start()
	if err := testnet.Ping(c1, e2.IP); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2500 * time.Millisecond) // a renewal and a full pass
	for _, noisy := range []string{"considered gone", "republished", "lost its state"} {
		if strings.Contains(a.log(), noisy) {
			t.Errorf("restart with the embedded store logged %q:\n%s", noisy, a.logTail())
		}
	}
}

// An agent that is not running gives a clear error quickly.
func TestCLIUnreachableAgent(t *testing.T) {
	start := time.Now()
	out, err := exec.Command(binDir+"/vxnet", "-H", "unix:///nonexistent/vxnet.sock", "network", "ls").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "cannot reach vxnetd") {
		t.Fatalf("err %v, out %s", err, out)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("took %s", d)
	}
}

// Attaches on one host run concurrently (their store round trips overlap)
// while reconciles run: every one gets its own address and interfaces, a
// name is taken once, and nothing is left half-made.
func TestConcurrentAttaches(t *testing.T) {
	c := newCluster(t, 1)
	a := c.agents[0]
	a.mustVxnet("network", "create", "par", "--subnet", "10.11.0.0/24")
	const n = 16
	nss := make([]string, n)
	for i := range nss {
		nss[i] = c.net.AddNS(fmt.Sprintf("p%d", i))
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	outs := make([]string, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Pairs share a name: exactly one of each pair may win.
			outs[i], errs[i] = a.vxnet("attach", "par", nss[i], "--name", fmt.Sprintf("ep%d", i/2))
		}()
	}
	wg.Wait()
	won := 0
	for i := range n {
		if errs[i] == nil {
			won++
		} else if !strings.Contains(outs[i], "already") {
			t.Errorf("attach %d: %v %s", i, errs[i], outs[i])
		}
	}
	if won != n/2 {
		t.Errorf("%d attaches succeeded, want %d (one per name)", won, n/2)
	}
	time.Sleep(2500 * time.Millisecond) // a full reconcile runs in between
	var eps []api.Endpoint
	a.jsonOut(&eps, "endpoint", "ls")
	ips := map[string]bool{}
	for _, e := range eps {
		if ips[e.IP] {
			t.Errorf("duplicate address %s", e.IP)
		}
		ips[e.IP] = true
	}
	var d []api.NetworkDetail
	a.jsonOut(&d, "network", "inspect", "par")
	out, _ := a.inNS(nsName(d[0].ID), "ip", "-o", "link", "show", "type", "veth")
	if got := strings.Count(out, "\n"); got != len(eps) || len(eps) != n/2 {
		t.Errorf("%d endpoints, %d veths, want %d of each", len(eps), got, n/2)
	}
	gws, _ := exec.Command("ip", "-n", c.hosts[0].Name, "-o", "link", "show", "master", "vxnet_gwbridge").Output()
	if got := strings.Count(string(gws), "\n"); got != n/2 {
		t.Errorf("%d gateway interfaces, want %d", got, n/2)
	}
}

// With Consul's ACLs on, the token comes from CONSUL_HTTP_TOKEN; a wrong
// one is reported as a permission problem, not an outage; and no token
// ever reaches a log, even at debug level (the test agents' level).
func TestConsulACLToken(t *testing.T) {
	const token = "3f1c2b8e-5d4a-4e6f-9a7b-1c2d3e4f5a6b"
	const wrong = "0a0b0c0d-1e1f-4a4b-8c8d-9e9f0a0b0c0d"
	c := newCluster(t, 0, testconsul.WithACL(token))
	good := newAgent(t, c.net.AddHost("h1"), "host1", c.consul.URL("vxnet/"))
	good.env = []string{"CONSUL_HTTP_TOKEN=" + token}
	good.start()
	good.mustVxnet("network", "create", "acl", "--subnet", "10.9.0.0/24")
	good.mustVxnet("attach", "acl", c.net.AddNS("c1"))

	// A wrong token stops the agent at start with a message that says
	// what to fix (systemd shows it); the datapath is not touched.
	bad := newAgent(t, c.net.AddHost("h2"), "host2", c.consul.URL("vxnet/"))
	bad.env = []string{"CONSUL_HTTP_TOKEN=" + wrong}
	bad.launch()
	select {
	case <-bad.done:
	case <-time.After(10 * time.Second):
		t.Fatal("an agent with a wrong token kept running")
	}
	if !strings.Contains(bad.log(), "check the ACL token (CONSUL_HTTP_TOKEN)") {
		t.Errorf("wrong token: %s", bad.log())
	}
	// The good agent's own requests carry the token; a failing one is
	// logged without it.
	if out, err := good.vxnet("network", "create", "acl", "--subnet", "10.9.1.0/24"); err == nil {
		t.Errorf("duplicate create: %s", out)
	}
	for _, a := range []*agent{good, bad} {
		for _, secret := range []string{token, wrong} {
			if strings.Contains(a.log(), secret) {
				t.Errorf("%s logged a token", a.node)
			}
		}
	}
}
