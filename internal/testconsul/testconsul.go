// Package testconsul runs a throwaway Consul server for tests: on free
// loopback ports (or a given address, inside a given network namespace),
// stopped when the test ends.
package testconsul

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Server is one running Consul.
type Server struct {
	t       testing.TB
	bin     string
	addr    string
	netns   string
	persist bool
	hcl     []string // extra configuration
	join    []string // serf LAN addresses of the other servers (cluster)
	expect  int      // -bootstrap-expect (cluster)
	client  bool     // a client agent (StartClient)
	name    string
	tls     bool
	dataDir string
	ports   map[string]int
	logPath string
	cmd     *exec.Cmd
	done    chan struct{}
}

// Option changes how the server starts.
type Option func(*Server)

// WithPersistence runs a real server (-server -bootstrap-expect 1) with a
// data dir kept across Restart, instead of -dev.
func WithPersistence() Option { return func(s *Server) { s.persist = true } }

// WithTLS also serves HTTPS (HTTPSAddr) with the given certificate.
func WithTLS(caFile, certFile, keyFile string) Option {
	return func(s *Server) {
		s.tls = true
		s.hcl = append(s.hcl, fmt.Sprintf(`tls { defaults { ca_file = %q cert_file = %q key_file = %q verify_incoming = false } }`, caFile, certFile, keyFile))
	}
}

// WithACL turns ACLs on, denying by default, with token as the management
// token.
func WithACL(token string) Option {
	return func(s *Server) {
		s.hcl = append(s.hcl, fmt.Sprintf(`acl { enabled = true default_policy = "deny" tokens { initial_management = %q } }`, token))
	}
}

// WithAddr binds the server to ip instead of 127.0.0.1.
func WithAddr(ip string) Option { return func(s *Server) { s.addr = ip } }

// WithNetNS runs the server inside the network namespace at path.
func WithNetNS(path string) Option { return func(s *Server) { s.netns = path } }

// Binary finds the Consul binary: $CONSUL_BIN, else the cache that
// scripts/install-consul.sh fills.
func Binary() string {
	if b := os.Getenv("CONSUL_BIN"); b != "" {
		return b
	}
	home, _ := os.UserHomeDir()
	cache := os.Getenv("XDG_CACHE_HOME")
	if cache == "" {
		cache = filepath.Join(home, ".cache")
	}
	return filepath.Join(cache, "vxnet", "consul-v1.14.11")
}

// Start runs a Consul server for the test and waits for its leader.
func Start(t testing.TB, opts ...Option) *Server {
	t.Helper()
	s := prepare(t, opts...)
	s.start()
	return s
}

func prepare(t testing.TB, opts ...Option) *Server {
	t.Helper()
	s := &Server{t: t, bin: Binary(), addr: "127.0.0.1", ports: map[string]int{}}
	for _, o := range opts {
		o(s)
	}
	if _, err := os.Stat(s.bin); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("no Consul binary at %s: run scripts/install-consul.sh (CI must run the Consul tests)", s.bin)
		}
		t.Skipf("no Consul binary at %s: run scripts/install-consul.sh or set CONSUL_BIN", s.bin)
	}
	dir, err := os.MkdirTemp("", "vxnet-consul-")
	if err != nil {
		t.Fatal(err)
	}
	s.dataDir = filepath.Join(dir, "data")
	s.logPath = filepath.Join(dir, "consul.log")
	s.pickPorts()
	t.Cleanup(func() {
		s.Stop()
		if t.Failed() {
			t.Logf("consul log tail:\n%s", s.logTail())
		}
		os.RemoveAll(dir)
	})
	return s
}

// StartCluster runs len(addrs) servers, one per address (each must be
// assigned to an interface of the namespace they run in), joined into one
// cluster with persistence, and waits for a leader.
func StartCluster(t testing.TB, addrs []string, opts ...Option) []*Server {
	t.Helper()
	var servers []*Server
	for i, a := range addrs {
		s := prepare(t, append(opts, WithAddr(a), WithPersistence())...)
		s.expect, s.name = len(addrs), fmt.Sprintf("vxnet-test-%d", i)
		servers = append(servers, s)
	}
	for i, s := range servers {
		for j, o := range servers {
			if i != j {
				s.join = append(s.join, net.JoinHostPort(o.addr, fmt.Sprint(o.ports["serf_lan"])))
			}
		}
	}
	// The servers wait for each other: start all, then wait for the leader.
	for _, s := range servers {
		s.launch()
	}
	for _, s := range servers {
		if err := s.WaitLeader(60 * time.Second); err != nil {
			t.Fatalf("consul cluster: %v\n%s", err, s.logTail())
		}
	}
	return servers
}

// StartClient runs a Consul client agent inside the network namespace at
// netns, as a host runs one beside its programs: bound to bind (the host's
// underlay address), joined to server, its HTTP API on 127.0.0.1 of that
// namespace. It waits until the agent knows the server's leader.
func StartClient(t testing.TB, server *Server, netns, bind, node string) *Server {
	t.Helper()
	s := StartClientNoWait(t, net.JoinHostPort(server.addr, fmt.Sprint(server.ports["serf_lan"])), netns, bind, node)
	if err := s.WaitLeader(30 * time.Second); err != nil {
		t.Fatalf("consul client agent: %v\n%s", err, s.logTail())
	}
	return s
}

// StartClientNoWait is StartClient with the server's serf address given,
// not waiting for the join (which may never happen).
func StartClientNoWait(t testing.TB, join, netns, bind, node string) *Server {
	t.Helper()
	s := prepare(t, WithNetNS(netns))
	s.client, s.addr, s.name = true, bind, node
	s.join = []string{join}
	s.launch()
	// Its API first: the agent serves it before it has joined.
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(s.get("/v1/agent/self"), "NodeName") {
		if time.Now().After(deadline) {
			t.Fatalf("consul client agent: no API after 30s\n%s", s.logTail())
		}
		time.Sleep(100 * time.Millisecond)
	}
	return s
}

// Leader returns the address (host:port of the server RPC) of the leader
// as this server sees it.
func (s *Server) Leader() string {
	return strings.Trim(s.get("/v1/status/leader"), "\" \n")
}

// RPCAddr is this server's address as the leader is reported.
func (s *Server) RPCAddr() string { return net.JoinHostPort(s.addr, fmt.Sprint(s.ports["server"])) }

// portNames are the ports a server listens on.
var portNames = []string{"http", "https", "serf_lan", "serf_wan", "server"}

// pickPorts asks the kernel for free ports on loopback, TCP and UDP (serf
// uses both), holding each until all are chosen: a port closed at once can
// come back from the next ask, and two of one server's ports the same
// fails its start. Ports are only unique per namespace, so the same
// numbers are free in a test's own namespace too.
func (s *Server) pickPorts() {
	s.t.Helper()
	var held []io.Closer
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for _, name := range portNames {
		for {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				s.t.Fatal(err)
			}
			held = append(held, l)
			port := l.Addr().(*net.TCPAddr).Port
			u, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", fmt.Sprint(port)))
			if err != nil {
				continue // taken for UDP: keep the TCP one held, ask again
			}
			held = append(held, u)
			s.ports[name] = port
			break
		}
	}
}

func (s *Server) start() {
	s.t.Helper()
	for try := 1; ; try++ {
		s.launch()
		err := s.WaitLeader(30 * time.Second)
		if err == nil {
			return
		}
		// Another program may take a port between our ask and Consul's
		// bind; a lone server can move to other ports (a cluster's are
		// known to its peers, so StartCluster does not).
		if try < 3 && strings.Contains(s.logTail(), "address already in use") {
			s.t.Logf("consul: a port was taken, trying others")
			s.Stop()
			os.Remove(s.logPath)
			s.pickPorts()
			continue
		}
		s.t.Fatalf("consul: %v\n%s", err, s.logTail())
	}
}

func (s *Server) launch() {
	s.t.Helper()
	client := s.addr
	if s.client {
		client = "127.0.0.1" // the host's programs ask it on loopback
	}
	args := []string{"agent", "-bind", s.addr, "-client", client, "-advertise", s.addr,
		"-http-port", fmt.Sprint(s.ports["http"]), "-serf-lan-port", fmt.Sprint(s.ports["serf_lan"]),
		"-serf-wan-port", fmt.Sprint(s.ports["serf_wan"]), "-server-port", fmt.Sprint(s.ports["server"]),
		"-dns-port", "-1", "-grpc-port", "-1", "-grpc-tls-port", "-1", "-log-level", "warn", "-disable-host-node-id",
		// Consul phones home for update checks unless told not to.
		"-hcl", "disable_update_check = true"}
	if s.tls {
		args = append(args, "-https-port", fmt.Sprint(s.ports["https"]))
	}
	for _, h := range s.hcl {
		args = append(args, "-hcl", h)
	}
	switch {
	case s.client:
		args = append(args, "-data-dir", s.dataDir, "-node", s.name)
		for _, j := range s.join {
			args = append(args, "-retry-join", j, "-retry-interval", "1s")
		}
	case s.persist:
		expect := max(s.expect, 1)
		name := s.name
		if name == "" {
			name = "vxnet-test"
		}
		args = append(args, "-server", "-bootstrap-expect", fmt.Sprint(expect), "-data-dir", s.dataDir, "-node", name)
		for _, j := range s.join {
			args = append(args, "-retry-join", j)
		}
	default:
		args = append(args, "-dev")
	}
	name := s.bin
	if s.netns != "" {
		args = append([]string{"--net=" + s.netns, s.bin}, args...)
		name = "nsenter"
	}
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		s.t.Fatal(err)
	}
	s.cmd = exec.Command(name, args...)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		logf.Close()
		s.t.Fatalf("start consul: %v", err)
	}
	s.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { cmd.Wait(); logf.Close(); close(done) }(s.cmd, s.done)
}

// waitLeader polls /v1/status/leader until the server knows a leader.
func (s *Server) WaitLeader(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-s.done:
			return fmt.Errorf("consul exited")
		default:
		}
		if strings.Contains(s.get("/v1/status/leader"), ":") {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("no leader after %s", timeout)
}

// get fetches an HTTP API path; from outside the server's namespace the
// address is not reachable, so then it runs curl inside it.
func (s *Server) get(path string) string {
	url := "http://" + s.Addr() + path
	if s.netns != "" {
		out, _ := exec.Command("nsenter", "--net="+s.netns, "curl", "-sf", "-m", "1", url).Output()
		return string(out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// Keys lists the keys under prefix, for tests that check what the agents
// left in the store. An unreachable server gives none.
func (s *Server) Keys(prefix string) []string {
	var keys []string
	json.Unmarshal([]byte(s.get("/v1/kv/"+prefix+"?keys")), &keys)
	return keys
}

// Addr is host:port of the HTTP API (a client agent's is on loopback in
// its namespace).
func (s *Server) Addr() string {
	if s.client {
		return net.JoinHostPort("127.0.0.1", fmt.Sprint(s.ports["http"]))
	}
	return net.JoinHostPort(s.addr, fmt.Sprint(s.ports["http"]))
}

// Kill ends the agent at once (SIGKILL), as a crash or a host's death
// would: no leave.
func (s *Server) Kill() {
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Kill()
	<-s.done
	s.cmd = nil
}

// Launch starts a stopped agent again on the same ports and data dir,
// without waiting for it.
func (s *Server) Launch() { s.launch() }

// HTTPSAddr is host:port of the HTTPS API (WithTLS).
func (s *Server) HTTPSAddr() string { return net.JoinHostPort(s.addr, fmt.Sprint(s.ports["https"])) }

// URL is a vxnet store URL for this server.
func (s *Server) URL(prefix string) string {
	return "consul://" + s.Addr() + "/" + strings.Trim(prefix, "/")
}

// Stop ends the server (SIGTERM, then SIGKILL after 5s).
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
		s.cmd.Process.Kill()
		<-s.done
	}
	s.cmd = nil
}

// Restart stops and starts the server on the same ports and data dir.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	s.start()
}

func (s *Server) logTail() string {
	data, _ := os.ReadFile(s.logPath)
	lines := strings.Split(string(data), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return strings.Join(lines, "\n")
}

// Signal sends sig to the server (SIGSTOP freezes it: connections are
// accepted by the kernel and never answered, as with a hung server).
func (s *Server) Signal(sig syscall.Signal) {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Signal(sig)
	}
}

// Request sends one HTTP request to the server's API (for tests that
// tamper with the store by hand) and returns the body.
func (s *Server) Request(method, path, body string) (string, error) {
	return s.RequestToken(method, path, body, "")
}

// RequestToken is Request with an ACL token ("": none).
func (s *Server) RequestToken(method, path, body, token string) (string, error) {
	args := []string{"curl", "-sS", "-f", "-m", "5", "-X", method, "http://" + s.Addr() + path}
	if token != "" {
		args = append(args, "-H", "X-Consul-Token: "+token)
	}
	if body != "" {
		args = append(args, "--data-binary", body)
	}
	if s.netns != "" {
		args = append([]string{"nsenter", "--net=" + s.netns}, args...)
	}
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", method, path, err, out)
	}
	return string(out), nil
}

// Pid is the server's process id (0 when stopped), for tests that measure
// what it costs.
func (s *Server) Pid() int {
	if s.cmd == nil || s.cmd.Process == nil {
		return 0
	}
	return s.cmd.Process.Pid
}
