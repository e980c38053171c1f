package overlay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/netnsutil"
	"github.com/vxnet/vxnet/ipam"
	"github.com/vxnet/vxnet/kvstore"
	"github.com/vxnet/vxnet/metrics"
	"github.com/vxnet/vxnet/vtep"
)

// NetnsDir is where named namespaces live; a bare NETNS argument is a name
// there.
const NetnsDir = "/var/run/netns"

// resolveNetns turns the user's NETNS argument into a path and the
// namespace's identity, refusing anything that is not a network namespace
// or is one that must never get a container interface.
func (a *Agent) resolveNetns(arg string) (string, nsID, error) {
	if arg == "" {
		return "", nsID{}, invalidf("netns is empty: give a path such as /var/run/netns/c1 or /proc/PID/ns/net, or a name under %s", NetnsDir)
	}
	path := arg
	if !strings.Contains(arg, "/") {
		path = filepath.Join(NetnsDir, arg)
	}
	id, err := statNS(path)
	if err != nil {
		return "", nsID{}, invalidf("netns %q: %v", arg, err)
	}
	if err := a.dp.CheckNetNS(path); errors.Is(err, vtep.ErrNotNetNS) {
		return "", nsID{}, invalidf("netns %q is not a network namespace", arg)
	} else if err != nil {
		return "", nsID{}, fmt.Errorf("netns %q: %w", arg, err) // EMFILE and such: not the user's fault
	}
	if self, err := statNS("/proc/self/ns/net"); err == nil && self == id {
		return "", nsID{}, invalidf("netns %q is the agent's own (host) namespace", arg)
	}
	if strings.HasPrefix(filepath.Clean(path), filepath.Clean(a.cfg.NetNSDir)+"/") {
		return "", nsID{}, invalidf("netns %q is an overlay network's namespace", arg)
	}
	return path, id, nil
}

func statNS(path string) (nsID, error) { return netnsutil.IDOf(path) }

// Attach gives the namespace an interface on the network. It is all or
// nothing: every step pushes its undo, and a failure runs them in reverse.
// The endpoint is published in the store last, so peers never program an
// endpoint that does not exist yet.
func (a *Agent) Attach(ctx context.Context, network string, req api.AttachRequest) (*api.Endpoint, error) {
	// Bounded as a whole, so that a frozen store fails an attach in
	// seconds with "store unavailable" instead of holding the client, and
	// so that the rollback's own bound still fits in what a client waits.
	ctx, cancel := context.WithTimeout(ctx, AttachTimeout)
	defer cancel()
	start := time.Now()
	ep, err := a.attach(ctx, network, req)
	metrics.Since(metrics.AttachDuration, start)
	defer func() {
		if err != nil {
			metrics.AttachErrors.WithLabelValues(ErrorCode(err)).Inc()
		}
	}()
	if c := ErrorCode(err); err != nil && ctx.Err() != nil && !errors.Is(err, kvstore.ErrUnavailable) && (c == api.CodeInternal || c == api.CodeUnavailable) {
		err = fmt.Errorf("attach: no answer within %s (%w): %w", AttachTimeout, kvstore.ErrUnavailable, err)
	}
	return ep, err
}

// AttachTimeout bounds an attach's forward path; its rollback gets
// rollbackTimeout more for the store (the kernel part is not bounded: it
// must finish).
const (
	AttachTimeout   = 8 * time.Second
	rollbackTimeout = 2 * time.Second
)

func (a *Agent) attach(ctx context.Context, network string, req api.AttachRequest) (_ *api.Endpoint, rerr error) {
	st := newSteps()
	n, netIdx, err := a.getNetwork(ctx, network)
	if err != nil {
		return nil, err
	}
	st.mark("network")
	// For the whole attach, rollback included: a pass repairs no record
	// of the network meanwhile.
	defer a.ops.enter(network)()
	if n.Removing {
		return nil, conflictf("network %q is being removed", network)
	}
	// A handed-off interface has no container namespace yet: the runtime
	// says where it went later (SetNetns).
	var path string
	var nsid nsID
	if req.Handoff != "" {
		switch {
		case req.Netns != "":
			return nil, invalidf("netns and handoff exclude each other: a handed-off interface's namespace is given once the runtime has it")
		case !vtep.ValidIfName(req.Handoff):
			return nil, invalidf("handoff %q: give an interface name of 1 to 15 characters without '/', ':' or spaces", req.Handoff)
		case req.Interface != "":
			return nil, invalidf("interface: the runtime names a handed-off interface")
		}
	} else if path, nsid, err = a.resolveNetns(req.Netns); err != nil {
		return nil, err
	}
	var want netip.Addr
	if req.IP != "" {
		if want, err = netip.ParseAddr(req.IP); err != nil || !want.Is4() {
			return nil, invalidf("ip %q is not an IPv4 address", req.IP)
		}
	}
	id := newID()
	name := req.Name
	if name == "" {
		if name = sanitizeNetnsName(path); path == "" || name == "" || name == "net" {
			name = "ep-" + id[:8]
		}
	}
	if err := ValidateName("endpoint", name); err != nil {
		return nil, &codedError{code: api.CodeInvalid, msg: err.Error()}
	}
	for _, al := range req.Aliases {
		if err := ValidateName("alias", al); err != nil {
			return nil, &codedError{code: api.CodeInvalid, msg: err.Error()}
		}
	}
	if req.Interface != "" && !vtep.ValidIfName(req.Interface) {
		return nil, invalidf("interface %q: give a name of 1 to 15 characters without '/', ':' or spaces", req.Interface)
	}
	vxlanPort := a.cfg.VXLANPort
	if vxlanPort == 0 {
		vxlanPort = 4789
	}
	ports, err := parsePublish(req.Publish, vxlanPort)
	switch {
	case err != nil:
		return nil, invalidf("%v", err)
	case len(ports) > 0 && n.Internal:
		return nil, invalidf("--publish: network %q is internal: its containers have no way in or out", network)
	case len(ports) > 0 && a.egress == nil:
		return nil, invalidf("--publish: this agent runs without egress (--no-egress)")
	case len(ports) > 0 && !req.ReplaceDefaultRoute && !n.Internal && path != "":
		// Replies to a published port leave by the default route: the
		// container's own would send them past the DNAT that made them.
		own, err := a.egress.HasOwnDefaultRoute(ctx, path)
		if err != nil {
			return nil, fmt.Errorf("attach: %w", err)
		}
		if own {
			return nil, invalidf("--publish: netns %q has a default route of its own, which replies to published ports would take; add --default-route to route it through the gateway bridge (detach restores it)", req.Netns)
		}
	}

	// A name taken on another host is found by the publish, which is
	// create-only: no store round trip here for what is rare.
	st.mark("checks")

	// mu is held only around changes of the local records and the kernel:
	// the store round trips of concurrent attaches overlap. The record is
	// marked in flight so that a reconcile running in between neither
	// undoes it nor takes its interfaces for leaks.
	if err := a.undoInterrupted(ctx, network, nsid, name); err != nil {
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}
	if err := a.mu.LockCtx(ctx); err != nil {
		return nil, fmt.Errorf("attach %s: waiting for the agent: %w", name, err)
	}
	st.mark("lock")
	for _, l := range a.locals {
		if l.Endpoint.Network != network || ((l.NetnsID != nsid || nsid == nsID{}) && l.Endpoint.Name != name) {
			continue
		}
		a.unlock()
		if a.interruptedLocked(l) {
			// Another attach of it failed since undoInterrupted looked.
			return nil, conflictf("endpoint %q of network %q is being undone after a failed operation; try again", l.Endpoint.Name, network)
		}
		if l.Endpoint.Name == name {
			return nil, conflictf("endpoint %q already exists on network %q", name, network)
		}
		return nil, conflictf("netns %q is already attached to network %q as endpoint %q", req.Netns, network, l.Endpoint.Name)
	}
	inUse := a.portsInUse()
	var portSpecs []string
	for _, p := range ports {
		key := fmt.Sprintf("%d/%s", p.Host, p.Proto)
		if owner, ok := inUse[key]; ok {
			a.unlock()
			return nil, conflictf("host port %s is already published by endpoint %q", key, owner)
		}
		portSpecs = append(portSpecs, p.String())
	}
	l := &localEndpoint{
		Phase: phaseAttaching,
		Endpoint: Endpoint{
			Version: recordVersion, ID: id, Name: name, Network: network, NetworkID: n.ID,
			Node: a.cfg.Node, VTEP: a.cfg.Advertise, Ports: portSpecs, Created: time.Now().UTC().Truncate(time.Second),
			Interface: req.Interface, Aliases: req.Aliases,
		},
		Net: *n, Netns: path, NetnsID: nsid, MTU: networkMTU(n, a.localMTU()),
		ReplaceDefault: req.ReplaceDefaultRoute, Handoff: req.Handoff,
	}
	if req.Handoff != "" {
		l.Endpoint.Interface = req.Handoff
	}
	// The journal entry comes first: whatever happens next, a restarted
	// agent finds it and either finishes or undoes the attach.
	if err := a.state.save(l); err != nil {
		a.unlock()
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}
	st.mark("journal")
	a.locals[l.key()] = l
	a.inflight[l.key()] = true
	if a.views[n.ID] == nil {
		a.startView(a.life, n.ID) // its first answer is likely in before the publish
	}
	a.unlock()
	a.crashPoint("attach-journal")
	// Each step below pushes its undo before it changes anything, and a
	// failure runs them (see rollback). After a crash the journal entry
	// above is what is left, and purge undoes it all instead.
	var undo undoLog
	undo.store(func(context.Context) error { return a.forget(l) })
	ok := false
	defer func() {
		if !ok {
			a.rollback(context.WithoutCancel(ctx), l, &undo, rerr)
			return
		}
		a.mu.Lock()
		a.doneInflightLocked(l)
		a.unlock()
	}()

	lease := ipam.NetworkLease{Subnet: n.Subnet, Gateway: n.Gateway, VNI: n.VNI}
	owner := ipam.AddrOwner{Node: a.cfg.Node, Endpoint: name}
	ip, err := a.ipam.AllocateAddr(ctx, n.ID, lease, want, owner)
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}
	undo.store(func(ctx context.Context) error { return a.releaseAddr(ctx, n.ID, ip, owner) })
	if want.IsValid() {
		// A reservation of this address is the endpoint's now (or
		// gone with its undo): nothing for the sweep.
		if err := a.resv.forget(n.ID, ip); err != nil {
			a.log.Warn("forget a reservation taken over", "ip", ip, "err", err)
		}
	}
	st.mark("address")
	a.crashPoint("attach-allocated")

	spec := networkSpec(n, l.MTU)
	ifName, eg, err := a.attachKernel(ctx, l, spec, ip, &undo, st)
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}

	// The endpoint record and this host's peer record of the network in
	// one transaction, shared with the attaches and detaches under way
	// (see commit.go).
	data, _ := json.Marshal(&l.Endpoint)
	ops := append([]kvstore.Op{{Kind: kvstore.OpCheckIndex, Key: networkKey(network), Index: netIdx}},
		a.publishOps(endpointKey(network, name), data, "")...) // bound to the session by the committer
	undo.store(func(ctx context.Context) error { return a.unpublish(ctx, l) }) // a failed commit may have been applied
	err = a.commit(ctx, &commitReq{netID: n.ID, ops: ops, add: ip})
	if errors.Is(err, kvstore.ErrConflict) && a.removeLeftoverRecord(ctx, network, name, l) {
		err = a.commit(ctx, &commitReq{netID: n.ID, ops: ops, add: ip})
	}
	if errors.Is(err, kvstore.ErrConflict) {
		if cur, _, gerr := a.getNetwork(ctx, network); gerr != nil || cur.Removing || cur.ID != n.ID {
			return nil, conflictf("network %q was removed during attach", network)
		}
		if _, gerr := a.store.Get(ctx, endpointKey(network, name)); gerr == nil {
			return nil, conflictf("endpoint %q already exists on network %q", name, network)
		}
		// Not the name: say what the store refused (a lock held by
		// another session of this node, say).
		return nil, conflictf("attach %s: the store refused the publish: %v", name, err)
	}
	if err != nil {
		return nil, fmt.Errorf("attach %s: publish: %w", name, err)
	}
	st.mark("publish")
	a.crashPoint("attach-published")
	// Program the peers known now, so the container can talk as soon as
	// attach returns rather than at the watch's first answer: read once,
	// before mu, if this host's watch of the network is new.
	a.mu.Lock()
	v := a.views[n.ID]
	a.unlock()
	if v != nil {
		a.primeView(ctx, v)
	}
	st.mark("peers-read")

	// Not LockCtx: the endpoint is published, and giving up here would
	// undo what every peer may already have programmed.
	a.mu.Lock()
	l.Phase = phaseAttached
	err = a.state.save(l)
	if err == nil {
		ok = true
		a.syncNetwork(ctx, n.ID)
	} else {
		l.Phase = phaseAttaching
	}
	a.unlock()
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}
	st.mark("finish")
	a.log.Debug("attach timing", st.attrs...)
	a.log.Info("endpoint attached", "network", network, "endpoint", name, "ip", ip, "interface", ifName, "netns", path)
	detail := ifName + " in " + path
	if l.Handoff != "" {
		detail = ifName + " handed off to the runtime"
	}
	a.events.emit(api.Event{Kind: "attach", Network: network, Node: a.cfg.Node, Endpoint: name, IP: ip.String(), Detail: detail})
	out := l.Endpoint.apiView()
	out.Netns, out.Egress, out.DNS = path, eg, a.dnsInfo(n)
	return &out, nil
}

// removeLeftoverRecord removes an endpoint record of this host under
// the name that no local record accounts for, and reports whether it did:
// an earlier attach whose publish the store applied only after the attach
// had given up and been undone (a frozen store thawing). Anything else
// under the name is another endpoint's.
func (a *Agent) removeLeftoverRecord(ctx context.Context, network, name string, self *localEndpoint) bool {
	kv, err := a.store.Get(ctx, endpointKey(network, name))
	if err != nil {
		return false
	}
	var rec Endpoint
	if decodeRecord(kv.Key, kv.Value, &rec) != nil || rec.Node != a.cfg.Node || rec.ID == self.Endpoint.ID {
		return false
	}
	a.mu.Lock()
	l := a.locals[network+"/"+name]
	gap := a.journalGap(network)
	a.unlock()
	if l != self || gap {
		// A record of the journal: a detach or a pass deals with it.
		// Or the journal has records it cannot read: the record may be
		// a running container's, whose absence there is no intent.
		return false
	}
	if err := a.store.DeleteCAS(ctx, kv.Key, kv.ModifyIndex); err != nil {
		return false
	}
	a.log.Warn("removed a leftover record of this host under the name of a new endpoint: an earlier attach, undone, that the store applied late",
		"network", network, "endpoint", name, "old_id", idPrefix(rec.ID, 12))
	a.leakRemoved("endpoint_record", network, name, 1)
	return true
}

// undoLog is what an attach has to undo if a later step fails: the undo
// of each step, pushed before the step changes anything (an undo finds
// its part gone and does nothing, so a step that failed half way is
// undone too).
type undoLog struct {
	kernel, stores []func(context.Context) error
}

func (u *undoLog) onKernel(f func(context.Context) error) { u.kernel = append(u.kernel, f) }
func (u *undoLog) store(f func(context.Context) error)    { u.stores = append(u.stores, f) }

// runUndos runs undos last first and stops at the first that fails: what
// is left keeps what it depends on (a record, no longer attaching, keeps
// the address held until a later pass's purge finishes it).
func runUndos(ctx context.Context, undos []func(context.Context) error) error {
	for i := len(undos) - 1; i >= 0; i-- {
		if err := undos[i](ctx); err != nil {
			return err
		}
	}
	return nil
}

// rollback undoes a failed attach, the kernel's steps first, since they
// need no store: a container must not keep the interfaces of an attach
// that failed while the store is away. They run under mu and are not
// bounded: they must finish. The store's run outside mu, with their own
// short bound, so that rollbacks meeting a store that does not answer
// neither queue behind each other nor hold up other attaches; the record
// stays in flight meanwhile so that no pass works on it, and, no longer
// attaching, is given no gateway. If the store cannot take them, a later
// pass's purge finishes them.
func (a *Agent) rollback(ctx context.Context, l *localEndpoint, u *undoLog, cause error) {
	a.mu.Lock()
	l.Phase = phaseDetaching
	err := runUndos(ctx, u.kernel)
	a.unlock()
	// An attach that failed for want of the store leaves the store half
	// to a later pass: trying now would only wait for the store again.
	storeDown := errors.Is(cause, kvstore.ErrUnavailable) || errors.Is(cause, context.DeadlineExceeded)
	if err == nil && !storeDown {
		rctx, cancel := context.WithTimeout(ctx, rollbackTimeout)
		err = runUndos(rctx, u.stores)
		cancel()
	}
	a.mu.Lock()
	a.doneInflightLocked(l)
	a.unlock()
	if err != nil {
		a.log.Warn("attach rolled back in the kernel; the store part is finished when the store answers", "endpoint", l.Endpoint.Name, "err", err)
	}
}

// undoInterrupted undoes what is left of an attach or detach of the same
// endpoint or namespace that failed when the store went away: a retry
// must neither wait for the pass that would undo it nor be told that the
// namespace is attached when it is not. The kernel half holds mu, the
// store half does not (the record is in flight meanwhile, so no pass
// works on it).
func (a *Agent) undoInterrupted(ctx context.Context, network string, nsid nsID, name string) error {
	for {
		if err := a.mu.LockCtx(ctx); err != nil {
			return fmt.Errorf("waiting for the agent: %w", err)
		}
		var l *localEndpoint
		busy := false
		for _, c := range a.locals {
			if c.Endpoint.Network != network || !(c.NetnsID == nsid && nsid != nsID{} || c.Endpoint.Name == name) {
				continue
			}
			if a.interruptedLocked(c) {
				l = c
				break
			}
			// Being undone by a pass's store phase, or detached: what
			// it leaves decides, so wait for it rather than be told the
			// endpoint exists.
			busy = busy || c.Phase == phaseDetaching && a.inflight[c.key()]
		}
		if l == nil && busy {
			a.unlock()
			select {
			case <-ctx.Done():
				return fmt.Errorf("waiting for the earlier operation on it to finish: %w", ctx.Err())
			case <-time.After(20 * time.Millisecond):
			}
			continue
		}
		if l == nil {
			a.unlock()
			return nil
		}
		err := a.purgeKernel(ctx, l)
		if err == nil {
			a.inflight[l.key()] = true
		}
		a.unlock()
		if err == nil {
			pctx, cancel := context.WithTimeout(ctx, rollbackTimeout)
			err = a.purgeStore(pctx, l, true)
			cancel()
			a.mu.Lock()
			a.doneInflightLocked(l)
			a.unlock()
		}
		if err != nil {
			return fmt.Errorf("undo the earlier failed operation on endpoint %q first: %w", l.Endpoint.Name, err)
		}
	}
}

// attachKernel builds an attaching endpoint's datapath: the network's
// namespace if needed, the veth pair and the container's gateway
// interface, each with its undo in u.
func (a *Agent) attachKernel(ctx context.Context, l *localEndpoint, spec vtep.NetworkSpec, ip netip.Addr, u *undoLog, st *steps) (string, *api.Egress, error) {
	if err := a.mu.LockCtx(ctx); err != nil {
		return "", nil, fmt.Errorf("waiting for the agent: %w", err)
	}
	defer a.unlock() // the view holds copies: publish the address and interface set here
	// Not journaled again until the end: a purge after a crash finds the
	// address by its owner and the veth by its name.
	l.Endpoint.IP, l.Endpoint.MAC = ip, HardwareAddr(ipam.MACFromIP(ip))
	u.onKernel(func(ctx context.Context) error {
		a.dropIdleNetworkExcept(ctx, &l.Net, l) // if nothing else uses it, this attach made it
		return nil
	})
	changes, err := a.dp.EnsureNetwork(ctx, spec)
	if len(changes) > 0 {
		delete(a.applied, spec.Name) // a new VTEP has no entries
		a.events.emit(api.Event{Kind: "namespace_created", Network: l.Net.Name, Detail: spec.Name})
	}
	if err != nil {
		return "", nil, err
	}
	a.ensureDNS(&l.Net)
	st.mark("kernel-network")
	a.crashPoint("attach-network")
	u.onKernel(func(ctx context.Context) error { return a.dp.RemoveEndpoint(ctx, spec.Name, l.Endpoint.HostVeth()) })
	ifName, err := a.dp.AddEndpoint(ctx, a.endpointSpec(l))
	if err != nil {
		return "", nil, err
	}
	st.mark("kernel-veth")
	a.crashPoint("attach-veth")
	l.Endpoint.Interface = ifName
	if l.pending() {
		// Named by the runtime once it has moved it (bindNetns), which
		// also gives the container its egress and ports.
		l.Endpoint.Interface = ""
		return ifName, nil, nil
	}
	// Undone when no endpoint of the container needs the gateway any
	// more, which, once this one is no longer attaching, may be none.
	u.onKernel(func(ctx context.Context) error {
		a.dropIdleGateway(ctx, l.NetnsID)
		return nil
	})
	eg, err := a.ensureGateway(ctx, l)
	if err != nil {
		return "", nil, err
	}
	if len(l.Endpoint.Ports) > 0 {
		u.onKernel(func(ctx context.Context) error { return a.syncPublished(ctx) })
		if err := a.syncPublished(ctx); err != nil {
			return "", nil, err
		}
	}
	st.mark("kernel-gateway")
	a.crashPoint("attach-gateway")
	return ifName, eg, nil
}

func (a *Agent) endpointSpec(l *localEndpoint) vtep.EndpointSpec {
	if l.pending() {
		// Not in a container yet, or not known to be: only br0's side
		// is checked, and a lost pair is made again for the runtime.
		return vtep.EndpointSpec{Network: l.Net.NamespaceName(), HostVeth: l.Endpoint.HostVeth(), IfName: l.Handoff,
			Addr: l.addrPrefix(), MAC: net.HardwareAddr(l.Endpoint.MAC), MTU: l.MTU, Handoff: true}
	}
	return vtep.EndpointSpec{
		Network:     l.Net.NamespaceName(),
		ContainerNS: l.Netns,
		HostVeth:    l.Endpoint.HostVeth(),
		IfName:      l.Endpoint.Interface,
		Addr:        l.addrPrefix(),
		MAC:         net.HardwareAddr(l.Endpoint.MAC),
		MTU:         l.MTU,
	}
}

// interruptedLocked reports whether a local record is what remains of an
// attach or detach that failed half way (not one under way).
func (a *Agent) interruptedLocked(l *localEndpoint) bool {
	return l.Phase != phaseAttached && !a.inflight[l.key()]
}

// Detach removes a local endpoint.
func (a *Agent) Detach(ctx context.Context, network, name string) error {
	start := time.Now()
	err := a.detach(ctx, network, name)
	metrics.Since(metrics.DetachDuration, start)
	if err != nil {
		metrics.DetachErrors.WithLabelValues(ErrorCode(err)).Inc()
	}
	return err
}

func (a *Agent) detach(ctx context.Context, network, name string) error {
	ctx, cancel := context.WithTimeout(ctx, AttachTimeout)
	defer cancel()
	if err := ValidateName("network", network); err != nil {
		return &codedError{code: api.CodeInvalid, msg: err.Error()}
	}
	if err := ValidateName("endpoint", name); err != nil {
		return &codedError{code: api.CodeInvalid, msg: err.Error()}
	}
	defer a.ops.enter(network)() // a pass repairs no record of the network meanwhile
	// Fail early and change nothing when the store cannot be written;
	// asked before taking mu, which attaches would wait behind.
	if _, err := a.store.Get(ctx, networkKey(network)); err != nil && !errors.Is(err, kvstore.ErrNotFound) {
		return fmt.Errorf("detach %s: %w", name, err)
	}
	if err := a.mu.LockCtx(ctx); err != nil {
		return fmt.Errorf("detach %s: waiting for the agent: %w", name, err)
	}
	l := a.locals[network+"/"+name]
	if l == nil || a.inflight[l.key()] {
		a.unlock()
		if l != nil {
			return conflictf("endpoint %q of network %q is being attached or detached; try again", name, network)
		}
		kv, err := a.store.Get(ctx, endpointKey(network, name))
		if err == nil {
			var e Endpoint
			if json.Unmarshal(kv.Value, &e) == nil && e.Node != a.cfg.Node {
				return conflictf("endpoint %q of network %q is on node %s: detach it there", name, network, e.Node)
			}
		}
		return notFoundf("endpoint %q not found on network %q on this node", name, network)
	}
	prev := l.Phase
	l.Phase = phaseDetaching
	if err := a.state.save(l); err != nil {
		l.Phase = prev
		a.unlock()
		return fmt.Errorf("detach %s: %w", name, err)
	}
	a.crashPoint("detach-journal")
	if err := a.purgeKernel(ctx, l); err != nil {
		a.unlock()
		return fmt.Errorf("detach %s: %w (the agent finishes it when it can)", name, err)
	}
	// In flight while its store half runs outside mu: no pass takes it
	// for an interrupted operation meanwhile.
	a.inflight[l.key()] = true
	a.unlock()
	err := a.purgeStore(ctx, l, true)
	a.mu.Lock()
	defer a.unlock()
	a.doneInflightLocked(l)
	if err != nil {
		return fmt.Errorf("detach %s: %w (its interfaces are gone; the agent removes its record when the store answers)", name, err)
	}
	a.log.Info("endpoint detached", "network", network, "endpoint", name)
	a.events.emit(api.Event{Kind: "detach", Network: network, Node: a.cfg.Node, Endpoint: name, IP: l.Endpoint.IP.String()})
	a.dropIdleNetwork(ctx, &l.Net)
	return nil
}

// purge undoes everything an endpoint may have: the kernel interfaces
// (its veth, and the container's gateway if no other endpoint needs it),
// then the store record and the address, and finally the local record.
// The kernel goes first because it needs no store: an endpoint given up
// on (a detach, a failed attach, a gone container) must not keep its
// interfaces while the store is away. Each step is a no-op when its part
// is already gone, so a purge cut short by a crash or a store outage is
// simply run again; until then the record, no longer attached, keeps the
// address held.
func (a *Agent) purge(ctx context.Context, l *localEndpoint) error {
	if err := a.purgeKernel(ctx, l); err != nil {
		return err
	}
	return a.purgeStore(ctx, l, false)
}

// purgeKernel is purge's first half: the endpoint's interfaces, its
// container's gateway if nothing else needs it, its published ports.
func (a *Agent) purgeKernel(ctx context.Context, l *localEndpoint) error {
	e := &l.Endpoint
	if l.Phase == phaseAttached {
		// No longer wanted, whatever happens next: the gateway and the
		// published ports are computed without it.
		l.Phase = phaseDetaching
	}
	if err := a.dp.RemoveEndpoint(ctx, l.Net.NamespaceName(), e.HostVeth()); err != nil {
		return fmt.Errorf("remove interfaces: %w", err)
	}
	if l.NetnsID != (nsID{}) {
		a.dropIdleGateway(ctx, l.NetnsID)
	}
	if len(e.Ports) > 0 {
		if err := a.syncPublished(ctx); err != nil {
			// A full pass removes the forward.
			a.log.Warn("remove published ports", "endpoint", e.Name, "err", err)
		}
	}
	a.crashPoint("purge-interfaces")
	return nil
}

// purgeStore is purge's second half: the record, the address, and the
// journal entry last. With unlocked, the caller does not hold mu, which
// is then taken for the journal entry alone.
func (a *Agent) purgeStore(ctx context.Context, l *localEndpoint, unlocked bool) error {
	if err := a.unpublish(ctx, l); err != nil {
		return err
	}
	a.crashPoint("purge-unpublished")
	if err := a.releaseAddrs(ctx, l); err != nil {
		return err
	}
	a.crashPoint("purge-released")
	if unlocked {
		return a.forget(l)
	}
	return a.forgetLocked(l)
}

// unpublish removes the endpoint's record, if it is still its own, and its
// address from this host's peer record, in one transaction (the committer
// writes the peer record only if the address was in it).
func (a *Agent) unpublish(ctx context.Context, l *localEndpoint) error {
	e := &l.Endpoint
	var ops []kvstore.Op
	kv, err := a.store.Get(ctx, endpointKey(e.Network, e.Name))
	switch {
	case err == nil:
		var cur Endpoint
		if json.Unmarshal(kv.Value, &cur) == nil && cur.ID == e.ID {
			ops = []kvstore.Op{{Kind: kvstore.OpCheckIndex, Key: kv.Key, Index: kv.ModifyIndex}, {Kind: kvstore.OpDelete, Key: kv.Key}}
		}
	case !errors.Is(err, kvstore.ErrNotFound):
		return fmt.Errorf("unpublish endpoint: %w", err)
	}
	if err := a.commit(ctx, &commitReq{netID: l.Net.ID, ops: ops, del: e.IP}); err != nil {
		return fmt.Errorf("unpublish endpoint: %w", err)
	}
	return nil
}

// releaseAddrs releases the endpoint's address; without one recorded (a
// crash between allocating and recording it), whatever its owner holds.
func (a *Agent) releaseAddrs(ctx context.Context, l *localEndpoint) error {
	owner := ipam.AddrOwner{Node: a.cfg.Node, Endpoint: l.Endpoint.Name}
	if l.Endpoint.IP.IsValid() {
		return a.releaseAddr(ctx, l.Net.ID, l.Endpoint.IP, owner)
	}
	addrs, err := a.ipam.Addrs(ctx, l.Net.ID)
	if err != nil {
		return fmt.Errorf("release address: %w", err)
	}
	for ip, o := range addrs {
		if o == owner {
			if err := a.releaseAddr(ctx, l.Net.ID, ip, owner); err != nil {
				return err
			}
		}
	}
	return nil
}

// releaseAddr releases one address if the owner still holds it.
func (a *Agent) releaseAddr(ctx context.Context, netID string, ip netip.Addr, owner ipam.AddrOwner) error {
	if err := a.ipam.ReleaseAddr(ctx, netID, ip, owner); err != nil && !errors.Is(err, ipam.ErrInUse) {
		return fmt.Errorf("release %s: %w", ip, err)
	}
	return nil
}

// forget drops the endpoint's journal entry and local record; mu is taken
// for it.
func (a *Agent) forget(l *localEndpoint) error {
	a.mu.Lock()
	defer a.unlock()
	return a.forgetLocked(l)
}

func (a *Agent) forgetLocked(l *localEndpoint) error {
	if err := a.state.remove(l.Endpoint.Network, l.Endpoint.Name); err != nil {
		return err
	}
	delete(a.locals, l.key())
	// With the record, in the same hold of mu: an attach of the same name
	// may start as soon as mu is released.
	delete(a.inflight, l.key())
	return nil
}

// doneInflightLocked ends an operation's in-flight mark, unless its record
// was forgotten and the name has been taken by another operation since:
// the mark is by name, and that one's.
func (a *Agent) doneInflightLocked(l *localEndpoint) {
	if cur := a.locals[l.key()]; cur == nil || cur == l {
		delete(a.inflight, l.key())
	}
}

// dropIdleNetwork removes a network's namespace once its last local
// endpoint is gone.
func (a *Agent) dropIdleNetwork(ctx context.Context, n *Network) {
	a.dropIdleNetworkExcept(ctx, n, nil)
}

// dropIdleNetworkExcept is dropIdleNetwork with the record except not
// counted: an attach being rolled back.
func (a *Agent) dropIdleNetworkExcept(ctx context.Context, n *Network, except *localEndpoint) {
	ns := n.NamespaceName()
	for _, l := range a.locals {
		if l != except && l.Net.NamespaceName() == ns {
			return
		}
	}
	if a.journalGap(n.Name) {
		// A journal record of the network could not be read: the
		// namespace may hold endpoints this host cannot account for.
		a.log.Warn("keeping a network namespace no readable journal record needs: the journal of its network has unreadable records", "namespace", ns, "network", n.Name)
		return
	}
	if err := a.removeNetworkNS(ctx, ns); err != nil {
		a.log.Warn("remove idle network namespace", "namespace", ns, "err", err)
		return
	}
	a.events.emit(api.Event{Kind: "namespace_removed", Detail: ns})
}

// removeNetworkNS deletes a network namespace that no local record
// needs, with its DNS server (whose sockets live in it) and what this
// host programmed there. Called with mu held.
func (a *Agent) removeNetworkNS(ctx context.Context, ns string) error {
	if a.dns != nil {
		a.dns.Stop(a.dp.NetNSPath(ns))
	}
	if err := a.dp.DeleteNetwork(ctx, ns); err != nil {
		return err
	}
	delete(a.applied, ns)
	return nil
}

// localExists reports whether the namespace an endpoint was attached to is
// still the same namespace (a deleted and re-created name is not).
func localExists(l *localEndpoint) bool {
	id, err := statNS(l.Netns)
	if err != nil {
		return !errors.Is(err, os.ErrNotExist) && !errors.Is(err, syscall.ENOENT)
	}
	return id == l.NetnsID
}

// CrashPoints are the places where a test can make the agent die as if
// killed (Config.CrashAt), to prove that every step is finished or undone
// after a restart.
var CrashPoints = []string{
	"attach-journal", "attach-allocated", "attach-network", "attach-veth", "attach-gateway", "attach-published",
	"detach-journal", "purge-interfaces", "purge-unpublished", "purge-released",
}

func (a *Agent) crashPoint(name string) {
	if a.cfg.PauseAt == name {
		time.Sleep(a.cfg.PauseFor)
	}
	if a.cfg.CrashAt == name {
		a.log.Warn("crashing on purpose (test hook)", "at", name)
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // never go on: the signal is on its way
	}
}
