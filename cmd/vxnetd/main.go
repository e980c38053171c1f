// Command vxnetd is the vxnet agent: one per host. It keeps the host's
// overlay networks, containers' interfaces and VXLAN peer tables in line
// with the shared store, and serves the vxnet CLI on a unix socket.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	_ "net/http/pprof" // served only with --debug-addr
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/net/netutil"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/dnsserver"
	"github.com/vxnet/vxnet/dockerplugin"
	"github.com/vxnet/vxnet/internal/netnsutil"
	"github.com/vxnet/vxnet/ipam"
	"github.com/vxnet/vxnet/kvstore"
	"github.com/vxnet/vxnet/metrics"
	"github.com/vxnet/vxnet/nat"
	"github.com/vxnet/vxnet/overlay"
	"github.com/vxnet/vxnet/vtep"
)

type options struct {
	store, advertise, node, stateDir, runDir, socket, socketGroup string
	logLevel, pool                                                string
	gwBridge, gwSubnet, chainPrefix, iptables                     string
	noEgress, cleanup, dns, dnsForward                            bool
	dnsResolvConf                                                 string
	debugAddr, metricsAddr, dockerSocket, dockerHost              string
	vxlanPort                                                     int
	resync, nodeTTL, holdDown, holdLeft                           time.Duration
	caFile, certFile, keyFile                                     string
	version                                                       bool
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "vxnetd:", err)
		os.Exit(1)
	}
}

func parseFlags() (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("vxnetd", flag.ContinueOnError)
	fs.StringVar(&o.store, "store", "", "shared store: consul://HOST:PORT[/PREFIX] or file:///PATH (default: file://<state-dir>/store.db, single host only)")
	fs.StringVar(&o.advertise, "advertise", "", "underlay IPv4 address or interface name used as this host's VTEP address (default: the address of the interface holding the default route)")
	fs.StringVar(&o.node, "node", "", "node name (default: hostname)")
	fs.StringVar(&o.stateDir, "state-dir", "/var/lib/vxnet", "directory for this host's endpoint records")
	fs.StringVar(&o.runDir, "run-dir", "/run/vxnet", "runtime directory; network namespaces are mounted under DIR/netns")
	fs.StringVar(&o.socket, "socket", api.DefaultSocket, "API unix socket path")
	fs.StringVar(&o.socketGroup, "socket-group", "", "group that may use the API socket (mode 0660)")
	fs.IntVar(&o.vxlanPort, "vxlan-port", 4789, "VXLAN UDP port")
	fs.DurationVar(&o.resync, "resync-interval", 30*time.Second, "period of the full reconcile that repairs drift")
	fs.DurationVar(&o.holdDown, "peer-hold-down", time.Second, "how long a host's entries stay after its records went with its session when gossip found its local Consul agent failed (dead, or killed and restarting); 0 for none")
	fs.DurationVar(&o.holdLeft, "peer-hold-left", 15*time.Second, "how long at most a host's entries stay after its records went with its session when its local Consul agent left the cluster gracefully (a restart); 0 for none")
	fs.DurationVar(&o.nodeTTL, "node-ttl", 15*time.Second, "store session TTL: a host silent for longer is considered gone (min 10s; Consul may take up to twice this to notice)")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.pool, "pool", "10.0.0.0/8", "pool that networks without --subnet get a /24 from")
	fs.StringVar(&o.gwBridge, "gateway-bridge", nat.DefaultBridge, "host bridge that gives containers their way out (eth1 and the default route)")
	fs.StringVar(&o.gwSubnet, "gateway-subnet", nat.DefaultSubnet.String(), "subnet of the gateway bridge; the bridge holds its first address")
	fs.StringVar(&o.chainPrefix, "chain-prefix", nat.DefaultChainPrefix, "prefix of this agent's iptables chains")
	fs.StringVar(&o.iptables, "iptables", "", "iptables program: iptables-nft or iptables-legacy (default: iptables, the distribution's choice)")
	fs.BoolVar(&o.noEgress, "no-egress", false, "give containers no gateway interface and program no NAT")
	fs.BoolVar(&o.dns, "dns", true, "run a DNS server per network on its gateway address (port 53, in the network's namespace) answering the network's endpoint names on every host")
	fs.BoolVar(&o.dnsForward, "dns-forward", true, "forward names outside the overlay to the resolvers of --dns-resolv-conf; false answers them REFUSED")
	fs.StringVar(&o.dnsResolvConf, "dns-resolv-conf", "/etc/resolv.conf", "the resolv.conf whose nameservers names outside the overlay are forwarded to")
	fs.BoolVar(&o.cleanup, "cleanup", false, "remove the gateway bridge, its interfaces and every iptables rule and chain this agent made, then exit (overlay namespaces and containers' overlay interfaces stay)")
	fs.StringVar(&o.caFile, "store-ca-file", "", "CA certificate for the store's TLS (env CONSUL_CACERT)")
	fs.StringVar(&o.certFile, "store-cert-file", "", "client certificate for the store (env CONSUL_CLIENT_CERT)")
	fs.StringVar(&o.keyFile, "store-key-file", "", "client key for the store (env CONSUL_CLIENT_KEY)")
	fs.StringVar(&o.dockerSocket, "docker-plugin-socket", "", "serve Docker's network and IPAM plugin protocol on this unix socket; Docker names the plugin after the file (recommended: /run/docker/plugins/vxnet.sock, giving the drivers the name vxnet); off by default")
	fs.StringVar(&o.dockerHost, "docker-host", "unix:///var/run/docker.sock", "the Docker daemon the plugin asks for network names, which Docker's plugin protocol does not pass")
	fs.StringVar(&o.metricsAddr, "metrics-addr", "", "serve Prometheus metrics (/metrics) and health (/healthz, /readyz) on this address (e.g. 127.0.0.1:9473); off by default")
	fs.StringVar(&o.debugAddr, "debug-addr", "", "serve Go's pprof profiles on this address (e.g. 127.0.0.1:6060); off by default")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: vxnetd [flags]

vxnetd is the vxnet agent. Every flag can also be set in the environment as
VXNETD_<FLAG> (upper case, '-' as '_'), e.g. VXNETD_STORE=consul://10.0.0.1:8500.
The Consul ACL token is read from CONSUL_HTTP_TOKEN (never from a flag, so it
does not show in the process list).

Flags:
`)
		fs.PrintDefaults()
	}
	for _, a := range os.Args[1:] {
		if a == "-h" || a == "-help" || a == "--help" {
			fs.SetOutput(os.Stdout) // asked for: an answer, not an error
		}
	}
	set := map[string]bool{}
	if err := fs.Parse(os.Args[1:]); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q (see --help)", fs.Arg(0))
	}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		env := "VXNETD_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(env); ok && !set[f.Name] && err == nil {
			if serr := f.Value.Set(v); serr != nil {
				err = fmt.Errorf("%s=%q: %w", env, v, serr)
			}
		}
	})
	return o, err
}

func run() error {
	o, err := parseFlags()
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	if o.version {
		fmt.Println("vxnetd", api.Version)
		return nil
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		return fmt.Errorf("--log-level %q: use debug, info, warn or error", o.logLevel)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(log)

	var egress *nat.Config
	if !o.noEgress || o.cleanup {
		sub, err := netip.ParsePrefix(o.gwSubnet)
		if err != nil {
			return fmt.Errorf("--gateway-subnet %q: %w", o.gwSubnet, err)
		}
		egress = &nat.Config{Bridge: o.gwBridge, Subnet: sub, ChainPrefix: o.chainPrefix, IPTables: o.iptables, Logger: log,
			ForwardingMark: filepath.Join(o.stateDir, "ip_forward-enabled")}
	}
	if o.cleanup {
		// Cleanup tears down egress: under a running agent that would cut
		// its containers off, so it needs the agent's state dir to itself.
		if err := os.MkdirAll(o.stateDir, 0o755); err != nil {
			return err
		}
		release, err := lockDirs([2]string{"--state-dir", o.stateDir})
		if err != nil {
			return fmt.Errorf("cleanup: %w", err)
		}
		defer release()
		return cleanup(*egress, o.stateDir)
	}
	if egress != nil {
		if err := checkGatewaySubnet(egress.Subnet, o.gwBridge); err != nil {
			return err
		}
	}
	if o.node == "" {
		if o.node, err = os.Hostname(); err != nil {
			return fmt.Errorf("node name: %w", err)
		}
	}
	if err := overlay.ValidateName("node", o.node); err != nil {
		return fmt.Errorf("--node: %w", err)
	}
	addr, err := advertiseAddr(o.advertise)
	if err != nil {
		return fmt.Errorf("--advertise: %w", err)
	}
	pool, err := netip.ParsePrefix(o.pool)
	if err != nil {
		return fmt.Errorf("--pool %q: %w", o.pool, err)
	}
	// Networks without --subnet get a /24 of the pool.
	if err := ipam.ValidatePool(pool, 24); err != nil {
		return fmt.Errorf("--pool: %w", err)
	}
	if o.nodeTTL < 10*time.Second {
		return fmt.Errorf("--node-ttl %s is below Consul's minimum of 10s", o.nodeTTL)
	}
	for _, f := range []struct {
		name string
		d    time.Duration
	}{{"--peer-hold-down", o.holdDown}, {"--peer-hold-left", o.holdLeft}} {
		if f.d < 0 || f.d > 5*time.Minute {
			return fmt.Errorf("%s %s: give 0 (none) up to 5m", f.name, f.d)
		}
	}
	if o.vxlanPort < 1 || o.vxlanPort > 65535 {
		return fmt.Errorf("--vxlan-port %d is out of range", o.vxlanPort)
	}
	mtu, err := vtep.UnderlayMTU(addr)
	if err != nil {
		return fmt.Errorf("underlay MTU: %w", err)
	}
	for _, d := range []string{o.stateDir, o.runDir, filepath.Dir(o.socket)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	// Before anything of the directories is read or changed (the store
	// file, the journal, the namespaces): a second agent on the same run
	// dir would remove the first one's namespaces as leaks. The locks go
	// with the process, however it ends.
	release, err := lockDirs([2]string{"--run-dir", o.runDir}, [2]string{"--state-dir", o.stateDir})
	if err != nil {
		return err
	}
	defer release()
	nofile, err := fileLimit(log)
	if err != nil {
		return err
	}
	store, err := kvstore.Open(o.store, kvstore.Options{
		CAFile: o.caFile, CertFile: o.certFile, KeyFile: o.keyFile,
		DefaultFile: filepath.Join(o.stateDir, "store.db"),
	})
	if err != nil {
		return fmt.Errorf("--store: %w", err)
	}
	defer store.Close()

	var dnsCfg *dnsserver.Config
	if o.dns {
		dnsCfg = &dnsserver.Config{Forward: o.dnsForward, ResolvConf: o.dnsResolvConf}
	}
	agent, err := overlay.New(overlay.Config{
		Node: o.node, Advertise: addr, StateDir: o.stateDir, NetNSDir: filepath.Join(o.runDir, "netns"),
		VXLANPort: o.vxlanPort, UnderlayMTU: mtu, ResyncInterval: o.resync, NodeTTL: o.nodeTTL, HoldDown: holdConfig(o.holdDown), HoldLeft: holdConfig(o.holdLeft),
		StoreName: storeName(o.store, o.stateDir), IPAM: ipam.Options{Pool: pool}, Egress: egress, DNS: dnsCfg, Logger: log,
		CrashAt: os.Getenv("VXNETD_TEST_CRASH_AT"), PauseAt: os.Getenv("VXNETD_TEST_PAUSE_AT"), PauseFor: 2 * time.Second,
	}, store)
	if err != nil {
		return err
	}

	{
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		err := agent.CheckGatewaySubnet(ctx)
		cancel()
		switch {
		case errors.Is(err, kvstore.ErrUnavailable):
			log.Warn("cannot check the gateway subnet against the overlay networks: store unreachable", "err", err)
		case err != nil:
			return err
		}
	}
	ln, err := listen(o.socket, o.socketGroup)
	if err != nil {
		return err
	}
	// Connections over the cap wait in the kernel's backlog, not in the
	// agent's descriptor table; the timeouts bound how long each one is
	// held, so slow clients delay other clients but never starve the
	// datapath of descriptors.
	conns := apiConnLimit(nofile)
	ln = netutil.LimitListener(ln, conns)
	log.Debug("api connection limit", "connections", conns, "open_file_limit", nofile)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	srv := &http.Server{
		Handler:           agent.Handler(),
		ReadHeaderTimeout: overlay.ServerTimeouts.ReadHeader,
		ReadTimeout:       overlay.ServerTimeouts.Read,
		WriteTimeout:      overlay.ServerTimeouts.Write,
		IdleTimeout:       overlay.ServerTimeouts.Idle,
		MaxHeaderBytes:    overlay.MaxHeaderBytes,
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("api server", "err", err)
			stop()
		}
	}()
	if o.debugAddr != "" {
		dbg := &http.Server{Addr: o.debugAddr, Handler: http.DefaultServeMux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := dbg.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("debug server", "err", err)
			}
		}()
		defer dbg.Close()
	}
	if o.metricsAddr != "" {
		metrics.SetBuildInfo(api.Version)
		// Listening first: a taken port is an error at start, not a
		// warning nobody reads.
		ln, err := net.Listen("tcp", o.metricsAddr)
		if err != nil {
			return fmt.Errorf("--metrics-addr: %w", err)
		}
		go func() {
			if err := metrics.Serve(ctx, ln, agent, log); err != nil {
				log.Error("metrics server", "err", err)
			}
		}()
	}
	if o.dockerSocket != "" {
		if err := serveDockerPlugin(ctx, o, log); err != nil {
			return err
		}
		defer os.Remove(o.dockerSocket)
	}
	warnPrivateMounts(log, o.runDir)
	log.Info("vxnetd starting", "version", api.Version, "node", o.node, "advertise", addr, "store", redact(o.store),
		"socket", o.socket, "underlay_mtu", mtu)

	err = agent.Run(ctx, func() {
		log.Info("vxnetd ready")
		sdNotify("READY=1")
	})
	// Stopping is not cleanup: the datapath stays as it is, so containers
	// keep talking while the agent is down or restarting.
	sdNotify("STOPPING=1")
	shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	srv.Shutdown(shutdown)
	os.Remove(o.socket)
	log.Info("vxnetd stopped")
	return err
}

// serveDockerPlugin starts the Docker plugin on its socket. It talks to
// this agent through its API socket, like any other client.
func serveDockerPlugin(ctx context.Context, o *options, log *slog.Logger) error {
	client, err := api.NewClient("unix://" + o.socket)
	if err != nil {
		return err
	}
	docker, err := dockerplugin.NewDocker(o.dockerHost)
	if err != nil {
		return fmt.Errorf("--docker-host: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(o.dockerSocket), 0o755); err != nil {
		return fmt.Errorf("--docker-plugin-socket: %w", err)
	}
	ln, err := listen(o.dockerSocket, "")
	if err != nil {
		return fmt.Errorf("--docker-plugin-socket: %w", err)
	}
	p := dockerplugin.New(ctx, client, docker, log.With("part", "docker-plugin"), filepath.Join(o.stateDir, "docker-networks.json"))
	go func() {
		if err := p.Serve(ctx, ln); err != nil {
			log.Error("docker plugin", "err", err)
		}
	}()
	log.Info("docker plugin listening", "socket", o.dockerSocket, "docker_host", o.dockerHost)
	return nil
}

// checkGatewaySubnet refuses a gateway subnet that a route of the host
// already covers (other than the gateway bridge's own).
func checkGatewaySubnet(sub netip.Prefix, bridge string) error {
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst == nil || isDefault(r) {
			continue
		}
		if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil && l.Attrs().Name == bridge {
			continue
		}
		ones, _ := r.Dst.Mask.Size()
		ip, _ := netip.AddrFromSlice(r.Dst.IP.To4())
		if netip.PrefixFrom(ip, ones).Overlaps(sub) {
			return fmt.Errorf("--gateway-subnet %s overlaps the host's route to %s: choose another", sub, r.Dst)
		}
	}
	return nil
}

// cleanup removes what egress made: explicit, never part of stopping.
func cleanup(cfg nat.Config, stateDir string) error {
	m, err := nat.New(cfg)
	if err != nil {
		return err
	}
	defer m.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Cleanup(ctx); err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	if err := os.Remove(filepath.Join(stateDir, "gateway-addrs.json")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("cleanup: %w", err)
	}
	slog.Info("removed the gateway bridge, its interfaces and this agent's iptables chains")
	return nil
}

// advertiseAddr resolves --advertise: an IPv4 address, an interface name,
// or (empty) the interface holding the default route.
func advertiseAddr(v string) (netip.Addr, error) {
	if v != "" {
		if a, err := netip.ParseAddr(v); err == nil {
			switch {
			case !a.Is4():
				return netip.Addr{}, fmt.Errorf("%s: only IPv4 underlays are supported", v)
			case !overlay.IsUnicastIPv4(a):
				// Peers refuse such a VTEP in its endpoint records.
				return netip.Addr{}, fmt.Errorf("%s is not a unicast address: peers send this host's VXLAN traffic there", v)
			}
			return a, nil
		}
		link, err := netlink.LinkByName(v)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("%q is neither an IPv4 address nor an interface: %w", v, err)
		}
		return firstIPv4(link)
	}
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return netip.Addr{}, err
	}
	for _, r := range routes {
		if isDefault(r) {
			link, err := netlink.LinkByIndex(r.LinkIndex)
			if err != nil {
				return netip.Addr{}, err
			}
			return firstIPv4(link)
		}
	}
	return netip.Addr{}, errors.New("no default route to take the address from; give --advertise")
}

// isDefault covers both ways netlink reports a default route: no
// destination, or 0.0.0.0/0.
func isDefault(r netlink.Route) bool {
	if r.Dst == nil {
		return true
	}
	ones, _ := r.Dst.Mask.Size()
	return ones == 0
}

func firstIPv4(link netlink.Link) (netip.Addr, error) {
	addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return netip.Addr{}, err
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok {
			return ip, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("interface %s has no IPv4 address", link.Attrs().Name)
}

// listen opens the API socket. A leftover socket of a dead agent is
// replaced; one that answers belongs to a running agent and is an error.
func listen(path, group string) (net.Listener, error) {
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("another agent is serving %s", path)
	}
	os.Remove(path)
	old := syscall.Umask(0o117)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if group != "" {
		g, err := user.LookupGroup(group)
		if err != nil {
			ln.Close()
			return nil, fmt.Errorf("--socket-group: %w", err)
		}
		gid, _ := strconv.Atoi(g.Gid)
		if err := os.Chown(path, 0, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("--socket-group: %w", err)
		}
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// sdNotify tells systemd about readiness (Type=notify); without
// NOTIFY_SOCKET it does nothing.
func sdNotify(state string) {
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock == "" {
		return
	}
	if strings.HasPrefix(sock, "@") {
		sock = "\x00" + sock[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		slog.Warn("sd_notify", "err", err)
		return
	}
	defer c.Close()
	c.Write([]byte(state))
}

// redact hides credentials that a store URL might carry.
func redact(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.User == nil {
		return raw
	}
	u.User = url.User("REDACTED")
	return u.String()
}

// warnPrivateMounts warns when the agent runs in a mount namespace other
// than the host's (as under "ip netns exec"): the network namespaces it
// bind-mounts under the run dir live in that mount namespace and vanish
// when the agent exits, and every container's overlay with them.
func warnPrivateMounts(log *slog.Logger, runDir string) {
	private, self, host, err := netnsutil.PrivateMounts()
	if err != nil || !private {
		return
	}
	log.Warn("vxnetd runs in a mount namespace other than the host's: the network namespaces it mounts under the run dir vanish when it exits, "+
		"and every container's overlay with them; start it from systemd or with nsenter --net=, not ip netns exec",
		"self", self, "host", host, "run_dir", runDir)
}

// holdConfig maps a hold flag to overlay.Config's, where 0 means the
// default and a negative value none.
func holdConfig(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}

// storeName is the store as status shows it: the URL without secrets, or
// the embedded store's file.
func storeName(store, stateDir string) string {
	if store == "" {
		return "embedded: " + filepath.Join(stateDir, "store.db")
	}
	return redact(store)
}
