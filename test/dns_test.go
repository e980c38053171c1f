package test

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/vishvananda/netns"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/netnsutil"
)

// outsideResolver is a resolver on the underlay (the switch's address)
// for the names outside the overlay: it knows outside.example. only.
func outsideResolver(t *testing.T, nsName, addr string) {
	t.Helper()
	h, err := netns.GetFromName(nsName)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var pc net.PacketConn
	if err := netnsutil.WithNetNS(h, func() error {
		var err error
		pc, err = net.ListenPacket("udp4", net.JoinHostPort(addr, "53"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		out := new(dns.Msg)
		if q := r.Question[0]; strings.EqualFold(q.Name, "outside.example.") && q.Qtype == dns.TypeA {
			out.SetReply(r)
			out.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.ParseIP("203.0.113.7")}}
		} else {
			out.SetRcode(r, dns.RcodeNameError)
		}
		w.WriteMsg(out)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
}

// dig asks server from namespace ns; it returns the answer section (one
// record per line, +short) and the status.
func dig(t *testing.T, ns, server string, args ...string) (short, status string) {
	t.Helper()
	full := append([]string{"netns", "exec", ns, "dig", "@" + server, "+time=1", "+tries=1", "+noall", "+answer", "+comments"}, args...)
	out, _ := exec.Command("ip", full...).CombinedOutput()
	var answers []string
	for _, line := range strings.Split(string(out), "\n") {
		if i := strings.Index(line, "status: "); i >= 0 {
			status = strings.TrimRight(strings.Fields(line[i+len("status: "):])[0], ",")
		}
		if f := strings.Fields(line); len(f) >= 5 && !strings.HasPrefix(line, ";") {
			answers = append(answers, f[len(f)-1])
		}
	}
	return strings.Join(answers, " "), status
}

// Names across hosts: a container on h1 resolves one on h2, by name and
// name.network, and back by address; a name on another network is not
// found; a detach and an attach elsewhere move the name within the peer
// bound; outside names are forwarded to the underlay's resolver; and the
// article's `ping net1c2` works by name.
func TestDNSAcrossHosts(t *testing.T) {
	if out, err := exec.Command("../scripts/install-runtimes.sh").CombinedOutput(); err != nil {
		t.Fatalf("install dig: %v\n%s", err, out)
	}
	rc := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(rc, []byte("nameserver 192.168.77.254\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c := newClusterArgs(t, 2, []string{"--dns-resolv-conf", rc})
	outsideResolver(t, c.net.Switch, "192.168.77.254")
	a1, a2 := c.agents[0], c.agents[1]
	a1.mustVxnet("network", "create", "net1", "--subnet", "10.55.0.0/24")
	a1.mustVxnet("network", "create", "net2", "--subnet", "10.55.1.0/24")
	c1, c2, c3 := c.net.AddNS("net1c1"), c.net.AddNS("net1c2"), c.net.AddNS("net2c1")

	// vxnet attach says where the DNS server is and writes resolv.conf
	// for ip netns users.
	etc := "/etc/netns/" + c1
	t.Cleanup(func() {
		os.RemoveAll(etc)
		os.Remove("/etc/netns") // if empty: made for this test
	})
	var e api.Endpoint
	a1.jsonOut(&e, "attach", "net1", c1, "--name", "net1c1", "--resolv-conf", etc+"/resolv.conf")
	if e.DNS == nil || e.DNS.Server != "10.55.0.1" || len(e.DNS.Search) != 1 || e.DNS.Search[0] != "net1" {
		t.Fatalf("attach's dns: %+v", e.DNS)
	}
	if data, err := os.ReadFile(etc + "/resolv.conf"); err != nil || !strings.Contains(string(data), "nameserver 10.55.0.1\nsearch net1") {
		t.Fatalf("resolv.conf: %v %q", err, data)
	}
	a2.mustVxnet("attach", "net1", c2, "--name", "net1c2", "--ip", "10.55.0.20", "--alias", "db")
	a2.mustVxnet("attach", "net2", c3, "--name", "net2c1", "--ip", "10.55.1.30")

	const srv = "10.55.0.1"
	expect := func(what string, want, wantStatus string, args ...string) {
		t.Helper()
		eventually(t, 5*time.Second, what, func() error {
			got, status := dig(t, c1, srv, args...)
			if got != want || status != wantStatus {
				return fmt.Errorf("dig %v: %q %s, want %q %s", args, got, status, want, wantStatus)
			}
			return nil
		})
	}
	expect("net1c1 resolves net1c2 on h2", "10.55.0.20", "NOERROR", "net1c2")
	expect("name.network", "10.55.0.20", "NOERROR", "net1c2.net1")
	expect("an alias", "10.55.0.20", "NOERROR", "db.net1")
	expect("its own name", e.IP, "NOERROR", "NET1C1")
	expect("the address back", "net1c2.net1. db.net1.", "NOERROR", "-x", "10.55.0.20")
	expect("over TCP", "10.55.0.20", "NOERROR", "+tcp", "net1c2")
	expect("another network's endpoint", "", "NXDOMAIN", "net2c1")
	expect("another network's endpoint by its network", "", "NXDOMAIN", "net2c1.net2")
	expect("an outside name, forwarded", "203.0.113.7", "NOERROR", "outside.example")
	expect("an unknown outside name", "", "NXDOMAIN", "nothing.example")
	if got, status := dig(t, c3, "10.55.1.1", "net1c2"); got != "" || status != "NXDOMAIN" {
		t.Errorf("net2c1 resolves net1c2: %q %s", got, status)
	}

	// The article, by name.
	if out, err := exec.Command("ip", "netns", "exec", c1, "ping", "-c", "1", "-W", "1", "net1c2").CombinedOutput(); err != nil {
		t.Errorf("ping net1c2 by name: %v\n%s", err, out)
	}

	// Detach: gone from the names. Attach on the other host with a new
	// address: found there.
	a2.mustVxnet("detach", "net1", "net1c2")
	expect("a detached name", "", "NXDOMAIN", "net1c2")
	c4 := c.net.AddNS("net1c2b")
	a1.mustVxnet("attach", "net1", c4, "--name", "net1c2", "--ip", "10.55.0.40")
	expect("the name at its new address", "10.55.0.40", "NOERROR", "net1c2")
}
