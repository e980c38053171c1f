package kvstore

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// Hermetic tests of the Consul backend's Watch against a fake of Consul's
// KV list endpoint: GET /v1/kv/<prefix>?recurse&index=N&wait=Dms, answered
// with a JSON array of pairs (Value in base64) and X-Consul-Index, or 404
// with X-Consul-Index when nothing is under the prefix. Like Consul's
// blockingQuery, a request with index=N waits (up to the smaller of its wait
// and the fake's maxWait) while the current index is <= N, so the watcher
// under test cannot spin against it.

// fakeKVPair is the wire form of one pair in Consul's KV list answer.
type fakeKVPair struct {
	Key         string
	CreateIndex uint64
	ModifyIndex uint64
	LockIndex   uint64
	Flags       uint64
	Value       *string // base64; null for an empty value, as Consul does
	Session     string  `json:",omitempty"`
}

type fakeEntry struct {
	value   []byte
	modify  uint64
	session string
}

// fakeRequest is what the fake saw of one request.
type fakeRequest struct {
	at       time.Time
	path     string
	recurse  bool
	hasIndex bool
	index    uint64
	wait     string
	status   int
}

type fakeConsul struct {
	maxWait time.Duration

	mu       sync.Mutex
	index    uint64
	kv       map[string]fakeEntry // full keys, prefix included
	fail     int                  // HTTP status to fail every request with; 0: answer
	changed  chan struct{}        // closed and replaced on every change
	log      []fakeRequest
	inflight int
	blocked  map[uint64]int // blocking queries waiting now, by index
	bad      []string       // requests the fake did not expect
}

func newFakeConsul(index uint64, maxWait time.Duration) *fakeConsul {
	return &fakeConsul{maxWait: maxWait, index: index, kv: map[string]fakeEntry{}, changed: make(chan struct{}), blocked: map[uint64]int{}}
}

// notify wakes blocked requests; f.mu must be held.
func (f *fakeConsul) notify() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// put writes a key (full name) at a new index.
func (f *fakeConsul) put(key, value string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.index++
	f.kv[key] = fakeEntry{value: []byte(value), modify: f.index}
	f.notify()
}

func (f *fakeConsul) del(key string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.index++
	delete(f.kv, key)
	f.notify()
}

// bump raises the index without changing any content.
func (f *fakeConsul) bump() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.index++
	f.notify()
}

// reset emulates Consul losing its state (or a restore of an old snapshot):
// the index goes back to index, the content stays.
func (f *fakeConsul) reset(index uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.index = index
	for k, e := range f.kv {
		e.modify = min(e.modify, index)
		f.kv[k] = e
	}
	f.notify()
}

func (f *fakeConsul) setFail(status int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = status
	f.notify()
}

func (f *fakeConsul) requests() []fakeRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.log)
}

func (f *fakeConsul) inFlight() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.inflight
}

func (f *fakeConsul) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet || !strings.HasPrefix(r.URL.Path, "/v1/kv/") {
		f.mu.Lock()
		f.bad = append(f.bad, r.Method+" "+r.URL.String())
		f.mu.Unlock()
		http.Error(w, "fake consul: unexpected request", http.StatusBadRequest)
		return
	}
	q := r.URL.Query()
	req := fakeRequest{at: time.Now(), path: strings.TrimPrefix(r.URL.Path, "/v1/kv/"), wait: q.Get("wait")}
	_, req.recurse = q["recurse"]
	if s, ok := q["index"]; ok {
		n, err := strconv.ParseUint(s[0], 10, 64)
		if err != nil {
			http.Error(w, "bad index", http.StatusBadRequest)
			return
		}
		req.hasIndex, req.index = true, n
	}
	wait := f.maxWait
	if req.wait != "" {
		d, err := time.ParseDuration(req.wait)
		if err != nil {
			http.Error(w, "bad wait", http.StatusBadRequest)
			return
		}
		wait = min(wait, d)
	}

	f.mu.Lock()
	f.inflight++
	defer func() { f.inflight--; f.mu.Unlock() }()
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for req.index > 0 && f.index <= req.index && f.fail == 0 {
		ch := f.changed
		f.blocked[req.index]++
		f.mu.Unlock()
		expired, gone := false, false
		select {
		case <-ch:
		case <-timer.C:
			expired = true
		case <-r.Context().Done():
			gone = true
		}
		f.mu.Lock()
		f.blocked[req.index]--
		if gone {
			req.status = -1 // the client went away
			f.log = append(f.log, req)
			return
		}
		if expired {
			break
		}
	}
	w.Header().Set("X-Consul-KnownLeader", "true")
	w.Header().Set("X-Consul-LastContact", "0")
	if f.fail != 0 {
		req.status = f.fail
		f.log = append(f.log, req)
		body := "fake consul failure"
		if f.fail == http.StatusForbidden {
			body = "Permission denied"
		}
		http.Error(w, body, f.fail)
		return
	}
	var out []fakeKVPair
	for k, e := range f.kv {
		if (req.recurse && strings.HasPrefix(k, req.path)) || k == req.path {
			p := fakeKVPair{Key: k, CreateIndex: e.modify, ModifyIndex: e.modify, Session: e.session}
			if len(e.value) > 0 {
				v := base64.StdEncoding.EncodeToString(e.value)
				p.Value = &v
			}
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b fakeKVPair) int { return strings.Compare(a.Key, b.Key) })
	w.Header().Set("X-Consul-Index", strconv.FormatUint(f.index, 10))
	if len(out) == 0 {
		req.status = http.StatusNotFound
		f.log = append(f.log, req)
		w.WriteHeader(http.StatusNotFound)
		return
	}
	req.status = http.StatusOK
	f.log = append(f.log, req)
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

// startFakeWatch serves f and returns a Consul store on it, prefix "vxnet/".
func startFakeWatch(t *testing.T, f *fakeConsul) Store {
	t.Helper()
	for _, env := range []string{"CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_HTTP_SSL", "CONSUL_HTTP_AUTH", "CONSUL_NAMESPACE", "CONSUL_PARTITION"} {
		t.Setenv(env, "")
	}
	srv := httptest.NewServer(f)
	t.Cleanup(func() {
		srv.Close()
		f.mu.Lock()
		defer f.mu.Unlock()
		if len(f.bad) > 0 {
			t.Errorf("unexpected requests to the fake Consul: %v", f.bad)
		}
		for _, r := range f.log {
			if !r.recurse || r.path != "vxnet/nodes/" {
				t.Errorf("watch request for %q recurse=%v, want a recursive list of vxnet/nodes/", r.path, r.recurse)
				break
			}
		}
	})
	s, err := NewConsul(ConsulConfig{Address: srv.Listener.Addr().String(), Prefix: "vxnet/"})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// watchFake starts a watch of "nodes/" that ends with the test.
func watchFake(t *testing.T, s Store) (<-chan Event, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ch := s.Watch(ctx, "nodes/")
	t.Cleanup(func() {
		cancel()
		for range ch {
		}
	})
	return ch, cancel
}

func recvEvent(t *testing.T, ch <-chan Event, within time.Duration) Event {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("watch channel closed")
		}
		return ev
	case <-time.After(within):
		t.Fatalf("no watch event within %s", within)
	}
	return Event{}
}

func recvSnapshot(t *testing.T, ch <-chan Event, within time.Duration) Event {
	t.Helper()
	ev := recvEvent(t, ch, within)
	if ev.Err != nil {
		t.Fatalf("watch error instead of a snapshot: %v", ev.Err)
	}
	return ev
}

// expectQuiet fails if the watch delivers anything during d.
func expectQuiet(t *testing.T, ch <-chan Event, d time.Duration) {
	t.Helper()
	select {
	case ev, ok := <-ch:
		t.Fatalf("unexpected watch event (open=%v): %s", ok, describeEvent(ev))
	case <-time.After(d):
	}
}

// waitFor polls cond until it holds or fails the test after d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func describeEvent(ev Event) string {
	if ev.Err != nil {
		return "error: " + ev.Err.Error()
	}
	var b strings.Builder
	b.WriteString("index " + strconv.FormatUint(ev.Index, 10) + " [")
	for i, p := range ev.Pairs {
		if i > 0 {
			b.WriteString(" ")
		}
		b.WriteString(p.Key + "=" + strconv.Quote(string(p.Value)) + "@" + strconv.FormatUint(p.ModifyIndex, 10))
	}
	return b.String() + "]"
}

// pairsOf renders a snapshot's pairs as key=value for comparison.
func pairsOf(ev Event) []string {
	var out []string
	for _, p := range ev.Pairs {
		out = append(out, p.Key+"="+string(p.Value))
	}
	return out
}

// blockedAt reports whether a blocking request at index idx is waiting.
func blockedAt(f *fakeConsul, idx uint64) func() bool {
	return func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.blocked[idx] > 0
	}
}

func seedNodes(f *fakeConsul) {
	f.kv["vxnet/nodes/a"] = fakeEntry{value: []byte("1"), modify: 7}
	f.kv["vxnet/nodes/b"] = fakeEntry{value: []byte{0, 0xff, '\n', '"'}, modify: 9, session: "sess-1"}
	f.kv["vxnet/nodes/empty"] = fakeEntry{modify: 11}
	f.kv["vxnet/networks/x"] = fakeEntry{value: []byte("not watched"), modify: 12}
	f.kv["vxnet/nodesX"] = fakeEntry{value: []byte("not under nodes/"), modify: 13}
}

// (a) The first event is the full content of the prefix, keys relative to
// the store prefix, values decoded, at the index Consul reported; the
// first read does not block, the following ones block on that index.
func TestConsulWatchInitialSnapshot(t *testing.T) {
	f := newFakeConsul(42, 300*time.Millisecond)
	seedNodes(f)
	ch, _ := watchFake(t, startFakeWatch(t, f))

	ev := recvSnapshot(t, ch, 3*time.Second)
	if ev.Index != 42 {
		t.Errorf("snapshot index %d, want 42", ev.Index)
	}
	if len(ev.Pairs) != 3 {
		t.Fatalf("snapshot %s, want nodes/a, nodes/b, nodes/empty", describeEvent(ev))
	}
	a, b, e := ev.Pairs[0], ev.Pairs[1], ev.Pairs[2]
	if a.Key != "nodes/a" || string(a.Value) != "1" || a.ModifyIndex != 7 || a.Session != "" {
		t.Errorf("first pair %+v", *a)
	}
	if b.Key != "nodes/b" || string(b.Value) != "\x00\xff\n\"" || b.ModifyIndex != 9 || b.Session != "sess-1" {
		t.Errorf("second pair %+v", *b)
	}
	if e.Key != "nodes/empty" || len(e.Value) != 0 || e.ModifyIndex != 11 {
		t.Errorf("third pair %+v", *e)
	}

	// Idle: the blocking queries time out at the same index, which must
	// not produce events, nor a storm of requests.
	expectQuiet(t, ch, time.Second)
	reqs := f.requests()
	if len(reqs) < 2 || len(reqs) > 8 {
		t.Errorf("%d requests in about 1s idle with 300ms blocking queries, want 2..8", len(reqs))
	}
	if reqs[0].hasIndex {
		t.Errorf("first read has index=%d, want a non-blocking read", reqs[0].index)
	}
	for _, r := range reqs[1:] {
		if !r.hasIndex || r.index != 42 || r.wait != "30000ms" {
			t.Errorf("idle request index=%d (set %v) wait=%q, want a blocking query at 42 with wait=30000ms", r.index, r.hasIndex, r.wait)
		}
	}
}

// (a') An empty prefix (Consul answers 404 with an index) is a snapshot
// with no pairs, not an error; the first key written is then delivered.
func TestConsulWatchEmptyPrefix(t *testing.T) {
	f := newFakeConsul(9, 300*time.Millisecond)
	f.kv["vxnet/networks/x"] = fakeEntry{value: []byte("elsewhere"), modify: 3}
	ch, _ := watchFake(t, startFakeWatch(t, f))

	ev := recvSnapshot(t, ch, 3*time.Second)
	if len(ev.Pairs) != 0 || ev.Index != 9 {
		t.Fatalf("empty prefix: %s, want no pairs at index 9", describeEvent(ev))
	}
	waitFor(t, 2*time.Second, "a blocking query at 9", blockedAt(f, 9))
	f.put("vxnet/nodes/a", "hello")
	ev = recvSnapshot(t, ch, 3*time.Second)
	if got := pairsOf(ev); ev.Index != 10 || !slices.Equal(got, []string{"nodes/a=hello"}) {
		t.Fatalf("after the first put: %s", describeEvent(ev))
	}
	if r := f.requests(); r[0].status != http.StatusNotFound {
		t.Errorf("first answer was %d, want the fake's 404", r[0].status)
	}
}

// (b) Every increase of the index delivers the new snapshot promptly (the
// blocking query returns at once), including deletes and an index that
// moved without a visible change.
func TestConsulWatchChange(t *testing.T) {
	f := newFakeConsul(42, 5*time.Second) // longer than the test: only changes wake the watcher
	seedNodes(f)
	ch, _ := watchFake(t, startFakeWatch(t, f))
	ev := recvSnapshot(t, ch, 3*time.Second)
	if ev.Index != 42 {
		t.Fatalf("initial: %s", describeEvent(ev))
	}

	steps := []struct {
		name   string
		change func()
		want   []string
	}{
		{"put", func() { f.put("vxnet/nodes/c", "3") }, []string{"nodes/a=1", "nodes/b=\x00\xff\n\"", "nodes/c=3", "nodes/empty="}},
		{"update", func() { f.put("vxnet/nodes/a", "one") }, []string{"nodes/a=one", "nodes/b=\x00\xff\n\"", "nodes/c=3", "nodes/empty="}},
		{"delete", func() { f.del("vxnet/nodes/b") }, []string{"nodes/a=one", "nodes/c=3", "nodes/empty="}},
		{"index only", f.bump, []string{"nodes/a=one", "nodes/c=3", "nodes/empty="}},
		// The fake, like Consul's whole-table index, wakes the watch for
		// any write; the snapshot is then the same, which is allowed.
		{"outside the prefix", func() { f.put("vxnet/networks/y", "z") }, []string{"nodes/a=one", "nodes/c=3", "nodes/empty="}},
	}
	for _, st := range steps {
		before := ev.Index
		waitFor(t, 2*time.Second, "a blocking query at "+strconv.FormatUint(before, 10), blockedAt(f, before))
		start := time.Now()
		st.change()
		ev = recvSnapshot(t, ch, 2*time.Second)
		if ev.Index != before+1 || !slices.Equal(pairsOf(ev), st.want) {
			t.Fatalf("%s: got %s, want index %d with %q", st.name, describeEvent(ev), before+1, st.want)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("%s: delivered after %s; the blocking query should return at once", st.name, d)
		}
	}
	if c := ev.Pairs[1]; c.Key != "nodes/c" || c.ModifyIndex != 43 {
		t.Errorf("nodes/c: %+v, want ModifyIndex 43", *c)
	}
	expectQuiet(t, ch, 300*time.Millisecond)
	// One read per change plus the initial one and the one in flight: no
	// request was wasted.
	if n := len(f.requests()); n != len(steps)+1 {
		t.Errorf("%d answered requests for %d changes, want %d", n, len(steps), len(steps)+1)
	}
}

// (c) An index that goes backwards (Consul lost its state, or a snapshot
// was restored) must be delivered as a fresh snapshot even when the content
// is the same, and the watch must then follow the new, lower indexes.
func TestConsulWatchIndexBackwards(t *testing.T) {
	f := newFakeConsul(100, 200*time.Millisecond)
	seedNodes(f)
	ch, _ := watchFake(t, startFakeWatch(t, f))
	first := recvSnapshot(t, ch, 3*time.Second)
	if first.Index != 100 {
		t.Fatalf("initial: %s", describeEvent(first))
	}
	waitFor(t, 2*time.Second, "a blocking query at 100", blockedAt(f, 100))

	f.reset(5)
	// Consul keeps a query at index 100 blocked while its index is <= 100,
	// so the reset is seen when the query's wait expires.
	ev := recvSnapshot(t, ch, 2*time.Second)
	if ev.Index != 5 || !slices.Equal(pairsOf(ev), pairsOf(first)) {
		t.Fatalf("after the reset: %s, want the same content at index 5", describeEvent(ev))
	}
	if !ev.Reset || first.Reset {
		t.Errorf("Reset: %v on the snapshot after the reset, %v on the first", ev.Reset, first.Reset)
	}
	// A repeat of the same snapshot is allowed (consumers diff snapshots),
	// anything else is not.
	dups := 0
	quiet := time.After(700 * time.Millisecond)
loop:
	for {
		select {
		case ev := <-ch:
			if ev.Err != nil || ev.Index != 5 || !slices.Equal(pairsOf(ev), pairsOf(first)) {
				t.Fatalf("after the reset, unexpected event %s", describeEvent(ev))
			}
			dups++
		case <-quiet:
			break loop
		}
	}
	if dups > 0 {
		t.Logf("the index reset was delivered %d extra time(s)", dups)
	}
	// The watcher now blocks at the new index instead of spinning or
	// waiting for the old one.
	reqs := f.requests()
	if last := reqs[len(reqs)-1]; !last.hasIndex || last.index != 5 {
		t.Errorf("after the reset the watch queries index=%d (set %v), want 5", last.index, last.hasIndex)
	}
	if n := len(reqs); n > 10 {
		t.Errorf("%d requests in about 1s around the reset: spinning", n)
	}
	waitFor(t, 2*time.Second, "a blocking query at 5", blockedAt(f, 5))
	f.put("vxnet/nodes/a", "after reset")
	ev = recvSnapshot(t, ch, 2*time.Second)
	if ev.Index != 6 || string(ev.Pairs[0].Value) != "after reset" {
		t.Fatalf("first change after the reset: %s", describeEvent(ev))
	}

	// A reset to the very same content and an index that goes back to 0
	// is clamped: the watch must still deliver it and not spin.
	waitFor(t, 2*time.Second, "a blocking query at 6", blockedAt(f, 6))
	f.reset(0)
	ev = recvSnapshot(t, ch, 2*time.Second)
	if ev.Index != 0 || len(ev.Pairs) != 3 {
		t.Fatalf("after a reset to 0: %s", describeEvent(ev))
	}
	n := len(f.requests())
	repeats := 0
	quiet = time.After(1000 * time.Millisecond)
loop0:
	for {
		select {
		case ev := <-ch:
			if ev.Err != nil || ev.Index != 0 || len(ev.Pairs) != 3 {
				t.Fatalf("at index 0, unexpected event %s", describeEvent(ev))
			}
			repeats++
		case <-quiet:
			break loop0
		}
	}
	if m := len(f.requests()); m-n > 8 {
		t.Errorf("%d requests in 1s at index 0 with 200ms blocking queries: spinning", m-n)
	}
	if repeats > 0 {
		t.Logf("index 0 (clamped to 1): the unchanged snapshot was delivered %d more time(s) in 1s", repeats)
	}
}

// (d) While Consul fails, the watch reports one error, retries with a
// growing backoff, and delivers a fresh snapshot (even an unchanged one) as
// soon as Consul answers again. A second outage is reported again.
func TestConsulWatchServerErrors(t *testing.T) {
	f := newFakeConsul(42, 300*time.Millisecond)
	seedNodes(f)
	ch, _ := watchFake(t, startFakeWatch(t, f))
	first := recvSnapshot(t, ch, 3*time.Second)

	failed := func(n int) func() bool {
		return func() bool {
			c := 0
			for _, r := range f.requests() {
				if r.status >= 500 {
					c++
				}
			}
			return c >= n
		}
	}

	for round, fails := range []int{4, 2} {
		waitFor(t, 2*time.Second, "a blocking query", blockedAt(f, 42))
		n0 := len(f.requests())
		f.setFail(http.StatusInternalServerError)
		ev := recvEvent(t, ch, 2*time.Second)
		if ev.Err == nil || !errors.Is(ev.Err, ErrUnavailable) || ev.Pairs != nil {
			t.Fatalf("round %d: first event of the outage: %s (err %v), want an ErrUnavailable", round, describeEvent(ev), ev.Err)
		}
		before := func() int {
			c := 0
			for _, r := range f.requests()[:n0] {
				if r.status >= 500 {
					c++
				}
			}
			return c
		}()
		waitFor(t, 3*time.Second, "failed retries", failed(before+fails))
		select {
		case ev := <-ch:
			t.Fatalf("round %d: second event while failing: %s", round, describeEvent(ev))
		default:
		}
		// Retries back off: 100ms after the first failure, doubling.
		// (Lower bounds only: a loaded machine makes gaps longer.)
		var gaps []time.Duration
		var prev time.Time
		for _, r := range f.requests()[n0:] {
			if r.status < 500 {
				continue
			}
			if !prev.IsZero() {
				gaps = append(gaps, r.at.Sub(prev))
			}
			prev = r.at
		}
		for i, g := range gaps {
			if g < 90*time.Millisecond<<i {
				t.Errorf("round %d: retry gaps %v do not back off from 100ms", round, gaps)
				break
			}
		}

		nFail := len(f.requests())
		f.setFail(0)
		ev = recvEvent(t, ch, 3*time.Second)
		if ev.Err != nil || ev.Index != 42 || !slices.Equal(pairsOf(ev), pairsOf(first)) {
			t.Fatalf("round %d: after recovery: %s, want the unchanged snapshot at 42", round, describeEvent(ev))
		}
		reqs := f.requests()
		if r := reqs[nFail]; r.hasIndex || r.status != http.StatusOK {
			t.Errorf("round %d: first request after the outage index=%d (set %v) status %d, want a non-blocking read", round, r.index, r.hasIndex, r.status)
		}
		expectQuiet(t, ch, 200*time.Millisecond)
	}
	// And the watch goes on normally.
	waitFor(t, 2*time.Second, "a blocking query", blockedAt(f, 42))
	f.put("vxnet/nodes/z", "z")
	if ev := recvSnapshot(t, ch, 2*time.Second); ev.Index != 43 || len(ev.Pairs) != 4 {
		t.Fatalf("after the outages: %s", describeEvent(ev))
	}
}

// A refused ACL token is reported as ErrForbidden, not as an outage.
func TestConsulWatchForbidden(t *testing.T) {
	f := newFakeConsul(42, 300*time.Millisecond)
	seedNodes(f)
	f.fail = http.StatusForbidden
	ch, _ := watchFake(t, startFakeWatch(t, f))
	ev := recvEvent(t, ch, 3*time.Second)
	if !errors.Is(ev.Err, ErrForbidden) {
		t.Fatalf("403: %s, want ErrForbidden", describeEvent(ev))
	}
	f.setFail(0)
	if ev := recvSnapshot(t, ch, 3*time.Second); len(ev.Pairs) != 3 {
		t.Fatalf("after the token is fixed: %s", describeEvent(ev))
	}
}

// (e) Cancelling the context ends the watch and closes the channel
// promptly, whether the watcher is inside a blocking query or backing off,
// and nothing is requested afterwards.
func TestConsulWatchCancel(t *testing.T) {
	closedWithin := func(t *testing.T, ch <-chan Event, d time.Duration) {
		t.Helper()
		deadline := time.After(d)
		for {
			select {
			case _, ok := <-ch:
				if !ok {
					return
				}
			case <-deadline:
				t.Fatalf("watch channel still open %s after cancel", d)
			}
		}
	}
	noMoreRequests := func(t *testing.T, f *fakeConsul) {
		t.Helper()
		// A request the cancel cut short is logged when its handler sees
		// the client go; wait for that before counting.
		waitFor(t, time.Second, "the last request to end", func() bool { return f.inFlight() == 0 })
		n := len(f.requests())
		time.Sleep(300 * time.Millisecond)
		if m := len(f.requests()); m != n || f.inFlight() != 0 {
			t.Errorf("requests after the watch ended: %d more, %d in flight", m-n, f.inFlight())
		}
	}

	t.Run("blocked", func(t *testing.T) {
		blocking := consulBlocking.Value()
		f := newFakeConsul(42, 20*time.Second) // a blocking query outlives the test
		seedNodes(f)
		s := startFakeWatch(t, f)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		ch := s.Watch(ctx, "nodes/")
		recvSnapshot(t, ch, 3*time.Second)
		waitFor(t, 2*time.Second, "a blocking query", blockedAt(f, 42))
		if got := consulBlocking.Value(); got != blocking+1 {
			t.Errorf("consul_blocking_queries %d during the watch, want %d", got, blocking+1)
		}
		start := time.Now()
		cancel()
		closedWithin(t, ch, time.Second)
		t.Logf("closed %s after cancel", time.Since(start))
		waitFor(t, time.Second, "the blocked request to end", func() bool { return f.inFlight() == 0 })
		if got := consulBlocking.Value(); got != blocking {
			t.Errorf("consul_blocking_queries %d after the watch, want %d", got, blocking)
		}
		noMoreRequests(t, f)
	})

	t.Run("backing off", func(t *testing.T) {
		f := newFakeConsul(42, 300*time.Millisecond)
		f.fail = http.StatusInternalServerError
		s := startFakeWatch(t, f)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		ch := s.Watch(ctx, "nodes/")
		if ev := recvEvent(t, ch, 3*time.Second); ev.Err == nil {
			t.Fatalf("want an error event, got %s", describeEvent(ev))
		}
		// After the 4th failure the watcher sleeps 800ms.
		waitFor(t, 3*time.Second, "4 failed requests", func() bool { return len(f.requests()) >= 4 })
		start := time.Now()
		cancel()
		closedWithin(t, ch, 300*time.Millisecond)
		t.Logf("closed %s after cancel", time.Since(start))
		noMoreRequests(t, f)
	})

	t.Run("unread event", func(t *testing.T) {
		f := newFakeConsul(42, 20*time.Second)
		seedNodes(f)
		s := startFakeWatch(t, f)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		ch := s.Watch(ctx, "nodes/")
		waitFor(t, 2*time.Second, "a blocking query", blockedAt(f, 42))
		cancel()
		// The snapshot nobody read may still be there; then the channel
		// is closed.
		n := 0
		deadline := time.After(time.Second)
		for open := true; open; {
			select {
			case _, open = <-ch:
				if open {
					n++
				}
			case <-deadline:
				t.Fatal("watch channel still open 1s after cancel")
			}
		}
		if n > 1 {
			t.Errorf("%d events buffered, want at most 1", n)
		}
		noMoreRequests(t, f)
	})

	t.Run("cancelled before start", func(t *testing.T) {
		f := newFakeConsul(42, 300*time.Millisecond)
		s := startFakeWatch(t, f)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		closedWithin(t, s.Watch(ctx, "nodes/"), time.Second)
		if n := len(f.requests()); n != 0 {
			t.Errorf("%d requests for a watch cancelled before it started", n)
		}
	})
}

// A connection error is an outage even when the server's port contains
// "403"; only a 403 status is a refusal.
func TestUnavailableNotForbiddenByPort(t *testing.T) {
	dial := &net.OpError{Op: "dial", Net: "tcp", Addr: &net.TCPAddr{IP: net.IPv4(192, 168, 77, 254), Port: 40347}, Err: syscall.ECONNREFUSED}
	if err := unavailable("get", "k", fmt.Errorf("Get %q: %w", "http://192.168.77.254:40347/v1/kv/k", dial)); !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrForbidden) {
		t.Errorf("connection refused on port 40347: %v", err)
	}
	if err := unavailable("get", "k", api.StatusError{Code: 403, Body: "Permission denied"}); !errors.Is(err, ErrForbidden) {
		t.Errorf("403: %v", err)
	}
}

// A renewal that cannot reach the server is an outage, even when the URL
// it quotes (the session id, the port) contains "404": taking it for an
// expired session would replace a session that still holds the node's
// keys.
func TestRenewUnreachableIsNotExpired(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there now: connection refused
	s, err := NewConsul(ConsulConfig{Address: addr, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	err = s.RenewSession(context.Background(), "c4040404-0404-4040-8404-040404040404")
	if !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrNotFound) {
		t.Errorf("renewal with the server unreachable: %v", err)
	}
}
