package overlay

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/vxnet/vxnet/api"
)

// The locals view holds copies of the records: a change made under mu is
// seen by readers only once published, and never while it is being made.
func TestLocalsViewIsASnapshot(t *testing.T) {
	n := testNet("n", testID("n"), 256, "10.0.0.0/24")
	l := &localEndpoint{Phase: phaseAttaching, Endpoint: *testEP(n, "c", "me", "10.0.0.2", "192.168.0.1"), Net: n}
	a := &Agent{locals: map[string]*localEndpoint{l.key(): l}}
	a.publishView()

	a.mu.Lock()
	l.Phase = phaseAttached
	if got := a.viewLocals()[l.key()]; got == l || got.Phase != phaseAttaching {
		t.Errorf("view shares the record being changed: %p %p phase %s", got, l, got.Phase)
	}
	a.unlock()
	if got := a.viewLocals()[l.key()].Phase; got != phaseAttached {
		t.Errorf("published view: phase %s, want %s", got, phaseAttached)
	}
	if s := a.Status(); s.LocalEndpoints != 1 {
		t.Errorf("status counts %d attached endpoints, want 1", s.LocalEndpoints)
	}
}

// Status reads phases through the view while attach and detach change
// them under mu alone; run with -race.
func TestStatusDoesNotRaceWithPhaseChanges(t *testing.T) {
	n := testNet("n", testID("n"), 256, "10.0.0.0/24")
	a := &Agent{locals: map[string]*localEndpoint{}}
	var ls []*localEndpoint
	for i := range 4 {
		l := &localEndpoint{Phase: phaseAttached, Endpoint: *testEP(n, fmt.Sprint("c", i), "me", fmt.Sprint("10.0.0.", i+2), "192.168.0.1"), Net: n}
		a.locals[l.key()] = l
		ls = append(ls, l)
	}
	a.publishView()
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range 500 {
			a.mu.Lock()
			for _, l := range ls {
				l.Phase = []string{phaseAttached, phaseDetaching}[i%2]
			}
			a.unlock()
		}
	})
	for range 500 {
		if s := a.Status(); s.LocalEndpoints < 0 || s.LocalEndpoints > len(ls) {
			t.Fatalf("status counts %d endpoints", s.LocalEndpoints)
		}
		for _, l := range a.viewLocals() {
			_ = l.Phase == phaseAttached && l.Net.ID == n.ID
		}
	}
	wg.Wait()
}

// A network MTU above what this host's underlay carries after the VXLAN
// header is refused, naming both numbers; the check needs neither the
// store nor the kernel.
func TestCreateNetworkRefusesMTUAboveUnderlay(t *testing.T) {
	for _, c := range []struct{ underlay, mtu int }{{1500, 1451}, {1500, 1500}, {1500, 9000}, {9000, 8951}, {1280, 1231}} {
		a := &Agent{cfg: Config{UnderlayMTU: c.underlay}}
		_, err := a.CreateNetwork(context.Background(), api.CreateNetworkRequest{Name: "n", MTU: &c.mtu})
		if err == nil {
			t.Fatalf("underlay %d: mtu %d accepted", c.underlay, c.mtu)
		}
		if ErrorCode(err) != api.CodeInvalid {
			t.Errorf("underlay %d, mtu %d: code %s, want %s", c.underlay, c.mtu, ErrorCode(err), api.CodeInvalid)
		}
		for _, want := range []string{fmt.Sprint("mtu ", c.mtu), fmt.Sprint(c.underlay - 50), fmt.Sprint("underlay MTU ", c.underlay)} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("underlay %d, mtu %d: %q does not say %q", c.underlay, c.mtu, err, want)
			}
		}
	}
}

// The largest MTU the underlay carries is still accepted (this needs an
// agent with a store, hence root for its datapath manager).
func TestCreateNetworkAcceptsUnderlayMTUMinus50(t *testing.T) {
	a := testAgent(t)
	ctx := context.Background()
	big, small := a.cfg.UnderlayMTU-50, 576
	n, err := a.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "big", MTU: &big})
	if err != nil {
		t.Fatalf("mtu %d refused on underlay %d: %v", a.cfg.UnderlayMTU-50, a.cfg.UnderlayMTU, err)
	}
	if n.MTU != a.cfg.UnderlayMTU-50 {
		t.Errorf("mtu %d", n.MTU)
	}
	if _, err := a.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "small", MTU: &small}); err != nil {
		t.Errorf("mtu 576 refused: %v", err)
	}
}
