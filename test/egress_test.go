package test

import (
	"bufio"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/vtep"
)

// startEchoAddr runs a TCP server inside ns that answers every connection
// with the remote address it sees, and returns its address.
func startEchoAddr(t *testing.T, nsPath, ip string) string {
	t.Helper()
	var ln net.Listener
	err := vtep.WithNetNS(nsPath, func() error {
		var err error
		ln, err = net.Listen("tcp", ip+":0")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintln(c, c.RemoteAddr().(*net.TCPAddr).IP)
			c.Close()
		}
	}()
	return ln.Addr().String()
}

// dialFrom connects from inside a namespace and returns the first line the
// server sends.
func dialFrom(nsPath, addr string) (string, error) {
	var line string
	err := vtep.WithNetNS(nsPath, func() error {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		line, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	return strings.TrimSpace(line), err
}

func iptablesSave(t *testing.T, ns string) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", ns, "iptables-save").CombinedOutput()
	if err != nil {
		t.Fatalf("iptables-save: %v %s", err, out)
	}
	var keep []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "#") || strings.HasPrefix(l, ":") {
			continue // comments and counters change by themselves
		}
		keep = append(keep, l)
	}
	return strings.Join(keep, "\n")
}

func countRules(s string) int { return strings.Count(s, "\n-A ") }

func TestEgress(t *testing.T) {
	c := newCluster(t, 2)
	a1 := c.agents[0]
	before := iptablesSave(t, c.hosts[0].Name)
	out := c.net.AddHost("out") // an "outside" server on the underlay
	server := startEchoAddr(t, out.Path, out.Addr.String())

	a1.mustVxnet("network", "create", "pub")
	a1.mustVxnet("network", "create", "priv", "--internal")
	// A gateway subnet that overlaps an overlay network is refused at start.
	dir := t.TempDir()
	bad := exec.Command("nsenter", "--net="+c.hosts[1].Path, binDir+"/vxnetd", "--store", c.consul.URL("vxnet/"),
		"--advertise", c.hosts[1].Addr.String(), "--state-dir", dir+"/s", "--run-dir", dir+"/r", "--socket", dir+"/sock",
		"--gateway-subnet", "10.0.0.0/16")
	if out, err := bad.CombinedOutput(); err == nil || !strings.Contains(string(out), "overlaps network") {
		t.Errorf("overlapping --gateway-subnet: %v\n%s", err, out)
	}
	if out, _ := a1.vxnet("network", "create", "clash", "--subnet", "172.18.5.0/24"); !strings.Contains(out, "gateway subnet") {
		t.Errorf("network overlapping the gateway subnet: %s", out)
	}
	ca, cb, ci := c.net.AddNS("ca"), c.net.AddNS("cb"), c.net.AddNS("ci")
	a1.mustVxnet("attach", "pub", ca)
	a1.mustVxnet("attach", "pub", cb)
	var ei api.Endpoint
	a1.jsonOut(&ei, "attach", "priv", ci)

	// The article's shape: eth0 on the overlay, eth1 on the gateway
	// bridge with the default route.
	routes, _ := exec.Command("ip", "-n", ca, "route").CombinedOutput()
	if !strings.Contains(string(routes), "default via 172.18.0.1 dev eth1") {
		t.Errorf("container routes:\n%s", routes)
	}
	// Egress is masqueraded: the server sees host1's underlay address.
	seen, err := dialFrom("/var/run/netns/"+ca, server)
	if err != nil || seen != c.hosts[0].Addr.String() {
		t.Fatalf("egress from ca: saw %q, err %v (want %s)", seen, err, c.hosts[0].Addr)
	}
	// An internal network's container has no way out.
	if _, err := dialFrom("/var/run/netns/"+ci, server); err == nil {
		t.Error("a container on an internal network reached the outside")
	}
	if out, _ := exec.Command("ip", "-n", ci, "route").CombinedOutput(); strings.Contains(string(out), "default") {
		t.Errorf("internal container has a default route:\n%s", out)
	}
	// Containers do not reach each other over the gateway bridge.
	addrs, _ := exec.Command("ip", "-n", cb, "-4", "-o", "addr", "show", "eth1").CombinedOutput()
	fields := strings.Fields(string(addrs))
	if len(fields) < 4 {
		t.Fatalf("cb eth1: %s", addrs)
	}
	cbGw := strings.Split(fields[3], "/")[0]
	if out, err := exec.Command("ip", "netns", "exec", ca, "ping", "-c", "1", "-W", "1", cbGw).CombinedOutput(); err == nil {
		t.Errorf("ca reached cb's gateway address %s:\n%s", cbGw, out)
	}

	// A restart adds no rule and keeps egress working.
	rules := iptablesSave(t, c.hosts[0].Name)
	a1.stop(9)
	a1.start()
	time.Sleep(300 * time.Millisecond)
	if after := iptablesSave(t, c.hosts[0].Name); countRules(after) != countRules(rules) {
		t.Errorf("rules after restart: %d, before %d\n%s", countRules(after), countRules(rules), after)
	}
	if seen, err := dialFrom("/var/run/netns/"+ca, server); err != nil || seen != c.hosts[0].Addr.String() {
		t.Errorf("egress after restart: %q %v", seen, err)
	}

	// The last non-internal endpoint leaving takes eth1 with it.
	a1.mustVxnet("detach", "pub", ca)
	if out, _ := exec.Command("ip", "-n", ca, "link").CombinedOutput(); strings.Contains(string(out), "eth1") {
		t.Errorf("gateway interface left after detach:\n%s", out)
	}

	// --cleanup restores iptables as it was before the agent first ran.
	a1.mustVxnet("detach", "pub", cb)
	a1.mustVxnet("detach", "priv", ci)
	a1.stop(15)
	cmd := exec.Command("nsenter", "--net="+c.hosts[0].Path, binDir+"/vxnetd", "--cleanup", "--state-dir", a1.dir+"/state")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("vxnetd --cleanup: %v\n%s", err, out)
	}
	if after := iptablesSave(t, c.hosts[0].Name); countRules(after) != countRules(before) || strings.Contains(after, "VXNET") {
		t.Errorf("after --cleanup:\n%s\nbefore:\n%s", after, before)
	}
	if out, _ := exec.Command("ip", "-n", c.hosts[0].Name, "link").CombinedOutput(); strings.Contains(string(out), "vxnet_gwbridge") {
		t.Errorf("gateway bridge left after --cleanup")
	}
}
