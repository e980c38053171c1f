package test

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/netnsutil"
	"github.com/vxnet/vxnet/internal/testnet"
)

// vxnet doctor finds a program on the VXLAN port, and what was broken by
// hand (a neighbor entry, an FDB entry, a veth, a NAT rule: one at a time),
// exits 1 naming it, and 0 again once the next full pass has repaired it.
func TestDoctorFindsDrift(t *testing.T) {
	// A resync slow enough for the doctor to see the drift first.
	c := newClusterArgs(t, 2, []string{"--resync-interval", "6s"})
	a1 := c.agents[0]
	// A program on the VXLAN port (before the agent's VTEP takes it).
	h, err := netns.GetFromPath(c.hosts[0].Path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var sock net.PacketConn
	if err := netnsutil.WithNetNS(h, func() (err error) {
		sock, err = net.ListenPacket("udp4", "0.0.0.0:4789")
		return err
	}); err != nil {
		t.Fatalf("bind the VXLAN port: %v", err)
	}
	if out, err := a1.vxnet("doctor"); err == nil || !strings.Contains(out, "a program holds UDP port 4789") {
		t.Errorf("doctor with a program on the VXLAN port: %v\n%s", err, out)
	}
	sock.Close()

	ns, _, _ := c.pairOn(t, a1, c.agents[1], "dr", "10.35.0")
	healthy := func() error {
		if out, err := a1.vxnet("doctor"); err != nil {
			return fmt.Errorf("%v\n%s", err, out)
		}
		return nil
	}
	eventually(t, 15*time.Second, "doctor is content before anything is broken", healthy)

	veth := func() string {
		out, _ := a1.inNS(ns, "ip", "-o", "link", "show", "master", "br0")
		for _, l := range strings.Split(out, "\n") {
			if f := strings.Fields(l); len(f) > 1 && !strings.HasPrefix(f[1], "vxlan1") {
				return strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0]
			}
		}
		t.Fatalf("no endpoint veth in %s:\n%s", ns, out)
		return ""
	}
	breakages := []struct {
		what, finding string
		do            func() (string, error)
	}{
		{"a neighbor entry", "neighbor entry of peer 10.35.0.20", func() (string, error) {
			return a1.inNS(ns, "ip", "neigh", "del", "10.35.0.20", "dev", "vxlan1")
		}},
		{"an FDB entry", "FDB entry of 02:42:0a:23:00:14", func() (string, error) {
			return a1.inNS(ns, "bridge", "fdb", "del", "02:42:0a:23:00:14", "dev", "vxlan1", "dst", "192.168.77.2")
		}},
		{"a veth", "is missing", func() (string, error) {
			return a1.inNS(ns, "ip", "link", "del", veth())
		}},
		{"a NAT rule", "lacks", func() (string, error) {
			return testnet.Exec(c.hosts[0].Name, "iptables", "-t", "nat", "-D", "VXNET-POSTROUTING", "-s", "172.18.0.0/16", "!", "-o", "vxnet_gwbridge", "-j", "MASQUERADE")
		}},
	}
	for _, b := range breakages {
		// Right after a full pass, so that the next is seconds away.
		if out, err := b.do(); err != nil {
			t.Fatalf("break %s: %v\n%s", b.what, err, out)
		}
		out, err := a1.vxnet("doctor")
		if err == nil || !strings.Contains(out, b.finding) {
			t.Errorf("doctor after deleting %s: exit %v, want 1 with %q:\n%s", b.what, err, b.finding, out)
		}
		eventually(t, 15*time.Second, "doctor content after the repair of "+b.what, healthy)
	}
	var fs []api.Finding
	a1.jsonOut(&fs, "doctor")
	checks := map[string]bool{}
	for _, f := range fs {
		checks[f.Check] = true
	}
	for _, want := range []string{"kernel", "mounts", "datapath", "egress", "underlay", "mtu", "store", "session", "room"} {
		if !checks[want] {
			t.Errorf("doctor -o json has no %q check: %+v", want, fs)
		}
	}
}
