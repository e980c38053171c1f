package test

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/testconsul"
	"github.com/vxnet/vxnet/internal/testnet"
)

// A Consul leader change in a 3-server cluster in the middle of an attach
// storm from two hosts: attaches fail clearly or succeed, no address is
// ever handed out twice, nothing leaks, and the agents carry on.
func TestConsulLeaderChange(t *testing.T) {
	tn := testnet.New(t)
	var addrs []string
	for _, a := range tn.SwitchAddrs(3) {
		addrs = append(addrs, a.String())
	}
	servers := testconsul.StartCluster(t, addrs, testconsul.WithNetNS("/var/run/netns/"+tn.Switch))
	leader := servers[0].Leader()
	var follower, lead *testconsul.Server
	for _, s := range servers {
		if s.RPCAddr() == leader {
			lead = s
		} else if follower == nil {
			follower = s
		}
	}
	if lead == nil || follower == nil {
		t.Fatalf("leader %q not among the servers", leader)
	}
	var agents []*agent
	for i := range 2 {
		h := tn.AddHost(fmt.Sprintf("h%d", i+1))
		agents = append(agents, startAgent(t, h, fmt.Sprintf("host%d", i+1), follower.URL("vxnet/"), "--node-ttl", "15s"))
	}
	agents[0].mustVxnet("network", "create", "storm", "--subnet", "10.8.0.0/24")

	const per = 12
	type result struct {
		a   *agent
		ns  string
		ep  api.Endpoint
		err error
		out string
	}
	var mu sync.Mutex
	var results []result
	var wg sync.WaitGroup
	for i, a := range agents {
		nss := make([]string, per)
		for j := range nss {
			nss[j] = tn.AddNS(fmt.Sprintf("s%d-%d", i, j))
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, ns := range nss {
				out, err := a.vxnet("-o", "json", "attach", "storm", ns)
				r := result{a: a, ns: ns, err: err, out: out}
				if err == nil {
					jsonDecode(out, &r.ep)
				}
				mu.Lock()
				results = append(results, r)
				mu.Unlock()
			}
		}()
	}
	// Stop the leader once the storm is under way, whatever the speed of
	// an attach on this machine, so that the election falls inside it.
	eventually(t, 30*time.Second, "first attaches of the storm", func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(results) < 3 {
			return fmt.Errorf("%d attaches done", len(results))
		}
		return nil
	})
	lead.Stop()
	wg.Wait()
	// A follower reports the old leader for a while after it died: wait
	// for another one.
	eventually(t, 60*time.Second, "a new leader", func() error {
		if l := follower.Leader(); l == "" || l == leader {
			return fmt.Errorf("leader %q", l)
		}
		return nil
	})

	failed := 0
	for _, r := range results {
		if r.err != nil {
			failed++
			if !strings.Contains(r.out, "store") && !strings.Contains(r.out, "leader") && !strings.Contains(r.out, "conflict") {
				t.Errorf("unclear failure: %s", r.out)
			}
		}
	}
	t.Logf("%d of %d attaches failed during the leader change", failed, len(results))
	// Every failed attach can be done now.
	for _, r := range results {
		if r.err != nil {
			eventually(t, 20*time.Second, "attach after the election", func() error {
				// err is only the exit status: the reason is in the output.
				// An attach that failed on the client side may still have
				// been done by the agent.
				out, err := r.a.vxnet("attach", "storm", r.ns)
				if err == nil || strings.Contains(out, "already attached") {
					return nil
				}
				return fmt.Errorf("%w: %s", err, strings.TrimSpace(out))
			})
		}
	}
	var eps []api.Endpoint
	agents[0].jsonOut(&eps, "endpoint", "ls")
	if len(eps) != 2*per {
		t.Errorf("%d endpoints, want %d", len(eps), 2*per)
	}
	seen := map[string]string{}
	for _, e := range eps {
		if prev, dup := seen[e.IP]; dup {
			t.Errorf("address %s handed out twice: %s and %s", e.IP, prev, e.Name)
		}
		seen[e.IP] = e.Name
	}
	// No interface or address leaked on either host.
	var nets []api.NetworkDetail
	agents[0].jsonOut(&nets, "network", "inspect", "storm")
	for _, a := range agents {
		out, _ := a.inNS(nsName(nets[0].ID), "ip", "-o", "link", "show", "type", "veth")
		mine := 0
		for _, e := range eps {
			if e.Node == a.node {
				mine++
			}
		}
		if got := strings.Count(out, "\n"); got != mine {
			t.Errorf("%s: %d veths for %d endpoints", a.node, got, mine)
		}
	}
	// Attaches cut short by the election may have reserved an address
	// they could not release then; the agents release it at their next
	// full reconcile.
	eventually(t, 20*time.Second, "address reservations match the endpoints", func() error {
		keys := follower.Keys("vxnet/ipam/addrs/" + nets[0].ID + "/")
		if len(keys) != len(eps) {
			return fmt.Errorf("%d addresses reserved for %d endpoints: %v", len(keys), len(eps), keys)
		}
		return nil
	})
	probe := tn.AddNS("probe")
	var pe api.Endpoint
	agents[1].jsonOut(&pe, "attach", "storm", probe)
	// Not necessarily the lowest free address: an agent's cache of taken
	// addresses lags releases made elsewhere, on purpose (fewer store
	// reads). What matters is that it is not anyone else's.
	if prev := seen[pe.IP]; prev != "" || pe.IP == "" {
		t.Errorf("probe got %q, already %s's", pe.IP, prev)
	}
}
