package nat

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// TestMain guards the hard rule that tests never touch the root namespace:
// its ruleset and forwarding sysctl must be byte-identical afterwards.
func TestMain(m *testing.M) {
	snap := func() string {
		if os.Geteuid() != 0 {
			return ""
		}
		save, _ := exec.Command("iptables-save").Output()
		fwd, _ := os.ReadFile(ipForwardPath)
		return saveComment.ReplaceAllString(string(save), "") + "ip_forward=" + string(fwd)
	}
	before := snap()
	code := m.Run()
	if after := snap(); after != before {
		fmt.Fprintf(os.Stderr, "ROOT NAMESPACE CHANGED by nat tests\nbefore:\n%s\nafter:\n%s\n", before, after)
		code = 1
	}
	os.Exit(code)
}

type world struct {
	host, hostPath       string
	outside, outsidePath string
	a, aPath             string
	b, bPath             string
}

// newWorld builds a host namespace whose uplink leads to an "outside"
// namespace, plus two empty container namespaces.
func newWorld(t *testing.T) world {
	var w world
	w.host, w.hostPath = newNS(t, "host")
	w.outside, w.outsidePath = newNS(t, "out")
	w.a, w.aPath = newNS(t, "ca")
	w.b, w.bPath = newNS(t, "cb")
	run(t, "ip", "-n", w.host, "link", "add", "up0", "type", "veth", "peer", "name", "up1", "netns", w.outside)
	run(t, "ip", "-n", w.host, "addr", "add", "192.168.88.1/24", "dev", "up0")
	run(t, "ip", "-n", w.host, "link", "set", "up0", "up")
	run(t, "ip", "-n", w.outside, "addr", "add", "192.168.88.2/24", "dev", "up1")
	run(t, "ip", "-n", w.outside, "link", "set", "up1", "up")
	return w
}

func TestIntegration(t *testing.T) {
	requireRoot(t)
	ctx := testCtx(t)
	w := newWorld(t)

	// Someone else's rules, which must survive everything we do.
	const foreignFwd = "-A FORWARD -s 10.99.0.0/16 -j ACCEPT"
	const foreignNat = "-A POSTROUTING -d 10.98.0.0/16 -j RETURN"
	mustInNS(t, w.host, "iptables", "-A", "FORWARD", "-s", "10.99.0.0/16", "-j", "ACCEPT")
	mustInNS(t, w.host, "iptables", "-t", "nat", "-A", "POSTROUTING", "-d", "10.98.0.0/16", "-j", "RETURN")
	pristine := iptablesSave(t, w.host)
	if readSysctl(t, w.host, "net.ipv4.ip_forward") != "0" {
		t.Log("host namespace started with forwarding on; the sysctl repair is not exercised")
	}

	m, err := New(Config{NetNS: w.hostPath, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if m.GatewayAddr() != netip.MustParseAddr("172.18.0.1") {
		t.Fatalf("GatewayAddr() = %s", m.GatewayAddr())
	}

	changes, err := m.Ensure(ctx)
	if err != nil {
		t.Fatalf("first Ensure: %v", err)
	}
	t.Logf("first Ensure: %q", changes)
	if len(changes) == 0 {
		t.Fatal("first Ensure reported no changes")
	}
	if got := readSysctl(t, w.host, "net.ipv4.ip_forward"); got != "1" {
		t.Fatalf("host ip_forward = %s after Ensure", got)
	}
	br := mustInNS(t, w.host, "ip", "-d", "addr", "show", "dev", "vxnet_gwbridge")
	if !strings.Contains(br, "inet 172.18.0.1/16") || !strings.Contains(br, "bridge ") || !strings.Contains(br, ",UP") {
		t.Fatalf("bridge not as wanted:\n%s", br)
	}
	saved := iptablesSave(t, w.host)
	for _, r := range append(Config{}.Rules(), Config{}.Jumps()...) {
		if !strings.Contains(saved, r.String()+"\n") {
			t.Errorf("rule %q missing from\n%s", r.String(), saved)
		}
	}
	fwd := mustInNS(t, w.host, "iptables", "-S", "FORWARD")
	if lines := strings.Split(strings.TrimSpace(fwd), "\n"); len(lines) < 3 || lines[1] != "-A FORWARD -j VXNET-FORWARD" || lines[2] != foreignFwd {
		t.Fatalf("FORWARD should start with our jump, then the foreign rule:\n%s", fwd)
	}

	// ifb interfaces stand in for dummies, which this kernel lacks.
	// Containers: A has an "overlay" eth0 (an ifb) already, so its gateway must
	// become eth1, as in Docker; B names it explicitly.
	run(t, "ip", "-n", w.a, "link", "add", "eth0", "type", "ifb")
	specA := GatewaySpec{ContainerNS: w.aPath, HostVeth: "gw" + randHex(7), Addr: netip.MustParsePrefix("172.18.0.2/16")}
	specB := GatewaySpec{ContainerNS: w.bPath, HostVeth: "gw" + randHex(7), IfName: "eth1", Addr: netip.MustParsePrefix("172.18.0.3/16")}
	for _, s := range []GatewaySpec{specA, specB} {
		ifn, _, err := m.AddGateway(ctx, s)
		if err != nil {
			t.Fatalf("AddGateway(%s): %v", s.HostVeth, err)
		}
		if ifn != "eth1" {
			t.Fatalf("AddGateway(%s) interface %q, want eth1", s.HostVeth, ifn)
		}
	}
	// Adopting an existing, correct gateway is a no-op.
	if ifn, _, err := m.AddGateway(ctx, specA); err != nil || ifn != "eth1" {
		t.Fatalf("repeated AddGateway = %q, %v", ifn, err)
	}
	if gws, err := m.Gateways(ctx); err != nil || !slices.Equal(gws, sorted(specA.HostVeth, specB.HostVeth)) {
		t.Fatalf("Gateways() = %v, %v", gws, err)
	}
	route := mustInNS(t, w.a, "ip", "route", "show", "default")
	if !strings.Contains(route, "default via 172.18.0.1 dev eth1") {
		t.Fatalf("container A default route: %q", route)
	}

	server := echoServer(t, w.outsidePath, "192.168.88.2:0")
	t.Run("egress is masqueraded", func(t *testing.T) {
		seen, err := dialFrom(w.aPath, server)
		if err != nil {
			t.Fatalf("container A cannot reach the outside: %v", err)
		}
		if !strings.HasPrefix(seen, "192.168.88.1:") {
			t.Fatalf("outside saw %s, want the host address 192.168.88.1 (MASQUERADE)", seen)
		}
	})
	t.Run("container reaches host through the bridge", func(t *testing.T) {
		if out, err := inNS(w.a, "ping", "-c1", "-W2", "172.18.0.1"); err != nil {
			t.Fatalf("ping gateway: %v\n%s", err, out)
		}
	})

	bServer := echoServer(t, w.bPath, "172.18.0.3:0")
	assertIsolated := func(t *testing.T) {
		t.Helper()
		if out, err := inNS(w.a, "ping", "-c1", "-W1", "172.18.0.3"); err == nil {
			t.Fatalf("container A pinged container B over the gateway bridge:\n%s", out)
		}
		if seen, err := dialFromTimeout(w.aPath, bServer, 500*time.Millisecond); err == nil {
			t.Fatalf("container A connected to container B over the gateway bridge (B saw %s)", seen)
		}
	}
	t.Run("containers isolated on the bridge", assertIsolated)
	t.Run("iptables alone isolates when br_netfilter is active", func(t *testing.T) {
		if readSysctl(t, w.host, "net.bridge.bridge-nf-call-iptables") != "1" {
			t.Skip("bridge-nf-call-iptables is off in the host namespace; only port isolation applies")
		}
		for _, s := range []GatewaySpec{specA, specB} {
			run(t, "ip", "-n", w.host, "link", "set", "dev", s.HostVeth, "type", "bridge_slave", "isolated", "off")
		}
		assertIsolated(t)
		if n := dropCount(t, w.host); n == 0 {
			t.Fatal("isolation held without port isolation, but the DROP rule matched nothing")
		}
		// Control: without the DROP rule as well, A does reach B, so the
		// isolation assertions are not vacuous.
		mustInNS(t, w.host, "iptables", "-D", "VXNET-FORWARD", "-i", "vxnet_gwbridge", "-o", "vxnet_gwbridge", "-j", "DROP")
		if out, err := inNS(w.a, "ping", "-c1", "-W2", "172.18.0.3"); err != nil {
			t.Fatalf("with neither port isolation nor the DROP rule, A should reach B: %v\n%s", err, out)
		}
		if ch, err := m.Ensure(ctx); err != nil || len(ch) != 1 {
			t.Fatalf("Ensure after deleting DROP = %q, %v", ch, err)
		}
		assertIsolated(t)
		// CheckGateway notices and restores the port isolation.
		for _, s := range []GatewaySpec{specA, specB} {
			ch, err := m.CheckGateway(ctx, s)
			if err != nil || len(ch) != 1 || !strings.Contains(ch[0], "isolated") {
				t.Fatalf("CheckGateway(%s) = %q, %v; want the isolation repair", s.HostVeth, ch, err)
			}
		}
		assertIsolated(t)
	})

	t.Run("Ensure is idempotent", func(t *testing.T) {
		before := iptablesSave(t, w.host)
		for range 2 {
			ch, err := m.Ensure(ctx)
			if err != nil || len(ch) != 0 {
				t.Fatalf("Ensure on converged state = %q, %v; want no changes", ch, err)
			}
		}
		if after := iptablesSave(t, w.host); after != before || countRules(after) != countRules(before) {
			t.Fatalf("ruleset changed by a no-op Ensure:\nbefore:\n%s\nafter:\n%s", before, after)
		}
		for _, s := range []GatewaySpec{specA, specB} {
			if ch, err := m.CheckGateway(ctx, s); err != nil || len(ch) != 0 {
				t.Fatalf("CheckGateway(%s) on healthy gateway = %q, %v", s.HostVeth, ch, err)
			}
		}
	})

	t.Run("Ensure repairs drift", func(t *testing.T) {
		want := iptablesSave(t, w.host)
		drifts := []struct {
			name   string
			break_ []string
			expect string
		}{
			{"deleted DROP", []string{"iptables", "-D", "VXNET-FORWARD", "-i", "vxnet_gwbridge", "-o", "vxnet_gwbridge", "-j", "DROP"}, "filter/VXNET-FORWARD"},
			{"deleted MASQUERADE", []string{"iptables", "-t", "nat", "-F", "VXNET-POSTROUTING"}, "nat/VXNET-POSTROUTING"},
			{"stray rule in our chain", []string{"iptables", "-I", "VXNET-FORWARD", "1", "-j", "ACCEPT"}, "unexpected"},
			{"reordered", []string{"iptables", "-A", "VXNET-FORWARD", "-j", "VXNET-ISOLATION"}, "filter/VXNET-FORWARD"},
			{"deleted jump", []string{"iptables", "-D", "FORWARD", "-j", "VXNET-FORWARD"}, "inserted jump"},
			{"duplicate jump", []string{"iptables", "-t", "nat", "-A", "POSTROUTING", "-j", "VXNET-POSTROUTING"}, "duplicate"},
			{"bridge down", []string{"ip", "link", "set", "vxnet_gwbridge", "down"}, "up"},
			{"bridge address gone", []string{"ip", "addr", "flush", "dev", "vxnet_gwbridge"}, "added address 172.18.0.1/16"},
			{"forwarding off", []string{"sysctl", "-qw", "net.ipv4.ip_forward=0"}, "ip_forward"},
		}
		for _, d := range drifts {
			if d.name == "reordered" {
				// Move the isolation jump from first to last.
				mustInNS(t, w.host, "iptables", "-D", "VXNET-FORWARD", "1")
			}
			mustInNS(t, w.host, d.break_...)
			ch, err := m.Ensure(ctx)
			if err != nil {
				t.Fatalf("%s: Ensure: %v", d.name, err)
			}
			if len(ch) == 0 || !strings.Contains(strings.Join(ch, "\n"), d.expect) {
				t.Fatalf("%s: Ensure reported %q, want a change mentioning %q", d.name, ch, d.expect)
			}
			t.Logf("%s: repaired: %q", d.name, ch)
			if got := iptablesSave(t, w.host); got != want {
				t.Fatalf("%s: not repaired to the original ruleset:\nwant:\n%s\ngot:\n%s", d.name, want, got)
			}
			if ch, err := m.Ensure(ctx); err != nil || len(ch) != 0 {
				t.Fatalf("%s: Ensure after repair = %q, %v", d.name, ch, err)
			}
		}
		// Gateways survive flushing the bridge address (they are ports,
		// not addresses) and egress still works after all that.
		if seen, err := dialFrom(w.aPath, server); err != nil || !strings.HasPrefix(seen, "192.168.88.1:") {
			t.Fatalf("egress after repairs: %q, %v", seen, err)
		}
	})

	t.Run("CheckGateway repairs drift", func(t *testing.T) {
		run(t, "ip", "-n", w.host, "link", "set", specA.HostVeth, "nomaster")
		run(t, "ip", "-n", w.a, "route", "del", "default")
		run(t, "ip", "-n", w.a, "addr", "flush", "dev", "eth1")
		ch, err := m.CheckGateway(ctx, specA)
		if err != nil {
			t.Fatal(err)
		}
		joined := strings.Join(ch, "\n")
		for _, want := range []string{"enslaved", "isolated", "added 172.18.0.2/16", "default route"} {
			if !strings.Contains(joined, want) {
				t.Errorf("CheckGateway repairs %q lack %q", ch, want)
			}
		}
		if seen, err := dialFrom(w.aPath, server); err != nil || !strings.HasPrefix(seen, "192.168.88.1:") {
			t.Fatalf("egress after CheckGateway: %q, %v", seen, err)
		}
	})

	t.Run("RemoveGateway", func(t *testing.T) {
		if err := m.RemoveGateway(ctx, specB.HostVeth, nil); err != nil {
			t.Fatal(err)
		}
		if err := m.RemoveGateway(ctx, specB.HostVeth, nil); err != nil {
			t.Fatalf("second RemoveGateway: %v", err)
		}
		if slices.Contains(linkNames(t, w.host), specB.HostVeth) || slices.Contains(linkNames(t, w.b), "eth1") {
			t.Fatal("veth pair still present after RemoveGateway")
		}
		if _, err := m.CheckGateway(ctx, specB); !errors.Is(err, ErrGatewayGone) {
			t.Fatalf("CheckGateway on removed gateway: %v, want ErrGatewayGone", err)
		}
		if gws, _ := m.Gateways(ctx); !slices.Equal(gws, []string{specA.HostVeth}) {
			t.Fatalf("Gateways() = %v", gws)
		}
	})

	t.Run("Cleanup", func(t *testing.T) {
		if err := m.Cleanup(ctx); err != nil {
			t.Fatal(err)
		}
		if got := iptablesSave(t, w.host); got != pristine {
			t.Fatalf("Cleanup left the ruleset different from before Ensure:\nbefore:\n%s\nafter:\n%s", pristine, got)
		}
		saved := iptablesSave(t, w.host)
		if !strings.Contains(saved, foreignFwd) || !strings.Contains(saved, foreignNat) {
			t.Fatalf("foreign rules lost:\n%s", saved)
		}
		for _, l := range linkNames(t, w.host) {
			if l == "vxnet_gwbridge" || strings.HasPrefix(l, "gw") {
				t.Fatalf("link %s survived Cleanup", l)
			}
		}
		if err := m.Cleanup(ctx); err != nil {
			t.Fatalf("Cleanup of nothing: %v", err)
		}
		if _, err := m.CheckGateway(ctx, specA); !errors.Is(err, ErrGatewayGone) {
			t.Fatalf("CheckGateway after Cleanup: %v, want ErrGatewayGone", err)
		}
	})
}

// dropCount returns the packet counter of the icc DROP rule.
func dropCount(t *testing.T, ns string) int {
	t.Helper()
	for _, l := range strings.Split(mustInNS(t, ns, "iptables", "-L", "VXNET-FORWARD", "-v", "-x", "-n"), "\n") {
		f := strings.Fields(l)
		if len(f) > 2 && f[2] == "DROP" {
			n, err := strconv.Atoi(f[0])
			if err != nil {
				t.Fatalf("parse counter in %q: %v", l, err)
			}
			return n
		}
	}
	t.Fatal("DROP rule not found in VXNET-FORWARD")
	return 0
}

func sorted(s ...string) []string {
	slices.Sort(s)
	return s
}

func TestAddGatewayRollback(t *testing.T) {
	requireRoot(t)
	ctx := testCtx(t)
	host, hostPath := newNS(t, "rbhost")
	c, cPath := newNS(t, "rbc")
	m, err := New(Config{NetNS: hostPath, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })

	// Without Ensure there is no bridge to attach to.
	if _, _, err := m.AddGateway(ctx, GatewaySpec{ContainerNS: cPath, HostVeth: "gwnobridge", Addr: netip.MustParsePrefix("172.18.0.9/16")}); err == nil {
		t.Fatal("AddGateway without a bridge succeeded")
	}
	if _, err := m.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	// The container already has an address clash, an eth1 and its own
	// default route, which a failed attach must leave intact.
	run(t, "ip", "-n", c, "link", "add", "eth0", "type", "ifb")
	run(t, "ip", "-n", c, "link", "add", "eth1", "type", "ifb")
	run(t, "ip", "-n", c, "addr", "add", "172.18.0.9/16", "dev", "eth0")
	run(t, "ip", "-n", c, "addr", "add", "10.1.0.2/24", "dev", "eth1")
	run(t, "ip", "-n", c, "link", "set", "eth0", "up")
	run(t, "ip", "-n", c, "link", "set", "eth1", "up")
	run(t, "ip", "-n", c, "route", "add", "default", "via", "10.1.0.1")
	hostLinks := linkNames(t, host)
	cLinks := linkNames(t, c)
	cRoutes := mustInNS(t, c, "ip", "route")

	hookErr := errors.New("injected failure after veth creation")
	cases := []struct {
		name string
		spec GatewaySpec
		hook func() error
	}{
		{"bad netns path", GatewaySpec{ContainerNS: "/run/netns/vxn-does-not-exist-" + randHex(6), HostVeth: "gw" + randHex(7), Addr: netip.MustParsePrefix("172.18.0.10/16")}, nil},
		{"address clash", GatewaySpec{ContainerNS: cPath, HostVeth: "gw" + randHex(7), Addr: netip.MustParsePrefix("172.18.0.9/16")}, nil},
		{"ifname clash", GatewaySpec{ContainerNS: cPath, HostVeth: "gw" + randHex(7), IfName: "eth1", Addr: netip.MustParsePrefix("172.18.0.11/16")}, nil},
		{"gateway address", GatewaySpec{ContainerNS: cPath, HostVeth: "gw" + randHex(7), Addr: netip.MustParsePrefix("172.18.0.1/16")}, nil},
		{"outside subnet", GatewaySpec{ContainerNS: cPath, HostVeth: "gw" + randHex(7), Addr: netip.MustParsePrefix("172.19.0.5/16")}, nil},
		{"host veth name taken", GatewaySpec{ContainerNS: cPath, HostVeth: "up0", Addr: netip.MustParsePrefix("172.18.0.12/16")}, nil},
		{"eth0 asked for", GatewaySpec{ContainerNS: cPath, HostVeth: "gw" + randHex(7), IfName: "eth0", Addr: netip.MustParsePrefix("172.18.0.16/16")}, nil},
		{"failure after creation", GatewaySpec{ContainerNS: cPath, HostVeth: "gw" + randHex(7), Addr: netip.MustParsePrefix("172.18.0.13/16")}, func() error { return hookErr }},
	}
	run(t, "ip", "-n", host, "link", "add", "up0", "type", "ifb")
	hostLinks = append(hostLinks, "up0")
	for _, tc := range cases {
		testHookAfterVeth = tc.hook
		_, _, err := m.AddGateway(ctx, tc.spec)
		testHookAfterVeth = nil
		if err == nil {
			t.Fatalf("%s: AddGateway succeeded", tc.name)
		}
		t.Logf("%s: %v", tc.name, err)
		if tc.hook != nil && !errors.Is(err, hookErr) {
			t.Fatalf("%s: error does not wrap the cause: %v", tc.name, err)
		}
		if got := linkNames(t, host); !slices.Equal(sorted(got...), sorted(hostLinks...)) {
			t.Fatalf("%s: host links %v, want %v", tc.name, got, hostLinks)
		}
		if got := linkNames(t, c); !slices.Equal(sorted(got...), sorted(cLinks...)) {
			t.Fatalf("%s: container links %v, want %v", tc.name, got, cLinks)
		}
		if got := mustInNS(t, c, "ip", "route"); got != cRoutes {
			t.Fatalf("%s: container routes changed:\n%s\nwant:\n%s", tc.name, got, cRoutes)
		}
	}

	// A good attach to the same container, asked to, then replaces its
	// default route, and picks eth2 as the first free name. Its host name
	// is taken by a half-made pair (a crash before the peer was moved),
	// which is replaced rather than refused.
	left := "gw" + randHex(7)
	run(t, "ip", "-n", host, "link", "add", left, "type", "veth", "peer", "name", left+"p")
	ok := GatewaySpec{ContainerNS: cPath, HostVeth: left, Addr: netip.MustParsePrefix("172.18.0.14/16"), MTU: 1400, ReplaceDefault: true}
	ifn, replaced, err := m.AddGateway(ctx, ok)
	if err != nil || ifn != "eth2" {
		t.Fatalf("AddGateway = %q, %v; want eth2", ifn, err)
	}
	if len(replaced) != 1 || replaced[0].Dev != "eth1" || replaced[0].Gateway != netip.MustParseAddr("10.1.0.1") {
		t.Fatalf("AddGateway replaced %v; want the default via 10.1.0.1 dev eth1", replaced)
	}
	if r := mustInNS(t, c, "ip", "route", "show", "default"); strings.TrimSpace(r) != "default via 172.18.0.1 dev eth2" {
		t.Fatalf("default route %q", r)
	}
	if l := mustInNS(t, c, "ip", "link", "show", "eth2"); !strings.Contains(l, "mtu 1400") {
		t.Fatalf("MTU not applied: %s", l)
	}
	if slices.Contains(linkNames(t, host), left+"p") {
		t.Fatal("half-made pair's host-side peer survived")
	}
	// A veth whose peer lives in some other namespace is not ours to take.
	other, _ := newNS(t, "rbother")
	taken := "gw" + randHex(7)
	run(t, "ip", "-n", host, "link", "add", taken, "type", "veth", "peer", "name", "eth0", "netns", other)
	if _, _, err := m.AddGateway(ctx, GatewaySpec{ContainerNS: cPath, HostVeth: taken, Addr: netip.MustParsePrefix("172.18.0.15/16")}); err == nil {
		t.Fatal("AddGateway took over a veth belonging to another namespace")
	}
	if !slices.Contains(linkNames(t, host), taken) {
		t.Fatal("AddGateway deleted a veth belonging to another namespace")
	}
	if err := m.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(linkNames(t, c), "eth2") {
		t.Fatal("container end survived Cleanup")
	}
}

func TestEnsureReplacesNonBridgeAndCleansFromScratch(t *testing.T) {
	requireRoot(t)
	ctx := testCtx(t)
	host, hostPath := newNS(t, "nb")
	empty := iptablesSave(t, host)

	m, err := New(Config{NetNS: hostPath, Bridge: "gwb" + randHex(4), Subnet: netip.MustParsePrefix("10.77.0.0/24"), ChainPrefix: "VXT", Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	// Cleanup before anything exists is fine and creates nothing.
	if err := m.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if got := iptablesSave(t, host); got != empty {
		t.Fatalf("Cleanup on nothing changed the ruleset:\n%s", got)
	}

	br := m.Config().Bridge
	run(t, "ip", "-n", host, "link", "add", br, "type", "ifb")
	// A wrong-length copy of the gateway address must be replaced too.
	ch, err := m.Ensure(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(ch, "\n"), "type ifb") {
		t.Fatalf("Ensure did not report replacing the ifb: %q", ch)
	}
	if out := mustInNS(t, host, "ip", "-d", "link", "show", br); !strings.Contains(out, "bridge ") {
		t.Fatalf("%s is not a bridge:\n%s", br, out)
	}
	run(t, "ip", "-n", host, "addr", "del", "10.77.0.1/24", "dev", br)
	run(t, "ip", "-n", host, "addr", "add", "10.77.0.1/16", "dev", br)
	ch, err = m.Ensure(ctx)
	if err != nil || !strings.Contains(strings.Join(ch, "\n"), "wrong prefix length") {
		t.Fatalf("Ensure = %q, %v; want prefix-length repair", ch, err)
	}
	if out := mustInNS(t, host, "ip", "addr", "show", br); !strings.Contains(out, "10.77.0.1/24") || strings.Contains(out, "/16") {
		t.Fatalf("bridge address not repaired:\n%s", out)
	}
	saved := iptablesSave(t, host)
	if !strings.Contains(saved, "-A VXT-POSTROUTING -s 10.77.0.0/24 ! -o "+br+" -j MASQUERADE") {
		t.Fatalf("custom rules missing:\n%s", saved)
	}
	if err := m.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if got := iptablesSave(t, host); got != empty {
		t.Fatalf("Cleanup left:\n%s", got)
	}
	if slices.Contains(linkNames(t, host), br) {
		t.Fatal("bridge survived Cleanup")
	}
}

// TestProcSysFollowsThread pins down the kernel behaviour ensureForwarding
// relies on: /proc/sys/net is resolved against the opening thread's network
// namespace, so a namespace-entered thread sees and sets that namespace's
// sysctl, not the root's.
func TestProcSysFollowsThread(t *testing.T) {
	requireRoot(t)
	on, onPath := newNS(t, "pson")
	off, offPath := newNS(t, "psoff")
	mustInNS(t, on, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	mustInNS(t, off, "sysctl", "-qw", "net.ipv4.ip_forward=0")
	read := func(path string) string {
		var v []byte
		if err := withNetNS(path, func() (err error) {
			v, err = os.ReadFile(ipForwardPath)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(v))
	}
	if got := read(onPath); got != "1" {
		t.Fatalf("ip_forward read in a forwarding namespace = %s", got)
	}
	if got := read(offPath); got != "0" {
		t.Fatalf("ip_forward read in a non-forwarding namespace = %s", got)
	}
}

// TestNewInCurrentNamespace covers the agent's path: no Config.NetNS, the
// manager binds to the namespace of the thread calling New and keeps using
// it from any goroutine.
func TestNewInCurrentNamespace(t *testing.T) {
	requireRoot(t)
	ctx := testCtx(t)
	host, hostPath := newNS(t, "cur")
	var m *Manager
	if err := withNetNS(hostPath, func() (err error) {
		m, err = New(Config{Logger: testLogger(t)})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	// Guard before touching anything: a manager bound to the root
	// namespace here would break the hard rule.
	want, err := netns.GetFromPath(hostPath)
	if err != nil {
		t.Fatal(err)
	}
	defer want.Close()
	if !m.ns.Equal(want) {
		t.Fatal("manager is not bound to the namespace New was called in")
	}
	if _, err := m.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(linkNames(t, host), "vxnet_gwbridge") {
		t.Fatal("bridge not created in the caller's namespace")
	}
	if !strings.Contains(iptablesSave(t, host), "-A FORWARD -j VXNET-FORWARD") {
		t.Fatal("rules not created in the caller's namespace")
	}
	if err := m.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
}

// The legacy iptables backend (x_tables) gets the same rules, published
// ports included, is left alone when nothing changed, and is cleaned to
// what it was. Hosts pick one backend; the agent follows --iptables.
func TestLegacyBackend(t *testing.T) {
	requireRoot(t)
	if _, err := exec.LookPath("iptables-legacy"); err != nil {
		t.Skip("no iptables-legacy on this machine")
	}
	ctx := testCtx(t)
	host, hostPath := newNS(t, "lg")
	save := func() string {
		out, err := exec.Command("ip", "netns", "exec", host, "iptables-legacy-save").Output()
		if err != nil {
			t.Fatalf("iptables-legacy-save: %v", err)
		}
		// Legacy tables appear once anything has used them, with their
		// built-in chains: a table of only built-in chains with policy
		// ACCEPT is the same as none. Rules, our chains' declarations and
		// any other policy count.
		var keep []string
		for _, l := range strings.Split(string(out), "\n") {
			f := strings.Fields(l)
			switch {
			case strings.HasPrefix(l, "-A "):
				keep = append(keep, l)
			case strings.HasPrefix(l, ":") && len(f) > 1 && f[1] != "ACCEPT":
				keep = append(keep, f[0]+" "+f[1])
			}
		}
		return strings.Join(keep, "\n")
	}
	empty := save()
	m, err := New(Config{NetNS: hostPath, Bridge: "gwb" + randHex(4), Subnet: netip.MustParsePrefix("10.78.0.0/24"),
		ChainPrefix: "VXL", IPTables: "iptables-legacy", Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	m.SetPublished([]Publish{{Proto: "tcp", HostPort: 8080, Addr: netip.MustParseAddr("10.78.0.9"), ContainerPort: 80}})
	if _, err := m.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	saved := save()
	for _, want := range []string{
		"-A VXL-POSTROUTING -s 10.78.0.0/24 ! -o " + m.Config().Bridge + " -j MASQUERADE",
		"--dport 8080 -j DNAT --to-destination 10.78.0.9:80",
		"-A PREROUTING -m addrtype --dst-type LOCAL -j VXL-DNAT",
	} {
		if !strings.Contains(saved, want) {
			t.Fatalf("legacy ruleset lacks %q:\n%s", want, saved)
		}
	}
	if ch, err := m.Ensure(ctx); err != nil || len(ch) > 0 {
		t.Fatalf("second Ensure = %q, %v; want no change", ch, err)
	}
	if err := m.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if got := save(); got != empty {
		t.Fatalf("Cleanup left in the legacy ruleset:\n%s\nwant:\n%s", got, empty)
	}
}
