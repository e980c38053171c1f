package overlay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/atomicfile"
	"github.com/vxnet/vxnet/ipam"
	"github.com/vxnet/vxnet/kvstore"
)

// A runtime such as Docker builds a container's interface from the
// driver's answers: it asks for an address before the endpoint exists
// (Reserve), has the endpoint made with its interface left in the host's
// namespace (AttachRequest.Handoff), moves that interface into the
// container itself, and says where the container will be (SetNetns)
// before the container's namespace exists. The agent then watches for the
// interface to arrive there and only then gives the container its gateway
// interface and published ports (bindNetns): the container's namespace is
// Docker's to make.

// reservationTTL is how long a reservation that no endpoint took over is
// kept before a full pass releases it: Docker asks for the endpoint
// milliseconds after the address.
const reservationTTL = 10 * time.Minute

// bindWait bounds how long the agent watches for a handed-off interface to
// arrive (polls fast for bindFast, then slower); later, the next passes
// look again.
const (
	bindWait     = 2 * time.Minute
	bindFast     = 10 * time.Second
	bindFastPoll = 10 * time.Millisecond
	bindSlowPoll = 250 * time.Millisecond
)

// Reserve reserves an address of the network for this host: want if
// given, else the next free one.
func (a *Agent) Reserve(ctx context.Context, network, want string) (*api.Reservation, error) {
	n, _, err := a.getNetwork(ctx, network)
	if err != nil {
		return nil, err
	}
	if n.Removing {
		return nil, conflictf("network %q is being removed", network)
	}
	var ip netip.Addr
	if want != "" {
		if ip, err = netip.ParseAddr(want); err != nil || !ip.Is4() {
			return nil, invalidf("ip %q is not an IPv4 address", want)
		}
	}
	lease := ipam.NetworkLease{Subnet: n.Subnet, Gateway: n.Gateway, VNI: n.VNI}
	owner := ipam.ReservationOwner(a.cfg.Node, time.Now())
	got, err := a.ipam.AllocateAddr(ctx, n.ID, lease, ip, owner)
	if err != nil {
		return nil, fmt.Errorf("reserve an address of %s: %w", network, err)
	}
	if err := a.resv.add(n.ID, got, owner); err != nil {
		// Unkept, a restart would forget it and leave the address
		// taken: not reserved at all, then. The release must not
		// depend on the caller still waiting; if it fails, the entry
		// stays in memory for this run's sweep.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if rerr := a.ipam.ReleaseAddr(rctx, n.ID, got, owner); rerr != nil {
			a.log.Warn("release an address whose reservation could not be kept; this run's sweep does", "ip", got, "err", rerr)
		} else {
			a.resv.drop([]reservation{{n.ID, got, owner}})
		}
		return nil, fmt.Errorf("reserve an address of %s: %w", network, err)
	}
	return &api.Reservation{IP: got.String()}, nil
}

// reservations are the addresses this agent reserved, so that full passes
// release those no endpoint took over on any network, also one with no
// endpoint here (whose addresses those passes do not list). They are kept
// in the state dir too: a restart would otherwise forget those of
// networks without endpoints here, and their addresses would stay taken.
type reservations struct {
	mu   sync.Mutex
	path string // "" keeps them in memory only
	m    map[reservation]time.Time
}

type reservation struct {
	netID string
	ip    netip.Addr
	owner ipam.AddrOwner
}

// reservationRecord is a reservation as the state dir keeps it.
type reservationRecord struct {
	Network string         `json:"network"` // id
	IP      netip.Addr     `json:"ip"`
	Owner   ipam.AddrOwner `json:"owner"`
	At      time.Time      `json:"at"`
}

// load reads the reservations a previous run kept. A file that cannot be
// read loses only the release of what it held: the addresses stay taken.
func (r *reservations) load() error {
	data, err := os.ReadFile(r.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read reservations: %w", err)
	}
	var recs []reservationRecord
	if err := json.Unmarshal(data, &recs); err != nil {
		return fmt.Errorf("read reservations %s: %w", r.path, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.m = make(map[reservation]time.Time, len(recs))
	for _, rec := range recs {
		r.m[reservation{rec.Network, rec.IP, rec.Owner}] = rec.At
	}
	return nil
}

// saveLocked writes the reservations; called with mu held.
func (r *reservations) saveLocked() error {
	if r.path == "" {
		return nil
	}
	recs := make([]reservationRecord, 0, len(r.m))
	for k, at := range r.m {
		recs = append(recs, reservationRecord{k.netID, k.ip, k.owner, at})
	}
	slices.SortFunc(recs, func(a, b reservationRecord) int { return a.At.Compare(b.At) })
	data, err := json.Marshal(recs)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(r.path), 0o700); err != nil {
		return fmt.Errorf("keep reservations: %w", err)
	}
	if err := atomicfile.Write(r.path, data, 0o600); err != nil {
		return fmt.Errorf("keep reservations: %w", err)
	}
	return nil
}

func (r *reservations) add(netID string, ip netip.Addr, owner ipam.AddrOwner) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = map[reservation]time.Time{}
	}
	r.m[reservation{netID, ip, owner}] = time.Now()
	return r.saveLocked()
}

// drop removes exactly these reservations (owner included: a newer
// reservation of the same address is another's).
func (r *reservations) drop(ks []reservation) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := len(r.m)
	for _, k := range ks {
		delete(r.m, k)
	}
	if len(r.m) == n {
		return nil
	}
	return r.saveLocked()
}

// forget removes every reservation of ip: it was released, or an endpoint
// took it over.
func (r *reservations) forget(netID string, ip netip.Addr) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := len(r.m)
	for k := range r.m {
		if k.netID == netID && k.ip == ip {
			delete(r.m, k)
		}
	}
	if len(r.m) == n {
		return nil
	}
	return r.saveLocked()
}

// sweep releases the reservations older than reservationTTL that are
// still reservations (the exact owner: one taken over is an endpoint's).
func (r *reservations) sweep(ctx context.Context, a *Agent) {
	r.mu.Lock()
	var old []reservation
	for k, t := range r.m {
		if time.Since(t) > reservationTTL {
			old = append(old, k)
		}
	}
	r.mu.Unlock()
	var done []reservation
	for _, k := range old {
		err := a.ipam.ReleaseAddr(ctx, k.netID, k.ip, k.owner)
		if err != nil && !errors.Is(err, ipam.ErrInUse) {
			a.log.Debug("release an old reservation; next full pass", "ip", k.ip, "err", err)
			continue
		}
		if err == nil {
			a.log.Warn("released an address reserved for an endpoint that never came", "ip", k.ip)
			a.leakRemoved("address", a.networkName(k.netID), k.ip.String(), 1)
		}
		done = append(done, k)
	}
	if err := r.drop(done); err != nil {
		a.log.Warn("forget released reservations", "err", err)
	}
}

// ReleaseReservation releases an address this host reserved and no
// endpoint took over. Anything else is left alone: an endpoint's address
// goes with its detach, and Docker releases the address after that.
func (a *Agent) ReleaseReservation(ctx context.Context, network, addr string) error {
	ip, err := netip.ParseAddr(addr)
	if err != nil || !ip.Is4() {
		return invalidf("ip %q is not an IPv4 address", addr)
	}
	n, _, err := a.getNetwork(ctx, network)
	if err != nil {
		return err
	}
	if err := a.ipam.ReleaseReservation(ctx, n.ID, ip, a.cfg.Node); err != nil {
		return fmt.Errorf("release %s of %s: %w", ip, network, err)
	}
	if err := a.resv.forget(n.ID, ip); err != nil {
		// Released: a later sweep finds nothing to release.
		a.log.Warn("forget a released reservation", "ip", ip, "err", err)
	}
	return nil
}

// abandonedHandoff reports whether a handed-off interface has waited so
// long for its container that the runtime must have given up on it
// without saying so (its DeleteEndpoint lost while the agent was down):
// the namespace it was to go to does not exist, or none was named.
func abandonedHandoff(l *localEndpoint, now time.Time) bool {
	if !l.pending() || now.Sub(l.Endpoint.Created) < reservationTTL {
		return false
	}
	if l.Netns == "" {
		return true
	}
	_, err := os.Stat(l.Netns)
	return errors.Is(err, os.ErrNotExist)
}

// staleReservation reports whether a full pass may release an address
// held by o, an owner that is no local endpoint.
func staleReservation(o ipam.AddrOwner, now time.Time) bool {
	since, ok := o.Reserved()
	return !ok || now.Sub(since) > reservationTTL
}

// SetNetns records where the runtime moves a handed-off interface and
// starts watching for it there. The path need not be a namespace yet:
// Docker names it before it makes it.
func (a *Agent) SetNetns(ctx context.Context, network, name, path string) error {
	if !filepath.IsAbs(path) {
		return invalidf("netns %q: give an absolute path", path)
	}
	if err := a.mu.LockCtx(ctx); err != nil {
		return fmt.Errorf("waiting for the agent: %w", err)
	}
	l := a.locals[network+"/"+name]
	switch {
	case l == nil || l.Phase == phaseDetaching:
		a.unlock()
		return notFoundf("endpoint %q of network %q is not on this host", name, network)
	case l.Phase != phaseAttached:
		a.unlock()
		return conflictf("endpoint %q of network %q is still being attached", name, network)
	case l.Handoff == "":
		a.unlock()
		return invalidf("endpoint %q was attached to %s, not handed off", name, l.Netns)
	case !l.pending() && l.Netns == path:
		a.unlock()
		return nil
	case !l.pending():
		a.unlock()
		return conflictf("endpoint %q is in %s already", name, l.Netns)
	}
	if l.Netns != path {
		prev := l.Netns
		l.Netns = path
		if err := a.state.save(l); err != nil {
			l.Netns = prev
			a.unlock()
			return fmt.Errorf("endpoint %s: %w", name, err)
		}
	}
	a.startBindLocked(l.key())
	a.unlock()
	return nil
}

// startBindLocked starts watching for a pending endpoint's interface in
// its namespace, unless that is under way. Called with mu held.
func (a *Agent) startBindLocked(key string) {
	if a.binding[key] || a.stopping || !a.running.Load() {
		return // before Run, the first pass starts it
	}
	a.binding[key] = true
	life := a.life
	a.bg.Go(func() {
		defer func() {
			a.mu.Lock()
			delete(a.binding, key)
			a.unlock()
		}()
		start := time.Now()
		for time.Since(start) < bindWait {
			done, err := a.bindNetns(life, key)
			if done {
				return
			}
			if err != nil && time.Since(start) > bindFast {
				a.log.Debug("handed-off interface not in its namespace yet", "endpoint", key, "err", err)
			}
			poll := bindFastPoll
			if time.Since(start) > bindFast {
				poll = bindSlowPoll
			}
			select {
			case <-life.Done():
				return
			case <-time.After(poll):
			}
		}
		a.log.Warn("a handed-off interface did not arrive in its namespace; the next passes look again", "endpoint", key)
	})
}

// bindNetns looks for a pending endpoint's interface in the namespace the
// runtime named, and once the runtime has moved it there and given it its
// address, records the namespace and gives the container its gateway
// interface and published ports. done: nothing more to wait for.
func (a *Agent) bindNetns(ctx context.Context, key string) (done bool, err error) {
	a.mu.Lock()
	l := a.locals[key]
	if l == nil || !l.pending() || l.Netns == "" || l.Phase == phaseDetaching {
		a.unlock()
		return true, nil
	}
	path, netName, veth, addr := l.Netns, l.Net.NamespaceName(), l.Endpoint.HostVeth(), l.addrPrefix()
	a.unlock()
	if err := a.dp.CheckNetNS(path); err != nil {
		return false, err
	}
	id, err := statNS(path)
	if err != nil {
		return false, err
	}
	// What resolveNetns refuses of a netns given at attach: the agent's
	// own, or an overlay's.
	if self, err := statNS("/proc/self/ns/net"); err == nil && self == id || strings.HasPrefix(filepath.Clean(path), filepath.Clean(a.cfg.NetNSDir)+"/") {
		return false, fmt.Errorf("netns %s is the agent's own or an overlay's: no container's", path)
	}
	ifName, hasAddr, found, err := a.dp.FindPeer(ctx, netName, veth, path, addr)
	switch {
	case err != nil:
		return false, err
	case !found:
		return false, errors.New("not moved in yet")
	case !hasAddr:
		// The runtime is still configuring it: a gateway made now could
		// race its routes.
		return false, errors.New("no address yet")
	}
	if err := a.mu.LockCtx(ctx); err != nil {
		return true, err
	}
	defer a.unlock()
	if a.locals[key] != l || !l.pending() || l.Netns != path || l.Phase == phaseDetaching {
		return true, nil
	}
	l.NetnsID, l.Endpoint.Interface = id, ifName
	if err := a.state.save(l); err != nil {
		l.NetnsID, l.Endpoint.Interface = nsID{}, ""
		return false, fmt.Errorf("journal: %w", err)
	}
	if _, err := a.ensureGateway(ctx, l); err != nil {
		// The next full pass makes it (reconcileEgress).
		a.log.Warn("gateway interface of a handed-off endpoint", "endpoint", key, "err", err)
	}
	if len(l.Endpoint.Ports) > 0 {
		if err := a.syncPublished(ctx); err != nil {
			a.log.Warn("published ports of a handed-off endpoint", "endpoint", key, "err", err)
		}
	}
	a.log.Info("handed-off interface is in its container", "network", l.Endpoint.Network, "endpoint", l.Endpoint.Name, "interface", ifName, "netns", path)
	a.events.emit(api.Event{Kind: "attach", Network: l.Endpoint.Network, Node: a.cfg.Node, Endpoint: l.Endpoint.Name,
		IP: l.Endpoint.IP.String(), Detail: ifName + " in " + path + " (moved there by the runtime)"})
	return true, nil
}

// SetAliases replaces an endpoint's other DNS names (a runtime learns its
// container's name only once it runs: Docker passes the driver none). The
// endpoint record and this host's peer record are written together; the
// network's attaches wait meanwhile, since the peer record is written
// whole.
func (a *Agent) SetAliases(ctx context.Context, network, name string, aliases []string) error {
	for _, al := range aliases {
		if err := ValidateName("alias", al); err != nil {
			return &codedError{code: api.CodeInvalid, msg: err.Error()}
		}
	}
	// The network's lock, as a pass takes it, but waited for: give up
	// with the request rather than hold up the attaches queued behind.
	lk := a.ops.get(network)
	for !lk.TryLock() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the operations on network %s: %w", network, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	defer lk.Unlock()
	if err := a.mu.LockCtx(ctx); err != nil {
		return fmt.Errorf("waiting for the agent: %w", err)
	}
	l := a.locals[network+"/"+name]
	if l == nil || l.Phase != phaseAttached {
		a.unlock()
		return notFoundf("endpoint %q of network %q is not attached on this host", name, network)
	}
	if slices.Equal(l.Endpoint.Aliases, aliases) {
		a.unlock()
		return nil
	}
	prev := l.Endpoint.Aliases
	l.Endpoint.Aliases = slices.Clone(aliases)
	if err := a.state.save(l); err != nil {
		l.Endpoint.Aliases = prev
		a.unlock()
		return fmt.Errorf("endpoint %s: %w", name, err)
	}
	netID, rec := l.Net.ID, l.Endpoint
	var want []netip.Addr
	for _, o := range a.locals {
		if o.Net.ID == netID && o.Phase == phaseAttached {
			want = append(want, o.Endpoint.IP)
		}
	}
	a.unlock() // the view now has the names the peer record is written with
	key := endpointKey(network, name)
	kv, err := a.store.Get(ctx, key)
	if err != nil {
		return fmt.Errorf("endpoint %s: %w", name, err)
	}
	data, _ := json.Marshal(&rec)
	// As publishOps, but over the record as it is.
	ops := []kvstore.Op{{Kind: kvstore.OpCAS, Key: key, Value: data, Index: kv.ModifyIndex}}
	if a.sessionsInUse() {
		ops = []kvstore.Op{{Kind: kvstore.OpCheckIndex, Key: key, Index: kv.ModifyIndex}, {Kind: kvstore.OpLock, Key: key, Value: data}}
	}
	if err := a.commit(ctx, &commitReq{netID: netID, ops: ops, set: want, setOK: true}); err != nil {
		// The journal has them: the next pass writes the peer record.
		return fmt.Errorf("endpoint %s: write its names: %w", name, err)
	}
	a.log.Info("endpoint names set", "network", network, "endpoint", name, "aliases", aliases)
	return nil
}
