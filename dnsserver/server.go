package dnsserver

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
	"github.com/vishvananda/netns"
	"golang.org/x/net/netutil"

	"github.com/vxnet/vxnet/internal/netnsutil"
)

// Config is what every network's server shares.
type Config struct {
	// Forward sends names outside the overlay to the resolvers of
	// ResolvConf; without it they are answered REFUSED.
	Forward    bool
	ResolvConf string // default /etc/resolv.conf
	// TTL of answers and of negative answers (default 5 s): short, so
	// that a detach or a host's death is seen soon.
	TTL uint32
	// MaxInflight bounds the queries a network's server works on at
	// once (default 256), and MaxForwards those of them waiting for an
	// outside resolver (default 64); more are dropped, not queued, so
	// that a flood costs the agent a bounded amount of work, and slow
	// outside names do not hold up the network's own.
	MaxInflight, MaxForwards int
	// IsNetwork says whether a name is that of an overlay network: its
	// names are never forwarded, and only its own server answers them.
	IsNetwork func(name string) bool
	// IsOverlayAddr says whether an address is in an overlay network's
	// subnet: its reverse name is never forwarded either.
	IsOverlayAddr func(ip netip.Addr) bool
	// Count, if set, is told of each query: "local", "forwarded",
	// "refused" or "dropped".
	Count func(result string)
	Log   *slog.Logger
}

// Spec is one network's server: the namespace it listens in, on the
// network's gateway address, and its names.
type Spec struct {
	Netns   string // path of the network's namespace
	Network string // the zone: names are <endpoint> and <endpoint>.<network>
	Gateway netip.Addr
	Subnet  netip.Prefix
	Zone    *Zone
}

// Manager runs a server per network namespace.
type Manager struct {
	cfg Config
	up  *upstream

	mu      sync.Mutex
	servers map[string]*server // by namespace path
	closed  bool
}

// NewManager makes a manager; it listens nowhere until Ensure.
func NewManager(cfg Config) *Manager {
	if cfg.ResolvConf == "" {
		cfg.ResolvConf = "/etc/resolv.conf"
	}
	if cfg.TTL == 0 {
		cfg.TTL = 5
	}
	if cfg.MaxInflight == 0 {
		cfg.MaxInflight = 256
	}
	if cfg.MaxForwards == 0 {
		cfg.MaxForwards = 64
	}
	if cfg.IsNetwork == nil {
		cfg.IsNetwork = func(string) bool { return false }
	}
	if cfg.Count == nil {
		cfg.Count = func(string) {}
	}
	if cfg.IsOverlayAddr == nil {
		cfg.IsOverlayAddr = func(netip.Addr) bool { return false }
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Manager{cfg: cfg, up: &upstream{path: cfg.ResolvConf}, servers: map[string]*server{}}
}

type server struct {
	spec     Spec
	ns       netnsutil.ID // the namespace when the sockets were made
	pc       net.PacketConn
	ln       net.Listener
	sem, fwd chan struct{}
}

// Ensure runs the network's server, or checks that the running one still
// listens in the namespace at spec.Netns (a namespace made again needs
// new sockets) on the same address. It is cheap when nothing changed.
func (m *Manager) Ensure(spec Spec) error {
	id, err := netnsutil.IDOf(spec.Netns)
	if err != nil {
		return fmt.Errorf("dns server of %s: %w", spec.Network, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil // the agent is stopping
	}
	if s := m.servers[spec.Netns]; s != nil {
		if s.ns == id && s.spec.Gateway == spec.Gateway && s.spec.Network == spec.Network && s.spec.Zone == spec.Zone {
			s.spec.Subnet = spec.Subnet
			return nil
		}
		s.stop()
		delete(m.servers, spec.Netns)
	}
	s := &server{spec: spec, ns: id, sem: make(chan struct{}, m.cfg.MaxInflight), fwd: make(chan struct{}, m.cfg.MaxForwards)}
	if err := m.listen(s); err != nil {
		return fmt.Errorf("dns server of %s on %s:53: %w", spec.Network, spec.Gateway, err)
	}
	m.servers[spec.Netns] = s
	m.cfg.Log.Info("dns server listening", "network", spec.Network, "addr", spec.Gateway.String()+":53", "netns", spec.Netns)
	return nil
}

// Stop stops the server of a namespace, if any.
func (m *Manager) Stop(netnsPath string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if s := m.servers[netnsPath]; s != nil {
		s.stop()
		delete(m.servers, netnsPath)
	}
}

// Close stops every server, and Ensure starts none after it.
func (m *Manager) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	for p, s := range m.servers {
		s.stop()
		delete(m.servers, p)
	}
}

// Running lists the namespaces served.
func (m *Manager) Running() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for p := range m.servers {
		out = append(out, p)
	}
	return out
}

// listen opens the sockets inside the network's namespace: they stay
// there, while the goroutines serving them, and the forwarding, run in
// the agent's own namespace.
func (m *Manager) listen(s *server) error {
	h, err := netns.GetFromPath(s.spec.Netns)
	if err != nil {
		return err
	}
	defer h.Close()
	addr := net.JoinHostPort(s.spec.Gateway.String(), "53")
	var pc net.PacketConn
	var ln net.Listener
	err = netnsutil.WithNetNS(h, func() error {
		var err error
		if pc, err = net.ListenPacket("udp4", addr); err != nil {
			return err
		}
		if ln, err = net.Listen("tcp4", addr); err != nil {
			pc.Close()
			return err
		}
		return nil
	})
	if err != nil {
		return err
	}
	// TCP connections are bounded like queries: each holds a descriptor
	// and a goroutine while it idles.
	ln = netutil.LimitListener(ln, maxTCPConns)
	s.pc, s.ln = pc, ln
	handler := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) { m.serve(s, w, r) })
	idle := func() time.Duration { return 2 * time.Second }
	for _, srv := range []*dns.Server{
		{PacketConn: pc, Handler: handler},
		{Listener: ln, Handler: handler, ReadTimeout: 2 * time.Second, WriteTimeout: 2 * time.Second, IdleTimeout: idle},
	} {
		go func() {
			if err := srv.ActivateAndServe(); err != nil && !errors.Is(err, net.ErrClosed) {
				m.cfg.Log.Warn("dns server", "network", s.spec.Network, "err", err)
			}
		}()
	}
	return nil
}

// maxTCPConns bounds a server's TCP connections.
const maxTCPConns = 64

// stop closes the sockets: the serving goroutines end with them, whether
// or not they had started (a dns.Server's Shutdown refuses one that has
// not, and waits for the queries in flight, forwards included), and the
// namespace is not kept alive by a socket.
func (s *server) stop() {
	s.pc.Close()
	s.ln.Close()
}

// serve answers one query. Over the bound, the query is dropped: the
// client retries, and the agent's other work goes on.
func (m *Manager) serve(s *server, w dns.ResponseWriter, r *dns.Msg) {
	select {
	case s.sem <- struct{}{}:
		defer func() { <-s.sem }()
	default:
		m.cfg.Count("dropped")
		return
	}
	out := m.answer(s, w, r)
	if out == nil {
		return
	}
	if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
		// What the client can take: 512 bytes, or what its EDNS0
		// record says; more is truncated, and it asks again over TCP.
		size := dns.MinMsgSize
		if opt := r.IsEdns0(); opt != nil {
			size = max(int(opt.UDPSize()), dns.MinMsgSize)
			if out.IsEdns0() == nil {
				out.SetEdns0(uint16(size), false)
			}
		}
		out.Compress = true
		out.Truncate(size)
	}
	w.WriteMsg(out)
}

// answer is the reply to r, nil for none.
func (m *Manager) answer(s *server, w dns.ResponseWriter, r *dns.Msg) *dns.Msg {
	if len(r.Question) != 1 || r.Opcode != dns.OpcodeQuery {
		out := new(dns.Msg)
		out.SetRcode(r, dns.RcodeFormatError)
		return out
	}
	q := r.Question[0]
	name := strings.ToLower(dns.Fqdn(q.Name))
	zone := strings.ToLower(dns.Fqdn(s.spec.Network))
	switch {
	case name == zone:
		return m.negative(s, r, dns.RcodeSuccess)
	case strings.HasSuffix(name, "."+zone):
		// <endpoint>.<network>: the endpoint's name may have dots.
		return m.local(s, r, strings.TrimSuffix(name, "."+zone))
	case strings.HasSuffix(name, ".in-addr.arpa.") && q.Qtype == dns.TypePTR:
		if ip, ok := reverseAddr(name); ok && s.spec.Subnet.Contains(ip) {
			return m.reverse(s, r, ip)
		} else if ok && m.cfg.IsOverlayAddr(ip) {
			m.cfg.Count("local")
			return m.negative(s, r, dns.RcodeNameError) // another overlay's
		}
	}
	// A single label is an endpoint of this network or nothing, and so
	// is a name with dots that one of its endpoints has.
	bare := strings.TrimSuffix(name, ".")
	if dns.CountLabel(name) == 1 || len(s.spec.Zone.Lookup(bare)) > 0 {
		return m.local(s, r, bare)
	}
	if m.inOtherNetwork(name) {
		// Another overlay's names are not known here, and are never
		// sent outside: no answer says what another network holds.
		m.cfg.Count("local")
		return m.negative(s, r, dns.RcodeNameError)
	}
	if !m.cfg.Forward {
		m.cfg.Count("refused")
		out := new(dns.Msg)
		out.SetRcode(r, dns.RcodeRefused)
		return out
	}
	select {
	case s.fwd <- struct{}{}:
		defer func() { <-s.fwd }()
	default:
		m.cfg.Count("dropped")
		return nil // the client asks again
	}
	m.cfg.Count("forwarded")
	return m.forward(w, r)
}

// inOtherNetwork reports whether a name ends in an overlay network's name
// (which may have dots itself).
func (m *Manager) inOtherNetwork(name string) bool {
	for off, end := 0, false; !end; off, end = dns.NextLabel(name, off) {
		if off > 0 && m.cfg.IsNetwork(strings.TrimSuffix(name[off:], ".")) {
			return true
		}
	}
	return false
}

func (m *Manager) local(s *server, r *dns.Msg, label string) *dns.Msg {
	m.cfg.Count("local")
	ips := s.spec.Zone.Lookup(label)
	if len(ips) == 0 {
		if !s.spec.Zone.Complete() {
			// The other hosts' names are not known yet (the store
			// has not answered since the start): no answer to cache.
			out := new(dns.Msg)
			out.SetRcode(r, dns.RcodeServerFailure)
			return out
		}
		return m.negative(s, r, dns.RcodeNameError)
	}
	q := r.Question[0]
	if q.Qtype != dns.TypeA && q.Qtype != dns.TypeANY {
		return m.noData(s, r)
	}
	out := new(dns.Msg)
	out.SetReply(r)
	out.Authoritative, out.RecursionAvailable = true, m.cfg.Forward
	for _, ip := range ips {
		out.Answer = append(out.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: m.cfg.TTL}, A: ip.AsSlice()})
	}
	return out
}

func (m *Manager) reverse(s *server, r *dns.Msg, ip netip.Addr) *dns.Msg {
	m.cfg.Count("local")
	names := s.spec.Zone.Names(ip)
	if len(names) == 0 {
		return m.negative(s, r, dns.RcodeNameError)
	}
	q := r.Question[0]
	out := new(dns.Msg)
	out.SetReply(r)
	out.Authoritative, out.RecursionAvailable = true, m.cfg.Forward
	for _, n := range names {
		out.Answer = append(out.Answer, &dns.PTR{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypePTR, Class: dns.ClassINET, Ttl: m.cfg.TTL},
			Ptr: dns.Fqdn(n + "." + s.spec.Network)})
	}
	return out
}

func (m *Manager) noData(s *server, r *dns.Msg) *dns.Msg { return m.negative(s, r, dns.RcodeSuccess) }

// negative is NXDOMAIN or an empty answer, with the zone's SOA, whose
// minimum makes resolvers cache the absence only briefly.
func (m *Manager) negative(s *server, r *dns.Msg, rcode int) *dns.Msg {
	out := new(dns.Msg)
	out.SetRcode(r, rcode)
	out.Authoritative, out.RecursionAvailable = true, m.cfg.Forward
	zone := dns.Fqdn(s.spec.Network)
	out.Ns = []dns.RR{&dns.SOA{Hdr: dns.RR_Header{Name: zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: m.cfg.TTL},
		Ns: "ns." + zone, Mbox: "hostmaster." + zone, Serial: 1, Refresh: m.cfg.TTL, Retry: m.cfg.TTL, Expire: m.cfg.TTL, Minttl: m.cfg.TTL}}
	return out
}

func reverseAddr(name string) (netip.Addr, bool) {
	labels := dns.SplitDomainName(strings.TrimSuffix(name, "in-addr.arpa."))
	if len(labels) != 4 {
		return netip.Addr{}, false
	}
	ip, err := netip.ParseAddr(labels[3] + "." + labels[2] + "." + labels[1] + "." + labels[0])
	return ip, err == nil && ip.Is4()
}

// forward asks the host's resolvers, over the transport the query came
// by (a truncated answer makes the client ask again over TCP).
func (m *Manager) forward(w dns.ResponseWriter, r *dns.Msg) *dns.Msg {
	servers, err := m.up.servers()
	if err != nil || len(servers) == 0 {
		m.cfg.Log.Debug("dns: no resolver to forward to", "path", m.cfg.ResolvConf, "err", err)
		out := new(dns.Msg)
		out.SetRcode(r, dns.RcodeServerFailure)
		return out
	}
	network := "udp"
	if _, ok := w.RemoteAddr().(*net.TCPAddr); ok {
		network = "tcp"
	}
	c := &dns.Client{Net: network, Timeout: 2 * time.Second}
	for _, srv := range servers {
		resp, _, err := c.Exchange(r, srv)
		if err == nil && resp != nil {
			resp.Id = r.Id
			return resp
		}
	}
	out := new(dns.Msg)
	out.SetRcode(r, dns.RcodeServerFailure)
	return out
}

// upstream is the resolvers of a resolv.conf, read again when it
// changes.
type upstream struct {
	path string
	mu   sync.Mutex
	mod  time.Time
	list []string
}

func (u *upstream) servers() ([]string, error) {
	st, err := os.Stat(u.path)
	if err != nil {
		return nil, err
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if !st.ModTime().Equal(u.mod) || u.list == nil {
		cc, err := dns.ClientConfigFromFile(u.path)
		if err != nil {
			return nil, err
		}
		// A new slice: forwards under way still read the old one.
		list := make([]string, 0, len(cc.Servers))
		for _, s := range cc.Servers {
			list = append(list, net.JoinHostPort(s, cc.Port))
		}
		u.list = list
		u.mod = st.ModTime()
	}
	return u.list, nil
}
