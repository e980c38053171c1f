package overlay

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/atomicfile"
	"github.com/vxnet/vxnet/kvstore"
	"github.com/vxnet/vxnet/metrics"
)

// aliveKey is bound to this node's store session: it exists exactly while
// the node is alive in the store's eyes.
func aliveKey(node string) string { return alivePrefix + node }

const alivePrefix = "alive/"

func (a *Agent) sessionFile() string { return filepath.Join(a.cfg.StateDir, "session") }

// sessionsInUse: the agent runs and holds (or is getting) a session.
func (a *Agent) sessionsInUse() bool { return a.running.Load() }

func (a *Agent) currentSession() string {
	a.cmu.RLock()
	defer a.cmu.RUnlock()
	return a.session
}

func (a *Agent) setSession(id string) {
	a.cmu.Lock()
	a.session = id
	a.cmu.Unlock()
	if id == "" {
		metrics.SessionUp.Set(0)
	} else {
		metrics.SessionUp.Set(1)
	}
	if id == "" {
		os.Remove(a.sessionFile())
		return
	}
	if err := atomicfile.Write(a.sessionFile(), []byte(id), 0o600); err != nil {
		a.log.Warn("remember store session", "err", err)
	}
}

// keepAlive holds this node's store session. The node's alive key and every
// local endpoint record are bound to it, so when the host dies or loses the
// store for longer than the TTL, the store deletes them and every other host
// removes this host's neighbor and FDB entries. The session id is kept in
// the state dir and reused after a restart, so restarting the agent within
// the TTL does not make peers drop this host's containers.
func (a *Agent) keepAlive(ctx context.Context) {
	if data, err := os.ReadFile(a.sessionFile()); err == nil {
		a.cmu.Lock()
		a.session = strings.TrimSpace(string(data))
		a.cmu.Unlock()
	}
	repeatOrKick(ctx, a.cfg.NodeTTL/3, a.renewNow, a.log, "store session", func(ctx context.Context) error {
		err := a.renewOrCreate(ctx)
		// A renewal is the first request to notice a partition: the
		// watches' blocking queries may hang for their whole wait time
		// before they fail. Any answer means the store is reachable.
		if !errors.Is(err, kvstore.ErrForbidden) {
			a.setSessionErr(nil)
		}
		switch {
		case err == nil:
			a.setStoreErr(nil)
		case errors.Is(err, kvstore.ErrForbidden) && ctx.Err() == nil:
			// Not an outage, but nothing this host publishes can be
			// bound to its life without it: say what right is missing.
			a.setSessionErr(err)
		case errors.Is(err, kvstore.ErrUnavailable) && ctx.Err() == nil:
			a.setStoreErr(err)
		}
		return err
	})
}

// setSessionErr records why the store refuses this node a session (an
// ACL token without session:write), for status, logged once.
func (a *Agent) setSessionErr(err error) {
	a.cmu.Lock()
	defer a.cmu.Unlock()
	if err != nil && (a.sessionErr == nil || a.sessionErr.Error() != err.Error()) {
		a.log.Error("store session refused: endpoints cannot be published bound to this host's life", "err", err)
	}
	a.sessionErr = err
}

// kickRenew renews (or replaces) the session now rather than at the next
// renewal: the store is back, or this host's records vanished.
func (a *Agent) kickRenew() {
	select {
	case a.renewNow <- struct{}{}:
	default:
	}
}

func (a *Agent) renewOrCreate(ctx context.Context) error {
	var old string
	if id := a.currentSession(); id != "" {
		err := a.store.RenewSession(ctx, id)
		if err == nil {
			return a.lockAlive(ctx, id)
		}
		if !errors.Is(err, kvstore.ErrNotFound) {
			return err
		}
		// A session is lost with the node's death in the store's eyes,
		// or with the store's own state: only the second is not ours to
		// regret, and storeLost says it.
		lost, ierr := a.checkIdentity(ctx)
		switch {
		case ierr != nil:
		case lost:
			a.storeLost("our session is unknown to it and its identity changed")
		case a.lostRecently():
			a.log.Info("new store session after the store lost its state")
		default:
			a.log.Warn("store session expired: this node was considered gone; registering again and republishing its endpoints")
		}
		a.setSession("")
		old = id
	}
	id, err := a.store.CreateSession(ctx, "vxnet node "+a.cfg.Node, a.cfg.NodeTTL)
	if err != nil {
		return err
	}
	a.setSession(id)
	err = a.lockAlive(ctx, id)
	if errors.Is(err, kvstore.ErrConflict) && old != "" {
		// The store said the old session was gone, yet it holds this
		// node's keys (a Consul server answering while it restores its
		// state): it is this node's, and ended by its successor rather
		// than left to hold them until its TTL runs out.
		a.log.Warn("the store's answer that this node's session had ended was early: ending it", "session", old)
		if derr := a.store.DestroySession(ctx, old); derr == nil {
			err = a.lockAlive(ctx, id)
		}
	}
	if err != nil {
		return err
	}
	// Endpoints bound to a previous session are gone from the store; the
	// reconciler publishes them again under the new one.
	a.republishAll.Store(true)
	a.trigger()
	return nil
}

// lockAlive makes sure the alive key is held by the session (it is lost if
// someone deletes it, or after the store lost its data).
func (a *Agent) lockAlive(ctx context.Context, id string) error {
	if kv, err := a.store.Get(ctx, aliveKey(a.cfg.Node)); err == nil && kv.Session == id {
		return nil
	}
	return a.store.Txn(ctx, []kvstore.Op{{Kind: kvstore.OpLock, Key: aliveKey(a.cfg.Node), Value: []byte(a.cfg.Node), Session: id}})
}

// publishOps are the operations that create an endpoint record:
// create-only, and bound to session. With session "", the committer binds
// them to the node's session when it writes them (and refuses to write
// them without one): a record must never outlive its host.
func (a *Agent) publishOps(key string, data []byte, session string) []kvstore.Op {
	if session == "" && !a.sessionsInUse() {
		return []kvstore.Op{{Kind: kvstore.OpCAS, Key: key, Value: data}} // no agent running: no session to bind to
	}
	return []kvstore.Op{
		{Kind: kvstore.OpCheckIndex, Key: key, Index: 0},
		{Kind: kvstore.OpLock, Key: key, Value: data, Session: session},
	}
}

// RemoveNode forgets a host that is gone: its endpoint records and the
// addresses they held. The addresses of a dead host stay reserved until
// then, because its containers may still be running behind a partition;
// only an operator can say they are not.
func (a *Agent) RemoveNode(ctx context.Context, name string) error {
	if err := ValidateName("node", name); err != nil {
		return &codedError{code: api.CodeInvalid, msg: err.Error()}
	}
	if name == a.cfg.Node {
		return invalidf("node %q is this node: stop its agent and remove it from another host", name)
	}
	_, err := a.store.Get(ctx, nodeKey(name))
	registered := err == nil
	if err != nil && !errors.Is(err, kvstore.ErrNotFound) {
		return fmt.Errorf("remove node %s: %w", name, err)
	}
	if kv, err := a.store.Get(ctx, aliveKey(name)); err == nil && kv.Session != "" {
		return conflictf("node %q is alive: stop its agent first (it is considered gone when its session expires)", name)
	} else if err != nil && !errors.Is(err, kvstore.ErrNotFound) {
		return fmt.Errorf("remove node %s: %w", name, err)
	}
	// A node record is not needed: endpoint records and addresses in the
	// name of a node that never registered, or whose record was lost,
	// must be removable too (they block network rm).
	pairs, _, err := a.store.List(ctx, endpointsPrefix)
	if err != nil {
		return fmt.Errorf("remove node %s: %w", name, err)
	}
	removed := 0
	for _, kv := range pairs {
		var e Endpoint
		if decodeRecord(kv.Key, kv.Value, &e) == nil && e.Node == name {
			if kv.Session != "" {
				// Held by a live session: the node is alive after all.
				return conflictf("node %q holds endpoint %s/%s under a live session: stop its agent first", name, e.Network, e.Name)
			}
			if err := a.store.DeleteCAS(ctx, kv.Key, kv.ModifyIndex); err != nil && !errors.Is(err, kvstore.ErrConflict) {
				return fmt.Errorf("remove node %s: %w", name, err)
			}
			removed++
		}
	}
	nets, err := a.ipam.Networks(ctx)
	if err != nil {
		return fmt.Errorf("remove node %s: %w", name, err)
	}
	released := 0
	for id := range nets {
		// Its peer record of the network: what the other hosts program.
		if err := a.store.Delete(ctx, peerKey(id, name)); err != nil {
			return fmt.Errorf("remove node %s: %w", name, err)
		}
		addrs, err := a.ipam.Addrs(ctx, id)
		if err != nil {
			return fmt.Errorf("remove node %s: %w", name, err)
		}
		for ip, o := range addrs {
			if o.Node == name {
				if err := a.ipam.ReleaseAddr(ctx, id, ip, o); err != nil {
					return fmt.Errorf("remove node %s: %w", name, err)
				}
				released++
			}
		}
	}
	if !registered && removed == 0 && released == 0 {
		return notFoundf("node %q not found: no node record, endpoint or address in its name", name)
	}
	if err := a.store.Delete(ctx, nodeKey(name)); err != nil {
		return fmt.Errorf("remove node %s: %w", name, err)
	}
	a.log.Info("node removed", "node", name, "endpoints_removed", removed, "addresses_released", released)
	return nil
}

// detectLiveness asks the store, once, how this node's session is kept
// alive, and says it in the log: through a Consul client agent on this
// host, gossip ends the session within seconds of the host's death;
// against a server (or the embedded store), only its TTL does. A client
// agent that has joined no server is an error that names the fix; it is
// asked again until it has.
func (a *Agent) detectLiveness(ctx context.Context) (kvstore.Liveness, error) {
	a.cmu.RLock()
	known := a.liveness
	a.cmu.RUnlock()
	if known != nil {
		return *known, nil
	}
	var l kvstore.Liveness
	if r, ok := a.store.(kvstore.LivenessReporter); ok {
		var err error
		l, err = r.Liveness(ctx)
		switch {
		case errors.Is(err, kvstore.ErrForbidden):
			// Gossip still ends a session made through a client agent:
			// only the log and status cannot say so.
			a.log.Warn("cannot ask the Consul agent whether it is a client or a server (the ACL token lacks agent:read); liveness is shown as TTL alone", "err", err)
			l = kvstore.Liveness{}
		case errors.Is(err, kvstore.ErrNotJoined):
			a.setStoreErr(err)
			a.log.Error("store: the local Consul agent has joined no Consul server, so nothing reaches the cluster", "err", err)
			return l, err
		case err != nil:
			return l, err
		}
	}
	if !l.LocalAgent {
		l.Node = "" // a server's node is not this host's
	}
	a.cmu.Lock()
	a.liveness = &l
	a.cmu.Unlock()
	if l.LocalAgent {
		a.log.Info("liveness: gossip and TTL: the store is this host's Consul client agent, whose node's serfHealth check ends the session within seconds of the host's death",
			"consul_node", l.Node, "ttl", a.cfg.NodeTTL, "peer_hold_down", a.cfg.HoldDown, "peer_hold_left", a.cfg.HoldLeft)
	} else {
		a.log.Info("liveness: TTL alone: the store is a Consul server (or the embedded store); a dead host is noticed when its session's TTL runs out. Run a Consul client agent on every host and give vxnetd --store consul://127.0.0.1:8500 for death detection in seconds",
			"ttl", a.cfg.NodeTTL)
	}
	return l, nil
}

// removedByHost is holdFor's answer for a host's own removal: its last
// detach on the network, not its death.
const removedByHost = "removed by its host"

// defaultHoldDown and defaultHoldLeft: see Config. Gossip notices a dead
// host in about two seconds here; with the hold-down its entries go
// within 5. A Consul agent restarted gracefully is back, and its host
// republished, in about five seconds.
const (
	defaultHoldDown = time.Second
	defaultHoldLeft = 15 * time.Second
)

// holdFor says, for a host whose peer record vanished, how long its
// entries stay. A host that removed its record itself (its alive key is
// still held by a session), or that has no Consul agent of its own (its
// TTL ran out: it has been silent that long), is not held. A host whose
// record went with its session while it runs a Consul client agent is
// held while gossip says that agent left the cluster gracefully (a
// restart), HoldLeft at most; for HoldDown when gossip found it failed
// (dead, or a killed agent coming back); briefly if the store cannot say.
//
// session is the one that held the vanished record.
func (a *Agent) holdFor(ctx context.Context, node, session string) (time.Duration, string) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	kv, err := a.store.Get(ctx, aliveKey(node))
	switch {
	case err == nil && kv.Session != "" && (kv.Session == session || session == ""):
		return 0, removedByHost
	case err == nil && kv.Session != "":
		// Its record's session ended and it already has a new one: it
		// is writing its records back.
		return a.cfg.HoldLeft, "its host has a new session"
	case err != nil && !errors.Is(err, kvstore.ErrNotFound):
		return a.cfg.HoldDown, "the store cannot say why"
	}
	var n Node
	switch kv, err = a.store.Get(ctx, nodeKey(node)); {
	case errors.Is(err, kvstore.ErrNotFound):
		return 0, "no node record"
	case err != nil:
		return a.cfg.HoldDown, "the store cannot say why" // an error is no evidence
	case decodeRecord(kv.Key, kv.Value, &n) != nil:
		return 0, "unreadable node record"
	}
	r, ok := a.store.(kvstore.LivenessReporter)
	if !ok || n.Liveness != (kvstore.Liveness{LocalAgent: true}).Mode() || n.ConsulNode == "" {
		return 0, "its session TTL ran out"
	}
	switch h, err := r.NodeHealth(ctx, n.ConsulNode); {
	case err != nil:
		return a.cfg.HoldDown, "the store cannot say why"
	case h == kvstore.NodeLeft:
		return a.cfg.HoldLeft, "its Consul agent left the cluster (restarting?)"
	case h == kvstore.NodeFailed:
		return a.cfg.HoldDown, "gossip found its Consul agent failed"
	default:
		return a.cfg.HoldDown, "its Consul agent is alive"
	}
}
