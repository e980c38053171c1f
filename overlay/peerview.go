package overlay

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/dnsserver"
	"github.com/vxnet/vxnet/kvstore"
	"github.com/vxnet/vxnet/metrics"
)

// peerView is one network's peer records as this host's watch of them
// last saw them. A host watches a network only while it has endpoints on
// it, so a network costs a host without endpoints there nothing. The
// watch goroutine is the view's only writer; the reconciler reads it
// through peers and own.
type peerView struct {
	id     string
	node   string // this host: its own record is not a peer
	cancel context.CancelFunc

	mu     sync.Mutex
	synced bool
	raw    map[string][]byte      // key -> value: only a changed value is decoded
	recs   map[string]*PeerRecord // node -> valid record
	sess   map[string]string      // node -> session holding its record
	// held are records of other hosts that vanished but are still
	// programmed, until their hosts write them again or their time is up:
	// with the store's state (see holdVanished), or with their session
	// while their Consul agent may be restarting (see holdFor).
	held map[string]heldRecord
	// ownLost: this host's record vanished or changed session in a
	// snapshot (its session ended, the store lost it): the reconciler
	// writes it again at its next pass instead of its next full one.
	ownLost bool
	// claims is, by address, which other hosts' effective records hold
	// it and with which VTEP: what an address resolves to now, kept up
	// to date per changed record.
	claims map[netip.Addr]map[string]netip.Addr
	// touched are the addresses whose claims changed since the reconciler
	// last read the whole list (peersAndReset) or a delta; deltaOK is
	// false until it has read the list once, or after a change a delta
	// cannot carry (a hold that ended, a failed write).
	touched map[netip.Addr]bool
	deltaOK bool
	// index is that of the snapshot the view holds: an older one (the
	// first read of an attach racing with the watch) is not taken.
	index uint64
	// wmu makes each apply one step: the watch and an attach's first
	// read both apply snapshots.
	wmu sync.Mutex
	// pendingSince is when the first change the kernel does not hold yet
	// reached the view (for the convergence metric).
	pendingSince time.Time
	// zone is the network's names as the records say (this host's own
	// included), kept up to date per changed record for the network's
	// DNS server; it has its own lock.
	zone *dnsserver.Zone
	// ownNames is what setOwnNames last gave the zone (under the
	// agent's mu).
	ownNames []dnsserver.Entry
}

// markPending notes that a change reached the view.
func (v *peerView) markPending() {
	v.mu.Lock()
	if v.pendingSince.IsZero() {
		v.pendingSince = time.Now()
	}
	v.mu.Unlock()
}

// converged observes, once the kernel holds the view's changes, how long
// since the first of them arrived.
func (v *peerView) converged() {
	v.mu.Lock()
	t := v.pendingSince
	v.pendingSince = time.Time{}
	v.mu.Unlock()
	if !t.IsZero() {
		metrics.Since(metrics.Convergence, t)
	}
}

// heldRecord is a vanished record still in force until until.
type heldRecord struct {
	rec   *PeerRecord
	until time.Time
	// lost: held because the store may have lost its state; extended
	// while the store cannot say (see expireHolds).
	lost bool
}

// activeHeld is the held records still in force at now.
func activeHeld(held map[string]heldRecord, now time.Time) map[string]*PeerRecord {
	out := make(map[string]*PeerRecord, len(held))
	for node, h := range held {
		if now.Before(h.until) {
			out[node] = h.rec
		}
	}
	return out
}

// PeerAddr is one endpoint of another host, as the datapath needs it.
type PeerAddr struct {
	Node string
	VTEP netip.Addr
	IP   netip.Addr
}

// peers lists the endpoints of other hosts, sorted by address; ok is false
// until the watch has read the records once.
func (v *peerView) peers() (out []PeerAddr, ok bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.peersLocked()
}

// peersAndReset is peers, and the start of a new delta: what changes from
// here on is what takeDelta returns.
func (v *peerView) peersAndReset() ([]PeerAddr, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.touched, v.deltaOK = nil, v.synced
	out, ok := v.peersLocked()
	// The claims index from scratch, as the list just read says.
	v.claims = make(map[netip.Addr]map[string]netip.Addr, len(out))
	for _, p := range out {
		c := v.claims[p.IP]
		if c == nil {
			c = map[string]netip.Addr{}
			v.claims[p.IP] = c
		}
		c[p.Node] = p.VTEP
	}
	return out, ok
}

// takeDelta returns what changed since the last peersAndReset or
// takeDelta: each touched address as it resolves now, programmed (add)
// or, claimed by no other host, removed (del, by address alone); ok is
// false when only the whole list will do.
func (v *peerView) takeDelta() (add []PeerAddr, del []netip.Addr, ok bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.deltaOK {
		return nil, nil, false
	}
	for ip := range v.touched {
		if p, ok := resolve(v.claims, ip); ok {
			add = append(add, p)
		} else {
			del = append(del, ip)
		}
	}
	v.touched = nil
	return add, del, true
}

// resolve is the peer an address stands for: when several hosts claim
// it (which IPAM prevents, but records can say anything), the first by
// name, as the whole list sorts them.
func resolve(claims map[netip.Addr]map[string]netip.Addr, ip netip.Addr) (PeerAddr, bool) {
	var best PeerAddr
	for node, vtep := range claims[ip] {
		if best.Node == "" || node < best.Node {
			best = PeerAddr{Node: node, VTEP: vtep, IP: ip}
		}
	}
	return best, best.Node != ""
}

// invalidate makes the next reader take the whole list.
func (v *peerView) invalidate() {
	v.mu.Lock()
	v.deltaOK = false
	v.mu.Unlock()
}

// effective is a node's record as peers counts it: its own, or the one
// held for it.
func effective(recs, held map[string]*PeerRecord, node string) *PeerRecord {
	if r := recs[node]; r != nil {
		return r
	}
	return held[node]
}

// updateClaims moves the claims index from one state of the records to
// the next, node by changed node, and marks the addresses it touched.
// Called with mu held.
func (v *peerView) updateClaims(self string, prevRecs, prevHeld, recs, held map[string]*PeerRecord) {
	if v.claims == nil {
		v.claims = map[netip.Addr]map[string]netip.Addr{}
	}
	touch := func(ip netip.Addr) {
		if v.touched == nil {
			v.touched = map[netip.Addr]bool{}
		}
		v.touched[ip] = true
	}
	nodes := map[string]bool{}
	for _, m := range []map[string]*PeerRecord{prevRecs, prevHeld, recs, held} {
		for n := range m {
			nodes[n] = true
		}
	}
	for node := range nodes {
		if node == self {
			continue
		}
		before, after := effective(prevRecs, prevHeld, node), effective(recs, held, node)
		if before == after {
			continue // the same decoded record: unchanged
		}
		if before != nil {
			for _, ip := range before.Addrs() {
				if c := v.claims[ip]; c != nil {
					delete(c, node)
					if len(c) == 0 {
						delete(v.claims, ip)
					}
				}
				touch(ip)
			}
		}
		if after != nil {
			for _, ip := range after.Addrs() {
				c := v.claims[ip]
				if c == nil {
					c = map[string]netip.Addr{}
					v.claims[ip] = c
				}
				c[node] = after.VTEP
				touch(ip)
			}
		}
	}
}

func (v *peerView) peersLocked() (out []PeerAddr, ok bool) {
	add := func(r *PeerRecord) {
		for _, ip := range r.Addrs() {
			out = append(out, PeerAddr{Node: r.Node, VTEP: r.VTEP, IP: ip})
		}
	}
	for node, r := range v.recs {
		if node != v.node {
			add(r)
		}
	}
	for node, r := range activeHeld(v.held, time.Now()) {
		if v.recs[node] == nil {
			add(r)
		}
	}
	slices.SortFunc(out, func(a, b PeerAddr) int {
		if c := a.IP.Compare(b.IP); c != 0 {
			return c
		}
		return strings.Compare(a.Node, b.Node)
	})
	return out, v.synced
}

// own is this host's record as the store holds it, and the session
// holding it ("" when none); nil when absent.
func (v *peerView) own() (*PeerRecord, string, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.recs[v.node], v.sess[v.node], v.synced
}

// watchPeers feeds one network's peer records into its view until ctx is
// done.
func (a *Agent) watchPeers(ctx context.Context, v *peerView) {
	for ev := range a.store.Watch(ctx, peersOf(v.id)) {
		if ev.Err != nil {
			a.setStoreErr(ev.Err)
			continue
		}
		a.setStoreErr(nil)
		if a.applyPeers(ctx, v, ev.Pairs, ev.Index, ev.Reset) {
			v.markPending()
			a.markDirty(v.id)
		}
	}
}

// applyPeers takes a snapshot of the network's records into its view and
// reports whether anything changed. Only records whose value changed are
// decoded; a record of another host that vanished is held when the store
// lost its state (see hold).
func (a *Agent) applyPeers(ctx context.Context, v *peerView, pairs []*kvstore.KV, index uint64, reset bool) bool {
	v.wmu.Lock()
	defer v.wmu.Unlock()
	v.mu.Lock()
	if v.synced && index != 0 && index < v.index && !reset {
		v.mu.Unlock()
		return false // older than what the view holds
	}
	prevRaw, prevRecs, prevSess := v.raw, v.recs, v.sess
	held := v.held
	wasSynced := v.synced
	v.mu.Unlock()

	raw := make(map[string][]byte, len(pairs))
	recs := make(map[string]*PeerRecord, len(pairs))
	sess := make(map[string]string, len(pairs))
	changed := !wasSynced
	for _, kv := range pairs {
		raw[kv.Key] = kv.Value
		node := kv.Key[strings.LastIndexByte(kv.Key, '/')+1:]
		if old, ok := prevRaw[kv.Key]; ok && bytes.Equal(old, kv.Value) {
			if r := prevRecs[node]; r != nil {
				recs[node] = r
			}
		} else {
			changed = true
			var r PeerRecord
			err := decodeRecord(kv.Key, kv.Value, &r)
			if err == nil && r.Node != node {
				err = fmt.Errorf("record of node %q filed under %q", r.Node, node)
			}
			switch {
			case err == nil:
				recs[node] = &r
			case prevRecs[node] != nil:
				// An unreadable value says nothing about the host's
				// endpoints: the last good record stays in force.
				a.log.Warn("bad peer record; keeping the host's last good one", "err", err)
				recs[node] = prevRecs[node]
			default:
				a.log.Warn("skipping bad peer record", "err", err)
			}
		}
		sess[node] = kv.Session
		if prevSess[node] != kv.Session {
			changed = true
		}
	}
	if len(prevRaw) != len(raw) {
		changed = true
	}
	// Records that vanished: held while the store is known to have lost
	// its state, or for a moment when they went with their host's
	// session while it runs through a Consul agent; dropped otherwise (a
	// detach of the last endpoint, a host's TTL running out).
	now := time.Now()
	newHeld := map[string]heldRecord{}
	for node, h := range held {
		if recs[node] == nil && now.Before(h.until) {
			newHeld[node] = h
		}
	}
	var vanished []string
	for node := range prevRecs {
		if _, isHeld := newHeld[node]; node != a.cfg.Node && recs[node] == nil && !isHeld {
			vanished = append(vanished, node)
		}
	}
	var newHolds []heldRecord
	if len(vanished) > 0 {
		if a.holdVanished(ctx, len(vanished), reset) {
			for _, node := range vanished {
				a.events.emit(api.Event{Kind: "node_down", Network: a.networkName(v.id), Node: node, Detail: "its records vanished with the store's state; entries kept until it writes them again"})
				h := heldRecord{rec: prevRecs[node], until: now.Add(a.holdTime()), lost: true}
				newHeld[node] = h
				newHolds = append(newHolds, h)
			}
		} else {
			holds := a.holdsFor(ctx, vanished, prevSess)
			for i, node := range vanished {
				d, why := holds[i].d, holds[i].why
				detail := why
				if d > 0 {
					detail += fmt.Sprintf("; entries kept up to %s", d)
				}
				if why != removedByHost {
					a.events.emit(api.Event{Kind: "node_down", Network: a.networkName(v.id), Node: node, Detail: detail})
				}
				if d <= 0 {
					continue
				}
				a.log.Info("a host's records went with its session; keeping its entries until it writes them again",
					"node", node, "why", why, "at_most", d)
				h := heldRecord{rec: prevRecs[node], until: now.Add(d)}
				newHeld[node] = h
				newHolds = append(newHolds, h)
			}
		}
	}
	if wasSynced {
		for node := range recs {
			if _, wasHeld := held[node]; node != a.cfg.Node && prevRecs[node] == nil && !wasHeld {
				a.events.emit(api.Event{Kind: "node_up", Network: a.networkName(v.id), Node: node})
			}
		}
	}
	v.mu.Lock()
	if prevRecs[a.cfg.Node] != nil && (recs[a.cfg.Node] == nil || sess[a.cfg.Node] != prevSess[a.cfg.Node]) {
		v.ownLost, changed = true, true
		a.kickRenew() // its session may have ended: a new one, sooner than the next renewal
	}
	v.updateClaims(a.cfg.Node, prevRecs, activeHeld(held, now), recs, activeHeld(newHeld, now))
	v.syncZone(prevRecs, activeHeld(held, now), recs, activeHeld(newHeld, now))
	if index > v.index || reset {
		v.index = index
	}
	// When a hold ends, what it kept must go, which no snapshot will
	// say: one timer for the holds begun together.
	ends := map[time.Time]bool{}
	for _, h := range newHolds {
		if !ends[h.until] {
			ends[h.until] = true
			time.AfterFunc(time.Until(h.until)+10*time.Millisecond, func() { a.expireHolds(v, h.lost) })
		}
	}
	v.raw, v.recs, v.sess, v.synced = raw, recs, sess, true
	v.held = newHeld
	v.mu.Unlock()
	return changed
}

// expireHolds runs when holds of the view end: the reconciler then takes
// the whole list, without what they kept. Holds of a store that may have
// lost its state are extended instead while its identity cannot be read:
// time alone must not decide that those hosts left.
func (a *Agent) expireHolds(v *peerView, lost bool) {
	if a.life.Err() != nil {
		return // the agent stopped
	}
	if lost {
		if _, err := a.checkIdentity(a.life); err != nil {
			v.wmu.Lock()
			v.mu.Lock()
			until := time.Now().Add(a.holdTime())
			for node, h := range v.held {
				if h.lost {
					h.until = until
					v.held[node] = h
				}
			}
			v.mu.Unlock()
			v.wmu.Unlock()
			time.AfterFunc(a.holdTime(), func() { a.expireHolds(v, true) })
			return
		}
	}
	v.mu.Lock()
	v.deltaOK = false
	v.claims = nil
	v.rebuildZoneLocked()
	v.mu.Unlock()
	a.markDirty(v.id)
}

// syncZone moves the names from one state of the records to the next,
// node by changed node. Called with mu held.
func (v *peerView) syncZone(prevRecs, prevHeld, recs, held map[string]*PeerRecord) {
	if v.zone == nil {
		return
	}
	nodes := map[string]bool{}
	for _, m := range []map[string]*PeerRecord{prevRecs, prevHeld, recs, held} {
		for n := range m {
			nodes[n] = true
		}
	}
	for node := range nodes {
		if node == v.node {
			continue // this host's names come from its own records (setOwnNames)
		}
		before, after := effective(prevRecs, prevHeld, node), effective(recs, held, node)
		switch {
		case before == after:
		case after == nil:
			v.zone.SetNode(node, nil)
		default:
			v.zone.SetNode(node, after.Entries())
		}
	}
	v.zone.SetComplete()
}

// rebuildZoneLocked makes the names again from the records in force (a
// hold that ended leaves no snapshot to say so). Called with mu held.
func (v *peerView) rebuildZoneLocked() {
	if v.zone == nil {
		return
	}
	all := map[string][]dnsserver.Entry{}
	for node, r := range activeHeld(v.held, time.Now()) {
		all[node] = r.Entries()
	}
	for node, r := range v.recs {
		all[node] = r.Entries()
	}
	all[v.node] = v.zone.Node(v.node)
	v.zone.Reset(all)
}

// takeOwnLost reports, once, that this host's record was lost.
func (v *peerView) takeOwnLost() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	lost := v.ownLost
	v.ownLost = false
	return lost
}

// holdLookups bounds the hosts whose fate the agent asks the store about
// at once, over all networks' watches (Agent.holdSem).
const holdLookups = 16

type hold struct {
	d   time.Duration
	why string
}

// holdsFor is holdFor for each of nodes (by index), asked at once: up to
// three store requests per host, which one after another would hold up
// this network's view by hundreds of round trips when a rack goes down.
func (a *Agent) holdsFor(ctx context.Context, nodes []string, sess map[string]string) []hold {
	out := make([]hold, len(nodes))
	var wg sync.WaitGroup
	for i, node := range nodes {
		a.holdSem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-a.holdSem; wg.Done() }()
			out[i].d, out[i].why = a.holdFor(ctx, node, sess[node])
		}()
	}
	wg.Wait()
	return out
}

// holdVanished decides whether records that vanished are held. Records
// leave for good reasons (a detach, their host's session expiring) and
// for bad ones (the store lost its state); only the store's identity
// tells which, so it is read when something vanished: one request per
// removal event, nothing per attach. A snapshot whose index went
// backwards (reset) may be an older one restored, which keeps the
// identity: what vanished with it is held too.
func (a *Agent) holdVanished(ctx context.Context, n int, reset bool) bool {
	if reset {
		a.log.Warn("the store's index went backwards (restarted or restored from an older snapshot); keeping the entries of vanished hosts until they write them again",
			"hosts", n, "hold", a.holdTime())
		return true
	}
	lost, err := a.checkIdentity(ctx)
	switch {
	case err != nil:
		// The store answered the watch but not this: it cannot say
		// whether these left on purpose. Keep them until it can.
		a.log.Warn("cannot read the store's identity; keeping the entries of vanished hosts for now", "hosts", n, "err", err)
		return true
	case lost:
		a.storeLost("its identity changed or vanished")
		return true
	}
	return a.lostRecently()
}

// markDirty queues a network for the next light pass.
func (a *Agent) markDirty(netID string) {
	a.dmu.Lock()
	if a.dirty == nil {
		a.dirty = map[string]bool{}
	}
	a.dirty[netID] = true
	a.dmu.Unlock()
	a.trigger()
}

// takeDirty returns the networks changed since the last call.
func (a *Agent) takeDirty() map[string]bool {
	a.dmu.Lock()
	defer a.dmu.Unlock()
	d := a.dirty
	a.dirty = nil
	return d
}

// ensureViews starts a watch for every network with local endpoints and
// stops those of networks without any: called with mu held. A view
// started here is unsynced until its first snapshot; the attach that
// needs it sooner reads the records itself (primeView).
func (a *Agent) ensureViews(ctx context.Context) {
	want := map[string]bool{}
	for _, l := range a.locals {
		want[l.Net.ID] = true
	}
	for id := range want {
		if a.views[id] == nil {
			a.startView(ctx, id)
		}
	}
	for id, v := range a.views {
		if !want[id] {
			v.cancel()
			delete(a.views, id)
		}
	}
}

func (a *Agent) startView(ctx context.Context, id string) *peerView {
	vctx, cancel := context.WithCancel(ctx)
	v := &peerView{id: id, node: a.cfg.Node, cancel: cancel, zone: dnsserver.NewZone()}
	a.views[id] = v
	go a.watchPeers(vctx, v)
	return v
}

// primeView reads a network's records once if its watch has not yet, so
// that the first attach of a network on this host programs the peers
// known now rather than at the watch's first answer.
func (a *Agent) primeView(ctx context.Context, v *peerView) {
	if _, _, synced := v.own(); synced {
		return
	}
	pairs, index, err := a.store.List(ctx, peersOf(v.id))
	if err != nil {
		return
	}
	a.applyPeers(ctx, v, pairs, index, false)
}
