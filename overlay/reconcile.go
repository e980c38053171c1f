package overlay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/ipam"
	"github.com/vxnet/vxnet/kvstore"
	"github.com/vxnet/vxnet/metrics"
	"github.com/vxnet/vxnet/vtep"
)

// reconcile makes the kernel match the desired state. Without a complete
// view of the store it only ensures what the local records describe and
// removes nothing that the store might still want: an outage must never
// cost a running container its connectivity.
//
// Passes triggered by store events are light: they program the peers of
// networks whose peer set changed and drop namespaces nobody needs, which
// is all a remote change can require. Full passes (at start and every
// resync interval) also check every device, interface, rule and address
// against the desired state, to repair drift and remove leaks.
func (a *Agent) reconcile(ctx context.Context, full bool) {
	start := time.Now()
	kind := "light"
	if full {
		kind = "full"
	}
	defer func() { metrics.Since(metrics.ReconcileDuration.WithLabelValues(kind), start) }()
	synced := a.synced()
	storeUp := !a.storeDown()
	interrupted := a.reconcileKernel(ctx, full, synced && storeUp)
	kernelDone := time.Now()
	if ctx.Err() != nil {
		return // cut short: not a complete pass
	}
	if synced && storeUp {
		// The store phase holds no kernel lock: attaches and detaches of
		// other networks go on meanwhile. Bounded as a whole, so that a
		// store that stopped answering (frozen, partitioned) costs one
		// timeout, not one per record.
		sctx, cancel := context.WithTimeout(ctx, storePhaseTimeout)
		a.finishInterrupted(sctx, interrupted)
		a.reconcileStore(sctx, full)
		if sctx.Err() != nil && ctx.Err() == nil {
			// Passes skip the store until it answers a watch or a
			// renewal again.
			a.setStoreErr(fmt.Errorf("a pass's store work did not finish within %s: %w", storePhaseTimeout, kvstore.ErrUnavailable))
		}
		cancel()
	}
	if ctx.Err() != nil {
		return
	}
	a.log.Debug("pass done", "kind", kind, "synced", synced, "kernel", kernelDone.Sub(start).Round(time.Microsecond),
		"store", time.Since(kernelDone).Round(time.Microsecond))
	a.cmu.Lock()
	a.lastReconcile = time.Now()
	// Ready means a full pass with the store's view has run: the light
	// ones while the first waits for its peers (see Run) do not count.
	a.ready = a.ready || (synced && full)
	a.cmu.Unlock()
}

// reconcileKernel is a pass's kernel phase, under mu. It returns the
// interrupted operations whose kernel half it undid, for the store phase.
func (a *Agent) reconcileKernel(ctx context.Context, full, withStore bool) []*localEndpoint {
	a.mu.Lock()
	defer a.unlock()
	interrupted := a.undoInterruptedKernel(ctx)
	a.ensureViews(a.life)
	// A light pass works on the networks whose peers changed; a full one
	// on every network, against the kernel.
	var only map[string]bool
	if dirty := a.takeDirty(); !full {
		only = dirty
		if only == nil {
			only = map[string]bool{}
		}
	}

	if full {
		if stray, err := a.dp.RemoveStrays(ctx); err != nil {
			a.log.Warn("remove stray vxlan devices", "err", err)
		} else if len(stray) > 0 {
			a.log.Warn("removed vxlan devices left in the host namespace by a crash", "devices", stray)
			a.leakRemoved("vxlan_device", "", fmt.Sprint(stray), len(stray))
		}
	}
	if only != nil {
		// Networks whose view can say what changed take only that;
		// the others (a view not read in full yet, a failed write)
		// take the whole list below.
		for id := range only {
			if a.applyDelta(ctx, id) {
				delete(only, id)
			}
		}
	}
	peers, viewsSynced := a.viewPeers(only)
	plans := desiredState(peers, a.locals, a.localMTU(), only)
	// Peers first, the check of every endpoint after: on a host with many
	// endpoints the checks are most of a full pass, and the entries (what
	// a host that lost its tables needs first) land before them, not a
	// whole pass later.
	var usable []*netPlan
	for _, p := range plans {
		if ctx.Err() != nil {
			return nil
		}
		if full && a.ensureNetwork(ctx, p) {
			usable = append(usable, p)
		}
		if viewsSynced[p.Net.ID] {
			a.syncPeers(ctx, p, full)
		}
	}
	if full {
		for _, p := range usable {
			if ctx.Err() != nil {
				return nil
			}
			a.ensureEndpoints(ctx, p, withStore)
		}
		a.reconcileEgress(ctx)
	}
	if have, err := a.dp.Networks(); err != nil {
		a.log.Warn("list network namespaces", "err", err)
	} else {
		// A namespace stays while any local record needs it, including
		// an attach under way that has not published yet.
		keep := map[string]bool{}
		for _, l := range a.locals {
			keep[l.Net.NamespaceName()] = true
		}
		for _, ns := range have {
			if !keep[ns] && len(a.journalGaps) == 0 {
				a.log.Info("removing network namespace with no local endpoints", "namespace", ns)
				a.leakRemoved("namespace", "", ns, 1)
				if err := a.removeNetworkNS(ctx, ns); err != nil {
					a.log.Warn("remove network namespace", "namespace", ns, "err", err)
				}
			}
		}
	}
	return interrupted
}

// journalGap reports whether this host's journal of a network could not
// be read in full.
func (a *Agent) journalGap(network string) bool { return a.journalGaps[""] || a.journalGaps[network] }

// storePhaseTimeout bounds the store work of one reconcile pass; what is
// left is done by the next.
const storePhaseTimeout = 3 * time.Second

// viewPeers reads the peer views of the networks in only (all when nil):
// their peers, and whether each view has read its records yet.
func (a *Agent) viewPeers(only map[string]bool) (map[string][]PeerAddr, map[string]bool) {
	peers, synced := map[string][]PeerAddr{}, map[string]bool{}
	for id, v := range a.views {
		if only != nil && !only[id] {
			continue
		}
		peers[id], synced[id] = v.peersAndReset()
	}
	return peers, synced
}

// syncNetwork programs one network's peers from its view; called with mu
// held, by an attach.
func (a *Agent) syncNetwork(ctx context.Context, netID string) {
	if a.applyDelta(ctx, netID) {
		return // not the whole list of a large network on every attach
	}
	only := map[string]bool{netID: true}
	peers, synced := a.viewPeers(only)
	for _, p := range desiredState(peers, a.locals, a.localMTU(), only) {
		if synced[netID] {
			a.syncPeers(ctx, p, false)
		}
	}
}

// applyDelta programs what changed in one network's peers since its view
// was last read, if the view can say and what this host programmed last
// is known; it reports whether it did. This is the event path: its work
// is the change's, not the network's.
func (a *Agent) applyDelta(ctx context.Context, netID string) bool {
	v := a.views[netID]
	var net *Network
	local := map[netip.Addr]bool{}
	for _, l := range a.locals {
		if l.Net.ID == netID && l.Phase == phaseAttached {
			net = &l.Net
			local[l.Endpoint.IP] = true
		}
	}
	if v == nil || net == nil || !a.identityChecked.Load() || a.lostRecently() {
		return false
	}
	ns := net.NamespaceName()
	applied, known := a.applied[ns]
	if !known {
		return false
	}
	add, del, ok := v.takeDelta()
	if !ok {
		return false
	}
	var addP, delP []vtep.Peer
	var addNodes []string // by addP's index
	for _, ip := range del {
		if cur, ok := applied[ip]; ok {
			delP = append(delP, cur) // as programmed: its VTEP is the FDB entry's
		}
	}
	for _, p := range add {
		if err := peerError(net, p.IP, local); err != nil {
			a.log.Warn("skipping a peer address", "network", net.Name, "node", p.Node, "err", err)
			if cur, ok := applied[p.IP]; ok {
				delP = append(delP, cur)
			}
			continue
		}
		if cur, ok := applied[p.IP]; ok && cur.VTEP == p.VTEP {
			continue // programmed as it is
		}
		addP = append(addP, vtep.Peer{IP: p.IP, MAC: ipam.MACFromIP(p.IP), VTEP: p.VTEP})
		addNodes = append(addNodes, p.Node)
	}
	if len(addP)+len(delP) == 0 {
		v.converged()
		return true
	}
	added, removed, err := a.dp.ChangePeers(ctx, ns, addP, delP)
	if err != nil {
		a.log.Warn("program peers", "network", net.Name, "err", err)
		delete(a.applied, ns)
		v.invalidate()
		return false
	}
	for _, p := range delP {
		delete(applied, p.IP)
		a.events.emit(api.Event{Kind: "peer_removed", Network: net.Name, IP: p.IP.String(), Detail: "vtep " + p.VTEP.String()})
	}
	for i, p := range addP {
		applied[p.IP] = p
		a.events.emit(api.Event{Kind: "peer_added", Network: net.Name, Node: addNodes[i], IP: p.IP.String(), Detail: "vtep " + p.VTEP.String()})
	}
	metrics.Peers.WithLabelValues(net.Name).Set(float64(len(applied)))
	v.converged()
	a.log.Debug("peers changed", "network", net.Name, "added", added, "removed", removed, "peers", len(applied))
	return true
}

// peerSet is what this host programmed of a network's peers, by address.
type peerSet map[netip.Addr]vtep.Peer

func newPeerSet(peers []vtep.Peer) peerSet {
	s := make(peerSet, len(peers))
	for _, p := range peers {
		if _, dup := s[p.IP]; !dup { // the first wins, as in the kernel
			s[p.IP] = p
		}
	}
	return s
}

// same reports whether the set holds exactly these peers.
func (s peerSet) same(peers []vtep.Peer) bool {
	return samePeers(s.list(), peers)
}

// list is the set sorted by address, as desiredState sorts peers.
func (s peerSet) list() []vtep.Peer {
	out := make([]vtep.Peer, 0, len(s))
	for _, p := range s {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b vtep.Peer) int { return a.IP.Compare(b.IP) })
	return out
}

// syncPeers programs a network's peers. Passes driven by store events
// write only what changed since the last sync; full passes compare with
// the kernel's tables, and what they must fix there is drift: someone else
// changed our entries. While the store may have lost its state (or before
// this agent could tell), entries are only added: what vanished may be on
// its way back.
func (a *Agent) syncPeers(ctx context.Context, p *netPlan, full bool) {
	prev, known := a.applied[p.Spec.Name]
	same := known && prev.same(p.Peers)
	if same && !full {
		return
	}
	var added, removed int
	var err error
	switch {
	case !a.identityChecked.Load() || a.lostRecently():
		added, removed, err = a.dp.UpdatePeers(ctx, p.Spec.Name, nil, p.Peers)
		if err == nil {
			a.log.Debug("peers added, none removed, until the store is known to be the one it was", "network", p.Net.Name, "peers", len(p.Peers))
		}
		delete(a.applied, p.Spec.Name) // the kernel may hold more: read it next time
		if err != nil {
			a.log.Warn("program peers", "network", p.Net.Name, "err", err)
		}
		return
	case full || !known:
		added, removed, err = a.dp.SyncPeers(ctx, p.Spec.Name, p.Peers)
	default:
		added, removed, err = a.dp.UpdatePeers(ctx, p.Spec.Name, prev.list(), p.Peers)
	}
	if err != nil {
		a.log.Warn("program peers", "network", p.Net.Name, "err", err)
		delete(a.applied, p.Spec.Name)
		return
	}
	now := newPeerSet(p.Peers)
	a.applied[p.Spec.Name] = now
	metrics.Peers.WithLabelValues(p.Net.Name).Set(float64(len(p.Peers)))
	switch {
	case known && !full:
		a.peerEvents(p.Net.Name, prev, now)
	case added+removed > 0:
		a.events.emit(api.Event{Kind: "peers_synced", Network: p.Net.Name, Detail: fmt.Sprintf("%d written, %d removed, %d peers", added, removed, len(p.Peers))})
	}
	if v := a.views[p.Net.ID]; v != nil {
		v.converged()
	}
	switch {
	case added+removed == 0:
	case full && same:
		a.repaired("peer_entries", p.Net.Name, fmt.Sprintf("%d rewritten, %d removed", added, removed), added+removed)
		a.log.Warn("peer entries repaired: the kernel's tables differed from what was programmed",
			"network", p.Net.Name, "rewritten", added, "removed", removed, "peers", len(p.Peers))
	default:
		a.log.Info("peers programmed", "network", p.Net.Name, "added", added, "removed", removed, "peers", len(p.Peers))
	}
}

// ensureNetwork creates or repairs the network's namespace, bridge and
// VTEP, and its DNS server; it reports whether the namespace is usable.
func (a *Agent) ensureNetwork(ctx context.Context, p *netPlan) bool {
	changes, err := a.dp.EnsureNetwork(ctx, p.Spec)
	if len(changes) > 0 {
		a.log.Warn("network datapath repaired", "network", p.Net.Name, "changes", changes)
		a.repaired("network_datapath", p.Net.Name, strings.Join(changes, "; "), 1)
		delete(a.applied, p.Spec.Name) // a rebuilt VTEP has no entries
	}
	if err != nil {
		a.log.Error("ensure network", "network", p.Net.Name, "err", err)
		return false
	}
	a.ensureDNS(&p.Net)
	return true
}

// ensureEndpoints repairs the network's local endpoints, and removes
// interfaces that belong to no local endpoint.
func (a *Agent) ensureEndpoints(ctx context.Context, p *netPlan, synced bool) {
	want := map[string]bool{}
	for _, l := range a.locals {
		if l.Net.NamespaceName() == p.Spec.Name {
			want[l.Endpoint.HostVeth()] = true // any phase: an attach may be under way
		}
	}
	removeGone := func(l *localEndpoint, why string) {
		// The kernel half now; the store half by the next pass's
		// bounded store phase (finishInterrupted), not here under mu
		// with no bound.
		a.log.Info(why+"; removing its endpoint", "network", l.Endpoint.Network, "endpoint", l.Endpoint.Name, "netns", l.Netns)
		if err := a.purgeKernel(ctx, l); err != nil {
			a.log.Warn("remove endpoint of a gone container", "endpoint", l.Endpoint.Name, "err", err)
		} else if err := a.state.save(l); err != nil {
			a.log.Warn("journal the removal of a gone container's endpoint", "endpoint", l.Endpoint.Name, "err", err)
		}
		a.trigger()
	}
	var check []*localEndpoint
	var specs []vtep.EndpointSpec
	for _, l := range p.Locals {
		if l.pending() && abandonedHandoff(l, time.Now()) {
			if synced {
				removeGone(l, "no container took a handed-off interface")
			}
			continue
		}
		if l.pending() && l.Netns != "" {
			a.startBindLocked(l.key()) // after a restart, or a long wait
		}
		check, specs = append(check, l), append(specs, a.endpointSpec(l))
	}
	for i, res := range a.dp.CheckEndpoints(ctx, p.Spec.Name, specs) {
		l, spec, changes, err := check[i], specs[i], res.Changes, res.Err
		switch {
		case errors.Is(err, vtep.ErrEndpointGone) && !l.pending() && !localExists(l):
			if !synced {
				continue // removing it needs the store; later
			}
			removeGone(l, "container namespace is gone")
		case errors.Is(err, vtep.ErrEndpointGone):
			if _, err := a.dp.AddEndpoint(ctx, spec); err != nil {
				a.log.Error("recreate endpoint interface", "endpoint", l.Endpoint.Name, "err", err)
			} else {
				a.log.Warn("endpoint interface was missing; recreated", "network", l.Endpoint.Network, "endpoint", l.Endpoint.Name)
				a.repaired("endpoint_interface", l.Endpoint.Network, l.Endpoint.Name+": recreated", 1)
			}
		case err != nil:
			a.log.Error("check endpoint", "endpoint", l.Endpoint.Name, "err", err)
		case len(changes) > 0:
			a.log.Warn("endpoint interface repaired", "endpoint", l.Endpoint.Name, "changes", changes)
			a.repaired("endpoint_interface", l.Endpoint.Network, l.Endpoint.Name+": "+strings.Join(changes, "; "), 1)
		}
	}
	have, err := a.dp.Endpoints(ctx, p.Spec.Name)
	if err != nil {
		a.log.Warn("list endpoint interfaces", "network", p.Net.Name, "err", err)
		return
	}
	for _, veth := range have {
		if !want[veth] && !a.journalGap(p.Net.Name) {
			a.log.Warn("removing interface of no endpoint", "network", p.Net.Name, "interface", veth)
			a.leakRemoved("interface", p.Net.Name, veth, 1)
			if err := a.dp.RemoveEndpoint(ctx, p.Spec.Name, veth); err != nil {
				a.log.Warn("remove leaked interface", "interface", veth, "err", err)
			}
		}
	}
}

// undoInterruptedKernel undoes the kernel half of attaches and detaches
// that a crash or a store outage cut short (a container must not keep the
// interfaces of an attach that failed) and returns them: their record and
// address wait for the store phase (finishInterrupted).
func (a *Agent) undoInterruptedKernel(ctx context.Context) []*localEndpoint {
	var out []*localEndpoint
	for _, l := range a.locals {
		if !a.interruptedLocked(l) {
			continue
		}
		if err := a.purgeKernel(ctx, l); err != nil {
			a.log.Warn("remove interfaces of an interrupted operation", "endpoint", l.Endpoint.Name, "err", err)
			continue
		}
		out = append(out, l)
	}
	return out
}

// finishInterrupted is the store half of undoInterruptedKernel's
// operations, without mu: their records, addresses and journal entries.
func (a *Agent) finishInterrupted(ctx context.Context, ls []*localEndpoint) {
	for _, l := range ls {
		if ctx.Err() != nil {
			return
		}
		release, ok := a.ops.exclusive(l.Endpoint.Network)
		if !ok {
			continue // an attach of the network may be retrying it: next pass
		}
		a.mu.Lock()
		still := a.locals[l.key()] == l && a.interruptedLocked(l)
		a.unlock()
		if still {
			a.log.Warn("cleaning up an interrupted operation", "phase", l.Phase, "network", l.Endpoint.Network, "endpoint", l.Endpoint.Name)
			if err := a.purgeStore(ctx, l, true); err != nil {
				a.log.Warn("clean up interrupted operation", "endpoint", l.Endpoint.Name, "err", err)
			} else {
				a.mu.Lock()
				a.dropIdleNetwork(ctx, &l.Net)
				a.unlock()
			}
		}
		release()
	}
}

// reconcileStore makes the store agree with this host: its networks are
// there (a lost record is restored, a removed one's endpoints go), its
// peer record of each network holds exactly its attached endpoints under
// its session (a lost one, and the endpoint records with it, restored),
// and on full passes addresses held in its name by no endpoint of those
// networks are released. Its own peer record, in the view it watches
// anyway, tells whether anything needs doing: a pass in which nothing
// changed makes no request.
func (a *Agent) reconcileStore(ctx context.Context, full bool) {
	session := a.currentSession()
	a.cmu.RLock()
	networks := maps.Clone(a.networks)
	a.cmu.RUnlock()
	a.mu.Lock()
	names := map[string]bool{}
	for _, l := range a.locals {
		names[l.Endpoint.Network] = true
	}
	a.unlock()
	// A new session (the old one ended: a local Consul agent restarted,
	// the host was cut off): every record goes back under it now.
	forced := session != "" && a.republishAll.Swap(false)
	for name := range names {
		if ctx.Err() != nil {
			a.republishAll.Store(a.republishAll.Load() || forced)
			return
		}
		release, ok := a.ops.exclusive(name)
		if !ok {
			// An attach or detach of it is writing its records: next pass.
			a.republishAll.Store(a.republishAll.Load() || forced)
			continue
		}
		a.reconcileNetworkStore(ctx, name, networks[name], full, forced, session)
		release()
	}
	if ctx.Err() != nil {
		a.republishAll.Store(a.republishAll.Load() || forced) // cut short in the last one
		return
	}
	if full {
		a.resv.sweep(ctx, a)
	}
}

// networkStoreWork is what one network's store repair reads of the local
// state, copied under mu: while the repair holds the network's lock, no
// attach or detach changes it.
type networkStoreWork struct {
	byNet map[string][]*localEndpoint // attached endpoints, by network id
	views map[string]*peerView
	names map[string]map[string]bool // every local endpoint's name, by network id
}

func (a *Agent) networkStoreWork(name string) networkStoreWork {
	a.mu.Lock()
	defer a.unlock()
	w := networkStoreWork{byNet: map[string][]*localEndpoint{}, views: map[string]*peerView{}, names: map[string]map[string]bool{}}
	for _, l := range a.locals {
		if l.Endpoint.Network != name {
			continue
		}
		id := l.Net.ID
		if w.names[id] == nil {
			w.names[id] = map[string]bool{}
		}
		w.names[id][l.Endpoint.Name] = true
		if l.Phase == phaseAttached {
			w.byNet[id] = append(w.byNet[id], l)
			w.views[id] = a.views[id]
		}
	}
	return w
}

// reconcileNetworkStore is reconcileStore for the networks of one name
// (one, unless it was replaced), holding its lock and not mu.
func (a *Agent) reconcileNetworkStore(ctx context.Context, name string, cur *Network, full, forced bool, session string) {
	w := a.networkStoreWork(name)
	for id, ls := range w.byNet {
		if ctx.Err() != nil {
			return
		}
		n := &ls[0].Net
		if cur == nil || cur.ID != id {
			switch a.fateOf(ctx, n) {
			case fateRemoved:
				// network rm went through while this host was cut off
				// (its endpoints had expired): that is intent.
				for _, l := range ls {
					a.log.Warn("removing an endpoint whose network was removed while this host was away", "endpoint", l.key())
					a.mu.Lock()
					err := a.purgeKernel(ctx, l)
					a.unlock()
					if err == nil {
						err = a.purgeStore(ctx, l, true)
					}
					if err != nil {
						a.log.Warn("remove endpoint of a removed network", "endpoint", l.key(), "err", err)
					}
				}
				a.mu.Lock()
				a.dropIdleNetwork(ctx, n)
				a.unlock()
				continue
			case fateReplaced, fateUnknown:
				continue // not publishable now; the datapath stays
			}
		}
		// This host's record is checked on full passes and when its
		// view saw it lost; not at every event, where the view may not
		// show this host's own latest write yet.
		// Never without a session: records written without one would
		// outlive the host. The session keeper asks for this pass again
		// once it has one.
		if v := w.views[id]; v != nil && session != "" {
			// Lost (its record vanished, or a repair failed) or a new
			// session: every record is checked; on full passes the peer
			// record decides.
			lost := v.takeOwnLost() || forced
			if lost || full && !a.commits.recentlyWrote(id, time.Second) {
				a.ensurePublished(ctx, v, ls, session, lost)
			}
		}
		if !full || a.journalGap(n.Name) {
			continue
		}
		addrs, err := a.ipam.Addrs(ctx, id)
		if err != nil {
			a.log.Warn("list addresses", "network", n.Name, "err", err)
			continue
		}
		for ip, o := range addrs {
			if o.Node != a.cfg.Node || w.names[id][o.Endpoint] || !staleReservation(o, time.Now()) {
				continue
			}
			if err := a.ipam.ReleaseAddr(ctx, id, ip, o); err == nil {
				a.log.Warn("released an address held by no endpoint", "network", n.Name, "ip", ip, "endpoint", o.Endpoint)
				a.leakRemoved("address", n.Name, ip.String(), 1)
			}
		}
	}
}

// ensurePublished checks this host's peer record of a network against its
// attached endpoints there and, if the store's differs (absent, other
// addresses, another session), puts their endpoint records back where
// they are missing and then writes the peer record. After a new session
// (all) the endpoint records are checked whatever the peer record says:
// an attach or detach since may have written that one under the new
// session already. What fails is tried again at the next pass.
func (a *Agent) ensurePublished(ctx context.Context, v *peerView, ls []*localEndpoint, session string, all bool) {
	netID := ls[0].Net.ID
	retry := func() {
		v.mu.Lock()
		v.ownLost = true
		v.mu.Unlock()
	}
	own, ownSession, synced := v.own()
	if !synced {
		return
	}
	want := make([]netip.Addr, 0, len(ls))
	for _, l := range ls {
		want = append(want, l.Endpoint.IP)
	}
	current := own != nil && bytes.Equal(own.IPs, packAddrs(want)) && own.VTEP == a.cfg.Advertise && (session == "" || ownSession == session) &&
		slices.Equal(own.Names, a.ownRecord(netID, want).Names) // names too: a record of an older agent has none
	if current && !all {
		return
	}
	republished, failed := 0, false
	for _, l := range ls {
		switch err := a.ensureEndpointRecord(ctx, l, session); {
		case errors.Is(err, errRepublished):
			republished++
		case err != nil:
			a.log.Warn("republish endpoint", "endpoint", l.key(), "err", err)
			failed = true
			if ctx.Err() != nil {
				retry()
				return
			}
		}
	}
	if failed {
		retry()
	}
	if current {
		return
	}
	if err := a.commit(ctx, &commitReq{netID: netID, set: want, setOK: true}); err != nil {
		a.log.Warn("write this host's peer record", "network", ls[0].Net.Name, "err", err)
		retry() // at the next pass, not the next full one
		return
	}
	switch {
	case own == nil:
		a.log.Error("this host's peer record was missing from the store; republished from its journal",
			"network", ls[0].Net.Name, "endpoints", len(want), "endpoint_records_republished", republished)
	default:
		a.log.Info("this host's peer record rewritten", "network", ls[0].Net.Name, "endpoints", len(want),
			"session_changed", ownSession != session, "endpoint_records_republished", republished)
	}
}

// errRepublished: ensureEndpointRecord had to put the record back.
var errRepublished = errors.New("republished")

// ensureEndpointRecord makes sure an attached endpoint's record is in the
// store and bound to the node's session.
func (a *Agent) ensureEndpointRecord(ctx context.Context, l *localEndpoint, session string) error {
	key := endpointKey(l.Endpoint.Network, l.Endpoint.Name)
	kv, err := a.store.Get(ctx, key)
	switch {
	case err == nil:
		var cur Endpoint
		if json.Unmarshal(kv.Value, &cur) != nil || cur.ID != l.Endpoint.ID {
			return fmt.Errorf("endpoint name taken by another endpoint in the store (node %s)", cur.Node)
		}
		value := kv.Value
		if !slices.Equal(cur.Aliases, l.Endpoint.Aliases) {
			// Names set while the store did not take them.
			value, _ = json.Marshal(&l.Endpoint)
		} else if session == "" || kv.Session == session {
			return nil
		}
		if session == "" {
			return a.store.CAS(ctx, key, value, kv.ModifyIndex)
		}
		// Bound to an older session of this node (a restart without
		// the session file): move it, once that session has let go.
		return a.store.Txn(ctx, []kvstore.Op{
			{Kind: kvstore.OpCheckIndex, Key: key, Index: kv.ModifyIndex},
			{Kind: kvstore.OpLock, Key: key, Value: value, Session: session},
		})
	case !errors.Is(err, kvstore.ErrNotFound):
		return err
	}
	// Its address may have been released meanwhile (vxnet node rm):
	// hold it again before telling anyone about the endpoint.
	lease := ipam.NetworkLease{Subnet: l.Net.Subnet, Gateway: l.Net.Gateway, VNI: l.Net.VNI}
	if _, err := a.ipam.AllocateAddr(ctx, l.Net.ID, lease, l.Endpoint.IP, ipam.AddrOwner{Node: a.cfg.Node, Endpoint: l.Endpoint.Name}); err != nil {
		return fmt.Errorf("cannot hold the address %s of a running endpoint again: %w", l.Endpoint.IP, err)
	}
	data, _ := json.Marshal(&l.Endpoint)
	if err := a.store.Txn(ctx, a.publishOps(key, data, session)); err != nil {
		return err
	}
	a.log.Error("endpoint was missing from the store; republished from this host's journal", "endpoint", l.key())
	return errRepublished
}

// fateOf is networkFate with a network that is absent put back, cached
// for a resync interval when the answer is to do nothing, so that a
// network this host cannot publish costs no store request per pass.
func (a *Agent) fateOf(ctx context.Context, n *Network) networkFate {
	if c, ok := a.fates[n.ID]; ok && time.Since(c.at) < a.cfg.ResyncInterval {
		return c.fate
	}
	fate := a.networkFate(ctx, n)
	if fate == fateAbsent {
		fate = a.restoreNetwork(ctx, n)
	}
	switch fate {
	case fateReplaced:
		a.log.Error("the network's name now holds another network and there is no record of ours being removed; keeping the datapath, not publishing its endpoints",
			"network", n.Name, "id", n.ID[:12])
		fallthrough
	case fateUnknown:
		if a.fates == nil {
			a.fates = map[string]fateCache{}
		}
		a.fates[n.ID] = fateCache{fate, time.Now()}
	default:
		delete(a.fates, n.ID)
	}
	return fate
}

type fateCache struct {
	fate networkFate
	at   time.Time
}

// restoreNetwork republishes a network that is absent from the store
// while this host runs endpoints of it, and says what became of it.
func (a *Agent) restoreNetwork(ctx context.Context, n *Network) networkFate {
	if err := a.republishNetwork(ctx, n); err != nil {
		a.log.Error("network of local endpoints is missing from the store and could not be republished; the datapath stays",
			"network", n.Name, "id", n.ID[:12], "err", err)
		if errors.Is(err, ipam.ErrInUse) {
			return fateReplaced
		}
		return fateUnknown
	}
	a.log.Error("network of local endpoints was missing from the store (not removed: no tombstone); republished from this host's journal",
		"network", n.Name, "id", n.ID[:12], "subnet", n.Subnet, "vni", n.VNI)
	a.cmu.Lock()
	if cur := a.networks[n.Name]; cur == nil {
		a.networks[n.Name] = n
		a.netNames[strings.ToLower(n.Name)] = true
	}
	a.cmu.Unlock()
	return fatePresent
}
