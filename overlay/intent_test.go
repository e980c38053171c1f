package overlay

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vxnet/vxnet/kvstore"
)

// storeAgent is an agent with an embedded store and no datapath: enough
// for the store-side logic, without root.
func storeAgent(t *testing.T) (*Agent, kvstore.Store) {
	t.Helper()
	dir := t.TempDir()
	st, err := kvstore.NewBolt(filepath.Join(dir, "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return &Agent{
		cfg: Config{Node: "me", StateDir: dir, NodeTTL: 10 * time.Second}, store: st,
		log: slog.New(slog.NewTextHandler(io.Discard, nil)), endpoints: map[string]*Endpoint{},
		kick: make(chan struct{}, 1), renewNow: make(chan struct{}, 1),
	}, st
}

// Endpoints of other hosts that vanish from the store are removed when the
// store is the one it was (a detach, a host's death), and held, still
// programmed, when it lost its state, until their hosts republish them or
// the hold ends; one that comes back under its key, or whose address is
// taken by another, is not held twice.
func TestVanishedPeersHeldOnlyWhenTheStoreLostItsState(t *testing.T) {
	ctx := context.Background()
	a, st := storeAgent(t)
	n := testNet("n", testID("n"), 256, "10.0.0.0/24")
	e1 := testEP(n, "e1", "other", "10.0.0.2", "192.168.0.2")
	e2 := testEP(n, "e2", "other", "10.0.0.3", "192.168.0.2")
	both := map[string]*Endpoint{"n/e1": e1, "n/e2": e2}

	if lost, err := a.checkIdentity(ctx); err != nil || lost {
		t.Fatalf("first identity check: lost %v, %v", lost, err)
	}
	a.applyView(ctx, both)
	a.applyView(ctx, map[string]*Endpoint{"n/e1": e1}) // e2 detached
	if got := a.peerView(); len(got) != 1 || got["n/e1"] == nil {
		t.Fatalf("after a detach with the store intact: %v", keys(got))
	}

	a.applyView(ctx, both)
	if err := st.Delete(ctx, identityKey); err != nil { // the store lost its state
		t.Fatal(err)
	}
	a.applyView(ctx, map[string]*Endpoint{})
	if got := a.peerView(); len(got) != 2 {
		t.Fatalf("with the store lost, the vanished peers are not held: %v", keys(got))
	}
	if !a.lostRecently() {
		t.Error("the loss was not noticed")
	}
	// e1 is republished; e2's address is taken by a new endpoint: held
	// entries give way to both.
	e3 := testEP(n, "e3", "third", "10.0.0.3", "192.168.0.3")
	a.applyView(ctx, map[string]*Endpoint{"n/e1": e1, "n/e3": e3})
	if got := a.peerView(); len(got) != 2 || got["n/e1"] != e1 || got["n/e3"] != e3 {
		t.Fatalf("view after republishing: %v", keys(got))
	}
	// A further removal with the (new) identity intact is not held.
	a.applyView(ctx, map[string]*Endpoint{"n/e3": e3})
	if got := a.peerView(); len(got) != 1 {
		t.Fatalf("a detach after the loss was held: %v", keys(got))
	}
	// The hold ends.
	a.applyView(ctx, both)
	st.Delete(ctx, identityKey)
	a.applyView(ctx, map[string]*Endpoint{})
	a.cmu.Lock()
	a.holdUntil = time.Now().Add(-time.Second)
	a.cmu.Unlock()
	if got := a.peerView(); len(got) != 0 {
		t.Fatalf("held past the hold time: %v", keys(got))
	}
}

// applyView sets the store view as the endpoint watch does.
func (a *Agent) applyView(ctx context.Context, m map[string]*Endpoint) {
	held, until := a.hold(ctx, m)
	a.cmu.Lock()
	a.endpoints, a.held, a.holdUntil = m, held, until
	a.cmu.Unlock()
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// An agent restarted after the store lost its state notices it from the
// identity it remembers; a store it never saw is new, not lost.
func TestIdentityRemembered(t *testing.T) {
	ctx := context.Background()
	a, st := storeAgent(t)
	if lost, err := a.checkIdentity(ctx); err != nil || lost {
		t.Fatalf("new store: lost %v, %v", lost, err)
	}
	restarted := &Agent{cfg: a.cfg, store: st, log: a.log}
	if lost, err := restarted.checkIdentity(ctx); err != nil || lost {
		t.Fatalf("same store after a restart: lost %v, %v", lost, err)
	}
	st.Delete(ctx, identityKey)
	restarted = &Agent{cfg: a.cfg, store: st, log: a.log}
	if lost, err := restarted.checkIdentity(ctx); err != nil || !lost {
		t.Fatalf("emptied store after a restart: lost %v, %v", lost, err)
	}
}

// A journal record that cannot be read marks its network: nothing there
// is taken for a leak.
func TestJournalGaps(t *testing.T) {
	dir := t.TempDir()
	s := stateDir{dir}
	n := testNet("n", testID("n"), 256, "10.0.0.0/24")
	l := &localEndpoint{Phase: phaseAttached, Endpoint: *testEP(n, "c", "me", "10.0.0.2", "192.168.0.1"), Net: n}
	if err := s.save(l); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "endpoints", "m"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "endpoints", "m", "x.json"), []byte("{torn"), 0o600); err != nil {
		t.Fatal(err)
	}
	locals, errs, gaps := s.load()
	if len(locals) != 1 || len(errs) != 1 || !gaps["m"] || gaps["n"] || gaps[""] {
		t.Fatalf("locals %d, errs %v, gaps %v", len(locals), errs, gaps)
	}
	a := &Agent{journalGaps: gaps}
	if !a.journalGap("m") || a.journalGap("n") {
		t.Errorf("journalGap: m %v, n %v", a.journalGap("m"), a.journalGap("n"))
	}
}
