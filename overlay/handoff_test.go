package overlay

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/ipam"
)

// Docker's order of calls, against the agent: an address reserved before
// the endpoint exists, the endpoint made with its interface handed off
// (taking the reservation over), the container's namespace named before
// it exists and bound once it does; a full pass keeps a young
// reservation, and releasing one leaves an endpoint's address alone.
func TestHandoffInProcess(t *testing.T) {
	a := startInProcess(t, "h1", nil)
	ctx := context.Background()
	n, err := a.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "n", Subnet: "10.1.0.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	r1, err := a.Reserve(ctx, "n", "")
	if err != nil {
		t.Fatal(err)
	}
	r2, err := a.Reserve(ctx, "n", "")
	if err != nil || r2.IP == r1.IP {
		t.Fatalf("second reservation %+v, %v (first %s)", r2, err, r1.IP)
	}
	if _, err := a.Attach(ctx, "n", api.AttachRequest{Name: "d1", IP: r1.IP, Handoff: "vxd1", Netns: "/proc/self/ns/net"}); ErrorCode(err) != api.CodeInvalid {
		t.Errorf("handoff with a netns: %v", err)
	}
	if _, err := a.Attach(ctx, "n", api.AttachRequest{Name: "d1", IP: r1.IP, Handoff: "vxd1"}); err != nil {
		t.Fatalf("attach with the reserved address: %v", err)
	}
	owners := func() map[netip.Addr]ipam.AddrOwner {
		t.Helper()
		o, err := a.ipam.Addrs(ctx, n.ID)
		if err != nil {
			t.Fatal(err)
		}
		return o
	}
	if o := owners()[netip.MustParseAddr(r1.IP)]; o.Endpoint != "d1" {
		t.Errorf("%s is held by %+v, not the endpoint", r1.IP, o)
	}

	if err := a.SetNetns(ctx, "n", "d1", "relative/path"); ErrorCode(err) != api.CodeInvalid {
		t.Errorf("relative netns: %v", err)
	}
	sandbox := filepath.Join(t.TempDir(), "sandbox")
	if err := a.SetNetns(ctx, "n", "d1", sandbox); err != nil {
		t.Fatalf("netns not made yet: %v", err)
	}
	pending := func() bool {
		a.mu.Lock()
		defer a.unlock()
		return a.locals["n/d1"].pending()
	}
	time.Sleep(50 * time.Millisecond)
	if !pending() {
		t.Fatal("bound to a namespace that does not exist yet")
	}
	if err := os.WriteFile(sandbox, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for pending() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if pending() {
		t.Fatal("not bound once its namespace exists")
	}
	if err := a.SetNetns(ctx, "n", "d1", sandbox); err != nil {
		t.Errorf("the same netns again: %v", err)
	}
	if err := a.SetNetns(ctx, "n", "d1", sandbox+"2"); ErrorCode(err) != api.CodeConflict {
		t.Errorf("another netns once bound: %v", err)
	}

	a.reconcile(ctx, true)
	if o, ok := owners()[netip.MustParseAddr(r2.IP)]; !ok {
		t.Errorf("a full pass released the young reservation of %s", r2.IP)
	} else if _, res := o.Reserved(); !res {
		t.Errorf("%s held by %+v", r2.IP, o)
	}
	if err := a.ReleaseReservation(ctx, "n", r1.IP); err != nil {
		t.Fatal(err)
	}
	if o := owners()[netip.MustParseAddr(r1.IP)]; o.Endpoint != "d1" {
		t.Errorf("releasing a reservation freed the endpoint's %s: %+v", r1.IP, o)
	}
	if err := a.ReleaseReservation(ctx, "n", r2.IP); err != nil {
		t.Fatal(err)
	}
	if _, ok := owners()[netip.MustParseAddr(r2.IP)]; ok {
		t.Errorf("reservation of %s not released", r2.IP)
	}
	if err := a.Detach(ctx, "n", "d1"); err != nil {
		t.Fatal(err)
	}
	if o := owners(); len(o) != 0 {
		t.Errorf("addresses left after detach: %v", o)
	}
}

func TestStaleReservation(t *testing.T) {
	now := time.Now()
	if staleReservation(ipam.ReservationOwner("h1", now.Add(-time.Minute)), now) {
		t.Error("a minute-old reservation is stale")
	}
	if !staleReservation(ipam.ReservationOwner("h1", now.Add(-time.Hour)), now) {
		t.Error("an hour-old reservation is not stale")
	}
	if !staleReservation(ipam.AddrOwner{Node: "h1", Endpoint: "gone"}, now) {
		t.Error("an endpoint's address is kept")
	}
}

// A reservation on a network with no endpoint here outlives a restart:
// the restarted agent still releases it once it is old, where it used to
// forget it and leave the address taken for good.
func TestReservationSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	st := testBolt(t, dir)
	a := startInProcessAt(t, "h1", st, dir, time.Second)
	ctx := context.Background()
	n, err := a.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "n", Subnet: "10.1.0.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	r, err := a.Reserve(ctx, "n", "")
	if err != nil {
		t.Fatal(err)
	}
	ip := netip.MustParseAddr(r.IP)
	a.stop()

	b := startInProcessAt(t, "h1", st, dir, time.Second)
	b.resv.mu.Lock()
	found := false
	for k := range b.resv.m {
		if k.netID == n.ID && k.ip == ip {
			b.resv.m[k] = time.Now().Add(-reservationTTL - time.Minute) // aged
			found = true
		}
	}
	b.resv.mu.Unlock()
	if !found {
		t.Fatalf("reservation of %s forgotten by the restart: %v", ip, b.resv.m)
	}
	b.resv.sweep(ctx, b.Agent)
	owners, err := b.ipam.Addrs(ctx, n.ID)
	if err != nil {
		t.Fatal(err)
	}
	if o, held := owners[ip]; held {
		t.Errorf("%s still held by %v after the sweep", ip, o)
	}
	c := &reservations{path: b.resv.path}
	if err := c.load(); err != nil || len(c.m) != 0 {
		t.Errorf("kept reservations after the sweep: %v %v", c.m, err)
	}
}

// A sweep drops exactly the reservations it dealt with: a newer one of
// the same address (Docker asked again after a detach) stays to be swept
// in its time.
func TestReservationDropIsExact(t *testing.T) {
	r := &reservations{path: filepath.Join(t.TempDir(), "reservations.json")}
	ip := netip.MustParseAddr("10.1.0.2")
	old, newer := ipam.ReservationOwner("h1", time.Now().Add(-time.Hour)), ipam.ReservationOwner("h1", time.Now())
	if err := r.add("n", ip, old); err != nil {
		t.Fatal(err)
	}
	if err := r.add("n", ip, newer); err != nil {
		t.Fatal(err)
	}
	if err := r.drop([]reservation{{"n", ip, old}}); err != nil {
		t.Fatal(err)
	}
	kept := &reservations{path: r.path}
	if err := kept.load(); err != nil {
		t.Fatal(err)
	}
	if _, ok := kept.m[reservation{"n", ip, newer}]; !ok || len(kept.m) != 1 {
		t.Errorf("after dropping the old one: %v", kept.m)
	}
	if err := r.forget("n", ip); err != nil || len(r.m) != 0 {
		t.Errorf("forget of the address: %v %v", r.m, err)
	}
}
