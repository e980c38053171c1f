package test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/testnet"
)

// cnitool finds (or installs, once) the CNI project's cnitool.
func cnitool(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("../scripts/install-cnitool.sh").Output()
	if err != nil {
		t.Fatalf("install cnitool: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1]
}

// cniHost is one simulated host's CNI set-up: a configuration directory
// whose networks name vxnet networks through the host's agent.
type cniHost struct {
	t    *testing.T
	tool string
	dir  string
}

func newCNIHost(t *testing.T, tool string, a *agent, nets map[string]string) *cniHost {
	t.Helper()
	dir := t.TempDir()
	for name, network := range nets {
		conf := fmt.Sprintf(`{"cniVersion":"1.0.0","name":%q,"type":"vxnet-cni","network":%q,"socket":%q,"capabilities":{"ips":true}}`, name, network, a.socket)
		if err := os.WriteFile(filepath.Join(dir, name+".conf"), []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return &cniHost{t: t, tool: tool, dir: dir}
}

// run is `cnitool VERB NET NETNS` with extra environment.
func (h *cniHost) run(verb, net, ns string, env ...string) (string, error) {
	cmd := exec.Command(h.tool, verb, net, "/var/run/netns/"+ns)
	cmd.Env = append(os.Environ(), append([]string{"NETCONFPATH=" + h.dir, "CNI_PATH=" + binDir}, env...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// With cnitool as the runtime: ADD attaches and returns the interface and
// address, containers on two hosts reach each other across the overlay and
// not across networks, CHECK passes, a static address comes through the
// "ips" capability, bad input changes nothing, and DEL leaves nothing
// behind and can be repeated.
func TestCNIWithCnitool(t *testing.T) {
	tool := cnitool(t)
	c := newCluster(t, 2)
	a1, a2 := c.agents[0], c.agents[1]
	a1.mustVxnet("network", "create", "n1", "--subnet", "10.31.0.0/24")
	a1.mustVxnet("network", "create", "n2", "--subnet", "10.32.0.0/24")
	nets := map[string]string{"net1": "n1", "net2": "n2", "nope": "missing"}
	h1, h2 := newCNIHost(t, tool, a1, nets), newCNIHost(t, tool, a2, nets)

	c1, c2, c3 := c.net.AddNS("c1"), c.net.AddNS("c2"), c.net.AddNS("c3")
	out, err := h1.run("add", "net1", c1)
	if err != nil {
		t.Fatalf("cnitool add on h1: %v\n%s", err, out)
	}
	var res struct {
		CNIVersion string `json:"cniVersion"`
		Interfaces []struct {
			Name    string `json:"name"`
			Mac     string `json:"mac"`
			Sandbox string `json:"sandbox"`
		} `json:"interfaces"`
		IPs []struct {
			Address string `json:"address"`
			Gateway string `json:"gateway"`
		} `json:"ips"`
		DNS struct {
			Nameservers []string `json:"nameservers"`
			Search      []string `json:"search"`
		} `json:"dns"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("result: %v\n%s", err, out)
	}
	if res.CNIVersion != "1.0.0" || len(res.Interfaces) != 1 || res.Interfaces[0].Name != "eth0" || res.Interfaces[0].Mac != "02:42:0a:1f:00:02" ||
		len(res.IPs) != 1 || res.IPs[0].Address != "10.31.0.2/24" || res.IPs[0].Gateway != "10.31.0.1" ||
		len(res.DNS.Nameservers) != 1 || res.DNS.Nameservers[0] != "10.31.0.1" || len(res.DNS.Search) != 1 || res.DNS.Search[0] != "n1" {
		t.Fatalf("ADD result:\n%s", out)
	}
	if out, err := h2.run("add", "net1", c2, `CAP_ARGS={"ips":["10.31.0.50/24"]}`); err != nil || !strings.Contains(out, "10.31.0.50/24") {
		t.Fatalf("cnitool add on h2 with a static address: %v\n%s", err, out)
	}
	if out, err := h2.run("add", "net2", c3); err != nil {
		t.Fatalf("cnitool add of net2 on h2: %v\n%s", err, out)
	}
	eventually(t, 5*time.Second, "c1 reaches c2 across hosts", func() error { return testnet.Ping(c1, "10.31.0.50") })
	if testnet.Ping(c1, "10.32.0.2") == nil {
		t.Error("c1 on n1 reaches c3 on n2")
	}
	if out, err := h1.run("check", "net1", c1); err != nil {
		t.Errorf("cnitool check: %v\n%s", err, out)
	}
	// CHECK also sees peers that are not programmed as they should be,
	// until the agent's next full pass repairs them.
	var d []api.NetworkDetail
	a1.jsonOut(&d, "network", "inspect", "n1")
	if out, err := a1.inNS(nsName(d[0].ID), "ip", "neigh", "del", "10.31.0.50", "dev", "vxlan1"); err != nil {
		t.Fatalf("delete a neighbor entry: %v\n%s", err, out)
	}
	if out, err := h1.run("check", "net1", c1); err == nil || !strings.Contains(out, "neighbor entry of peer 10.31.0.50") {
		t.Errorf("cnitool check with a peer's entry gone: %v\n%s", err, out)
	}
	eventually(t, 10*time.Second, "check passes once the entry is repaired", func() error {
		if out, err := h1.run("check", "net1", c1); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})

	// Bad input: an unknown network, an address taken. Nothing changes.
	c4 := c.net.AddNS("c4")
	if out, err := h1.run("add", "nope", c4); err == nil || !strings.Contains(out, "missing") {
		t.Errorf("add to an unknown network: %v\n%s", err, out)
	}
	if out, err := h1.run("add", "net1", c4, `CAP_ARGS={"ips":["10.31.0.50/24"]}`); err == nil || !strings.Contains(out, "10.31.0.50") {
		t.Errorf("add with a taken address: %v\n%s", err, out)
	}
	var eps []api.Endpoint
	a1.jsonOut(&eps, "endpoint", "ls", "--network", "n1")
	if len(eps) != 2 {
		t.Errorf("after the refused adds, n1 has %d endpoints, want 2: %+v", len(eps), eps)
	}

	// DEL leaves nothing; a second DEL, and a DEL after the namespace is
	// gone, succeed.
	for i := 0; i < 2; i++ {
		if out, err := h1.run("del", "net1", c1); err != nil {
			t.Fatalf("cnitool del (%d): %v\n%s", i+1, err, out)
		}
	}
	if out, _ := testnet.Exec(c1, "ip", "-o", "link"); strings.Contains(out, "eth0") {
		t.Errorf("c1 still has eth0 after DEL:\n%s", out)
	}
	if got := a1.overlayNamespaces(); len(got) != 0 {
		t.Errorf("h1 keeps overlay namespaces %v after its last DEL", got)
	}
	c.net.DelNS(c2)
	if out, err := h2.run("del", "net1", c2); err != nil {
		t.Errorf("cnitool del after the netns went: %v\n%s", err, out)
	}
	if out, err := h2.run("del", "net2", c3); err != nil {
		t.Errorf("cnitool del net2: %v\n%s", err, out)
	}
	eventually(t, 10*time.Second, "no endpoint and no address left", func() error {
		var eps []api.Endpoint
		a1.jsonOut(&eps, "endpoint", "ls")
		if len(eps) != 0 {
			return fmt.Errorf("endpoints left: %+v", eps)
		}
		if keys := c.consul.Keys("vxnet/ipam/addrs/"); len(keys) != 0 {
			return fmt.Errorf("addresses left: %v", keys)
		}
		return nil
	})
}
