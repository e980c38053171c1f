package nat

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// routeWorld is a host namespace with the gateway bridge set up and a
// manager on it.
func routeWorld(t *testing.T) (host string, m *Manager) {
	t.Helper()
	host, hostPath := newNS(t, "rthost")
	m, err := New(Config{NetNS: hostPath, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if _, err := m.Ensure(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Cleanup(testCtx(t)) })
	return host, m
}

// withOwnDefault gives container c an interface eth0 (an ifb: this kernel
// has no dummies) with an address and two default routes of its own,
// with a metric and a source, and returns them as ip prints them.
func withOwnDefault(t *testing.T, c string) string {
	t.Helper()
	run(t, "ip", "-n", c, "link", "add", "eth0", "type", "ifb")
	run(t, "ip", "-n", c, "addr", "add", "10.3.0.2/24", "dev", "eth0")
	run(t, "ip", "-n", c, "link", "set", "eth0", "up")
	run(t, "ip", "-n", c, "route", "add", "default", "via", "10.3.0.1", "dev", "eth0", "src", "10.3.0.2", "metric", "100")
	run(t, "ip", "-n", c, "route", "add", "default", "via", "10.3.0.254", "dev", "eth0", "metric", "200", "proto", "static")
	return defaults(t, c)
}

func defaults(t *testing.T, c string) string {
	t.Helper()
	return mustInNS(t, c, "ip", "-4", "route", "show", "default")
}

// A container's own default route is kept unless the attach asks for it
// to be replaced; a replaced one comes back exactly at removal, through a
// round trip of the address book on disk, and a second removal is a no-op.
func TestGatewayKeepsOrReplacesDefaultRoute(t *testing.T) {
	requireRoot(t)
	ctx := testCtx(t)
	_, m := routeWorld(t)
	c, cPath := newNS(t, "rtown")
	own := withOwnDefault(t, c)
	spec := GatewaySpec{ContainerNS: cPath, HostVeth: "gw" + randHex(7), Addr: netip.MustParsePrefix("172.18.0.2/16")}

	if has, err := m.HasOwnDefaultRoute(ctx, cPath); err != nil || !has {
		t.Fatalf("HasOwnDefaultRoute = %v, %v; want true", has, err)
	}
	ifn, replaced, err := m.AddGateway(ctx, spec)
	if err != nil || ifn != "eth1" || len(replaced) != 0 {
		t.Fatalf("AddGateway(keep) = %q, %v, %v; want eth1, nothing replaced", ifn, replaced, err)
	}
	if got := defaults(t, c); got != own {
		t.Fatalf("default routes after AddGateway(keep):\n%s\nwant:\n%s", got, own)
	}
	if out := mustInNS(t, c, "ip", "-4", "addr", "show", "eth1"); !strings.Contains(out, "172.18.0.2/16") {
		t.Fatalf("gateway interface without its address (published ports use it):\n%s", out)
	}
	if ch, err := m.CheckGateway(ctx, spec); err != nil || len(ch) != 0 {
		t.Fatalf("CheckGateway(keep) = %q, %v; want nothing to do", ch, err)
	}
	if got := defaults(t, c); got != own {
		t.Fatalf("default routes after CheckGateway(keep):\n%s\nwant:\n%s", got, own)
	}
	if has, err := m.HasOwnDefaultRoute(ctx, cPath); err != nil || !has {
		t.Fatalf("HasOwnDefaultRoute with a gateway = %v, %v; want true", has, err)
	}
	if err := m.RemoveGateway(ctx, spec.HostVeth, nil); err != nil {
		t.Fatal(err)
	}
	if got := defaults(t, c); got != own {
		t.Fatalf("default routes after RemoveGateway:\n%s\nwant:\n%s", got, own)
	}

	spec.ReplaceDefault = true
	ifn, replaced, err = m.AddGateway(ctx, spec)
	if err != nil || ifn != "eth1" || len(replaced) != 2 {
		t.Fatalf("AddGateway(replace) = %q, %v, %v; want eth1 and both routes replaced", ifn, replaced, err)
	}
	t.Logf("replaced: %v", replaced)
	if got := strings.TrimSpace(defaults(t, c)); got != "default via 172.18.0.1 dev eth1" {
		t.Fatalf("default routes after AddGateway(replace): %q", got)
	}
	if has, err := m.HasOwnDefaultRoute(ctx, cPath); err != nil || has {
		t.Fatalf("HasOwnDefaultRoute counted the gateway's route: %v, %v", has, err)
	}
	for _, rd := range []bool{true, false} {
		s := spec
		s.ReplaceDefault = rd
		if ch, err := m.CheckGateway(ctx, s); err != nil || len(ch) != 0 {
			t.Fatalf("CheckGateway(replace=%v) after replacing = %q, %v", rd, ch, err)
		}
	}
	// Adopting the gateway again replaces nothing more.
	if _, again, err := m.AddGateway(ctx, spec); err != nil || len(again) != 0 {
		t.Fatalf("repeated AddGateway(replace) = %v, %v", again, err)
	}

	// What the agent does: record, and read back after a restart.
	bookPath := filepath.Join(t.TempDir(), "gw.json")
	book, err := OpenAddrBook(bookPath, m.Config().Subnet, m.GatewayAddr())
	if err != nil {
		t.Fatal(err)
	}
	if err := book.SetRoutes("c", replaced); err != nil {
		t.Fatal(err)
	}
	if book, err = OpenAddrBook(bookPath, m.Config().Subnet, m.GatewayAddr()); err != nil {
		t.Fatal(err)
	}
	restore := book.Routes("c")
	for range 2 { // idempotent
		if err := m.RemoveGateway(ctx, spec.HostVeth, restore); err != nil {
			t.Fatal(err)
		}
		if got := defaults(t, c); got != own {
			t.Fatalf("default routes after RemoveGateway(restore):\n%s\nwant exactly:\n%s", got, own)
		}
	}
	if slices.Contains(linkNames(t, c), "eth1") {
		t.Fatal("gateway interface left")
	}

	// A route whose device is gone is skipped, not an error, and nothing
	// else is added.
	gone := restore[0]
	gone.Dev = "ethgone"
	gone.Priority = 300
	if err := m.RemoveGateway(ctx, spec.HostVeth, []Route{gone}); err != nil {
		t.Fatalf("RemoveGateway with a route of a gone device: %v", err)
	}
	// So is one for a namespace that is gone or has been replaced.
	other := restore[0]
	other.Priority = 400
	other.NetnsIno++
	missing := restore[0]
	missing.Netns = filepath.Join(t.TempDir(), "missing")
	if err := m.RemoveGateway(ctx, spec.HostVeth, []Route{other, missing}); err != nil {
		t.Fatalf("RemoveGateway with routes of gone namespaces: %v", err)
	}
	if got := defaults(t, c); got != own {
		t.Fatalf("skipped routes were added:\n%s\nwant:\n%s", got, own)
	}
}

// A container without a default route gets the gateway's, whichever the
// mode; one that gains its own later, not having asked for replacement,
// has the gateway's removed by the next check, and the gateway itself
// stays.
func TestGatewayDefaultRouteWithoutOwn(t *testing.T) {
	requireRoot(t)
	ctx := testCtx(t)
	_, m := routeWorld(t)
	c, cPath := newNS(t, "rtnone")
	spec := GatewaySpec{ContainerNS: cPath, HostVeth: "gw" + randHex(7), Addr: netip.MustParsePrefix("172.18.0.3/16")}
	if has, err := m.HasOwnDefaultRoute(ctx, cPath); err != nil || has {
		t.Fatalf("HasOwnDefaultRoute of a bare namespace = %v, %v", has, err)
	}
	// No eth0 in the container: the gateway still is not eth0.
	ifn, replaced, err := m.AddGateway(ctx, spec)
	if err != nil || ifn != "eth1" || len(replaced) != 0 {
		t.Fatalf("AddGateway = %q, %v, %v; want eth1", ifn, replaced, err)
	}
	if got := strings.TrimSpace(defaults(t, c)); got != "default via 172.18.0.1 dev eth1" {
		t.Fatalf("default route: %q", got)
	}
	// Drift: the gateway's route deleted by hand comes back.
	run(t, "ip", "-n", c, "route", "del", "default")
	if ch, err := m.CheckGateway(ctx, spec); err != nil || !strings.Contains(strings.Join(ch, "\n"), "set container default route") {
		t.Fatalf("CheckGateway after the route was deleted = %q, %v", ch, err)
	}
	withOwnDefault(t, c)
	var own string
	for _, l := range strings.SplitAfter(defaults(t, c), "\n") {
		if !strings.Contains(l, "via 172.18.0.1 ") {
			own += l
		}
	}
	ch, err := m.CheckGateway(ctx, spec)
	if err != nil || !strings.Contains(strings.Join(ch, "\n"), "has its own") {
		t.Fatalf("CheckGateway after the container got its own route = %q, %v", ch, err)
	}
	if got := defaults(t, c); got != own {
		t.Fatalf("default routes:\n%s\nwant only the container's own:\n%s", got, own)
	}
	if !slices.Contains(linkNames(t, c), "eth1") {
		t.Fatal("gateway interface removed with the route")
	}
	// And eth0, when the overlay's interface is missing, is refused.
	spec.IfName = "eth0"
	if _, _, err := m.AddGateway(ctx, spec); err == nil {
		t.Fatal("AddGateway accepted eth0")
	}
}

// A gateway whose container lost its gateway interface (the overlay's
// eth0 present) gets eth1, and with eth1 taken the next free one, never
// eth0 even where it is free.
func TestGatewayNameNeverEth0(t *testing.T) {
	requireRoot(t)
	ctx := testCtx(t)
	_, m := routeWorld(t)
	c, cPath := newNS(t, "rtname")
	run(t, "ip", "-n", c, "link", "add", "eth1", "type", "ifb")
	spec := GatewaySpec{ContainerNS: cPath, HostVeth: "gw" + randHex(7), Addr: netip.MustParsePrefix("172.18.0.4/16")}
	if ifn, _, err := m.AddGateway(ctx, spec); err != nil || ifn != "eth2" {
		t.Fatalf("AddGateway with eth0 free, eth1 taken = %q, %v; want eth2", ifn, err)
	}
	if slices.Contains(linkNames(t, c), "eth0") {
		t.Fatal("eth0 made")
	}
}

func TestAddrBookRoutes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gw.json")
	sub := netip.MustParsePrefix("172.18.0.0/16")
	gw := netip.MustParseAddr("172.18.0.1")
	// A file as written before routes existed opens as a book without them.
	old := `{"subnet": "172.18.0.0/16", "owners": {"netns:1:2": "172.18.0.2"}}`
	if err := os.WriteFile(path, []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := OpenAddrBook(path, sub, gw)
	if err != nil {
		t.Fatal(err)
	}
	if b.Owners()["netns:1:2"] != netip.MustParseAddr("172.18.0.2") || b.Routes("netns:1:2") != nil {
		t.Fatalf("old file: owners %v, routes %v", b.Owners(), b.Routes("netns:1:2"))
	}
	r := Route{Netns: "/run/netns/c", NetnsDev: 4, NetnsIno: 4026532000, Dev: "eth0",
		Gateway: netip.MustParseAddr("10.3.0.1"), Src: netip.MustParseAddr("10.3.0.2"), Priority: 100, Table: 254, Protocol: 3,
		NextHops: []NextHop{{Dev: "eth0", Gateway: netip.MustParseAddr("10.3.0.9"), Hops: 1}}}
	if err := b.SetRoutes("netns:1:2", []Route{r, r}); err != nil {
		t.Fatal(err)
	}
	b2, err := OpenAddrBook(path, sub, gw)
	if err != nil {
		t.Fatal(err)
	}
	if got := b2.Routes("netns:1:2"); len(got) != 1 || got[0].String() != r.String() || got[0].NextHops[0] != r.NextHops[0] {
		t.Fatalf("routes after reopen = %v; want [%v] (duplicates dropped)", got, r)
	}
	if err := b2.Release("netns:1:2"); err != nil {
		t.Fatal(err)
	}
	b3, err := OpenAddrBook(path, sub, gw)
	if err != nil {
		t.Fatal(err)
	}
	if len(b3.Owners()) != 0 || b3.Routes("netns:1:2") != nil {
		t.Fatalf("Release kept %v, %v", b3.Owners(), b3.Routes("netns:1:2"))
	}
	// A book that exists but cannot be read is an error, never an empty
	// book: that would hand out held addresses and forget the routes.
	dir := filepath.Join(t.TempDir(), "gw.json")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenAddrBook(dir, sub, gw); err == nil {
		t.Fatal("an unreadable book opened as an empty one")
	}
	if err := b3.SetRoutes("", []Route{r}); err == nil {
		t.Fatal("SetRoutes accepted an empty owner")
	}
}
