package overlay

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
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
		log: slog.New(slog.NewTextHandler(io.Discard, nil)), views: map[string]*peerView{},
		kick: make(chan struct{}, 1), renewNow: make(chan struct{}, 1), life: context.Background(),
		holdSem: make(chan struct{}, holdLookups),
	}, st
}

// Peer records of other hosts that vanish from the store are dropped when
// the store is the one it was (a detach, a host's death), and held, still
// programmed, when it lost its state, until their hosts write them again
// or the hold ends.
func TestVanishedPeersHeldOnlyWhenTheStoreLostItsState(t *testing.T) {
	ctx := context.Background()
	a, st := storeAgent(t)
	v := &peerView{id: testID("n"), node: "me"}
	rec := func(node, vtep string, ips ...string) *kvstore.KV { return peerKV(v.id, node, vtep, ips...) }
	h2 := rec("h2", "192.168.0.2", "10.0.0.2", "10.0.0.3")
	h3 := rec("h3", "192.168.0.3", "10.0.0.4")
	mine := rec("me", "192.168.0.1", "10.0.0.9")
	count := func() int { p, _ := v.peers(); return len(p) }

	if lost, err := a.checkIdentity(ctx); err != nil || lost {
		t.Fatalf("first identity check: lost %v, %v", lost, err)
	}
	if !a.applyPeers(ctx, v, []*kvstore.KV{h2, h3, mine}, 0, false) || count() != 3 {
		t.Fatalf("peers %d, want 3 (our own record is no peer)", count())
	}
	if a.applyPeers(ctx, v, []*kvstore.KV{h2, h3, mine}, 0, false) {
		t.Error("the same snapshot counted as a change")
	}
	a.applyPeers(ctx, v, []*kvstore.KV{h2, mine}, 0, false) // h3 gone: its host died
	if count() != 2 {
		t.Fatalf("after a host's record went with the store intact: %d peers", count())
	}

	a.applyPeers(ctx, v, []*kvstore.KV{h2, h3, mine}, 0, false)
	if err := st.Delete(ctx, identityKey); err != nil { // the store lost its state
		t.Fatal(err)
	}
	a.applyPeers(ctx, v, nil, 0, false)
	if count() != 3 {
		t.Fatalf("with the store lost, the vanished records are not held: %d peers", count())
	}
	if !a.lostRecently() {
		t.Error("the loss was not noticed")
	}
	// h2 writes its record again, with one endpoint fewer: the new one
	// counts, not the held one.
	a.applyPeers(ctx, v, []*kvstore.KV{rec("h2", "192.168.0.2", "10.0.0.2")}, 0, false)
	if count() != 2 {
		t.Fatalf("after h2 republished: %d peers, want 2 (h2's one, h3's held)", count())
	}
	// The hold ends.
	v.mu.Lock()
	for node, h := range v.held {
		h.until = time.Now().Add(-time.Second)
		v.held[node] = h
	}
	v.mu.Unlock()
	if count() != 1 {
		t.Fatalf("held past the hold time: %d peers", count())
	}
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

// A delta says what each touched address resolves to now, whatever
// happened to it in between: a host that changed its VTEP and then dropped
// the address removes it; an address that moved from one host to another
// in two steps stays, at its new VTEP.
func TestPeerDeltaResolvesTouchedAddresses(t *testing.T) {
	ctx := context.Background()
	a, _ := storeAgent(t)
	if _, err := a.checkIdentity(ctx); err != nil {
		t.Fatal(err)
	}
	v := &peerView{id: testID("n"), node: "me"}
	rec := func(node, vtep string, ips ...string) *kvstore.KV { return peerKV(v.id, node, vtep, ips...) }
	a.applyPeers(ctx, v, []*kvstore.KV{rec("A", "192.168.0.1", "10.0.0.5")}, 1, false)
	v.peersAndReset()
	a.applyPeers(ctx, v, []*kvstore.KV{rec("A", "192.168.0.9", "10.0.0.5")}, 2, false)
	a.applyPeers(ctx, v, []*kvstore.KV{rec("A", "192.168.0.9")}, 3, false)
	add, del, ok := v.takeDelta()
	if !ok || len(add) != 0 || len(del) != 1 || del[0].String() != "10.0.0.5" {
		t.Errorf("VTEP changed, then the address dropped: add %v del %v ok %v", add, del, ok)
	}

	a.applyPeers(ctx, v, []*kvstore.KV{rec("A", "192.168.0.1", "10.0.0.6")}, 4, false)
	v.peersAndReset()
	a.applyPeers(ctx, v, []*kvstore.KV{rec("A", "192.168.0.1", "10.0.0.6"), rec("B", "192.168.0.2", "10.0.0.6")}, 5, false)
	a.applyPeers(ctx, v, []*kvstore.KV{rec("A", "192.168.0.1"), rec("B", "192.168.0.2", "10.0.0.6")}, 6, false)
	add, del, ok = v.takeDelta()
	if !ok || len(del) != 0 || len(add) != 1 || add[0].VTEP.String() != "192.168.0.2" {
		t.Errorf("address moved from A to B in two steps: add %v del %v ok %v", add, del, ok)
	}
	// An older snapshot (an attach's first read racing with the watch)
	// does not take the view back.
	if a.applyPeers(ctx, v, []*kvstore.KV{rec("A", "192.168.0.1", "10.0.0.6")}, 5, false) {
		t.Error("an older snapshot was taken")
	}
	// An unreadable record keeps the host's last good one.
	bad := &kvstore.KV{Key: peerKey(v.id, "B"), Value: []byte("{torn")}
	a.applyPeers(ctx, v, []*kvstore.KV{rec("A", "192.168.0.1"), bad}, 7, false)
	if p, _ := v.peers(); len(p) != 1 || p[0].Node != "B" {
		t.Errorf("after a torn record of B: %v", p)
	}
}

// peerKV is a stored peer record of node on network id.
func peerKV(id, node, vtep string, ips ...string) *kvstore.KV {
	var addrs []netip.Addr
	for _, ip := range ips {
		addrs = append(addrs, netip.MustParseAddr(ip))
	}
	data, _ := json.Marshal(&PeerRecord{Version: 1, Node: node, VTEP: netip.MustParseAddr(vtep), IPs: packAddrs(addrs)})
	return &kvstore.KV{Key: peerKey(id, node), Value: data}
}

// A host whose records went with its session while its Consul client
// agent left the cluster (restarting) keeps its entries; one that removed
// its record itself (its alive key still held), one that has no agent of
// its own (its TTL ran out) and, here with no hold-down, one whose agent
// gossip found failed do not.
func TestHoldDownOnlyForSessionsOfLocalAgents(t *testing.T) {
	ctx := context.Background()
	a, st := storeAgent(t)
	a.cfg.HoldDown, a.cfg.HoldLeft = -1, time.Minute // no hold for a failed agent: a death
	a.store = &gossipStore{Store: st, health: map[string]kvstore.NodeHealth{"c-restarting": kvstore.NodeLeft, "c-dead": kvstore.NodeFailed, "c-detached": kvstore.NodeAlive}}
	v := &peerView{id: testID("n"), node: "me"}
	if _, err := a.checkIdentity(ctx); err != nil {
		t.Fatal(err)
	}
	node := func(name, liveness string) {
		data, _ := json.Marshal(Node{Version: recordVersion, Name: name, Liveness: liveness, ConsulNode: "c-" + name})
		if err := st.Put(ctx, nodeKey(name), data); err != nil {
			t.Fatal(err)
		}
	}
	node("restarting", "gossip+ttl")
	node("ttl", "ttl")
	node("detached", "gossip+ttl")
	node("dead", "gossip+ttl")
	sess, err := st.CreateSession(ctx, "detached", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Txn(ctx, []kvstore.Op{{Kind: kvstore.OpLock, Key: aliveKey("detached"), Value: []byte("detached"), Session: sess}}); err != nil {
		t.Fatal(err)
	}
	restarting := peerKV(v.id, "restarting", "192.168.0.2", "10.0.0.2")
	all := []*kvstore.KV{restarting, peerKV(v.id, "ttl", "192.168.0.3", "10.0.0.3"), peerKV(v.id, "detached", "192.168.0.4", "10.0.0.4"), peerKV(v.id, "dead", "192.168.0.5", "10.0.0.5")}
	nodes := func() []string {
		p, _ := v.peers()
		var out []string
		for _, x := range p {
			out = append(out, x.Node)
		}
		return out
	}
	a.applyPeers(ctx, v, all, 0, false)
	a.applyPeers(ctx, v, nil, 0, false)
	if got := nodes(); len(got) != 1 || got[0] != "restarting" {
		t.Fatalf("after every record vanished: peers of %v, want only the restarting host's", got)
	}
	// It comes back with the same record: in force again, no longer held.
	a.applyPeers(ctx, v, []*kvstore.KV{restarting}, 0, false)
	v.mu.Lock()
	held := len(v.held)
	v.mu.Unlock()
	if got := nodes(); len(got) != 1 || held != 0 {
		t.Fatalf("after it wrote its record again: peers of %v, %d held", got, held)
	}
}

// gossipStore is a store behind a Consul client agent: it reports gossip's
// view of nodes.
type gossipStore struct {
	kvstore.Store
	health map[string]kvstore.NodeHealth
}

func (g *gossipStore) Liveness(context.Context) (kvstore.Liveness, error) {
	return kvstore.Liveness{LocalAgent: true, Node: "c-me"}, nil
}

func (g *gossipStore) NodeHealth(_ context.Context, node string) (kvstore.NodeHealth, error) {
	h, ok := g.health[node]
	if !ok {
		return kvstore.NodeLeft, nil
	}
	return h, nil
}

// failingGets fails Gets of one key for want of an answer.
type failingGets struct {
	kvstore.Store
	key string
}

func (f *failingGets) Get(ctx context.Context, key string) (*kvstore.KV, error) {
	if key == f.key {
		return nil, fmt.Errorf("injected: %w", kvstore.ErrUnavailable)
	}
	return f.Store.Get(ctx, key)
}

// A store that cannot say why a host's records vanished (its node record
// does not answer) is no evidence that the host is gone: its entries are
// held for the hold-down, not dropped.
func TestVanishedHostHeldWhenTheStoreCannotSay(t *testing.T) {
	ctx := context.Background()
	a, st := storeAgent(t)
	a.cfg.HoldDown = time.Minute
	if _, err := a.checkIdentity(ctx); err != nil {
		t.Fatal(err)
	}
	a.store = &failingGets{Store: st, key: nodeKey("flaky")}
	v := &peerView{id: testID("n"), node: "me"}
	a.applyPeers(ctx, v, []*kvstore.KV{peerKV(v.id, "flaky", "192.168.0.2", "10.0.0.2")}, 0, false)
	a.applyPeers(ctx, v, nil, 0, false)
	if p, _ := v.peers(); len(p) != 1 {
		t.Errorf("a host whose node record did not answer was dropped: %d peers", len(p))
	}
}
