// Package overlay holds the model (networks, endpoints, nodes), this host's
// desired state, and the reconciler that drives the kernel through vtep.
//
// The flow is one way: store events and local records -> desired state ->
// diff -> kernel. Attach and detach change the store and the local records
// and then run the same reconciler as the watch events and the periodic
// resync, so there is one path that repairs and converges.
package overlay

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/dnsserver"
	"github.com/vxnet/vxnet/ipam"
	"github.com/vxnet/vxnet/kvstore"
	"github.com/vxnet/vxnet/metrics"
	"github.com/vxnet/vxnet/nat"
	"github.com/vxnet/vxnet/vtep"
)

// Config is what an agent needs to know about its host.
type Config struct {
	Node      string
	Advertise netip.Addr
	StateDir  string
	// NetNSDir is where network namespaces are bind-mounted (run dir/netns).
	NetNSDir  string
	VXLANPort int
	// UnderlayMTU is the MTU of the underlay interface; overlay interfaces
	// get 50 bytes less (the VXLAN/UDP/IPv4 header).
	UnderlayMTU    int
	ResyncInterval time.Duration
	// ReadyTimeout is how long the agent waits for the store before it
	// says it is ready anyway, its datapath built from its journal
	// (default 10s).
	ReadyTimeout time.Duration
	// NodeTTL is the store session's TTL: a host silent for longer is
	// considered gone and its endpoints are removed everywhere.
	NodeTTL time.Duration
	// HoldDown and HoldLeft are how long a peer's entries stay after its
	// records vanished with its session while it runs a Consul client
	// agent (see holdFor): HoldLeft while gossip says that agent left the
	// cluster gracefully, as it does to restart, HoldDown when gossip
	// found it failed. Records written again within the hold change
	// nothing in the kernel. A host that removed its records itself (its
	// last detach) or whose TTL ran out is not held. Defaults 1s and 15s;
	// negative: none.
	HoldDown, HoldLeft time.Duration
	// StoreName is shown in status (the store URL without secrets).
	StoreName string
	IPAM      ipam.Options
	// CrashAt names a crash point (see CrashPoints) where the agent kills
	// itself: for crash-consistency tests only.
	CrashAt string
	// PauseAt names a crash point where the agent waits PauseFor instead,
	// so that a test can act while an operation is under way.
	PauseAt  string
	PauseFor time.Duration
	// Egress configures the gateway bridge and NAT; nil turns egress off.
	Egress *nat.Config
	// DNS configures the DNS server of each network on this host (on
	// its gateway address); nil turns DNS off.
	DNS    *dnsserver.Config
	Logger *slog.Logger
}

// Agent is one host's vxnet agent.
type Agent struct {
	cfg   Config
	log   *slog.Logger
	store kvstore.Store
	ipam  *ipam.Allocator
	dp    datapath
	state stateDir
	// egress and gwAddrs are nil when egress is off.
	egress  egress
	gwAddrs *nat.AddrBook
	// egressReady: the bridge and rules were checked (guarded by mu).
	egressReady bool

	// mu serialises every change of the kernel and of the local records:
	// attach, detach and reconcile never interleave.
	mu     ctxMutex
	locals map[string]*localEndpoint
	// ops orders a pass's store repairs of a network against the
	// network's attaches and detaches (see netOps); taken before mu.
	ops netOps
	// inflight marks the attaches under way: a reconcile leaves their
	// records and interfaces alone.
	inflight map[string]bool
	// binding marks the pending endpoints whose interface is being
	// watched for in the runtime's namespace (handoff.go).
	binding map[string]bool
	// journalGaps are the networks with an unreadable journal record
	// ("": unknown ones), fixed at start: see stateDir.load.
	journalGaps map[string]bool
	// applied is, per namespace, the peers its last successful sync
	// wrote, so that the next one need only write the difference.
	applied map[string]peerSet

	cmu      sync.RWMutex
	networks map[string]*Network // store view, by name
	// netNames are the networks' names in lower case, for the DNS
	// servers, which test every name they would forward against them.
	netNames      map[string]bool
	netSynced     bool
	storeErr      error
	downSince     time.Time
	lastReconcile time.Time
	ready         bool   // a reconcile with a complete store view has run
	session       string // the node's store session, "" while it has none
	// liveness is how the session is kept alive, once the store said
	// (nil before).
	liveness *kvstore.Liveness
	// sessionErr: why the store refuses a session, if it does.
	sessionErr error
	// localsView is a copy of locals and of their records for readers
	// (status, listings), so that they never wait for a reconcile or an
	// attach holding mu. Readers must not change it.
	localsView map[string]*localEndpoint

	// identity is the store's, as this host last saw it (see intent.go).
	identity string
	lostAt   time.Time
	renewNow chan struct{}
	// fatal carries what stops the agent (a store of another format).
	fatal chan error

	// views are the peer views of the networks with local endpoints, by
	// network id (guarded by mu; each view guards itself).
	views map[string]*peerView
	// dirty are the networks whose peers changed since the last pass.
	dmu   sync.Mutex
	dirty map[string]bool
	// commits writes this host's peer records (see commit.go).
	commits *committer
	// life outlives requests: the watches an attach starts run in it.
	life context.Context
	// bg is what runs in life on behalf of requests (handoff watches):
	// Run waits for it before returning.
	bg sync.WaitGroup
	// resv are the addresses reserved and maybe not taken over.
	resv reservations
	// holdSem bounds the store lookups of vanished hosts (holdsFor).
	holdSem chan struct{}
	// stopping: Run is returning, and starts nothing more in bg (under
	// mu).
	stopping bool
	// dns runs the networks' DNS servers; nil without DNS.
	dns *dnsserver.Manager
	// identityChecked: the store's identity was compared with the one
	// remembered, once since start; until then peers are only added.
	identityChecked atomic.Bool
	// running: Run has started (and with it the session keeper).
	running atomic.Bool
	// republishAll: a new session was made; the next pass puts every
	// record of this host back under it.
	republishAll atomic.Bool
	// events is what vxnet events streams.
	events eventLog
	// metricNets are the networks with series in the per-network
	// gauges (guarded by mu).
	metricNets map[string]int
	// fates caches, by network id, what the store said of a network
	// missing from the view when nothing could be done (the pass's own:
	// only its store phase uses it).
	fates map[string]fateCache

	kick    chan struct{}
	started time.Time
}

// New prepares an agent; Run starts it.
func New(cfg Config, store kvstore.Store) (*Agent, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.ResyncInterval <= 0 {
		cfg.ResyncInterval = 30 * time.Second
	}
	if cfg.NodeTTL < 10*time.Second {
		cfg.NodeTTL = 15 * time.Second // Consul's minimum is 10s
	}
	if cfg.HoldDown == 0 {
		cfg.HoldDown = defaultHoldDown
	}
	if cfg.HoldLeft == 0 {
		cfg.HoldLeft = defaultHoldLeft
	}
	if cfg.UnderlayMTU == 0 {
		cfg.UnderlayMTU = 1500
	}
	if cfg.ReadyTimeout <= 0 {
		cfg.ReadyTimeout = 10 * time.Second
	}
	dp, err := vtep.New(vtep.Config{NetNSDir: cfg.NetNSDir, Local: cfg.Advertise, VXLANPort: cfg.VXLANPort})
	if err != nil {
		return nil, fmt.Errorf("datapath: %w", err)
	}
	var eg egress
	if cfg.Egress != nil {
		ec := *cfg.Egress
		ec.Logger = cfg.Logger
		m, err := nat.New(ec)
		if err != nil {
			return nil, fmt.Errorf("egress: %w", err)
		}
		eg = m
	}
	return newAgent(cfg, store, dp, eg)
}

// newAgent is New with the datapath and egress given (nil egress: off).
func newAgent(cfg Config, store kvstore.Store, dp datapath, eg egress) (*Agent, error) {
	var err error
	a := &Agent{
		cfg:      cfg,
		log:      cfg.Logger,
		store:    store,
		ipam:     ipam.New(store, cfg.IPAM),
		dp:       dp,
		state:    stateDir{cfg.StateDir},
		applied:  map[string]peerSet{},
		inflight: map[string]bool{},
		binding:  map[string]bool{},
		networks: map[string]*Network{},
		netNames: map[string]bool{},
		holdSem:  make(chan struct{}, holdLookups),
		views:    map[string]*peerView{},
		life:     context.Background(),
		kick:     make(chan struct{}, 1),
		renewNow: make(chan struct{}, 1),
		fatal:    make(chan error, 1),
		started:  time.Now(),
	}
	if cfg.DNS != nil {
		c := *cfg.DNS
		c.IsNetwork, c.Log = a.isNetwork, cfg.Logger.With("part", "dns")
		c.Count = func(result string) { metrics.DNSQueries.WithLabelValues(result).Inc() }
		c.IsOverlayAddr = a.isOverlayAddr
		a.dns = dnsserver.NewManager(c)
	}
	if eg != nil {
		a.egress = eg
		gw := a.egress.GatewayAddr()
		if a.gwAddrs, err = nat.OpenAddrBook(filepath.Join(cfg.StateDir, "gateway-addrs.json"), a.egress.Config().Subnet, gw); err != nil {
			return nil, fmt.Errorf("egress: %w", err)
		}
	}
	a.resv.path = filepath.Join(cfg.StateDir, "reservations.json")
	if err := a.resv.load(); err != nil {
		a.log.Error("reservations of an earlier run are lost: addresses reserved for endpoints that never came stay taken", "err", err)
	}
	locals, errs, gaps := a.state.load()
	for _, err := range errs {
		a.log.Error("unreadable endpoint journal: nothing of its network that this host cannot account for is removed until it is fixed and the agent restarted", "err", err)
	}
	a.locals, a.journalGaps = locals, gaps
	if have, err := dp.Networks(); err == nil && len(have) > 0 && len(locals) == 0 && !a.stateDirUsed() {
		// Namespaces of an earlier run, and a state dir that has never
		// been used: it was wiped, or another one given. The journal
		// that would say what these namespaces serve is not here, which
		// is no reason to take them away from their containers.
		a.log.Error("network namespaces of an earlier run exist but the state dir holds no journal (wiped, or another --state-dir?); nothing of them is removed",
			"namespaces", have, "netns_dir", cfg.NetNSDir, "state_dir", cfg.StateDir)
		a.journalGaps[""] = true
	}
	a.commits = &committer{a: a, reqs: make(chan *commitReq, 64), published: publishedAddrs(locals)}
	a.publishView()
	return a, nil
}

// stateDirUsed reports whether an agent has run on this state dir before:
// it leaves its session or the store's identity there.
func (a *Agent) stateDirUsed() bool {
	for _, f := range []string{a.sessionFile(), a.identityFile()} {
		if _, err := os.Stat(f); err == nil {
			return true
		}
	}
	return false
}

// publishView copies locals for readers; called with mu held, after every
// change of locals or of a record in it. The records are copied too, not
// only the map: attach and detach change a record's fields (Phase) holding
// mu alone, while readers of the view hold only cmu. A shallow copy is
// enough because the fields that are slices (the MAC) are replaced, never
// written in place.
func (a *Agent) publishView() {
	v := make(map[string]*localEndpoint, len(a.locals))
	attached := map[string]int{}
	for k, l := range a.locals {
		c := *l
		v[k] = &c
		if l.Phase == phaseAttached {
			attached[l.Endpoint.Network]++
		}
	}
	a.publishLocalMetrics(attached)
	a.cmu.Lock()
	a.localsView = v
	a.cmu.Unlock()
	a.setOwnNames()
}

// setOwnNames gives each network's zone this host's endpoints as its
// journal has them, not as the store last showed them: they answer while
// the store does not, and before the own record's round trip. Called with
// mu held; a zone whose entries are the same is not touched.
func (a *Agent) setOwnNames() {
	if a.dns == nil {
		return
	}
	own := map[string][]dnsserver.Entry{}
	for _, l := range a.locals {
		if l.Phase == phaseAttached && l.Endpoint.IP.IsValid() {
			own[l.Net.ID] = append(own[l.Net.ID], dnsserver.Entry{IP: l.Endpoint.IP, Names: append([]string{l.Endpoint.Name}, l.Endpoint.Aliases...)})
		}
	}
	for id, v := range a.views {
		if v.zone == nil {
			continue
		}
		es := own[id]
		slices.SortFunc(es, func(x, y dnsserver.Entry) int { return x.IP.Compare(y.IP) })
		if !slices.EqualFunc(v.ownNames, es, func(x, y dnsserver.Entry) bool { return x.IP == y.IP && slices.Equal(x.Names, y.Names) }) {
			v.ownNames = es
			v.zone.SetNode(a.cfg.Node, es)
		}
	}
}

// unlock publishes the locals view and releases mu.
func (a *Agent) unlock() {
	a.publishView()
	a.mu.Unlock()
}

func (a *Agent) localMTU() int { return a.cfg.UnderlayMTU - 50 }

// Run watches the store and reconciles until ctx is done. ready is called
// once, after the first reconcile with a complete view of the store (or,
// if the store cannot be reached, after the local state has been ensured),
// so that a service manager knows when the host's datapath is in place.
func (a *Agent) Run(ctx context.Context, ready func()) error {
	// Stopped means stopped: the helpers below are done (and write
	// nothing more to the state dir or the store) when Run returns, for
	// whatever reason it returns.
	if a.dns != nil {
		// Last: a pass or an attach still under way may start a server.
		defer a.dns.Close()
	}
	var helpers sync.WaitGroup
	defer helpers.Wait()
	defer func() {
		// The API may still call in: nothing new may join bg once it
		// is waited for.
		a.mu.Lock()
		a.stopping = true
		a.unlock()
		a.bg.Wait()
	}()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	a.mu.Lock()
	a.life = ctx
	a.ensureViews(ctx)
	a.unlock()
	a.running.Store(true)
	helpers.Go(func() { a.watch(ctx, networksPrefix, a.applyNetworks) })
	helpers.Go(func() { a.commits.run(ctx) })
	helpers.Go(func() { a.registerNode(ctx) })
	helpers.Go(func() { a.keepAlive(ctx) })

	ticker := time.NewTicker(a.cfg.ResyncInterval)
	defer ticker.Stop()
	// Do not wait forever for the store to announce readiness: the datapath
	// is built from local records meanwhile, and status says what is wrong.
	readyTimer := time.NewTimer(a.cfg.ReadyTimeout)
	defer readyTimer.Stop()
	notified := false
	notify := func() {
		if !notified && ready != nil {
			notified = true
			ready()
		}
	}
	// fullSynced: a full pass has run with a complete view of the store,
	// the one that removes what a previous life leaked; until then every
	// pass with a complete view is a full one, whether or not the ready
	// timer fired first.
	fullSynced := false
	runStart := time.Now()
	var viewTimer *time.Timer
	for {
		full := false
		var viewWaited <-chan time.Time
		if viewTimer != nil {
			viewWaited = viewTimer.C
		}
		select {
		case <-ctx.Done():
			return nil
		case err := <-a.fatal:
			return err
		case <-a.kick:
		case <-viewWaited:
		case <-ticker.C:
			full = true
		case <-readyTimer.C:
			synced := a.synced()
			a.reconcile(ctx, true)
			fullSynced = fullSynced || synced
			notify()
			continue
		}
		synced := a.synced()
		if synced && !fullSynced {
			if wait := viewWait - time.Since(runStart); wait > 0 && a.viewsPending() {
				// The first full pass takes the peers with it: a light
				// one until the local networks' views have their first
				// answer, for at most viewWait.
				if viewTimer == nil {
					viewTimer = time.NewTimer(wait)
					defer viewTimer.Stop()
				}
				a.reconcile(ctx, false)
				continue
			}
			full, fullSynced = true, true
		}
		a.reconcile(ctx, full)
		if synced {
			notify()
		}
	}
}

// viewWait bounds how long the first full pass waits for the local
// networks' peer views (see Run): one store round trip, normally.
const viewWait = 2 * time.Second

// viewsPending reports whether a local network's peer view has not had its
// first answer from the store yet.
func (a *Agent) viewsPending() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, v := range a.views {
		if _, _, synced := v.own(); !synced {
			return true
		}
	}
	return false
}

func (a *Agent) trigger() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

func (a *Agent) synced() bool {
	a.cmu.RLock()
	defer a.cmu.RUnlock()
	return a.netSynced
}

// watch feeds one prefix of the store into the cache.
func (a *Agent) watch(ctx context.Context, prefix string, apply func(context.Context, []*kvstore.KV)) {
	for ev := range a.store.Watch(ctx, prefix) {
		if ev.Err != nil {
			a.setStoreErr(ev.Err)
			continue
		}
		a.setStoreErr(nil)
		apply(ctx, ev.Pairs)
		a.trigger()
	}
}

// storeDown reports whether the last request to the store failed for want
// of an answer: passes then skip their store phase rather than hold the
// agent's lock through request timeouts that detach and attach would wait
// behind.
func (a *Agent) storeDown() bool {
	a.cmu.RLock()
	defer a.cmu.RUnlock()
	return a.storeErr != nil
}

func (a *Agent) setStoreErr(err error) {
	a.cmu.Lock()
	defer a.cmu.Unlock()
	switch {
	case err != nil && a.storeErr == nil:
		a.downSince = time.Now()
		a.log.Error("store unreachable; datapath keeps its current state", "err", err)
		a.events.emit(api.Event{Kind: "store_down", Detail: err.Error()})
	case err == nil && a.storeErr != nil:
		a.log.Info("store reachable again", "down_for", time.Since(a.downSince).Round(time.Millisecond))
		a.events.emit(api.Event{Kind: "store_up", Detail: "down for " + time.Since(a.downSince).Round(time.Millisecond).String()})
		a.downSince = time.Time{}
		// The session may have ended meanwhile (a local Consul agent
		// that restarted ends it): check it now, not at the next renewal.
		a.kickRenew()
	}
	a.storeErr = err
	if err == nil {
		metrics.StoreUp.Set(1)
	} else {
		metrics.StoreUp.Set(0)
	}
}

func (a *Agent) applyNetworks(_ context.Context, pairs []*kvstore.KV) {
	m := make(map[string]*Network, len(pairs))
	for _, kv := range pairs {
		var n Network
		if err := decodeRecord(kv.Key, kv.Value, &n); err != nil {
			a.log.Warn("skipping bad network record", "err", err)
			continue
		}
		m[n.Name] = &n
	}
	names := make(map[string]bool, len(m))
	for n := range m {
		names[strings.ToLower(n)] = true
	}
	a.cmu.Lock()
	a.networks, a.netNames, a.netSynced = m, names, true
	a.cmu.Unlock()
}

// registerNode publishes this host, retrying until the store answers, and
// refreshes its last-seen time at every resync interval.
func (a *Agent) registerNode(ctx context.Context) {
	rec := Node{Version: recordVersion, Name: a.cfg.Node, Address: a.cfg.Advertise, Agent: api.Version, Started: a.started}
	if p, err := a.dp.UnderlayPrefix(); err == nil {
		rec.Underlay = p
	}
	checked := false
	repeat(ctx, a.cfg.ResyncInterval, a.log, "register node", func(ctx context.Context) error {
		// First: a local Consul agent that has joined no server fails
		// everything after with less to say about it.
		l, err := a.detectLiveness(ctx)
		if err != nil {
			return err
		}
		if !checked {
			if err := a.checkFormat(ctx); errors.Is(err, errWrongFormat) {
				select {
				case a.fatal <- err:
				default:
				}
				return err
			} else if err != nil {
				return err
			}
			// A store that lost its state while this agent was down is
			// told apart from a new one here, once per start.
			lost, err := a.checkIdentity(ctx)
			if err != nil {
				return err
			}
			checked = true
			a.identityChecked.Store(true)
			if lost {
				a.storeLost("its identity changed or vanished while this agent was down")
			}
		}
		rec.Liveness, rec.ConsulNode = l.Mode(), l.Node
		rec.Seen = time.Now().UTC()
		data, _ := json.Marshal(rec)
		return a.store.Put(ctx, nodeKey(a.cfg.Node), data)
	})
}

// repeat runs fn every period, and sooner while it fails (backing off from
// a quarter second up to the period or 1s), until ctx is done.
func repeat(ctx context.Context, period time.Duration, log *slog.Logger, what string, fn func(context.Context) error) {
	repeatOrKick(ctx, period, nil, log, what, fn)
}

// repeatOrKick is repeat that also runs fn at once when kick fires.
func repeatOrKick(ctx context.Context, period time.Duration, kick <-chan struct{}, log *slog.Logger, what string, fn func(context.Context) error) {
	// From a quarter second: a local Consul agent that restarts is back
	// in about a second, and this host's session must be too.
	const first = 250 * time.Millisecond
	backoff := first
	for {
		wait := period
		if err := fn(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Debug(what, "err", err)
			wait, backoff = min(backoff, period), min(backoff*2, period, time.Second)
		} else {
			backoff = first
		}
		select {
		case <-ctx.Done():
			return
		case <-kick:
		case <-time.After(wait):
		}
	}
}

func newID() string {
	b := make([]byte, 32)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// CreateNetwork validates the request and stores the network with its
// subnet and VNI in one transaction.
func (a *Agent) CreateNetwork(ctx context.Context, req api.CreateNetworkRequest) (*api.Network, error) {
	if err := ValidateName("network", req.Name); err != nil {
		return nil, &codedError{code: api.CodeInvalid, msg: err.Error()}
	}
	ireq, mtu, err := a.networkRequest(req)
	if err != nil {
		return nil, err
	}
	if err := a.checkNameFree(ctx, req.Name); err != nil {
		return nil, err
	}
	avoid, err := a.outsideRanges(ctx)
	if err != nil {
		return nil, fmt.Errorf("create network %s: %w", req.Name, err)
	}
	ireq.Avoid, ireq.Records = avoid, a.networkRecords
	n := Network{
		Version: recordVersion, ID: newID(), Name: req.Name, MTU: mtu,
		Internal: req.Internal, Created: time.Now().UTC().Truncate(time.Second),
	}
	_, err = a.ipam.AllocateNetwork(ctx, n.ID, ireq, func(l ipam.NetworkLease) ([]kvstore.Op, error) {
		n.Subnet, n.Gateway, n.VNI = l.Subnet, l.Gateway, l.VNI
		data, err := json.Marshal(&n)
		return []kvstore.Op{{Kind: kvstore.OpCAS, Key: networkKey(n.Name), Value: data}}, err
	})
	if err != nil {
		if errors.Is(err, kvstore.ErrConflict) {
			if nerr := a.checkNameFree(ctx, req.Name); nerr != nil {
				return nil, nerr
			}
		}
		return nil, fmt.Errorf("create network %s: %w", req.Name, err)
	}
	a.log.Info("network created", "network", n.Name, "id", n.ID[:12], "subnet", n.Subnet, "vni", n.VNI)
	v := n.apiView(a.localMTU())
	return &v, nil
}

// PlanNetwork says what a network create with req's subnet and gateway
// would get, without creating anything: the network that has exactly
// that subnet already, or the subnet and gateway a new one would have
// (Docker's IPAM asks for a pool before the network has a name).
func (a *Agent) PlanNetwork(ctx context.Context, req api.CreateNetworkRequest) (*api.NetworkPlan, error) {
	ireq, _, err := a.networkRequest(req)
	if err != nil {
		return nil, err
	}
	avoid, err := a.outsideRanges(ctx)
	if err != nil {
		return nil, fmt.Errorf("plan network: %w", err)
	}
	ireq.Avoid, ireq.Records = avoid, a.networkRecords
	for try := 0; ; try++ {
		if ireq.Subnet.IsValid() {
			nets, err := a.Networks(ctx)
			if err != nil {
				return nil, fmt.Errorf("plan network: %w", err)
			}
			for _, n := range nets {
				if n.Subnet == ireq.Subnet.String() {
					if ireq.Gateway.IsValid() && ireq.Gateway.String() != n.Gateway {
						return nil, conflictf("subnet %s is network %q's, whose gateway is %s, not %s", n.Subnet, n.Name, n.Gateway, ireq.Gateway)
					}
					return &api.NetworkPlan{Subnet: n.Subnet, Gateway: n.Gateway, Network: n.Name}, nil
				}
			}
		}
		l, err := a.ipam.Plan(ctx, ireq)
		if errors.Is(err, ipam.ErrInUse) && ireq.Subnet.IsValid() && try < 3 {
			// A network of that subnet was made between the listing
			// and the reservations' read: it may be this very one.
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("plan network: %w", err)
		}
		return &api.NetworkPlan{Subnet: l.Subnet.String(), Gateway: l.Gateway.String()}, nil
	}
}

// networkRequest checks a create request's addressing and MTU.
func (a *Agent) networkRequest(req api.CreateNetworkRequest) (ipam.NetworkRequest, int, error) {
	var ireq ipam.NetworkRequest
	if req.Subnet != "" {
		p, err := netip.ParsePrefix(req.Subnet)
		if err != nil {
			return ireq, 0, invalidf("subnet %q is not a CIDR such as 10.1.0.0/24", req.Subnet)
		}
		ireq.Subnet = p
		if a.egress != nil && p.Overlaps(a.egress.Config().Subnet) {
			return ireq, 0, invalidf("subnet %s overlaps the gateway subnet %s", p, a.egress.Config().Subnet)
		}
	}
	if req.Gateway != "" {
		if req.Subnet == "" {
			return ireq, 0, invalidf("--gateway needs --subnet")
		}
		g, err := netip.ParseAddr(req.Gateway)
		if err != nil {
			return ireq, 0, invalidf("gateway %q is not an IP address", req.Gateway)
		}
		ireq.Gateway = g
	}
	if req.VNI != nil {
		if *req.VNI == 0 || *req.VNI > 1<<24-1 {
			return ireq, 0, invalidf("vni %d is out of range 1..16777215 (leave --vni out to have one chosen)", *req.VNI)
		}
		ireq.VNI = *req.VNI
	}
	mtu := 0
	if req.MTU != nil {
		mtu = *req.MTU
		if mtu < 576 || mtu > 9000 {
			return ireq, 0, invalidf("mtu %d is out of range 576..9000 (leave --mtu out for the underlay's minus 50)", mtu)
		}
		// A larger MTU is not refused by the kernel: full-size packets
		// are then dropped after encapsulation, silently. Other hosts
		// may have another underlay; this host's is the one known here.
		if mtu > a.localMTU() {
			return ireq, 0, invalidf("mtu %d is above %d, this host's underlay MTU %d minus the 50 bytes of VXLAN encapsulation",
				mtu, a.localMTU(), a.cfg.UnderlayMTU)
		}
	}
	return ireq, mtu, nil
}

// checkNameFree refuses a name the store holds a network record under,
// a corrupt one included (which no listing can show as a network).
func (a *Agent) checkNameFree(ctx context.Context, name string) error {
	kv, err := a.store.Get(ctx, networkKey(name))
	switch {
	case errors.Is(err, kvstore.ErrNotFound):
		return nil
	case err != nil:
		return fmt.Errorf("create network %s: %w", name, err)
	}
	var n Network
	if derr := decodeRecord(kv.Key, kv.Value, &n); derr != nil {
		return conflictf("network %q: the store holds an unreadable record under that name (%v); remove it with \"vxnet network rm %s\"", name, derr, name)
	}
	return conflictf("network %q already exists", name)
}

// outsideRanges are the address ranges an overlay subnet must stay out
// of: every host's underlay network (from the node records) and this
// host's routes. Other hosts' routes are not known here; their underlays
// are the ranges that matter most.
func (a *Agent) outsideRanges(ctx context.Context) ([]ipam.Avoid, error) {
	var out []ipam.Avoid
	pairs, _, err := a.store.List(ctx, nodesPrefix)
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	for _, kv := range pairs {
		var n Node
		if decodeRecord(kv.Key, kv.Value, &n) != nil {
			continue
		}
		if n.Underlay.IsValid() {
			out = append(out, ipam.Avoid{Prefix: n.Underlay, What: "the underlay network of host " + n.Name})
		} else if n.Address.IsValid() {
			out = append(out, ipam.Avoid{Prefix: netip.PrefixFrom(n.Address, 32), What: "the underlay address of host " + n.Name})
		}
	}
	routes, err := a.dp.HostRoutes()
	if err != nil {
		return nil, err
	}
	for _, r := range routes {
		if a.egress != nil && r == a.egress.Config().Subnet {
			continue // the gateway subnet: checked on its own, with its own message
		}
		out = append(out, ipam.Avoid{Prefix: r, What: "a route of host " + a.cfg.Node})
	}
	return out, nil
}

// getNetwork reads a network from the store (not the cache: a user who just
// created it on another host expects to see it).
func (a *Agent) getNetwork(ctx context.Context, name string) (*Network, uint64, error) {
	if err := ValidateName("network", name); err != nil {
		return nil, 0, &codedError{code: api.CodeInvalid, msg: err.Error()}
	}
	kv, err := a.store.Get(ctx, networkKey(name))
	if errors.Is(err, kvstore.ErrNotFound) {
		return nil, 0, notFoundf("network %q not found", name)
	}
	if err != nil {
		return nil, 0, fmt.Errorf("get network %s: %w", name, err)
	}
	var n Network
	if err := decodeRecord(kv.Key, kv.Value, &n); err != nil {
		return nil, kv.ModifyIndex, &codedError{code: api.CodeConflict, err: errCorruptRecord,
			msg: fmt.Sprintf("network %q: the store holds an unreadable record (%v); \"vxnet network rm %s\" removes it", name, err, name)}
	}
	return &n, kv.ModifyIndex, nil
}

// errCorruptRecord marks a record that is there but does not decode.
var errCorruptRecord = errors.New("unreadable record")

// Networks lists every network in the store.
func (a *Agent) Networks(ctx context.Context) ([]api.Network, error) {
	pairs, _, err := a.store.List(ctx, networksPrefix)
	if err != nil {
		return nil, fmt.Errorf("list networks: %w", err)
	}
	out := []api.Network{}
	for _, kv := range pairs {
		var n Network
		if err := decodeRecord(kv.Key, kv.Value, &n); err != nil {
			// Shown, not hidden: its name is taken, and rm removes it.
			out = append(out, api.Network{Name: strings.TrimPrefix(kv.Key, networksPrefix), Error: err.Error()})
			continue
		}
		out = append(out, n.apiView(a.localMTU()))
	}
	return out, nil
}

// InspectNetwork returns a network and its endpoints on every host.
func (a *Agent) InspectNetwork(ctx context.Context, name string) (*api.NetworkDetail, error) {
	n, _, err := a.getNetwork(ctx, name)
	if err != nil {
		return nil, err
	}
	eps, err := a.Endpoints(ctx, name)
	if err != nil {
		return nil, err
	}
	d := &api.NetworkDetail{Network: n.apiView(a.localMTU()), Endpoints: eps}
	for _, l := range a.viewLocals() {
		if l.Net.ID == n.ID && l.Phase == phaseAttached {
			d.Namespace = a.dp.NetNSPath(n.NamespaceName())
		}
	}
	return d, nil
}

// RemoveNetwork removes a network that has no endpoints anywhere. Every
// host then tears its namespace down when the watch tells it.
func (a *Agent) RemoveNetwork(ctx context.Context, name string) error {
	n, idx, err := a.getNetwork(ctx, name)
	if errors.Is(err, errCorruptRecord) {
		return a.removeCorruptNetwork(ctx, name, idx)
	}
	if err != nil {
		return err
	}
	if a.lostRecently() {
		// Hosts may not have put their endpoints back yet: a removal now
		// would be taken by them for intent.
		return &codedError{code: api.CodeUnavailable, msg: fmt.Sprintf("network %q: the store lost its state moments ago and hosts are still republishing their endpoints; try again in %s", name, a.holdTime())}
	}
	// Two steps, so that an attach cannot publish unseen between the
	// listing of endpoints and the removal: first mark the record
	// removing, which changes its index (an attach checks the index it
	// read when it publishes, and refuses a network being removed), then
	// list, then remove.
	if !n.Removing {
		n.Removing = true
		data, _ := json.Marshal(n)
		if err := a.store.CAS(ctx, networkKey(name), data, idx); errors.Is(err, kvstore.ErrConflict) {
			return conflictf("network %q changed while being removed; try again", name)
		} else if err != nil {
			return fmt.Errorf("remove network %s: %w", name, err)
		}
		if n, idx, err = a.getNetwork(ctx, name); err != nil {
			return err
		}
	}
	eps, err := a.Endpoints(ctx, name)
	if err != nil {
		return err
	}
	if len(eps) > 0 {
		names := make([]string, 0, len(eps))
		for _, e := range eps {
			names = append(names, e.Name+" on "+e.Node)
		}
		n.Removing = false
		data, _ := json.Marshal(n)
		if err := a.store.CAS(ctx, networkKey(name), data, idx); err != nil {
			a.log.Warn("network left marked as being removed; network rm again, or detach its endpoints and rm", "network", name, "err", err)
		}
		return conflictf("network %q has %d endpoint(s): %v; detach them first", name, len(eps), names)
	}
	// The tombstone is the intent that hosts which were away act on.
	ops := append([]kvstore.Op{{Kind: kvstore.OpDeleteCAS, Key: networkKey(name), Index: idx}}, a.tombstoneOps(ctx, n)...)
	err = a.ipam.ReleaseNetwork(ctx, n.ID, ops)
	if errors.Is(err, kvstore.ErrConflict) {
		return conflictf("network %q changed while being removed; try again", name)
	}
	if err != nil {
		return fmt.Errorf("remove network %s: %w", name, err)
	}
	a.log.Info("network removed", "network", name, "id", n.ID[:12])
	return nil
}

// removeCorruptNetwork deletes a network record that does not decode,
// once no endpoint record names the network. Its reservation goes too if
// the record still shows which network it was; else the allocator drops
// the reservation by itself, as one of no record and no address.
func (a *Agent) removeCorruptNetwork(ctx context.Context, name string, idx uint64) error {
	pairs, _, err := a.store.List(ctx, endpointsPrefix+name+"/")
	if err != nil {
		return fmt.Errorf("remove network %s: %w", name, err)
	}
	if len(pairs) > 0 {
		return conflictf("network %q (unreadable record) still has %d endpoint record(s), e.g. %s; detach them first", name, len(pairs), pairs[0].Key)
	}
	kv, err := a.store.Get(ctx, networkKey(name))
	if err != nil {
		return fmt.Errorf("remove network %s: %w", name, err)
	}
	var loose struct {
		ID string `json:"id"`
	}
	ops := []kvstore.Op{{Kind: kvstore.OpDeleteCAS, Key: networkKey(name), Index: idx}}
	if json.Unmarshal(kv.Value, &loose) == nil && validID(loose.ID) {
		// A host still running the network learns of the removal.
		ops = append(ops, a.tombstoneOps(ctx, &Network{ID: loose.ID, Name: name})...)
		err = a.ipam.ReleaseNetwork(ctx, loose.ID, ops)
	} else {
		err = a.store.Txn(ctx, ops)
	}
	if errors.Is(err, kvstore.ErrConflict) {
		return conflictf("network %q changed while being removed; try again", name)
	}
	if err != nil {
		return fmt.Errorf("remove network %s: %w", name, err)
	}
	a.log.Warn("removed an unreadable network record", "network", name)
	return nil
}

// Endpoints lists the endpoints of every host, of one network if given.
func (a *Agent) Endpoints(ctx context.Context, network string) ([]api.Endpoint, error) {
	prefix := endpointsPrefix
	if network != "" {
		if err := ValidateName("network", network); err != nil {
			return nil, &codedError{code: api.CodeInvalid, msg: err.Error()}
		}
		prefix += network + "/"
	}
	pairs, _, err := a.store.List(ctx, prefix)
	if err != nil {
		return nil, fmt.Errorf("list endpoints: %w", err)
	}
	if network != "" && len(pairs) == 0 {
		// An empty list must not hide a misspelt name. (Endpoints of a
		// network whose record is gone are still listed: they are what
		// is left to clean up.)
		if _, err := a.store.Get(ctx, networkKey(network)); errors.Is(err, kvstore.ErrNotFound) {
			return nil, notFoundf("network %q not found", network)
		} else if err != nil {
			return nil, fmt.Errorf("list endpoints: %w", err)
		}
	}
	out := []api.Endpoint{}
	locals := a.viewLocals()
	for _, kv := range pairs {
		var e Endpoint
		if err := decodeRecord(kv.Key, kv.Value, &e); err != nil {
			a.log.Warn("skipping bad endpoint record", "err", err)
			continue
		}
		v := e.apiView()
		if l := locals[e.Network+"/"+e.Name]; l != nil && e.Node == a.cfg.Node {
			v.Netns = l.Netns
		}
		out = append(out, v)
	}
	return out, nil
}

// Nodes lists the hosts that registered in the store.
func (a *Agent) Nodes(ctx context.Context) ([]api.Node, error) {
	pairs, _, err := a.store.List(ctx, nodesPrefix)
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	alivePairs, _, err := a.store.List(ctx, alivePrefix)
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	alive := map[string]bool{}
	for _, kv := range alivePairs {
		alive[kv.Key[len(alivePrefix):]] = kv.Session != ""
	}
	out := []api.Node{}
	for _, kv := range pairs {
		var n Node
		if err := decodeRecord(kv.Key, kv.Value, &n); err != nil {
			a.log.Warn("skipping bad node record", "err", err)
			continue
		}
		state := "down"
		if alive[n.Name] {
			state = "up"
		}
		out = append(out, api.Node{Name: n.Name, Address: n.Address.String(), Version: n.Agent, Started: n.Started, LastSeen: n.Seen, State: state,
			Liveness: n.Liveness, ConsulNode: n.ConsulNode})
	}
	return out, nil
}

// Status describes this agent.
func (a *Agent) Status() api.Status {
	a.cmu.RLock()
	defer a.cmu.RUnlock()
	nlocal := 0
	for _, l := range a.localsView {
		if l.Phase == phaseAttached {
			nlocal++
		}
	}
	s := api.Status{
		Node: a.cfg.Node, Address: a.cfg.Advertise.String(), Version: api.Version, Store: a.cfg.StoreName,
		StoreReachable: a.storeErr == nil && a.netSynced, Networks: len(a.networks), LocalEndpoints: nlocal,
		LastReconcile: a.lastReconcile, Started: a.started, StoreDownSince: a.downSince, Ready: a.ready,
	}
	if a.liveness != nil {
		s.Liveness, s.ConsulNode = a.liveness.Mode(), a.liveness.Node
	}
	switch {
	case a.cfg.DNS == nil:
		s.DNS = "off"
	case a.cfg.DNS.Forward:
		s.DNS = "on, forwarding to the resolvers of " + cmp.Or(a.cfg.DNS.ResolvConf, "/etc/resolv.conf")
	default:
		s.DNS = "on, other names refused"
	}
	if a.sessionErr != nil {
		s.SessionError = a.sessionErr.Error()
	}
	if a.storeErr != nil {
		s.StoreError = a.storeErr.Error()
	} else if !a.netSynced {
		s.StoreError = "not synced yet"
	}
	return s
}

func (a *Agent) viewLocals() map[string]*localEndpoint {
	a.cmu.RLock()
	defer a.cmu.RUnlock()
	return a.localsView
}

// publishLocalMetrics sets the per-network gauges from the attached
// endpoints by network name, and drops the series of networks this host
// no longer has endpoints on (called with mu held).
func (a *Agent) publishLocalMetrics(attached map[string]int) {
	for name := range a.metricNets {
		if attached[name] == 0 {
			metrics.LocalEndpoints.DeleteLabelValues(name)
			metrics.Peers.DeleteLabelValues(name)
		}
	}
	for name, n := range attached {
		metrics.LocalEndpoints.WithLabelValues(name).Set(float64(n))
	}
	a.metricNets = attached
}

// Health answers the health endpoints: ready once a reconcile with a
// complete view of the store has run, and why the store does not answer
// now, if it does not.
func (a *Agent) Health() (bool, error) {
	a.cmu.RLock()
	defer a.cmu.RUnlock()
	return a.ready, a.storeErr
}

// ProbeStatus is Status with the store asked now: a store that died a
// moment ago is not yet known to the watches, whose blocking queries wait.
func (a *Agent) ProbeStatus(ctx context.Context) api.Status {
	s := a.Status()
	if !s.StoreReachable {
		return s
	}
	if _, err := a.probeStore(ctx); err != nil {
		s.StoreReachable, s.StoreError = false, err.Error()
	}
	return s
}

// probeStore asks the store one small question now and says how long the
// answer took (an absent key answers as well as a present one).
func (a *Agent) probeStore(ctx context.Context) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	start := time.Now()
	if _, err := a.store.Get(ctx, formatKey); err != nil && !errors.Is(err, kvstore.ErrNotFound) {
		return 0, err
	}
	return time.Since(start), nil
}

// cachedNetworks is the agent's view of the networks, for listings while
// the store does not answer.
// isNetwork reports whether name is an overlay network's: the DNS servers
// answer its names only on that network.
func (a *Agent) isNetwork(name string) bool {
	a.cmu.RLock()
	defer a.cmu.RUnlock()
	return a.netNames[strings.ToLower(name)]
}

// isOverlayAddr reports whether ip is in an overlay network's subnet.
func (a *Agent) isOverlayAddr(ip netip.Addr) bool {
	a.cmu.RLock()
	defer a.cmu.RUnlock()
	for _, n := range a.networks {
		if n.Subnet.Contains(ip) {
			return true
		}
	}
	return false
}

// ensureDNS runs the network's DNS server on this host (it needs the
// network's namespace and view). Called with mu held.
func (a *Agent) ensureDNS(n *Network) {
	if a.dns == nil {
		return
	}
	v := a.views[n.ID]
	if v == nil {
		return
	}
	err := a.dns.Ensure(dnsserver.Spec{Netns: a.dp.NetNSPath(n.NamespaceName()), Network: n.Name, Gateway: n.Gateway, Subnet: n.Subnet, Zone: v.zone})
	if err != nil {
		a.log.Warn("dns server", "network", n.Name, "err", err)
	}
}

// dnsInfo is what a container of the network is told to resolve with.
func (a *Agent) dnsInfo(n *Network) *api.DNS {
	if a.dns == nil {
		return nil
	}
	return &api.DNS{Server: n.Gateway.String(), Search: []string{n.Name}}
}

func (a *Agent) cachedNetworks() []api.Network {
	a.cmu.RLock()
	defer a.cmu.RUnlock()
	out := make([]api.Network, 0, len(a.networks))
	for _, n := range a.networks {
		out = append(out, n.apiView(a.localMTU()))
	}
	slices.SortFunc(out, func(x, y api.Network) int { return strings.Compare(x.Name, y.Name) })
	return out
}

// localEndpoints is this host's attached endpoints (of one network, if
// given), for listings while the store does not answer.
func (a *Agent) localEndpoints(network string) []api.Endpoint {
	out := []api.Endpoint{}
	for _, l := range a.viewLocals() {
		if l.Phase == phaseAttached && (network == "" || l.Endpoint.Network == network) {
			v := l.Endpoint.apiView()
			v.Netns = l.Netns
			out = append(out, v)
		}
	}
	slices.SortFunc(out, func(x, y api.Endpoint) int { return strings.Compare(x.Network+"/"+x.Name, y.Network+"/"+y.Name) })
	return out
}
