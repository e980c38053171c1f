package overlay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/vxnet/vxnet/ipam"
	"github.com/vxnet/vxnet/kvstore"
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
	a.mu.Lock()
	defer a.unlock()
	synced := a.synced()
	storeUp := !a.storeDown()
	// The store phases hold mu, which attaches wait for: a store that
	// stopped answering (frozen, partitioned) may cost them one request
	// timeout in all, not one per record.
	sctx, cancel := context.WithTimeout(ctx, storePhaseTimeout)
	defer cancel()
	a.finishInterrupted(sctx, synced && storeUp)
	a.cmu.RLock()
	endpoints := maps.Clone(a.endpoints)
	a.cmu.RUnlock()
	peers := a.peerView()

	if full {
		if stray, err := a.dp.RemoveStrays(ctx); err != nil {
			a.log.Warn("remove stray vxlan devices", "err", err)
		} else if len(stray) > 0 {
			a.log.Warn("removed vxlan devices left in the host namespace by a crash", "devices", stray)
		}
	}
	plans := desiredState(a.cfg.Node, peers, a.locals, a.localMTU())
	for ns, p := range plans {
		if ctx.Err() != nil {
			return
		}
		if full {
			a.ensurePlan(ctx, p, synced && storeUp)
		}
		if synced && (full || !a.peersApplied(ns, p.Peers)) {
			a.syncPeers(ctx, p, full)
		}
	}
	if full {
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
			if plans[ns] == nil && !keep[ns] && len(a.journalGaps) == 0 {
				a.log.Info("removing network namespace with no local endpoints", "namespace", ns)
				if err := a.dp.DeleteNetwork(ctx, ns); err != nil {
					a.log.Warn("remove network namespace", "namespace", ns, "err", err)
				}
				delete(a.applied, ns)
			}
		}
	}
	if synced && storeUp && sctx.Err() == nil {
		a.reconcileStore(sctx, endpoints, full)
	}
	if sctx.Err() != nil && ctx.Err() == nil {
		// The store stopped answering (a frozen server, a partition
		// the session renewal has not met yet): passes skip the store
		// until it answers a watch or a renewal again.
		a.setStoreErr(fmt.Errorf("a pass's store work did not finish within %s: %w", storePhaseTimeout, kvstore.ErrUnavailable))
	}
	if ctx.Err() != nil {
		return // cut short: not a complete pass
	}
	a.cmu.Lock()
	a.lastReconcile = time.Now()
	a.ready = a.ready || synced
	a.cmu.Unlock()
}

// journalGap reports whether this host's journal of a network could not
// be read in full.
func (a *Agent) journalGap(network string) bool { return a.journalGaps[""] || a.journalGaps[network] }

// storePhaseTimeout bounds the store work of one reconcile pass; what is
// left is done by the next.
const storePhaseTimeout = 3 * time.Second

// syncNetwork programs one network's peers from the current store view.
func (a *Agent) syncNetwork(ctx context.Context, ns string) {
	p := desiredState(a.cfg.Node, a.peerView(), a.locals, a.localMTU())[ns]
	if p != nil && !a.peersApplied(ns, p.Peers) {
		a.syncPeers(ctx, p, false)
	}
}

// peersApplied reports whether the last sync of a namespace wrote exactly
// these peers.
func (a *Agent) peersApplied(ns string, peers []vtep.Peer) bool {
	prev, ok := a.applied[ns]
	return ok && samePeers(prev, peers)
}

// syncPeers programs a network's peers. Passes driven by store events
// write only what changed since the last sync; full passes compare with
// the kernel's tables, and what they must fix there is drift: someone else
// changed our entries.
func (a *Agent) syncPeers(ctx context.Context, p *netPlan, full bool) {
	prev, known := a.applied[p.Spec.Name]
	same := known && samePeers(prev, p.Peers)
	var added, removed int
	var err error
	if full || !known {
		added, removed, err = a.dp.SyncPeers(ctx, p.Spec.Name, p.Peers)
	} else {
		added, removed, err = a.dp.UpdatePeers(ctx, p.Spec.Name, prev, p.Peers)
	}
	if err != nil {
		a.log.Warn("program peers", "network", p.Net.Name, "err", err)
		delete(a.applied, p.Spec.Name)
		return
	}
	a.applied[p.Spec.Name] = p.Peers
	switch {
	case added+removed == 0:
	case full && same:
		a.log.Warn("peer entries repaired: the kernel's tables differed from what was programmed",
			"network", p.Net.Name, "rewritten", added, "removed", removed, "peers", len(p.Peers))
	default:
		a.log.Info("peers programmed", "network", p.Net.Name, "added", added, "removed", removed, "peers", len(p.Peers))
	}
}

// ensurePlan creates or repairs the network's namespace and its local
// endpoints, and removes interfaces that belong to no local endpoint.
func (a *Agent) ensurePlan(ctx context.Context, p *netPlan, synced bool) {
	changes, err := a.dp.EnsureNetwork(ctx, p.Spec)
	if len(changes) > 0 {
		a.log.Warn("network datapath repaired", "network", p.Net.Name, "changes", changes)
		delete(a.applied, p.Spec.Name) // a rebuilt VTEP has no entries
	}
	if err != nil {
		a.log.Error("ensure network", "network", p.Net.Name, "err", err)
		return
	}
	want := map[string]bool{}
	for _, l := range a.locals {
		if l.Net.NamespaceName() == p.Spec.Name {
			want[l.Endpoint.HostVeth()] = true // any phase: an attach may be under way
		}
	}
	for _, l := range p.Locals {
		spec := a.endpointSpec(l)
		changes, err := a.dp.CheckEndpoint(ctx, spec)
		switch {
		case errors.Is(err, vtep.ErrEndpointGone) && !localExists(l):
			if !synced {
				continue // removing it needs the store; later
			}
			a.log.Info("container namespace is gone; removing its endpoint", "network", l.Endpoint.Network, "endpoint", l.Endpoint.Name, "netns", l.Netns)
			if err := a.purge(ctx, l); err != nil {
				a.log.Warn("remove endpoint of a gone container", "endpoint", l.Endpoint.Name, "err", err)
			}
		case errors.Is(err, vtep.ErrEndpointGone):
			if _, err := a.dp.AddEndpoint(ctx, spec); err != nil {
				a.log.Error("recreate endpoint interface", "endpoint", l.Endpoint.Name, "err", err)
			} else {
				a.log.Warn("endpoint interface was missing; recreated", "network", l.Endpoint.Network, "endpoint", l.Endpoint.Name)
			}
		case err != nil:
			a.log.Error("check endpoint", "endpoint", l.Endpoint.Name, "err", err)
		case len(changes) > 0:
			a.log.Warn("endpoint interface repaired", "endpoint", l.Endpoint.Name, "changes", changes)
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
			if err := a.dp.RemoveEndpoint(ctx, p.Spec.Name, veth); err != nil {
				a.log.Warn("remove leaked interface", "interface", veth, "err", err)
			}
		}
	}
}

// finishInterrupted completes or undoes attaches and detaches that a crash
// or a store outage cut short. Without the store only their kernel part
// is undone (a container must not keep the interfaces of an attach that
// failed); the record and the address wait for the store.
func (a *Agent) finishInterrupted(ctx context.Context, withStore bool) {
	for _, l := range a.locals {
		if l.Phase == phaseAttached || a.inflight[l.key()] {
			continue
		}
		if !withStore {
			if err := a.purgeKernel(ctx, l); err != nil {
				a.log.Warn("remove interfaces of an interrupted operation", "endpoint", l.Endpoint.Name, "err", err)
			}
			continue
		}
		a.log.Warn("cleaning up an interrupted operation", "phase", l.Phase, "network", l.Endpoint.Network, "endpoint", l.Endpoint.Name)
		if err := a.purge(ctx, l); err != nil {
			a.log.Warn("clean up interrupted operation", "endpoint", l.Endpoint.Name, "err", err)
			continue
		}
		a.dropIdleNetwork(ctx, l.Net.NamespaceName())
	}
}

// reconcileStore makes the store agree with this host: our running
// endpoints are published (a lost record is restored), records that claim
// to be ours but are not are removed, and on full passes addresses held in
// our name by no endpoint are released.
func (a *Agent) reconcileStore(ctx context.Context, endpoints map[string]*Endpoint, full bool) {
	a.cmu.RLock()
	sessions := maps.Clone(a.epSession)
	a.cmu.RUnlock()
	session := a.currentSession()
	a.cmu.RLock()
	networks := maps.Clone(a.networks)
	a.cmu.RUnlock()
	fates := map[string]networkFate{}
	for key, l := range a.locals {
		if l.Phase != phaseAttached {
			continue
		}
		if n := networks[l.Endpoint.Network]; n == nil || n.ID != l.Net.ID {
			fate, seen := fates[l.Net.ID]
			if !seen {
				fate = a.networkFate(ctx, &l.Net)
				if fate == fateAbsent {
					fate = a.restoreNetwork(ctx, &l.Net)
				}
				fates[l.Net.ID] = fate
			}
			switch fate {
			case fateRemoved:
				// network rm went through while this host was cut off
				// (its endpoints had expired): that is intent.
				a.log.Warn("removing an endpoint whose network was removed while this host was away", "endpoint", key)
				if err := a.purge(ctx, l); err != nil {
					a.log.Warn("remove endpoint of a removed network", "endpoint", key, "err", err)
					continue
				}
				a.dropIdleNetwork(ctx, l.Net.NamespaceName())
				continue
			case fateReplaced:
				a.log.Error("the network's name now holds another network and there is no record of ours being removed; keeping the datapath, not publishing the endpoint",
					"endpoint", key, "id", l.Net.ID[:12])
				continue
			case fateUnknown:
				continue // the store did not answer; next pass
			}
		}
		if e := endpoints[key]; e != nil && e.ID == l.Endpoint.ID {
			if session != "" && sessions[key] != session {
				a.rebind(ctx, l, session)
			}
			continue
		}
		if e := endpoints[key]; e != nil {
			a.log.Error("endpoint name taken by another endpoint in the store", "endpoint", key, "node", e.Node)
			continue
		}
		data, _ := json.Marshal(&l.Endpoint)
		// Its address may have been released meanwhile (vxnet node rm):
		// hold it again before telling anyone about the endpoint.
		lease := ipam.NetworkLease{Subnet: l.Net.Subnet, Gateway: l.Net.Gateway, VNI: l.Net.VNI}
		if _, err := a.ipam.AllocateAddr(ctx, l.Net.ID, lease, l.Endpoint.IP, ipam.AddrOwner{Node: a.cfg.Node, Endpoint: l.Endpoint.Name}); err != nil {
			a.log.Error("cannot hold the address of a running endpoint again; not republishing it", "endpoint", key, "ip", l.Endpoint.IP, "err", err)
			continue
		}
		switch err := a.store.Txn(ctx, a.publishOps(endpointKey(l.Endpoint.Network, l.Endpoint.Name), data)); {
		case err == nil:
			a.log.Error("endpoint was missing from the store; republished from this host's journal", "endpoint", key)
		case !errors.Is(err, kvstore.ErrConflict):
			a.log.Warn("republish endpoint", "endpoint", key, "err", err)
		}
	}
	for key, e := range endpoints {
		if e.Node != a.cfg.Node {
			continue
		}
		if l := a.locals[key]; l != nil && l.Endpoint.ID == e.ID || a.journalGap(e.Network) {
			continue
		}
		kv, err := a.store.Get(ctx, endpointKey(e.Network, e.Name))
		if err != nil {
			continue
		}
		var cur Endpoint
		if json.Unmarshal(kv.Value, &cur) != nil || cur.ID != e.ID {
			continue
		}
		if err := a.store.DeleteCAS(ctx, kv.Key, kv.ModifyIndex); err == nil {
			a.log.Warn("removed a stale endpoint of this node from the store", "endpoint", key)
		}
	}
	if !full {
		return
	}
	for _, n := range networks {
		if a.journalGap(n.Name) {
			continue
		}
		addrs, err := a.ipam.Addrs(ctx, n.ID)
		if err != nil {
			a.log.Warn("list addresses", "network", n.Name, "err", err)
			continue
		}
		for ip, o := range addrs {
			if o.Node != a.cfg.Node {
				continue
			}
			if l := a.locals[n.Name+"/"+o.Endpoint]; l != nil && l.Net.ID == n.ID {
				continue
			}
			if err := a.ipam.ReleaseAddr(ctx, n.ID, ip, o); err == nil {
				a.log.Warn("released an address held by no endpoint", "network", n.Name, "ip", ip, "endpoint", o.Endpoint)
			}
		}
	}
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
	}
	a.cmu.Unlock()
	return fatePresent
}

// rebind moves our endpoint record to the node's current session (after
// the agent started without one, or got a new one).
func (a *Agent) rebind(ctx context.Context, l *localEndpoint, session string) {
	key := endpointKey(l.Endpoint.Network, l.Endpoint.Name)
	kv, err := a.store.Get(ctx, key)
	if err != nil {
		return
	}
	err = a.store.Txn(ctx, []kvstore.Op{
		{Kind: kvstore.OpCheckIndex, Key: key, Index: kv.ModifyIndex},
		{Kind: kvstore.OpLock, Key: key, Value: kv.Value, Session: session},
	})
	if err != nil {
		a.log.Debug("bind endpoint to session", "endpoint", key, "err", err)
	}
}
