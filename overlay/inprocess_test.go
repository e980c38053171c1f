package overlay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/kvstore"
	"github.com/vxnet/vxnet/vtep"
)

// fakeDatapath keeps in memory what vtep would make in the kernel, so
// that Attach, Detach and the reconciler run in-process without root.
type fakeDatapath struct {
	mu       sync.Mutex
	dir      string
	networks map[string]vtep.NetworkSpec
	eps      map[string]map[string]vtep.EndpointSpec // network -> host veth -> spec
	peers    map[string][]vtep.Peer
	failAdd  error // AddEndpoint fails with it
	changes  int   // ChangePeers calls: deltas applied
	routes   []netip.Prefix
}

func newFakeDatapath(dir string) *fakeDatapath {
	return &fakeDatapath{dir: dir, networks: map[string]vtep.NetworkSpec{}, eps: map[string]map[string]vtep.EndpointSpec{}, peers: map[string][]vtep.Peer{}}
}

// CheckNetNS takes any existing file for a namespace: the tests' "containers".
func (f *fakeDatapath) CheckNetNS(path string) error {
	_, err := os.Stat(path)
	return err
}
func (f *fakeDatapath) NetNSPath(name string) string { return filepath.Join(f.dir, name) }
func (f *fakeDatapath) Networks() ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for n := range f.networks {
		out = append(out, n)
	}
	return out, nil
}
func (f *fakeDatapath) EnsureNetwork(_ context.Context, s vtep.NetworkSpec) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.networks[s.Name]; ok {
		return nil, nil
	}
	f.networks[s.Name] = s
	f.eps[s.Name] = map[string]vtep.EndpointSpec{}
	return []string{"created namespace " + s.Name}, nil
}
func (f *fakeDatapath) DeleteNetwork(_ context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.networks, name)
	delete(f.eps, name)
	delete(f.peers, name)
	return nil
}
func (f *fakeDatapath) RemoveStrays(context.Context) ([]string, error) { return nil, nil }
func (f *fakeDatapath) AddEndpoint(_ context.Context, s vtep.EndpointSpec) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failAdd != nil {
		return "", f.failAdd
	}
	eps := f.eps[s.Network]
	if eps == nil {
		return "", fmt.Errorf("network %s: %w", s.Network, os.ErrNotExist)
	}
	s.IfName = fmt.Sprintf("eth%d", len(eps))
	eps[s.HostVeth] = s
	return s.IfName, nil
}
func (f *fakeDatapath) CheckEndpoints(_ context.Context, network string, specs []vtep.EndpointSpec) []vtep.EndpointCheck {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]vtep.EndpointCheck, len(specs))
	for i, s := range specs {
		if _, ok := f.eps[network][s.HostVeth]; !ok {
			out[i].Err = vtep.ErrEndpointGone
		}
	}
	return out
}
func (f *fakeDatapath) FindPeer(_ context.Context, network, veth, _ string, _ netip.Prefix) (string, bool, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.eps[network][veth]; !ok {
		return "", false, false, vtep.ErrEndpointGone
	}
	return "eth0", true, true, nil
}
func (f *fakeDatapath) RemoveEndpoint(_ context.Context, network, veth string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.eps[network], veth)
	return nil
}
func (f *fakeDatapath) Endpoints(_ context.Context, network string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for v := range f.eps[network] {
		out = append(out, v)
	}
	return out, nil
}
func (f *fakeDatapath) SyncPeers(_ context.Context, network string, peers []vtep.Peer) (int, int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.peers[network] = slices.Clone(peers)
	return len(peers), 0, nil
}
func (f *fakeDatapath) UpdatePeers(_ context.Context, network string, prev, peers []vtep.Peer) (int, int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if prev == nil { // added only
		for _, p := range peers {
			if !slices.ContainsFunc(f.peers[network], func(q vtep.Peer) bool { return q.IP == p.IP }) {
				f.peers[network] = append(f.peers[network], p)
			}
		}
		return len(peers), 0, nil
	}
	f.peers[network] = slices.Clone(peers)
	return len(peers), 0, nil
}
func (f *fakeDatapath) ChangePeers(_ context.Context, network string, add, remove []vtep.Peer) (int, int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.changes++
	cur := f.peers[network]
	for _, r := range remove {
		cur = slices.DeleteFunc(cur, func(q vtep.Peer) bool { return q.IP == r.IP })
	}
	for _, p := range add {
		cur = slices.DeleteFunc(cur, func(q vtep.Peer) bool { return q.IP == p.IP })
		cur = append(cur, p)
	}
	f.peers[network] = cur
	return len(add), len(remove), nil
}
func (f *fakeDatapath) HostRoutes() ([]netip.Prefix, error) { return f.routes, nil }
func (f *fakeDatapath) DiffPeers(context.Context, string, []vtep.Peer) (vtep.PeerPlan, error) {
	return vtep.PeerPlan{}, nil
}
func (f *fakeDatapath) UnderlayPrefix() (netip.Prefix, error) {
	return netip.MustParsePrefix("192.0.2.0/24"), nil
}

func (f *fakeDatapath) endpointCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, eps := range f.eps {
		n += len(eps)
	}
	return n
}

func (f *fakeDatapath) peerIPs(network string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, p := range f.peers[network] {
		out = append(out, p.IP.String())
	}
	slices.Sort(out)
	return out
}

// countingStore counts transactions that write a peer record.
type countingStore struct {
	kvstore.Store
	peerWrites atomic.Int64
}

func (c *countingStore) Txn(ctx context.Context, ops []kvstore.Op) error {
	for _, op := range ops {
		if len(op.Key) > len(peersPrefix) && op.Key[:len(peersPrefix)] == peersPrefix {
			c.peerWrites.Add(1)
			break
		}
	}
	return c.Store.Txn(ctx, ops)
}

// inProcess is an agent running in the test process on an embedded store
// and a fake datapath.
type inProcess struct {
	*Agent
	dp    *fakeDatapath
	store *countingStore
	dir   string
	stop  func()
}

func startInProcess(t *testing.T, node string, st kvstore.Store) *inProcess {
	t.Helper()
	return startInProcessAt(t, node, st, t.TempDir(), time.Second)
}

// startInProcessAt starts an agent on the state in dir (a restart when an
// agent ran there before) that says it is ready after readyTimeout at the
// latest.
func startInProcessAt(t *testing.T, node string, st kvstore.Store, dir string, readyTimeout time.Duration) *inProcess {
	t.Helper()
	if st == nil {
		st = testBolt(t, dir)
	}
	cs := &countingStore{Store: st}
	dp := newFakeDatapath(filepath.Join(dir, "netns"))
	a, err := newAgent(Config{
		Node: node, Advertise: netip.MustParseAddr("192.0.2.1"), StateDir: filepath.Join(dir, "state"), NetNSDir: dp.dir,
		ResyncInterval: time.Hour, NodeTTL: 10 * time.Second, UnderlayMTU: 1500, ReadyTimeout: readyTimeout,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}, cs, dp, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	ready := make(chan struct{})
	go func() {
		defer close(done)
		a.Run(ctx, func() { close(ready) })
	}()
	stop := func() { cancel(); <-done }
	t.Cleanup(stop)
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		t.Fatal("agent not ready")
	}
	return &inProcess{Agent: a, dp: dp, store: cs, dir: dir, stop: stop}
}

// testBolt is an embedded store in dir, closed when the test ends.
func testBolt(t *testing.T, dir string) kvstore.Store {
	t.Helper()
	b, err := kvstore.NewBolt(filepath.Join(dir, "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// stopped stops the agent (its cleanup then does nothing more).
func (p *inProcess) stopped(t *testing.T) { p.stop() }

// container makes a file standing for a container's namespace.
func (p *inProcess) container(t *testing.T, name string) string {
	t.Helper()
	path := filepath.Join(p.dir, "c-"+name)
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func eventuallyTrue(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after 5s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Attach publishes the endpoint record and this host's peer record in one
// go and builds the datapath; detach takes both away again, and the peer
// record goes with the network's last endpoint.
func TestAttachDetachInProcess(t *testing.T) {
	a := startInProcess(t, "h1", nil)
	ctx := context.Background()
	n, err := a.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "n", Subnet: "10.1.0.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	e, err := a.Attach(ctx, "n", api.AttachRequest{Netns: a.container(t, "c1"), Name: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	if e.IP != "10.1.0.2" || e.Interface != "eth0" || a.dp.endpointCount() != 1 {
		t.Fatalf("endpoint %+v, %d in the datapath", e, a.dp.endpointCount())
	}
	kv, err := a.store.Get(ctx, peerKey(n.ID, "h1"))
	if err != nil {
		t.Fatalf("peer record: %v", err)
	}
	var r PeerRecord
	if err := decodeRecord(kv.Key, kv.Value, &r); err != nil || len(r.Addrs()) != 1 || r.Addrs()[0].String() != "10.1.0.2" {
		t.Fatalf("peer record %+v, %v", r, err)
	}
	if err := a.Detach(ctx, "n", "c1"); err != nil {
		t.Fatal(err)
	}
	if a.dp.endpointCount() != 0 {
		t.Errorf("%d endpoints left in the datapath", a.dp.endpointCount())
	}
	for _, key := range []string{peerKey(n.ID, "h1"), endpointKey("n", "c1")} {
		if _, err := a.store.Get(ctx, key); !errors.Is(err, kvstore.ErrNotFound) {
			t.Errorf("%s after the last detach: %v", key, err)
		}
	}
}

// A failed attach leaves nothing: no interface, no record, no address.
func TestFailedAttachLeavesNothingInProcess(t *testing.T) {
	a := startInProcess(t, "h1", nil)
	ctx := context.Background()
	n, err := a.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "n", Subnet: "10.1.0.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	a.dp.mu.Lock()
	a.dp.failAdd = errors.New("injected")
	a.dp.mu.Unlock()
	if _, err := a.Attach(ctx, "n", api.AttachRequest{Netns: a.container(t, "c1")}); err == nil {
		t.Fatal("attach succeeded")
	}
	a.assertNothingLeft(t, n.ID)
	if eps, _ := a.Endpoints(ctx, "n"); len(eps) != 0 {
		t.Errorf("records: %+v", eps)
	}
}

// assertNothingLeft fails unless this host has nothing of the network:
// no interface, no namespace, no local record, no address.
func (p *inProcess) assertNothingLeft(t *testing.T, netID string) {
	t.Helper()
	nets, _ := p.dp.Networks()
	if p.dp.endpointCount() != 0 || len(nets) != 0 || len(p.viewLocals()) != 0 {
		t.Errorf("left: %d interfaces, namespaces %v, %d local records", p.dp.endpointCount(), nets, len(p.viewLocals()))
	}
	if addrs, _ := p.ipam.Addrs(context.Background(), netID); len(addrs) != 0 {
		t.Errorf("addresses still held: %v", addrs)
	}
}

// An attach that fails at its last step, the publish (the name is taken
// on another host), undoes every step before it, and nothing of the other
// host's.
func TestAttachFailingAtPublishUndoesEveryStep(t *testing.T) {
	a := startInProcess(t, "h1", nil)
	ctx := context.Background()
	n, err := a.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "n", Subnet: "10.1.0.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	theirs := []byte(`{"version":1,"id":"other","name":"c1","network":"n","node":"h2","ip":"10.1.0.77"}`)
	if err := a.store.Put(ctx, endpointKey("n", "c1"), theirs); err != nil {
		t.Fatal(err)
	}
	_, err = a.Attach(ctx, "n", api.AttachRequest{Netns: a.container(t, "c1"), Name: "c1"})
	if ErrorCode(err) != api.CodeConflict {
		t.Fatalf("attach of a name taken elsewhere: %v", err)
	}
	a.assertNothingLeft(t, n.ID)
	if kv, err := a.store.Get(ctx, endpointKey("n", "c1")); err != nil || string(kv.Value) != string(theirs) {
		t.Errorf("the other host's record: %v", err)
	}
	if _, err := a.store.Get(ctx, peerKey(n.ID, "h1")); !errors.Is(err, kvstore.ErrNotFound) {
		t.Errorf("this host's peer record after the failed attach: %v", err)
	}
}

// Peers come from the other hosts' peer records of the networks this host
// has endpoints on, and go with them.
func TestReconcilerProgramsPeerRecords(t *testing.T) {
	a := startInProcess(t, "h1", nil)
	ctx := context.Background()
	n, err := a.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "n", Subnet: "10.1.0.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Attach(ctx, "n", api.AttachRequest{Netns: a.container(t, "c1")}); err != nil {
		t.Fatal(err)
	}
	ns := NamespaceOf(n.ID)
	put := func(node string, ips ...string) {
		kv := peerKV(n.ID, node, "192.0.2.9", ips...)
		if err := a.store.Put(ctx, kv.Key, kv.Value); err != nil {
			t.Fatal(err)
		}
	}
	put("h2", "10.1.0.20", "10.1.0.21")
	eventuallyTrue(t, "h2's peers programmed", func() bool { return slices.Equal(a.dp.peerIPs(ns), []string{"10.1.0.20", "10.1.0.21"}) })
	put("h2", "10.1.0.21")
	eventuallyTrue(t, "a detached peer removed", func() bool { return slices.Equal(a.dp.peerIPs(ns), []string{"10.1.0.21"}) })
	if err := a.store.Delete(ctx, peerKey(n.ID, "h2")); err != nil {
		t.Fatal(err)
	}
	eventuallyTrue(t, "a gone host's peers removed", func() bool { return len(a.dp.peerIPs(ns)) == 0 })
	a.dp.mu.Lock()
	changes := a.dp.changes
	a.dp.mu.Unlock()
	if changes == 0 {
		t.Error("every change took the whole list: no delta was applied")
	}
	// A host's record with an address outside the subnet: the address
	// alone is left out.
	put("h3", "10.1.0.30", "10.9.9.9")
	eventuallyTrue(t, "h3's good address programmed", func() bool { return slices.Equal(a.dp.peerIPs(ns), []string{"10.1.0.30"}) })
}

// Concurrent attaches on one host share writes of its peer record.
func TestGroupCommit(t *testing.T) {
	a := startInProcess(t, "h1", nil)
	ctx := context.Background()
	if _, err := a.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "n", Subnet: "10.1.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Attach(ctx, "n", api.AttachRequest{Netns: a.container(t, "first")}); err != nil {
		t.Fatal(err)
	}
	before := a.store.peerWrites.Load()
	const n = 40
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := a.Attach(ctx, "n", api.AttachRequest{Netns: a.container(t, fmt.Sprint("c", i))}); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	writes := a.store.peerWrites.Load() - before
	t.Logf("%d attaches, %d writes of the peer record", n, writes)
	if writes >= n {
		t.Errorf("%d attaches made %d peer record writes: no group commit", n, writes)
	}
}

// NamespaceOf is the namespace name of a network id.
func NamespaceOf(id string) string { return (&Network{ID: id}).NamespaceName() }

// gatedStore holds back the snapshots of the networks watch until open is
// closed: a store that answers slowly at start.
type gatedStore struct {
	kvstore.Store
	open chan struct{}
}

func (g *gatedStore) Watch(ctx context.Context, prefix string) <-chan kvstore.Event {
	in := g.Store.Watch(ctx, prefix)
	if prefix != networksPrefix {
		return in
	}
	out := make(chan kvstore.Event, 1)
	go func() {
		defer close(out)
		select {
		case <-g.open:
		case <-ctx.Done():
			return
		}
		for ev := range in {
			out <- ev
		}
	}()
	return out
}

// When the ready timer fires before the store has answered, the first pass
// with the store's view is still a full one: what a previous life leaked
// (here an address held for an endpoint that does not exist) goes then,
// not a whole resync interval later.
func TestFirstSyncedPassIsFullAfterReadyTimer(t *testing.T) {
	dir := t.TempDir()
	b := testBolt(t, dir)
	ctx := context.Background()
	first := startInProcessAt(t, "h1", b, dir, time.Second)
	n, err := first.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "n", Subnet: "10.1.0.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := first.Attach(ctx, "n", api.AttachRequest{Netns: first.container(t, "c1")}); err != nil {
		t.Fatal(err)
	}
	leak := "ipam/addrs/" + n.ID + "/10.1.0.99"
	if err := b.Put(ctx, leak, []byte(`{"version":1,"node":"h1","endpoint":"ghost"}`)); err != nil {
		t.Fatal(err)
	}
	first.stopped(t)

	g := &gatedStore{Store: b, open: make(chan struct{})}
	start := time.Now()
	again := startInProcessAt(t, "h1", g, dir, 100*time.Millisecond) // ready by the timer
	if time.Since(start) > 5*time.Second {
		t.Fatal("not ready by the timer")
	}
	close(g.open)
	eventuallyTrue(t, "the leaked address released", func() bool {
		_, err := again.store.Get(ctx, leak)
		return errors.Is(err, kvstore.ErrNotFound)
	})
}

// stallingStore holds back Gets of one key until open is closed: a store
// that stops answering in the middle of a pass's repair.
type stallingStore struct {
	kvstore.Store
	key     string
	open    chan struct{}
	stalled chan struct{} // closed at the first stalled Get
	once    sync.Once
}

func (s *stallingStore) Get(ctx context.Context, key string) (*kvstore.KV, error) {
	if key == s.key {
		s.once.Do(func() { close(s.stalled) })
		select {
		case <-s.open:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return s.Store.Get(ctx, key)
}

// A pass repairing one network's records waits for the store without the
// kernel lock: an attach on another network goes through meanwhile.
func TestStoreRepairHoldsUpNoAttach(t *testing.T) {
	dir := t.TempDir()
	b := testBolt(t, dir)
	st := &stallingStore{Store: b, key: endpointKey("a", "c1"), open: make(chan struct{}), stalled: make(chan struct{})}
	a := startInProcessAt(t, "h1", st, dir, time.Second)
	ctx := context.Background()
	na, err := a.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "a", Subnet: "10.1.0.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "b", Subnet: "10.2.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Attach(ctx, "a", api.AttachRequest{Netns: a.container(t, "c1"), Name: "c1"}); err != nil {
		t.Fatal(err)
	}
	// This host's peer record of a vanishes: the pass that sees it
	// checks the endpoint record, and the store does not answer.
	if err := b.Delete(ctx, peerKey(na.ID, "h1")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-st.stalled:
	case <-time.After(5 * time.Second):
		t.Fatal("no pass repaired the lost peer record")
	}
	start := time.Now()
	if _, err := a.Attach(ctx, "b", api.AttachRequest{Netns: a.container(t, "c2"), Name: "c2"}); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	select {
	case <-st.open:
	default:
		close(st.open)
	}
	if took > time.Second {
		t.Errorf("an attach on another network took %s while a repair waited for the store", took)
	}
	eventuallyTrue(t, "the lost peer record republished", func() bool {
		_, err := b.Get(ctx, peerKey(na.ID, "h1"))
		return err == nil
	})
}

// A network whose journal has an unreadable record keeps its namespace
// when a failed attach's rollback, or a detach, leaves no readable record
// needing it: the namespace may hold endpoints this host cannot account
// for.
func TestJournalGapKeepsNamespace(t *testing.T) {
	a := startInProcess(t, "h1", nil)
	ctx := context.Background()
	if _, err := a.CreateNetwork(ctx, api.CreateNetworkRequest{Name: "n", Subnet: "10.1.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	if a.journalGaps == nil {
		a.journalGaps = map[string]bool{}
	}
	a.journalGaps["n"] = true
	a.unlock()
	namespaces := func() int { nets, _ := a.dp.Networks(); return len(nets) }

	a.dp.mu.Lock()
	a.dp.failAdd = errors.New("injected")
	a.dp.mu.Unlock()
	if _, err := a.Attach(ctx, "n", api.AttachRequest{Netns: a.container(t, "c1")}); err == nil {
		t.Fatal("attach succeeded")
	}
	if namespaces() != 1 {
		t.Errorf("a failed attach's rollback removed the namespace of a network with an unreadable journal record")
	}
	a.dp.mu.Lock()
	a.dp.failAdd = nil
	a.dp.mu.Unlock()
	if _, err := a.Attach(ctx, "n", api.AttachRequest{Netns: a.container(t, "c2"), Name: "c2"}); err != nil {
		t.Fatal(err)
	}
	if err := a.Detach(ctx, "n", "c2"); err != nil {
		t.Fatal(err)
	}
	if namespaces() != 1 {
		t.Errorf("the last detach removed the namespace of a network with an unreadable journal record")
	}
}
