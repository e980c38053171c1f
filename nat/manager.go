package nat

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"sync"

	"github.com/coreos/go-iptables/iptables"
	"github.com/vishvananda/netlink"
	nlsock "github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"github.com/vxnet/vxnet/internal/netnsutil"
	"golang.org/x/sys/unix"
)

// ipForwardPath is resolved by the kernel against the network namespace of
// the thread that opens it (not the namespace of the /proc mount), so it is
// only ever opened inside withNetNSHandle.
const ipForwardPath = "/proc/sys/net/ipv4/ip_forward"

// Manager owns the gateway bridge, its iptables chains and the gateway veths
// of one network namespace (the "host"). Its methods are safe for
// concurrent use; they are serialised because iptables edits are
// read-compare-write sequences.
type Manager struct {
	cfg Config
	log *slog.Logger
	ns  netns.NsHandle  // the manager's namespace, held open for its lifetime
	nl  *netlink.Handle // netlink sockets bound to ns
	// route is an rtnetlink socket bound to ns for the requests the
	// library has no call for (see portIsolated).
	route map[int]*nlsock.SocketHandle
	ipt   *iptables.IPTables
	// iptPath is the binary ipt runs, for the listing it has no call
	// for; iptWait says whether it takes --wait (1.4.20 and later).
	iptPath string
	iptWait bool

	mu sync.Mutex
	// applied remembers each chain's listing right after we filled it, so a
	// chain is not rewritten forever on an iptables version that prints a
	// rule differently from the way we spell it.
	applied map[Chain]appliedChain
	// published are the ports the DNAT and PUBLISH chains forward;
	// publishedDirty says they may differ from the kernel's (changed, or
	// never written since start, or the last write failed).
	published      []Publish
	publishedDirty bool
}

// appliedChain is a chain's wanted rules and iptables' listing of them
// right after they were written.
type appliedChain struct {
	want, listing []string
}

// SetPublished replaces the set of published ports, which Ensure or
// SyncPublished then write. It reports whether they still have to be
// written: the set changed, or it was not written successfully since the
// manager started.
func (m *Manager) SetPublished(ps []Publish) bool {
	ps = slices.Clone(ps)
	SortPublished(ps)
	m.mu.Lock()
	defer m.mu.Unlock()
	if !slices.Equal(ps, m.published) {
		m.published = ps
		m.publishedDirty = true
	}
	return m.publishedDirty
}

// SyncPublished writes the published ports into the DNAT and PUBLISH
// chains where they exist, without creating anything: enough to withdraw
// forwards on a host that has no gateway to set up. Ensure does the rest.
func (m *Manager) SyncPublished(ctx context.Context) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("nat: sync published ports: %w", err)
	}
	rules := m.cfg.PublishRules(m.published)
	var changes []string
	err := m.inNS(func() error {
		chains := []Chain{{"nat", m.cfg.dnatChain()}, {"filter", m.cfg.publishChain()}}
		t, err := m.readTables(chains)
		if err != nil {
			return err
		}
		for _, ch := range chains {
			if !t.has(ch) {
				if len(rulesOf(rules, ch)) > 0 {
					return fmt.Errorf("chain %s/%s is missing", ch.Table, ch.Name)
				}
				continue
			}
			c, err := m.syncChain(ch, rulesOf(rules, ch), t.rules[ch])
			changes = append(changes, c...)
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return changes, fmt.Errorf("nat: sync published ports: %w", err)
	}
	m.publishedDirty = false
	return changes, nil
}

// New validates cfg (after applying defaults), opens the manager's namespace
// and locates the iptables binary. go-iptables drives whatever "iptables"
// is on PATH, so both the nft and legacy backends work.
func New(cfg Config) (*Manager, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("nat: invalid config: %w", err)
	}
	var (
		ns  netns.NsHandle
		err error
	)
	if cfg.NetNS != "" {
		ns, err = netns.GetFromPath(cfg.NetNS)
	} else {
		ns, err = netns.Get()
	}
	if err != nil {
		return nil, fmt.Errorf("nat: open network namespace %q: %w", cfg.NetNS, err)
	}
	nl, err := netnsutil.Handle(ns)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("nat: netlink handle in namespace %q: %w", cfg.NetNS, err)
	}
	route, err := nlsock.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		nl.Close()
		ns.Close()
		return nil, fmt.Errorf("nat: rtnetlink socket in namespace %q: %w", cfg.NetNS, err)
	}
	// go-iptables looks up "iptables" on PATH by default, as this does.
	var ipt *iptables.IPTables
	path, err := exec.LookPath(cmp.Or(cfg.IPTables, "iptables"))
	if err == nil {
		ipt, err = iptables.New(iptables.Path(path))
	}
	if err != nil {
		route.Close()
		nl.Close()
		ns.Close()
		return nil, fmt.Errorf("nat: find iptables: %w", err)
	}
	return &Manager{
		cfg:     cfg,
		log:     cfg.Logger.With("component", "nat", "bridge", cfg.Bridge),
		ns:      ns,
		nl:      nl,
		route:   map[int]*nlsock.SocketHandle{unix.NETLINK_ROUTE: {Socket: route}},
		ipt:     ipt,
		iptPath: path,
		iptWait: waitSupported(ipt.GetIptablesVersion()),
		applied: map[Chain]appliedChain{},
		// Forwards a previous run left may be stale: write them once.
		publishedDirty: true,
	}, nil
}

// Close releases the namespace and netlink sockets. It changes nothing in
// the kernel: the bridge and rules outlive the process on purpose so that
// container egress survives an agent restart.
func (m *Manager) Close() error {
	m.route[unix.NETLINK_ROUTE].Close()
	m.nl.Close()
	return m.ns.Close()
}

// Config returns the effective configuration (defaults applied).
func (m *Manager) Config() Config { return m.cfg }

// GatewayAddr is the bridge address, every container's default gateway.
func (m *Manager) GatewayAddr() netip.Addr { return m.cfg.GatewayAddr() }

func (m *Manager) gatewayPrefix() netip.Prefix {
	return netip.PrefixFrom(m.GatewayAddr(), m.cfg.Subnet.Bits())
}

// inNS runs fn inside the manager's namespace; needed for iptables and
// /proc/sys, which have no namespace argument.
func (m *Manager) inNS(fn func() error) error {
	return withNetNSHandle(m.ns, fn)
}

// Ensure converges the bridge, forwarding sysctl and chains to the wanted
// state and reports every repair it made; an empty result means nothing had
// drifted.
func (m *Manager) Ensure(ctx context.Context) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var changes []string
	steps := []struct {
		name string
		fn   func() ([]string, error)
	}{
		{"bridge", m.ensureBridge},
		{"ip_forward", m.ensureForwarding},
		{"iptables", m.ensureIPTables},
	}
	for _, s := range steps {
		if err := ctx.Err(); err != nil {
			return changes, fmt.Errorf("nat: ensure %s: %w", s.name, err)
		}
		c, err := s.fn()
		changes = append(changes, c...)
		if err != nil {
			return changes, fmt.Errorf("nat: ensure %s: %w", s.name, err)
		}
	}
	for _, c := range changes {
		m.log.Info("repaired", "change", c)
	}
	return changes, nil
}

func (m *Manager) ensureBridge() ([]string, error) {
	var changes []string
	name := m.cfg.Bridge
	l, err := m.nl.LinkByName(name)
	switch {
	case err == nil && l.Type() != "bridge":
		if err := m.nl.LinkDel(l); err != nil {
			return changes, fmt.Errorf("delete non-bridge link %s (type %s): %w", name, l.Type(), err)
		}
		changes = append(changes, fmt.Sprintf("deleted link %s of type %s to replace it with a bridge", name, l.Type()))
		l = nil
	case err != nil && !isNotFound(err):
		return changes, fmt.Errorf("look up bridge %s: %w", name, err)
	case err != nil:
		l = nil
	}
	if l == nil {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}
		if err := m.nl.LinkAdd(br); err != nil {
			return changes, fmt.Errorf("create bridge %s: %w", name, err)
		}
		changes = append(changes, "created bridge "+name)
		if l, err = m.nl.LinkByName(name); err != nil {
			return changes, fmt.Errorf("look up new bridge %s: %w", name, err)
		}
	}

	want := m.gatewayPrefix()
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return m.nl.AddrList(l, netlink.FAMILY_V4) })
	if err != nil {
		return changes, fmt.Errorf("list addresses of %s: %w", name, err)
	}
	have := false
	for _, a := range addrs {
		p, ok := prefixOf(a.IPNet)
		if !ok || p.Addr() != want.Addr() {
			continue
		}
		if p.Bits() == want.Bits() {
			have = true
			continue
		}
		// Right address, wrong length: the on-link route would be wrong,
		// so containers outside it could not reach their gateway.
		if err := m.nl.AddrDel(l, &a); err != nil {
			return changes, fmt.Errorf("delete %s from %s: %w", p, name, err)
		}
		changes = append(changes, fmt.Sprintf("removed %s from %s (wrong prefix length)", p, name))
	}
	if !have {
		if err := m.nl.AddrAdd(l, &netlink.Addr{IPNet: ipNet(want)}); err != nil {
			return changes, fmt.Errorf("add %s to %s: %w", want, name, err)
		}
		changes = append(changes, fmt.Sprintf("added address %s to %s", want, name))
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		if err := m.nl.LinkSetUp(l); err != nil {
			return changes, fmt.Errorf("set %s up: %w", name, err)
		}
		changes = append(changes, "set bridge "+name+" up")
	}
	return changes, nil
}

func (m *Manager) ensureForwarding() ([]string, error) {
	var changes []string
	err := m.inNS(func() error {
		b, err := os.ReadFile(ipForwardPath)
		if err != nil {
			return fmt.Errorf("read %s: %w", ipForwardPath, err)
		}
		if strings.TrimSpace(string(b)) == "1" {
			return nil
		}
		// Without forwarding the host drops everything containers send to
		// their gateway for the outside world.
		if err := os.WriteFile(ipForwardPath, []byte("1\n"), 0o644); err != nil {
			return fmt.Errorf("write %s: %w", ipForwardPath, err)
		}
		m.log.Info("enabled IPv4 forwarding", "sysctl", "net.ipv4.ip_forward", "was", strings.TrimSpace(string(b)))
		if m.cfg.ForwardingMark != "" {
			if err := os.WriteFile(m.cfg.ForwardingMark, []byte("net.ipv4.ip_forward was "+strings.TrimSpace(string(b))+"\n"), 0o644); err != nil {
				m.log.Warn("note that the agent enabled IPv4 forwarding", "err", err)
			}
		}
		changes = append(changes, "enabled net.ipv4.ip_forward")
		return nil
	})
	return changes, err
}

func (m *Manager) ensureIPTables() ([]string, error) {
	var changes []string
	rules := append(m.cfg.Rules(), m.cfg.PublishRules(m.published)...)
	err := m.inNS(func() error {
		chains := m.cfg.Chains()
		// One listing per table for every chain and jump: each iptables
		// run costs milliseconds, and this is every full pass.
		t, err := m.readTables(tablesOf(chains, m.cfg.Jumps()))
		if err != nil {
			return err
		}
		// Create every chain before filling any: FORWARD's rules jump to
		// ISOLATION, and iptables refuses a jump to a missing chain.
		for _, ch := range chains {
			if t.has(ch) {
				continue
			}
			if err := m.ipt.NewChain(ch.Table, ch.Name); err != nil {
				return fmt.Errorf("create chain %s/%s: %w", ch.Table, ch.Name, err)
			}
			changes = append(changes, fmt.Sprintf("created chain %s/%s", ch.Table, ch.Name))
		}
		for _, ch := range chains {
			c, err := m.syncChain(ch, rulesOf(rules, ch), t.rules[ch])
			changes = append(changes, c...)
			if err != nil {
				return err
			}
		}
		// Jumps last, so traffic is only steered into complete chains.
		for _, j := range m.cfg.Jumps() {
			c, err := m.syncJump(j, t.rules[Chain{j.Table, j.Chain}])
			changes = append(changes, c...)
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil {
		m.publishedDirty = false
	}
	return changes, err
}

// syncChain makes ch, which holds have, contain exactly want, rewriting
// it only when it differs.
func (m *Manager) syncChain(ch Chain, want []Rule, have []string) ([]string, error) {
	wantS, missing, extra, same := m.chainDiff(ch, want, have)
	if same {
		return nil, nil
	}
	// Flush and refill rather than patching: the chains are ours alone and
	// small, and order matters (isolation first, RETURN last).
	if err := m.ipt.ClearChain(ch.Table, ch.Name); err != nil {
		return nil, fmt.Errorf("flush chain %s/%s: %w", ch.Table, ch.Name, err)
	}
	for _, r := range want {
		if err := m.ipt.Append(r.Table, r.Chain, r.Spec...); err != nil {
			return nil, fmt.Errorf("append %q to %s: %w", r.String(), r.Table, err)
		}
	}
	desc := fmt.Sprintf("rewrote chain %s/%s", ch.Table, ch.Name)
	if len(missing) > 0 {
		desc += fmt.Sprintf("; missing: %q", missing)
	}
	if len(extra) > 0 {
		desc += fmt.Sprintf("; unexpected: %q", extra)
	}
	if len(missing) == 0 && len(extra) == 0 {
		desc += "; rules were out of order"
	}
	after, err := m.listRules(ch.Table, ch.Name)
	if err != nil {
		return []string{desc}, err
	}
	if !slices.Equal(after, wantS) {
		m.log.Warn("iptables prints rules differently than they were written; comparing against its own listing from now on",
			"table", ch.Table, "chain", ch.Name, "listing", after, "written", wantS)
	}
	m.applied[ch] = appliedChain{want: wantS, listing: after}
	return []string{desc}, nil
}

// chainDiff compares a chain's rules, have, with the rules it should
// hold: the rules as strings, those missing and those unexpected, and
// whether it holds them.
func (m *Manager) chainDiff(ch Chain, want []Rule, have []string) (wantS, missing, extra []string, same bool) {
	wantS = make([]string, len(want))
	for i, r := range want {
		wantS[i] = r.String()
	}
	// The listing shortcut holds only for the rules it was taken of: the
	// DNAT and PUBLISH chains change with the published ports.
	if prev, ok := m.applied[ch]; slices.Equal(have, wantS) || (ok && slices.Equal(prev.want, wantS) && slices.Equal(have, prev.listing)) {
		return wantS, nil, nil, true
	}
	missing, extra = diff(wantS, have)
	return wantS, missing, extra, false
}

// syncJump makes the built-in chain, which holds have, jump to ours
// exactly once. A missing jump goes to position 1; an existing one is left
// where it is (see the package documentation).
func (m *Manager) syncJump(j Rule, have []string) ([]string, error) {
	n := 0
	for _, r := range have {
		if r == j.String() {
			n++
		}
	}
	var changes []string
	if n > 1 {
		for range n {
			if err := m.ipt.Delete(j.Table, j.Chain, j.Spec...); err != nil {
				return changes, fmt.Errorf("delete duplicate jump %q in %s: %w", j.String(), j.Table, err)
			}
		}
		changes = append(changes, fmt.Sprintf("removed %d duplicate jumps %q from %s/%s", n-1, j.String(), j.Table, j.Chain))
		n = 0
	}
	if n == 0 {
		if err := m.ipt.Insert(j.Table, j.Chain, 1, j.Spec...); err != nil {
			return changes, fmt.Errorf("insert jump %q into %s: %w", j.String(), j.Table, err)
		}
		changes = append(changes, fmt.Sprintf("inserted jump %q into %s/%s", j.String(), j.Table, j.Chain))
	}
	return changes, nil
}

// counterSuffix is what go-iptables appends when the nft backend prints
// counters in a -S listing.
var counterSuffix = regexp.MustCompile(` -c \d+ \d+$`)

// listRules returns the "-A" lines of a chain, normalised for comparison.
func (m *Manager) listRules(table, chain string) ([]string, error) {
	lines, err := m.ipt.List(table, chain)
	if err != nil {
		return nil, fmt.Errorf("list %s/%s: %w", table, chain, err)
	}
	var out []string
	for _, l := range lines {
		if r, ok := ruleLine(l); ok {
			out = append(out, r)
		}
	}
	return out, nil
}

// ruleLine is a "-A" line of a -S listing, normalised for comparison.
func ruleLine(l string) (string, bool) {
	if !strings.HasPrefix(l, "-A ") {
		return "", false
	}
	l = counterSuffix.ReplaceAllString(l, "")
	return strings.Join(strings.Fields(l), " "), true
}

// tableListing is what a -S listing of whole tables showed: which chains
// exist, and the normalised rules of each.
type tableListing struct {
	chains map[Chain]bool
	rules  map[Chain][]string
}

func (t *tableListing) has(ch Chain) bool { return t.chains[ch] }

// readTables lists the tables that chains are in, one iptables run each.
// go-iptables lists a chain, or a table's chain names without their
// rules, but not a table's rules, so this runs the binary it found. Call
// inside the manager's namespace.
func (m *Manager) readTables(chains []Chain) (*tableListing, error) {
	t := &tableListing{chains: map[Chain]bool{}, rules: map[Chain][]string{}}
	var tables []string
	for _, ch := range chains {
		if !slices.Contains(tables, ch.Table) {
			tables = append(tables, ch.Table)
		}
	}
	for _, table := range tables {
		args := []string{"-t", table, "-S"}
		if m.iptWait {
			args = append(args, "--wait") // as go-iptables runs it
		}
		var stdout, stderr strings.Builder
		cmd := exec.Command(m.iptPath, args...)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("list table %s: %w: %s", table, err, strings.TrimSpace(stderr.String()))
		}
		t.add(table, stdout.String())
	}
	return t, nil
}

// add takes in a -S listing of table.
func (t *tableListing) add(table, listing string) {
	for _, l := range strings.Split(listing, "\n") {
		// iptables 1.8.0 with nft prints counters first, as
		// iptables-save does.
		l = counterPrefix.ReplaceAllString(l, "")
		f := strings.Fields(l)
		switch {
		case len(f) < 2:
		case f[0] == "-P" || f[0] == "-N":
			t.chains[Chain{table, f[1]}] = true
		case f[0] == "-A":
			if r, ok := ruleLine(l); ok {
				ch := Chain{table, f[1]}
				t.rules[ch] = append(t.rules[ch], r)
			}
		}
	}
}

// counterPrefix is how iptables 1.8.0 with nft starts a rule in a -S
// listing (go-iptables moves it to the end, where counterSuffix finds it).
var counterPrefix = regexp.MustCompile(`^\[\d+:\d+\] `)

// waitSupported says whether an iptables of this version takes --wait.
func waitSupported(v1, v2, v3 int) bool {
	return v1 > 1 || (v1 == 1 && (v2 > 4 || (v2 == 4 && v3 >= 20)))
}

// tablesOf is chains and the built-in chains of jumps: every chain a
// listing for ensuring or checking them must show.
func tablesOf(chains []Chain, jumps []Rule) []Chain {
	out := slices.Clone(chains)
	for _, j := range jumps {
		out = append(out, Chain{j.Table, j.Chain})
	}
	return out
}

// diff returns the elements of want missing from have and those of have not
// in want.
func diff(want, have []string) (missing, extra []string) {
	for _, w := range want {
		if !slices.Contains(have, w) {
			missing = append(missing, w)
		}
	}
	for _, h := range have {
		if !slices.Contains(want, h) {
			extra = append(extra, h)
		}
	}
	return missing, extra
}

// Cleanup removes the jumps, chains, gateway veths and bridge this manager
// creates. Rules in built-in chains other than our exact jumps are left
// alone. net.ipv4.ip_forward is turned off again only if this manager
// turned it on (Config.ForwardingMark): otherwise other software may rely
// on it.
func (m *Manager) Cleanup(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("nat: cleanup: %w", err)
	}
	var errs []error
	err := m.inNS(func() error {
		for _, j := range m.cfg.Jumps() {
			if err := m.deleteJumps(j); err != nil {
				errs = append(errs, err)
			}
		}
		chains := m.cfg.Chains()
		// Reverse fill order: a chain can only be deleted once nothing
		// jumps to it.
		for i := len(chains) - 1; i >= 0; i-- {
			ch := chains[i]
			if err := m.ipt.ClearAndDeleteChain(ch.Table, ch.Name); err != nil && !isIPTNotExist(err) {
				errs = append(errs, fmt.Errorf("delete chain %s/%s: %w", ch.Table, ch.Name, err))
				continue
			}
			delete(m.applied, ch)
		}
		return nil
	})
	if err != nil {
		errs = append(errs, err)
	}
	if err := m.deleteBridge(); err != nil {
		errs = append(errs, err)
	}
	if err := m.restoreForwarding(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("nat: cleanup: %w", err)
	}
	m.log.Info("removed gateway bridge and chains")
	return nil
}

func (m *Manager) deleteJumps(j Rule) error {
	// Bounded: a rule that keeps reappearing means something else is
	// re-adding it, and looping forever would not help.
	for range 100 {
		ok, err := m.ipt.Exists(j.Table, j.Chain, j.Spec...)
		if err != nil {
			if isIPTNotExist(err) {
				return nil
			}
			return fmt.Errorf("check jump %q in %s: %w", j.String(), j.Table, err)
		}
		if !ok {
			return nil
		}
		if err := m.ipt.Delete(j.Table, j.Chain, j.Spec...); err != nil {
			return fmt.Errorf("delete jump %q in %s: %w", j.String(), j.Table, err)
		}
	}
	return fmt.Errorf("jump %q in %s keeps reappearing", j.String(), j.Table)
}

// isIPTNotExist tells "the chain/table is not there", which cleanup treats
// as done.
func isIPTNotExist(err error) bool {
	var e *iptables.Error
	if errors.As(err, &e) {
		return e.IsNotExist() || strings.Contains(e.Error(), "does not exist") ||
			strings.Contains(e.Error(), "No chain/target/match")
	}
	return false
}

func (m *Manager) deleteBridge() error {
	l, err := m.nl.LinkByName(m.cfg.Bridge)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up bridge %s: %w", m.cfg.Bridge, err)
	}
	if l.Type() != "bridge" {
		// Not something we made (Ensure would have replaced it).
		m.log.Warn("not deleting non-bridge link with the bridge's name", "type", l.Type())
		return nil
	}
	ports, err := m.ports(l)
	if err != nil {
		return err
	}
	var errs []error
	// Gateway veths would otherwise outlive the bridge as dangling
	// unenslaved links that no one will ever delete.
	for _, p := range ports {
		if err := m.nl.LinkDel(p); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("delete gateway veth %s: %w", p.Attrs().Name, err))
		}
	}
	if err := m.nl.LinkDel(l); err != nil && !isNotFound(err) {
		errs = append(errs, fmt.Errorf("delete bridge %s: %w", m.cfg.Bridge, err))
	}
	return errors.Join(errs...)
}

// ports lists the veths enslaved to br.
func (m *Manager) ports(br netlink.Link) ([]netlink.Link, error) {
	links, err := retryDump(m.nl.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var out []netlink.Link
	for _, l := range links {
		if l.Attrs().MasterIndex == br.Attrs().Index && l.Type() == "veth" {
			out = append(out, l)
		}
	}
	return out, nil
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// CheckRules compares this manager's chains and jumps with what they
// should hold and says what differs, changing nothing: what the next
// Ensure would repair.
func (m *Manager) CheckRules(ctx context.Context) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var findings []string
	rules := append(m.cfg.Rules(), m.cfg.PublishRules(m.published)...)
	err := m.inNS(func() error {
		t, err := m.readTables(tablesOf(m.cfg.Chains(), m.cfg.Jumps()))
		if err != nil {
			return err
		}
		for _, ch := range m.cfg.Chains() {
			if !t.has(ch) {
				findings = append(findings, fmt.Sprintf("chain %s/%s is missing", ch.Table, ch.Name))
				continue
			}
			_, missing, extra, same := m.chainDiff(ch, rulesOf(rules, ch), t.rules[ch])
			switch {
			case same:
			case len(missing)+len(extra) == 0:
				findings = append(findings, fmt.Sprintf("chain %s/%s: rules out of order", ch.Table, ch.Name))
			default:
				for _, r := range missing {
					findings = append(findings, fmt.Sprintf("chain %s/%s lacks %q", ch.Table, ch.Name, r))
				}
				for _, r := range extra {
					findings = append(findings, fmt.Sprintf("chain %s/%s has an unexpected %q", ch.Table, ch.Name, r))
				}
			}
		}
		for _, j := range m.cfg.Jumps() {
			have := t.rules[Chain{j.Table, j.Chain}]
			if n := strings.Count(strings.Join(have, "\n")+"\n", j.String()+"\n"); n != 1 {
				findings = append(findings, fmt.Sprintf("%s/%s has %d jumps %q, want 1", j.Table, j.Chain, n, j.String()))
			}
		}
		return nil
	})
	return findings, err
}

// restoreForwarding turns net.ipv4.ip_forward off again if this manager
// turned it on (its mark says so), and only then.
func (m *Manager) restoreForwarding() error {
	if m.cfg.ForwardingMark == "" {
		return nil
	}
	if _, err := os.Stat(m.cfg.ForwardingMark); err != nil {
		return nil // not ours to turn off
	}
	err := m.inNS(func() error { return os.WriteFile(ipForwardPath, []byte("0\n"), 0o644) })
	if err != nil {
		return fmt.Errorf("turn net.ipv4.ip_forward off again: %w", err)
	}
	m.log.Info("turned IPv4 forwarding off again: the agent had turned it on")
	return os.Remove(m.cfg.ForwardingMark)
}
