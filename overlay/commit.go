package overlay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vxnet/vxnet/kvstore"
)

// The committer writes this host's peer records. Every attach and detach
// changes its endpoint record and its host's peer record of the network in
// one transaction; the committer folds the changes that arrive while one
// transaction is on its way into the next, so that a storm of attaches on
// one host makes a handful of writes of its peer record, and as many store
// events on the other hosts, not one each.
type commitReq struct {
	netID string
	ops   []kvstore.Op // the endpoint record's own, committed with the peer record
	add   netip.Addr   // the address the change adds to the record, if any
	del   netip.Addr   // or removes
	// set replaces the record's addresses (a republish); with setOK.
	set   []netip.Addr
	setOK bool
	ctx   context.Context
	done  chan error
}

// maxBatchOps keeps a batch under Consul's 64 operations a transaction.
const maxBatchOps = 60

// minCommitTime is the least time a request must have left to join a
// batch, whose transaction is bounded by its earliest deadline.
const minCommitTime = time.Second

// committer owns what this host's peer records hold: published, by
// network id, is the set of addresses of its last successful write.
type committer struct {
	a         *Agent
	reqs      chan *commitReq
	published map[string][]netip.Addr
	// unsure are the networks whose record may not be what published
	// says: a transaction that failed without an answer may have been
	// applied. Their next write is made whatever published says.
	unsure map[string]bool
	// wrote is when each network's record was last written: a view may
	// not show the write yet (read by the reconciler, hence the lock).
	wmu   sync.Mutex
	wrote map[string]time.Time
}

// recentlyWrote reports whether this host's record of a network was
// written within d.
func (c *committer) recentlyWrote(netID string, d time.Duration) bool {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return time.Since(c.wrote[netID]) < d
}

// commit hands a change to the committer and waits for its transaction.
// Without a store session yet (the agent has just started) it waits for
// one: a record written without would outlive the host.
// A change whose context ends before the committer takes it up is never
// made; once taken up, the caller waits for the outcome (a transaction
// is bounded by its batch's earliest deadline), so that it always knows
// whether its change is in the store.
func (a *Agent) commit(ctx context.Context, r *commitReq) error {
	for a.currentSession() == "" && a.sessionsInUse() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("no store session yet: %w", ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	r.ctx, r.done = ctx, make(chan error, 1)
	select {
	case a.commits.reqs <- r:
	case <-ctx.Done():
		return ctx.Err()
	}
	return <-r.done
}

func (c *committer) run(ctx context.Context) {
	for {
		var batch []*commitReq
		n := 0
		take := func(r *commitReq) {
			if err := r.ctx.Err(); err != nil {
				r.done <- err // given up before it was made
				return
			}
			if d, ok := r.ctx.Deadline(); ok && time.Until(d) < minCommitTime {
				// Too little time left to wait for a transaction: joining
				// one would cut it short for every request in it.
				r.done <- fmt.Errorf("commit: %w", context.DeadlineExceeded)
				return
			}
			batch = append(batch, r)
			n += len(r.ops) + 1
		}
		select {
		case <-ctx.Done():
			return
		case r := <-c.reqs:
			take(r)
		}
	drain:
		for n < maxBatchOps-5 { // a request brings at most 4 ops and the record
			select {
			case r := <-c.reqs:
				take(r)
			default:
				break drain
			}
		}
		if len(batch) == 0 {
			continue
		}
		tctx, cancel := batchContext(ctx, batch)
		c.process(tctx, batch)
		cancel()
	}
}

// batchContext bounds a batch's transaction by its earliest deadline but
// is not cancelled with any one request: the others wait for it too.
func batchContext(ctx context.Context, batch []*commitReq) (context.Context, context.CancelFunc) {
	var first time.Time
	for _, r := range batch {
		if d, ok := r.ctx.Deadline(); ok && (first.IsZero() || d.Before(first)) {
			first = d
		}
	}
	if first.IsZero() {
		return context.WithCancel(ctx)
	}
	return context.WithDeadline(ctx, first)
}

// process commits a batch in one transaction. If it fails on a conflict,
// one request's own check failed (a name taken, a network removed): each
// is then committed alone, so that it fails alone.
func (c *committer) process(ctx context.Context, batch []*commitReq) {
	err := c.txn(ctx, batch)
	if err == nil || !errors.Is(err, kvstore.ErrConflict) || len(batch) == 1 {
		for _, r := range batch {
			r.done <- err
		}
		return
	}
	for _, r := range batch {
		r.done <- c.txn(ctx, []*commitReq{r})
	}
}

func (c *committer) txn(ctx context.Context, batch []*commitReq) error {
	next := map[string][]netip.Addr{}
	var ops []kvstore.Op
	for _, r := range batch {
		ips, ok := next[r.netID]
		if !ok {
			ips = slices.Clone(c.published[r.netID])
		}
		if r.setOK {
			ips = slices.Clone(r.set)
		}
		if r.del.IsValid() {
			ips = slices.DeleteFunc(ips, func(ip netip.Addr) bool { return ip == r.del })
		}
		if r.add.IsValid() && !slices.Contains(ips, r.add) {
			ips = append(ips, r.add)
		}
		next[r.netID] = ips
		ops = append(ops, r.ops...)
	}
	ops = dedupChecks(ops)
	session := c.a.currentSession()
	if session == "" && c.a.sessionsInUse() {
		// Lost since commit waited for it (a renewal found it ended):
		// written now, the records would outlive the host.
		return fmt.Errorf("commit: no store session: %w", kvstore.ErrUnavailable)
	}
	for i, op := range ops {
		if op.Kind == kvstore.OpLock && op.Session == "" {
			ops[i].Session = session // publishOps left it to the committer
		}
	}
	forced := map[string]bool{}
	for _, r := range batch {
		forced[r.netID] = forced[r.netID] || r.setOK || c.unsure[r.netID]
	}
	for id, ips := range next {
		if !forced[id] && sameAddrs(ips, c.published[id]) {
			delete(next, id) // no change of the record: no write, no event
			continue
		}
		key := peerKey(id, c.a.cfg.Node)
		if len(ips) == 0 {
			ops = append(ops, kvstore.Op{Kind: kvstore.OpDelete, Key: key})
			continue
		}
		data, _ := json.Marshal(c.a.ownRecord(id, ips))
		if session != "" {
			ops = append(ops, kvstore.Op{Kind: kvstore.OpLock, Key: key, Value: data, Session: session})
		} else {
			ops = append(ops, kvstore.Op{Kind: kvstore.OpPut, Key: key, Value: data})
		}
	}
	if len(ops) == 0 {
		return nil
	}
	if err := c.a.store.Txn(ctx, ops); err != nil {
		if errors.Is(err, kvstore.ErrSessionEnded) {
			c.a.kickRenew() // a new session now, not at the next renewal
		}
		if !errors.Is(err, kvstore.ErrConflict) {
			if c.unsure == nil {
				c.unsure = map[string]bool{}
			}
			for id := range next {
				c.unsure[id] = true
			}
		}
		return err
	}
	c.wmu.Lock()
	if c.wrote == nil {
		c.wrote = map[string]time.Time{}
	}
	for id, ips := range next {
		if len(ips) == 0 {
			delete(c.published, id)
		} else {
			c.published[id] = ips
		}
		c.wrote[id] = time.Now()
		delete(c.unsure, id)
	}
	c.wmu.Unlock()
	return nil
}

// ownRecord is this host's peer record of a network holding ips, with
// the names of the local endpoints that have them.
func (a *Agent) ownRecord(netID string, ips []netip.Addr) *PeerRecord {
	packed := packAddrs(ips)
	names := map[netip.Addr]string{}
	attached := map[netip.Addr]bool{}
	for _, l := range a.viewLocals() {
		ip := l.Endpoint.IP
		if l.Net.ID != netID || !ip.IsValid() || attached[ip] {
			continue
		}
		// An attached endpoint's name wins over a stale record's of the
		// same address, whatever the map's order.
		names[ip] = strings.Join(append([]string{l.Endpoint.Name}, l.Endpoint.Aliases...), " ")
		attached[ip] = l.Phase == phaseAttached
	}
	r := &PeerRecord{Version: recordVersion, Node: a.cfg.Node, VTEP: a.cfg.Advertise, IPs: packed}
	for i := 0; i+4 <= len(packed); i += 4 {
		r.Names = append(r.Names, names[netip.AddrFrom4([4]byte(packed[i:i+4]))])
	}
	return r
}

// dedupChecks drops repeated index checks of one key (attaches of one
// network each check its record): Consul would refuse nothing, but the
// transaction stays smaller.
func dedupChecks(ops []kvstore.Op) []kvstore.Op {
	type check struct {
		key   string
		index uint64
	}
	seen := map[check]bool{}
	out := ops[:0:0]
	for _, op := range ops {
		if op.Kind == kvstore.OpCheckIndex && op.Index != 0 {
			k := check{op.Key, op.Index}
			if seen[k] {
				continue
			}
			seen[k] = true
		}
		out = append(out, op)
	}
	return out
}

// publishedAddrs is what this host's peer records may hold according to
// its journal: the addresses of its endpoints, by network, interrupted
// ones included (a crash may have come after their publish), so that
// undoing one writes its record without it.
func publishedAddrs(locals map[string]*localEndpoint) map[string][]netip.Addr {
	out := map[string][]netip.Addr{}
	for _, l := range locals {
		if l.Endpoint.IP.IsValid() {
			out[l.Net.ID] = append(out[l.Net.ID], l.Endpoint.IP)
		}
	}
	return out
}

// sameAddrs compares two address sets.
func sameAddrs(a, b []netip.Addr) bool {
	return bytes.Equal(packAddrs(a), packAddrs(b))
}
