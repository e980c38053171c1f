package test

import (
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/testnet"
)

// A detach of an endpoint whose attach is still under way is refused: it
// used to remove the journal record while the attach carried on and
// published, leaving a record that later passes deleted as a leak and a
// restart brought back.
func TestDetachDuringAttachRefused(t *testing.T) {
	c := newCluster(t, 1)
	a := c.agents[0]
	a.mustVxnet("network", "create", "d", "--subnet", "10.17.0.0/24")
	a.stop(syscall.SIGTERM)
	a.env = []string{"VXNETD_TEST_PAUSE_AT=attach-allocated"}
	a.start()

	ns := c.net.AddNS("slow")
	done := make(chan error, 1)
	go func() {
		out, err := a.vxnet("attach", "d", ns, "--name", "slow")
		if err != nil {
			err = fmt.Errorf("%v: %s", err, out)
		}
		done <- err
	}()
	time.Sleep(700 * time.Millisecond) // the attach waits at attach-allocated
	out, err := a.vxnet("detach", "d", "slow")
	if err == nil || !strings.Contains(out, "being attached") {
		t.Errorf("detach during the attach: %v %s", err, out)
	}
	if err := <-done; err != nil {
		t.Fatalf("attach: %v", err)
	}
	check := func(when string) {
		t.Helper()
		var eps []api.Endpoint
		a.jsonOut(&eps, "endpoint", "ls")
		if len(eps) != 1 || eps[0].Name != "slow" {
			t.Errorf("%s: endpoints %+v", when, eps)
		}
		if out, _ := testnet.Exec(ns, "ip", "-o", "-4", "addr", "show", "eth0"); !strings.Contains(out, "10.17.0.") {
			t.Errorf("%s: eth0 of the container: %s", when, out)
		}
	}
	time.Sleep(2500 * time.Millisecond) // a full pass
	check("after a full pass")
	a.stop(syscall.SIGTERM)
	a.env = nil
	a.start()
	check("after a restart")
	a.mustVxnet("detach", "d", "slow")
}

// A full pass that runs while an attach waits for its address does not
// make the container's gateway interface first: the overlay interface is
// eth0, the gateway eth1.
func TestGatewayNotFirstDuringSlowAttach(t *testing.T) {
	c := newCluster(t, 1)
	a := c.agents[0]
	a.mustVxnet("network", "create", "g", "--subnet", "10.18.0.0/24")
	a.stop(syscall.SIGTERM)
	a.env = []string{"VXNETD_TEST_PAUSE_AT=attach-allocated"}
	a.start()
	ns := c.net.AddNS("g1")
	var e api.Endpoint
	a.jsonOut(&e, "attach", "g", ns) // pauses 2 s: a full pass (2 s) runs meanwhile
	if e.Interface != "eth0" {
		t.Errorf("overlay interface %s, want eth0", e.Interface)
	}
	out, _ := testnet.Exec(ns, "ip", "-o", "-4", "addr")
	if !strings.Contains(out, "eth0    inet "+e.IP) && !strings.Contains(out, "eth0 inet "+e.IP) {
		if !strings.Contains(out, "eth0") || !strings.Contains(out, e.IP) {
			t.Errorf("container addresses:\n%s", out)
		}
	}
	if !strings.Contains(out, "eth1") || !strings.Contains(out, "172.18.") {
		t.Errorf("no gateway eth1 in the container:\n%s", out)
	}
}

// An agent in a mount namespace of its own (as under ip netns exec) says
// that its namespace mounts vanish with it.
func TestPrivateMountNamespaceWarned(t *testing.T) {
	tn := testnet.New(t)
	h := tn.AddHost("m")
	a := newAgent(t, h, "m", "")
	a.wrap = []string{"unshare", "--mount", "--propagation", "private"}
	a.start()
	if !strings.Contains(a.log(), "mount namespace other than the host's") {
		t.Errorf("no warning:\n%s", a.logTail())
	}
	b := startAgent(t, tn.AddHost("n"), "n", "")
	if strings.Contains(b.log(), "mount namespace other than the host's") {
		t.Errorf("warned in the host's mount namespace:\n%s", b.logTail())
	}
}

// An agent that meets a store written in another format refuses to work
// on it, naming what it found.
func TestStoreOfAnotherFormatRefused(t *testing.T) {
	c := newCluster(t, 0)
	if _, err := c.consul.Request("PUT", "/v1/kv/vxnet/format", `{"version":1}`); err != nil {
		t.Fatal(err)
	}
	h := c.net.AddHost("h1")
	a := newAgent(t, h, "host1", c.consul.URL("vxnet/"), "--node-ttl", "10s")
	a.launch()
	cmd := a.cmd
	a.waitExit(15 * time.Second)
	if log := a.log(); !strings.Contains(log, `format "{\"version\":1}"`) || !strings.Contains(log, "reads format 2") {
		t.Errorf("no word of the formats:\n%s", a.logTail())
	}
	if cmd.ProcessState.Success() {
		t.Error("exited successfully")
	}
}

// A container's own default route is kept; --default-route replaces it
// with the gateway bridge's (the old one recorded first), and the detach
// of its last endpoint puts it back. Publishing a port with its own route
// kept is refused: replies would bypass the NAT.
func TestContainerDefaultRouteKeptOrReplaced(t *testing.T) {
	c := newCluster(t, 1)
	a := c.agents[0]
	a.mustVxnet("network", "create", "r", "--subnet", "10.19.0.0/24")
	ns := c.net.AddNS("own")
	for _, cmd := range [][]string{
		{"ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"}, {"ip", "addr", "add", "10.99.0.2/24", "dev", "d0"},
		{"ip", "link", "set", "d1", "up"}, {"ip", "link", "set", "d0", "up"},
		{"ip", "route", "add", "default", "via", "10.99.0.1", "dev", "d0"},
	} {
		if out, err := testnet.Exec(ns, cmd...); err != nil {
			t.Fatalf("%v: %v %s", cmd, err, out)
		}
	}
	route := func() string { out, _ := testnet.Exec(ns, "ip", "route", "show", "default"); return out }
	if out, err := a.vxnet("attach", "r", ns, "-p", "8081:80"); err == nil || !strings.Contains(out, "--default-route") {
		t.Errorf("publish with the container's own default route: %v %s", err, out)
	}
	a.mustVxnet("attach", "r", ns, "--name", "kept")
	if r := route(); !strings.Contains(r, "via 10.99.0.1") || strings.Contains(r, "172.18.") {
		t.Errorf("own default route not kept: %s", r)
	}
	a.mustVxnet("detach", "r", "kept")
	a.mustVxnet("attach", "r", ns, "--name", "repl", "--default-route")
	if r := route(); strings.Contains(r, "via 10.99.0.1") || !strings.Contains(r, "172.18.") {
		t.Errorf("default route not replaced: %s", r)
	}
	a.mustVxnet("detach", "r", "repl")
	if r := route(); !strings.Contains(r, "via 10.99.0.1 dev d0") {
		t.Errorf("own default route not restored by the detach: %s", r)
	}
}
