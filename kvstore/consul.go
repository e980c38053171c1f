package kvstore

import (
	"context"
	"errors"
	"expvar"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/vxnet/vxnet/metrics"
)

// ConsulConfig configures the Consul backend.
type ConsulConfig struct {
	Address       string // host:port of the HTTP API
	Prefix        string // key prefix, default "vxnet/"
	Scheme        string // http or https
	Token         string
	CAFile        string
	CertFile      string
	KeyFile       string
	TLSServerName string
	// Timeout bounds every non-blocking request (default 5s), so that a
	// dead Consul fails a CLI command in seconds rather than hanging it.
	Timeout time.Duration
}

// maxTxnOps is Consul's limit of operations in one transaction.
const maxTxnOps = 64

// watchWait is how long one blocking query waits for a change.
const watchWait = 30 * time.Second

// Requests to Consul, published with expvar (the agent serves them at
// /debug/vars with --debug-addr): an idle agent's load on Consul is a figure
// we promise to keep low, so it must be observable.
var (
	consulRequests = expvar.NewInt("consul_requests")
	// Blocking queries waiting in Consul now: one per watched prefix when
	// the watches are healthy.
	consulBlocking = expvar.NewInt("consul_blocking_queries")
	// What the watches cost: snapshots delivered, and the bytes of the
	// answers to blocking queries (the figure a watching agent pays per
	// change).
	consulWatchEvents = expvar.NewInt("consul_watch_events")
	consulWatchBytes  = expvar.NewInt("consul_watch_bytes")
)

type countingTransport struct{ next http.RoundTripper }

func (c countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	consulRequests.Add(1)
	start := time.Now()
	resp, err := c.next.RoundTrip(r)
	if r.URL.Query().Has("index") {
		// A blocking query waits for a change: its time says nothing of
		// the store's; what it brings is counted instead.
		if err == nil {
			resp.Body = countingBody{resp.Body}
		}
		return resp, err
	}
	op := requestOp(r)
	metrics.StoreRequestDuration.WithLabelValues(op).Observe(time.Since(start).Seconds())
	if err != nil || resp.StatusCode >= 500 {
		metrics.StoreRequestErrors.WithLabelValues(op).Inc()
	}
	return resp, err
}

// requestOp names a Consul request for the metrics: a bounded set.
func requestOp(r *http.Request) string {
	p := r.URL.Path
	switch {
	case strings.HasPrefix(p, "/v1/kv/"):
		switch {
		case r.Method == http.MethodGet && r.URL.Query().Has("recurse"):
			return "list"
		case r.Method == http.MethodGet:
			return "get"
		case r.Method == http.MethodDelete:
			return "delete"
		}
		return "put"
	case p == "/v1/txn":
		return "txn"
	case strings.HasPrefix(p, "/v1/session/create"):
		return "session_create"
	case strings.HasPrefix(p, "/v1/session/renew"):
		return "session_renew"
	case strings.HasPrefix(p, "/v1/session/"):
		return "session_other"
	case strings.HasPrefix(p, "/v1/health/"):
		return "health"
	case strings.HasPrefix(p, "/v1/agent/"), strings.HasPrefix(p, "/v1/status/"):
		return "agent"
	}
	return "other"
}

// countingBody counts what a blocking query's answer weighs.
type countingBody struct{ io.ReadCloser }

func (b countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	consulWatchBytes.Add(int64(n))
	metrics.WatchBytes.Add(float64(n))
	return n, err
}

type consulStore struct {
	kv      *api.KV
	session *api.Session
	raw     *api.Raw
	status  *api.Status
	health  *api.Health
	prefix  string
	timeout time.Duration
}

// NewConsul connects to a Consul agent or server. It does not contact it:
// the first request does.
func NewConsul(cfg ConsulConfig) (Store, error) {
	if cfg.Address == "" {
		return nil, errors.New("consul: address is required")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "vxnet/"
	}
	if !strings.HasSuffix(cfg.Prefix, "/") {
		cfg.Prefix += "/"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	c := api.DefaultNonPooledConfig()
	c.Address = cfg.Address
	if cfg.Scheme != "" {
		c.Scheme = cfg.Scheme
	}
	c.Token = cfg.Token
	c.TLSConfig = api.TLSConfig{Address: cfg.TLSServerName, CAFile: cfg.CAFile, CertFile: cfg.CertFile, KeyFile: cfg.KeyFile}
	if cfg.CAFile != "" || cfg.CertFile != "" {
		if cfg.Scheme == "" {
			c.Scheme = "https"
		}
	}
	tr, err := api.SetupTLSConfig(&c.TLSConfig)
	if err != nil {
		return nil, fmt.Errorf("consul tls: %w", err)
	}
	transport := c.Transport
	transport.TLSClientConfig = tr
	transport.ResponseHeaderTimeout = watchWait + 15*time.Second
	transport.MaxIdleConnsPerHost = 16
	// Every watch event carries the whole prefix. Gzip costs Consul and
	// every agent CPU per event (measured: a third of the convergence
	// time at 10 hosts x 50 endpoints) to save bandwidth that a Consul
	// client agent on the same host, the usual deployment, does not need.
	transport.DisableCompression = true
	c.HttpClient = &http.Client{Transport: countingTransport{transport}}
	client, err := api.NewClient(c)
	if err != nil {
		return nil, fmt.Errorf("consul client: %w", err)
	}
	return &consulStore{kv: client.KV(), session: client.Session(), raw: client.Raw(), status: client.Status(), health: client.Health(), prefix: cfg.Prefix, timeout: cfg.Timeout}, nil
}

func (s *consulStore) q(ctx context.Context) (*api.QueryOptions, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	return (&api.QueryOptions{}).WithContext(ctx), cancel
}

func (s *consulStore) w(ctx context.Context) (*api.WriteOptions, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	return (&api.WriteOptions{}).WithContext(ctx), cancel
}

// unavailable marks transport and server errors, so that callers can tell
// "the store said no" from "the store did not answer".
func unavailable(op, key string, err error) error {
	// By the status, not by the text: a connection error names the
	// server's port, which may well contain "403".
	var se api.StatusError
	if errors.As(err, &se) && se.Code == http.StatusForbidden || strings.Contains(strings.ToLower(err.Error()), "permission denied") && !errors.As(err, new(*net.OpError)) {
		// Not an outage: retrying will not help, the token must change.
		return fmt.Errorf("consul %s %s: %w: check the ACL token (CONSUL_HTTP_TOKEN)", op, key, ErrForbidden)
	}
	if notJoined(err) {
		// An outage to wait out, but one with a likely cause to name.
		return fmt.Errorf("consul %s %s: %w: %s (check its retry_join): %v", op, key, ErrUnavailable, ErrNotJoined, err)
	}
	return fmt.Errorf("consul %s %s: %w: %v", op, key, ErrUnavailable, err)
}

func (s *consulStore) pair(p *api.KVPair) *KV {
	return &KV{Key: strings.TrimPrefix(p.Key, s.prefix), Value: p.Value, ModifyIndex: p.ModifyIndex, Session: p.Session}
}

func (s *consulStore) Get(ctx context.Context, key string) (*KV, error) {
	q, cancel := s.q(ctx)
	defer cancel()
	p, _, err := s.kv.Get(s.prefix+key, q)
	if err != nil {
		return nil, unavailable("get", key, err)
	}
	if p == nil {
		return nil, fmt.Errorf("%s: %w", key, ErrNotFound)
	}
	return s.pair(p), nil
}

func (s *consulStore) List(ctx context.Context, prefix string) ([]*KV, uint64, error) {
	q, cancel := s.q(ctx)
	defer cancel()
	ps, meta, err := s.kv.List(s.prefix+prefix, q)
	if err != nil {
		return nil, 0, unavailable("list", prefix, err)
	}
	out := make([]*KV, 0, len(ps))
	for _, p := range ps {
		out = append(out, s.pair(p))
	}
	return out, meta.LastIndex, nil
}

func (s *consulStore) Put(ctx context.Context, key string, value []byte) error {
	w, cancel := s.w(ctx)
	defer cancel()
	if _, err := s.kv.Put(&api.KVPair{Key: s.prefix + key, Value: value}, w); err != nil {
		return unavailable("put", key, err)
	}
	return nil
}

func (s *consulStore) CAS(ctx context.Context, key string, value []byte, index uint64) error {
	w, cancel := s.w(ctx)
	defer cancel()
	ok, _, err := s.kv.CAS(&api.KVPair{Key: s.prefix + key, Value: value, ModifyIndex: index}, w)
	if err != nil {
		return unavailable("cas", key, err)
	}
	if !ok {
		return fmt.Errorf("cas %s at index %d: %w", key, index, ErrConflict)
	}
	return nil
}

func (s *consulStore) Delete(ctx context.Context, key string) error {
	w, cancel := s.w(ctx)
	defer cancel()
	if _, err := s.kv.Delete(s.prefix+key, w); err != nil {
		return unavailable("delete", key, err)
	}
	return nil
}

func (s *consulStore) DeleteCAS(ctx context.Context, key string, index uint64) error {
	if index == 0 {
		return fmt.Errorf("delete %s: index 0: %w", key, ErrConflict)
	}
	// Consul's own delete-cas succeeds on a missing key; a check-index in
	// the same transaction makes "absent" a conflict, as the interface says.
	err := s.Txn(ctx, []Op{{Kind: OpCheckIndex, Key: key, Index: index}, {Kind: OpDelete, Key: key}})
	if errors.Is(err, ErrConflict) {
		return fmt.Errorf("delete %s at index %d: %w", key, index, ErrConflict)
	}
	return err
}

func (s *consulStore) Txn(ctx context.Context, ops []Op) error {
	if len(ops) == 0 {
		return nil
	}
	if len(ops) > maxTxnOps {
		return fmt.Errorf("transaction of %d operations: Consul allows at most %d", len(ops), maxTxnOps)
	}
	txn := make(api.TxnOps, 0, len(ops))
	for _, op := range ops {
		k := &api.KVTxnOp{Key: s.prefix + op.Key, Value: op.Value, Index: op.Index, Session: op.Session}
		switch op.Kind {
		case OpPut:
			k.Verb = api.KVSet
		case OpCAS:
			k.Verb = api.KVCAS
		case OpDelete:
			k.Verb = api.KVDelete
		case OpDeleteCAS:
			k.Verb = api.KVDeleteCAS
		case OpCheckIndex:
			k.Verb = api.KVCheckIndex
			if op.Index == 0 {
				k.Verb = api.KVCheckNotExists
			}
		case OpLock:
			k.Verb = api.KVLock
		default:
			return fmt.Errorf("txn: unknown operation %d on %s", op.Kind, op.Key)
		}
		txn = append(txn, &api.TxnOp{KV: k})
	}
	q, cancel := s.q(ctx)
	defer cancel()
	ok, resp, _, err := s.kv.Txn(kvOps(txn), q)
	if err != nil {
		return unavailable("txn", ops[0].Key, err)
	}
	if !ok {
		var msgs []string
		if resp != nil {
			for _, e := range resp.Errors {
				key := ""
				if e.OpIndex >= 0 && e.OpIndex < len(ops) {
					key = ops[e.OpIndex].Key
				}
				msgs = append(msgs, fmt.Sprintf("%s: %s", key, e.What))
			}
		}
		if strings.Contains(strings.Join(msgs, " "), "invalid session") {
			// The session ended (its renewal has not noticed yet): not
			// a conflict of the caller's, which "already exists" would
			// tell, but an outage of the node's own liveness.
			return fmt.Errorf("txn rolled back (%s): %w: %w", strings.Join(msgs, "; "), ErrUnavailable, ErrSessionEnded)
		}
		return fmt.Errorf("txn rolled back (%s): %w", strings.Join(msgs, "; "), ErrConflict)
	}
	return nil
}

// ErrSessionEnded means a write bound to a session was refused because the
// session no longer exists; it comes with ErrUnavailable.
var ErrSessionEnded = errors.New("the store session has ended")

func kvOps(ops api.TxnOps) api.KVTxnOps {
	out := make(api.KVTxnOps, len(ops))
	for i, op := range ops {
		out[i] = op.KV
	}
	return out
}

func (s *consulStore) Watch(ctx context.Context, prefix string) <-chan Event {
	ch := make(chan Event, 1)
	go func() {
		defer close(ch)
		var index uint64
		var last uint64 // of the last successful read, kept across errors
		backoff := 100 * time.Millisecond
		failing := false
		for ctx.Err() == nil {
			qctx, cancel := context.WithTimeout(ctx, watchWait+10*time.Second)
			q := (&api.QueryOptions{WaitIndex: index, WaitTime: watchWait}).WithContext(qctx)
			consulBlocking.Add(1)
			ps, meta, err := s.kv.List(s.prefix+prefix, q)
			consulBlocking.Add(-1)
			cancel()
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				// The next read must not block on the old index: the
				// store may have come back with nothing new to say, and
				// the consumer needs a fresh snapshot at once.
				index = 0
				if !failing {
					failing = true
					sendLatest(ch, Event{Err: unavailable("watch", prefix, err)})
				}
				select {
				case <-ctx.Done():
					return
				case <-time.After(backoff):
				}
				backoff = min(backoff*2, 5*time.Second)
				continue
			}
			backoff = 100 * time.Millisecond
			// A blocking query needs an index above zero; compare after
			// clamping, or an index of 0 would count as a change at every
			// wait timeout. An index that went backwards means Consul lost
			// or reset its state: the list just read is the whole new
			// state, so it is delivered and watching resumes from there.
			next := max(meta.LastIndex, 1)
			changed := failing || index == 0 || next != index
			reset := last != 0 && next < last
			failing = false
			index, last = next, next
			if !changed {
				continue
			}
			out := make([]*KV, 0, len(ps))
			for _, p := range ps {
				out = append(out, s.pair(p))
			}
			consulWatchEvents.Add(1)
			metrics.WatchEvents.Inc()
			sendLatest(ch, Event{Pairs: out, Index: meta.LastIndex, Reset: reset})
		}
	}()
	return ch
}

// sendLatest replaces an unread event: a slow consumer gets the newest
// snapshot and the watcher never blocks. Only the watcher sends on ch.
func sendLatest(ch chan Event, ev Event) {
	for {
		select {
		case ch <- ev:
			return
		default:
		}
		select {
		case <-ch:
		default:
		}
	}
}

func (s *consulStore) CreateSession(ctx context.Context, name string, ttl time.Duration) (string, error) {
	w, cancel := s.w(ctx)
	defer cancel()
	// LockDelay 0 would mean Consul's default of 15s, during which the
	// keys of an expired session cannot be locked again: a returning host
	// would wait that long to republish. 1ms is as good as none.
	// No node and no checks given: Consul binds the session to the node
	// of the agent that takes the request, with its serfHealth check, so
	// that through a client agent on this host gossip ends it within
	// seconds of the host's death (see Liveness).
	id, _, err := s.session.Create(&api.SessionEntry{Name: name, TTL: ttl.String(), Behavior: api.SessionBehaviorDelete, LockDelay: time.Millisecond}, w)
	if err != nil {
		return "", sessionError(err, name)
	}
	return id, nil
}

// sessionError names what is wrong when Consul refuses a session: an ACL
// token without session:write, or an agent that knows no server.
func sessionError(err error, name string) error {
	var se api.StatusError
	msg := err.Error()
	switch {
	case errors.As(err, &se) && se.Code == http.StatusForbidden || strings.Contains(strings.ToLower(msg), "permission denied"):
		return fmt.Errorf("consul create session: %w: the ACL token needs session:write on the Consul node the store's agent runs as (a session or session_prefix rule with policy \"write\"): %v", ErrForbidden, err)
	}
	return unavailable("create session", name, err)
}

// notJoined: a Consul agent answered that it has no server to ask.
func notJoined(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "No known Consul servers") || strings.Contains(msg, "No cluster leader") || strings.Contains(msg, "No path to datacenter")
}

// Liveness is how the store's sessions are kept alive, which says how
// fast a dead host is noticed.
type Liveness struct {
	// LocalAgent: the store is a Consul client agent, whose sessions also
	// end when gossip finds its node failed (its serfHealth check): a
	// dead host is noticed in seconds. Otherwise (a server, or the
	// embedded store) only the session's TTL notices it.
	LocalAgent bool
	// Node is the name of the Consul node that sessions belong to.
	Node string
}

// Mode names the liveness mode for logs and status.
func (l Liveness) Mode() string {
	if l.LocalAgent {
		return "gossip+ttl"
	}
	return "ttl"
}

// LivenessReporter is a store that can say how its sessions are kept
// alive, and what gossip says of a node.
type LivenessReporter interface {
	Liveness(ctx context.Context) (Liveness, error)
	NodeHealth(ctx context.Context, node string) (NodeHealth, error)
}

// NodeHealth is what Consul's gossip says of a node.
type NodeHealth int

const (
	// NodeAlive: its serfHealth check passes.
	NodeAlive NodeHealth = iota
	// NodeFailed: gossip cannot reach it (serfHealth critical): dead, or
	// cut off.
	NodeFailed
	// NodeLeft: it is not in the catalog: its agent left the cluster
	// gracefully (stopped for a restart, or its host shutting down).
	NodeLeft
)

func (h NodeHealth) String() string {
	return [...]string{"alive", "failed", "left"}[h]
}

// NodeHealth reads a node's serfHealth check.
func (s *consulStore) NodeHealth(ctx context.Context, node string) (NodeHealth, error) {
	q, cancel := s.q(ctx)
	defer cancel()
	checks, meta, err := s.health.Node(node, q)
	if err != nil {
		return NodeAlive, unavailable("health of node", node, err)
	}
	if meta != nil && meta.ResultsFilteredByACLs {
		// An empty answer would read as "left".
		return NodeAlive, fmt.Errorf("consul health of node %s: %w: the ACL token may not read it (node_prefix read)", node, ErrForbidden)
	}
	for _, c := range checks {
		if c.CheckID == "serfHealth" {
			if c.Status == api.HealthCritical {
				return NodeFailed, nil
			}
			return NodeAlive, nil
		}
	}
	return NodeLeft, nil
}

// ErrNotJoined means a Consul client agent has joined no server: nothing
// written through it reaches the cluster.
var ErrNotJoined = errors.New("the Consul agent has joined no server")

// Liveness asks the agent behind the address whether it is a server or a
// client, and, for a client, whether it has joined a cluster.
func (s *consulStore) Liveness(ctx context.Context) (Liveness, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	// Through Raw: Agent.Self takes no context, and a frozen agent must
	// not leave a request behind at every retry.
	var self map[string]map[string]any
	if _, err := s.raw.Query("/v1/agent/self", &self, (&api.QueryOptions{}).WithContext(ctx)); err != nil {
		return Liveness{}, unavailable("agent self", "", err)
	}
	server, _ := self["Config"]["Server"].(bool)
	node, _ := self["Config"]["NodeName"].(string)
	l := Liveness{LocalAgent: !server, Node: node}
	if !server {
		leader, err := s.status.LeaderWithQueryOptions((&api.QueryOptions{}).WithContext(ctx))
		if err != nil && notJoined(err) || err == nil && leader == "" {
			return l, fmt.Errorf("consul client agent %q: %w (check its retry_join and that a server answers)", node, ErrNotJoined)
		}
		if err != nil {
			return l, unavailable("status leader", "", err)
		}
	}
	return l, nil
}

func (s *consulStore) RenewSession(ctx context.Context, id string) error {
	w, cancel := s.w(ctx)
	defer cancel()
	e, _, err := s.session.Renew(id, w)
	if err != nil {
		// By the status, not the text: a connection error quotes the
		// URL, whose port or session id may well contain "404", and a
		// session taken for expired would be replaced while the old one
		// still holds this node's keys.
		var se api.StatusError
		if errors.As(err, &se) && se.Code == http.StatusNotFound {
			return fmt.Errorf("session %s: %w", id, ErrNotFound)
		}
		return unavailable("renew session", id, err)
	}
	if e == nil {
		return fmt.Errorf("session %s: %w", id, ErrNotFound)
	}
	return nil
}

func (s *consulStore) DestroySession(ctx context.Context, id string) error {
	w, cancel := s.w(ctx)
	defer cancel()
	if _, err := s.session.Destroy(id, w); err != nil {
		return unavailable("destroy session", id, err)
	}
	return nil
}

func (s *consulStore) Close() error { return nil }
