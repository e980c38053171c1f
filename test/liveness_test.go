package test

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/testconsul"
	"github.com/vxnet/vxnet/internal/testnet"
)

// agentCluster is n simulated hosts, each with its own Consul client agent
// joined to the server on the underlay switch, and a vxnetd that talks to
// that agent on 127.0.0.1, as Consul is usually deployed.
type agentCluster struct {
	*cluster
	local []*testconsul.Server // each host's client agent
}

func newAgentCluster(t *testing.T, n int, extra ...string) *agentCluster {
	t.Helper()
	c := &agentCluster{cluster: newCluster(t, 0)}
	for i := range n {
		h := c.net.AddHost(fmt.Sprintf("h%d", i+1))
		c.hosts = append(c.hosts, h)
		// The Consul node is named after the namespace, not as vxnet's
		// node: the two names need not match.
		ca := testconsul.StartClient(t, c.consul, h.Path, h.Addr.String(), h.Name)
		c.local = append(c.local, ca)
		args := append([]string{"--node-ttl", "10s"}, extra...)
		c.agents = append(c.agents, startAgent(t, h, fmt.Sprintf("host%d", i+1), ca.URL("vxnet/"), args...))
	}
	return c
}

// neighGone waits until host a has no neighbor entry for ip on the network
// (namespace ns) and returns how long that took from start.
func neighGone(t *testing.T, a *agent, ns, ip string, start time.Time, limit time.Duration) time.Duration {
	t.Helper()
	for time.Since(start) < limit {
		out, _ := a.inNS(ns, "ip", "neigh", "show", ip, "dev", "vxlan1")
		if !strings.Contains(out, "PERMANENT") {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s still has the neighbor entry of %s after %s", a.node, ip, limit)
	return 0
}

// With a Consul client agent on every host: the agents say which liveness
// they use; restarting a host's Consul agent (gracefully, or killed) or its
// vxnetd loses no packet across hosts; a host that dies for good is dropped
// by the others within 5 seconds.
func TestLivenessWithLocalConsulAgents(t *testing.T) {
	c := newAgentCluster(t, 3)
	a1, a2, a3 := c.agents[0], c.agents[1], c.agents[2]

	var st api.Status
	a1.jsonOut(&st, "status")
	if st.Liveness != "gossip+ttl" || st.ConsulNode != c.hosts[0].Name {
		t.Errorf("status through a client agent: liveness %q, consul node %q", st.Liveness, st.ConsulNode)
	}
	var nodes []api.Node
	a1.jsonOut(&nodes, "node", "ls")
	for _, n := range nodes {
		if n.Liveness != "gossip+ttl" || n.ConsulNode == "" {
			t.Errorf("node ls: %+v", n)
		}
	}

	var n1 api.Network
	a1.jsonOut(&n1, "network", "create", "n", "--subnet", "10.21.0.0/24")
	ns := nsName(n1.ID)
	cs := []string{c.net.AddNS("c1"), c.net.AddNS("c2"), c.net.AddNS("c3")}
	for i, a := range []*agent{a1, a2, a3} {
		a.mustVxnet("attach", "n", cs[i], "--ip", fmt.Sprintf("10.21.0.%d", 10*(i+1)))
	}
	eventually(t, 5*time.Second, "c1 reaches c2 and c3", func() error {
		if err := testnet.Ping(cs[0], "10.21.0.20"); err != nil {
			return err
		}
		return testnet.Ping(cs[0], "10.21.0.30")
	})

	// h2's Consul agent restarts: a graceful stop (it leaves the cluster,
	// which ends h2's session), then killed; each time started again a
	// second later.
	for _, how := range []string{"SIGTERM", "SIGKILL"} {
		res, _ := pingLoss(t, cs[0], "10.21.0.20", 8*time.Second)
		time.Sleep(500 * time.Millisecond)
		start := time.Now()
		if how == "SIGTERM" {
			c.local[1].Stop()
		} else {
			c.local[1].Kill()
		}
		time.Sleep(time.Second)
		c.local[1].Launch()
		if err := c.local[1].WaitLeader(30 * time.Second); err != nil {
			t.Fatalf("h2's Consul agent after a %s: %v", how, err)
		}
		t.Logf("h2's Consul agent back %s after its %s", time.Since(start).Round(time.Millisecond), how)
		if loss := lossOf(t, res); loss != "0" {
			t.Errorf("%s%% of the pings from h1 to h2 lost while h2's Consul agent restarted after a %s\n%s", loss, how, a1.logTail())
		}
	}

	// vxnetd restarts, as without a local agent.
	res, _ := pingLoss(t, cs[0], "10.21.0.20", 3*time.Second)
	a2.stop(syscall.SIGTERM)
	time.Sleep(500 * time.Millisecond)
	a2.start()
	if loss := lossOf(t, res); loss != "0" {
		t.Errorf("%s%% of the pings lost while vxnetd on h2 restarted", loss)
	}

	took := c.killHost(t, 2, ns, "10.21.0.30")
	t.Logf("a dead host's entries dropped by its peers after %s (gossip+ttl)", took.Round(time.Millisecond))
	if took > 5*time.Second {
		t.Errorf("a dead host was dropped after %s, want within 5s", took.Round(time.Millisecond))
	}
}

// killHost kills host i for good (its Consul agent if it has one, its
// vxnetd, its link) and returns how long until host 0 has dropped the
// neighbor entry of ip, the host's endpoint on the network of namespace ns.
func (c *agentCluster) killHost(t *testing.T, i int, ns, ip string) time.Duration {
	t.Helper()
	start := time.Now()
	if c.local != nil {
		c.local[i].Kill()
	}
	c.agents[i].stop(syscall.SIGKILL)
	if out, err := testnet.Exec(c.hosts[i].Name, "ip", "link", "set", "eth0", "down"); err != nil {
		t.Fatalf("link down: %v: %s", err, out)
	}
	return neighGone(t, c.agents[0], ns, ip, start, 60*time.Second)
}

// TestBenchmarkLiveness measures how long a dead host's entries stay on
// its peers, in both liveness modes: vxnetd against the Consul server
// (its session's TTL alone) and through a Consul client agent on every
// host (gossip, then the hold-down). Run by scripts/bench.sh --liveness N.
func TestBenchmarkLiveness(t *testing.T) {
	rounds, _ := strconv.Atoi(os.Getenv("VXNET_BENCH_LIVENESS"))
	if rounds <= 0 {
		t.Skip("runs with scripts/bench.sh --liveness ROUNDS")
	}
	ttl := 10 * time.Second
	took := map[string][]time.Duration{}
	for _, mode := range []string{"ttl", "gossip+ttl"} {
		for r := range rounds {
			t.Run(fmt.Sprintf("%s/%d", mode, r), func(t *testing.T) {
				var c *agentCluster
				if mode == "ttl" {
					c = &agentCluster{cluster: newCluster(t, 3)}
				} else {
					c = newAgentCluster(t, 3)
				}
				var n api.Network
				c.agents[0].jsonOut(&n, "network", "create", "n", "--subnet", "10.22.0.0/24")
				for i, a := range c.agents {
					a.mustVxnet("attach", "n", c.net.AddNS(fmt.Sprint("c", i)), "--ip", fmt.Sprintf("10.22.0.%d", 10*(i+1)))
				}
				eventually(t, 5*time.Second, "host1 has host3's entry", func() error {
					out, _ := c.agents[0].inNS(nsName(n.ID), "ip", "neigh", "show", "10.22.0.30", "dev", "vxlan1")
					if !strings.Contains(out, "PERMANENT") {
						return fmt.Errorf("no entry")
					}
					return nil
				})
				d := c.killHost(t, 2, nsName(n.ID), "10.22.0.30")
				t.Logf("%s: dropped after %s", mode, d.Round(time.Millisecond))
				took[mode] = append(took[mode], d)
			})
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\nvxnet liveness benchmark: a host killed for good (vxnetd, its Consul agent, its link), until its peers dropped its entries; --node-ttl %s, %d rounds\n\n", ttl, rounds)
	fmt.Fprintf(&b, "| liveness mode | min | median | max | bound |\n|---|---|---|---|---|\n")
	bounds := map[string]string{"ttl": "TTL to 2 x TTL (Consul's session reaper)", "gossip+ttl": "gossip's detection + --peer-hold-down (1s)"}
	for _, mode := range []string{"ttl", "gossip+ttl"} {
		ds := took[mode]
		if len(ds) == 0 {
			continue
		}
		slices.Sort(ds)
		fmt.Fprintf(&b, "| %s | %.2f s | %.2f s | %.2f s | %s |\n", mode, ds[0].Seconds(), ds[len(ds)/2].Seconds(), ds[len(ds)-1].Seconds(), bounds[mode])
	}
	fmt.Print(b.String())
	if out := os.Getenv("VXNET_BENCH_OUT"); out != "" {
		os.WriteFile(out, []byte(b.String()), 0o644)
	}
}

// A local Consul agent that has joined no server, and an ACL token that
// may not create sessions, are errors that say what to fix.
func TestLocalAgentMisconfigured(t *testing.T) {
	const token = "7d2e4c1a-3b5f-4a6e-8c9d-0e1f2a3b4c5d"
	c := newCluster(t, 0, testconsul.WithACL(token))

	// A client agent told to join an address where no server is.
	h1 := c.net.AddHost("h1")
	lonely := testconsul.StartClientNoWait(t, "192.168.77.253:8301", h1.Path, h1.Addr.String(), h1.Name)
	a1 := newAgent(t, h1, "host1", lonely.URL("vxnet/"))
	a1.startNoWait()
	statusSays(t, a1, "has joined no server")

	// A token that may write the keys but not create sessions.
	policy := `{"Name":"kv-only","Rules":"key_prefix \"vxnet/\" { policy = \"write\" }\nnode_prefix \"\" { policy = \"read\" }"}`
	if out, err := c.consul.RequestToken("PUT", "/v1/acl/policy", policy, token); err != nil {
		t.Fatalf("policy: %v: %s", err, out)
	}
	out, err := c.consul.RequestToken("PUT", "/v1/acl/token", `{"Policies":[{"Name":"kv-only"}]}`, token)
	if err != nil {
		t.Fatalf("token: %v: %s", err, out)
	}
	var tok struct{ SecretID string }
	if err := jsonDecode(out, &tok); err != nil || tok.SecretID == "" {
		t.Fatalf("token: %v: %s", err, out)
	}
	a2 := newAgent(t, c.net.AddHost("h2"), "host2", c.consul.URL("vxnet/"))
	a2.env = []string{"CONSUL_HTTP_TOKEN=" + tok.SecretID}
	a2.startNoWait()
	statusSays(t, a2, "session:write")
}

// A host's Consul agent down for longer than the hold: its peers drop the
// host as gone; its own datapath is untouched; on the agent's return the
// host republishes and its peers program it again.
func TestLocalAgentDownLongerThanHold(t *testing.T) {
	c := newAgentCluster(t, 2, "--peer-hold-left", "2s")
	a1, a2 := c.agents[0], c.agents[1]
	ns, c1, _ := c.pairOn(t, a1, a2, "n", "10.23.0")

	start := time.Now()
	c.local[1].Stop()
	took := neighGone(t, a1, ns, "10.23.0.20", start, 20*time.Second)
	t.Logf("h2's Consul agent stopped: h1 dropped h2's entries after %s", took.Round(time.Millisecond))
	if out, _ := a2.inNS(ns, "ip", "neigh", "show", "10.23.0.10", "dev", "vxlan1"); !strings.Contains(out, "PERMANENT") {
		t.Errorf("h2 lost h1's entry while its own Consul agent was down: %q", out)
	}
	c.local[1].Launch()
	if err := c.local[1].WaitLeader(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	eventually(t, 10*time.Second, "c1 reaches c2 again", func() error { return testnet.Ping(c1, "10.23.0.20") })
	t.Logf("h2 republished and reachable %s after its Consul agent answered", time.Since(back).Round(time.Millisecond))
}

// statusSays waits until the agent's status names what.
func statusSays(t *testing.T, a *agent, what string) {
	t.Helper()
	eventually(t, 15*time.Second, "status says "+what, func() error {
		out, _ := a.vxnet("status")
		if !strings.Contains(out, what) {
			return fmt.Errorf("status:\n%s", out)
		}
		return nil
	})
}
