package test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/testnet"
)

// raiseFileLimit gives the test process up to n descriptors and restores
// the limit at the end. It is called after the agents started: processes
// started from here on inherit the raised limit (Go stops restoring the
// original for children once Setrlimit is called), and the agents must
// keep the limit a real one would have. Without CAP_SYS_RESOURCE the hard
// limit cannot rise; the soft one is then what Go set it to (the hard one
// less one), and it is returned for the test to know its budget.
func raiseFileLimit(t *testing.T, n uint64) uint64 {
	t.Helper()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	if old.Cur >= n {
		return old.Cur
	}
	lim := syscall.Rlimit{Cur: n, Max: max(n, old.Max)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Logf("cannot raise RLIMIT_NOFILE to %d (%v): the test keeps %d", n, err, old.Cur)
		return old.Cur
	}
	t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
	return n
}

// steadyPing pings from ns at 10/s until stop, which returns ping's
// summary. SIGINT makes ping print it.
func steadyPing(t *testing.T, ns, addr string) (stop func() string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns, "ping", "-i", "0.1", "-W", "1", addr)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	var once sync.Once
	stop = func() string {
		once.Do(func() {
			cmd.Process.Signal(syscall.SIGINT)
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				cmd.Process.Kill()
				<-done
			}
		})
		return out.String()
	}
	t.Cleanup(func() { stop() })
	return stop
}

// slowClients holds connections to a unix socket, each with a request's
// headers and one byte of its body sent, and the rest never coming.
type slowClients struct {
	mu    sync.Mutex
	conns []net.Conn
	// refused counts connects the kernel turned away (EAGAIN: the accept
	// backlog is full), which is what a capped agent should cause.
	refused int
	// outOfFDs is set when the test process itself ran out of
	// descriptors: with a capped agent at most the cap plus the backlog
	// can be connected at once, far fewer than the test may hold.
	outOfFDs bool
}

const slowRequest = "POST /v1/networks HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"

// fill dials until n connections are held, or one pass of attempts is
// done; it returns the first error other than a full backlog.
func (s *slowClients) fill(socket string, n int) error {
	s.mu.Lock()
	missing := n - len(s.conns)
	s.mu.Unlock()
	for range missing {
		c, err := net.Dial("unix", socket)
		if errors.Is(err, syscall.EAGAIN) {
			s.mu.Lock()
			s.refused++
			s.mu.Unlock()
			continue
		}
		if errors.Is(err, syscall.EMFILE) {
			s.mu.Lock()
			s.outOfFDs = true
			s.mu.Unlock()
			return nil
		}
		if err != nil {
			return err
		}
		// The write lands in the socket's queue even before the agent
		// accepts the connection.
		c.SetWriteDeadline(time.Now().Add(time.Second))
		if _, err := c.Write([]byte(slowRequest)); err != nil {
			c.Close() // the agent closed it already (its read timeout)
			continue
		}
		s.mu.Lock()
		s.conns = append(s.conns, c)
		s.mu.Unlock()
	}
	return nil
}

// prune drops the connections the agent has closed (it answers them with
// 400 after its read timeout), so that fill can replace them.
func (s *slowClients) prune() {
	s.mu.Lock()
	defer s.mu.Unlock()
	buf := make([]byte, 1)
	kept := s.conns[:0]
	for _, c := range s.conns {
		c.SetReadDeadline(time.Now().Add(time.Microsecond))
		if _, err := c.Read(buf); err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			kept = append(kept, c)
			continue
		}
		c.Close()
	}
	clear(s.conns[len(kept):])
	s.conns = kept
}

func (s *slowClients) held() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

func (s *slowClients) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
	s.conns = nil
}

// openFDs counts a process's descriptors.
func openFDs(pid int) int {
	entries, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(entries)
}

var datapathChangeRE = regexp.MustCompile(`(?i)removing|recreated|repaired|too many open files`)

// Slow clients that send a request's headers and never finish its body,
// 20,000 of them, cannot take the agent's descriptors: the API serves a
// capped number at a time, the others wait in the kernel's backlog or are
// refused there, each is cut off after the read timeout, and the datapath
// (its resyncs included) never notices. Once the clients go, the API
// answers again at once.
func TestSlowClientsDoNotStarveDatapath(t *testing.T) {
	c := newCluster(t, 2)
	a1, a2 := c.agents[0], c.agents[1]
	a1.mustVxnet("network", "create", "n", "--subnet", "10.8.0.0/24")
	c1, c2 := c.net.AddNS("c1"), c.net.AddNS("c2")
	a1.mustVxnet("attach", "n", c1, "--ip", "10.8.0.10")
	a2.mustVxnet("attach", "n", c2, "--ip", "10.8.0.20")
	eventually(t, 5*time.Second, "c1 reaches c2", func() error { return testnet.Ping(c1, "10.8.0.20") })

	pid := a1.cmd.Process.Pid // nsenter execs vxnetd: the same process
	baseFDs := openFDs(pid)
	logStart := len(a1.log())
	stopPing := steadyPing(t, c1, "10.8.0.20")
	budget := raiseFileLimit(t, 24000)

	// One slow client alone first: the agent takes it at once, and its
	// read timeout must cut it off (it used to be held for good).
	probe, err := net.Dial("unix", a1.socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { probe.Close() })
	if _, err := probe.Write([]byte(slowRequest)); err != nil {
		t.Fatal(err)
	}
	probeAnswer := make(chan string, 1)
	go func(start time.Time) {
		probe.SetReadDeadline(start.Add(30 * time.Second))
		buf := make([]byte, 4096)
		n, err := probe.Read(buf)
		probeAnswer <- fmt.Sprintf("after %s: %q %v", time.Since(start).Round(100*time.Millisecond), buf[:n], err)
	}(time.Now())

	const want, hold = 20000, 15 * time.Second
	var sc slowClients
	t.Cleanup(sc.closeAll)
	floodStart := time.Now()
	if err := sc.fill(a1.socket, want); err != nil {
		t.Fatalf("dial the agent: %v", err)
	}
	t.Logf("first pass: %d connections held, %d refused by the kernel (backlog full) in %s",
		sc.held(), sc.refused, time.Since(floodStart).Round(time.Millisecond))
	// Hold, topping up what the agent closes, while the agent's resyncs
	// (every 2 s) run.
	maxFDs := baseFDs
	for time.Since(floodStart) < hold {
		time.Sleep(time.Second)
		maxFDs = max(maxFDs, openFDs(pid))
		sc.prune()
		if err := sc.fill(a1.socket, want); err != nil {
			t.Fatalf("dial the agent: %v", err)
		}
	}
	held, refused := sc.held(), sc.refused
	sc.closeAll()
	closed := time.Now()

	// The API answers again within a few seconds of the clients going.
	var answered time.Duration
	eventually(t, 5*time.Second, "vxnet status after the slow clients closed", func() error {
		_, err := a1.vxnet("status")
		answered = time.Since(closed)
		return err
	})
	out := stopPing()
	m := lossRE.FindStringSubmatch(out)
	t.Logf("agent descriptors: %d before, at most %d during; held %d connections at the end, %d connects refused in all; "+
		"API answered %s after they closed; ping: %s",
		baseFDs, maxFDs, held, refused, answered.Round(10*time.Millisecond), lastLines(out, 2))
	if sc.outOfFDs {
		t.Errorf("the test process ran out of its %d descriptors: the agent accepted far more connections than its cap and its backlog", budget)
	}
	if m == nil || m[1] != "0" {
		t.Errorf("packets lost while slow clients held the API:\n%s", out)
	}
	// A quarter of the agent's descriptors at most go to API clients
	// (256 of them here); the rest stay for the datapath.
	if maxFDs > baseFDs+256+64 {
		t.Errorf("the agent had %d descriptors open (%d before the clients): the connection cap did not hold", maxFDs, baseFDs)
	}
	// The read timeout is 10 s: the probe is answered then, not held.
	select {
	case got := <-probeAnswer:
		t.Logf("lone slow client: answered %s", got)
		if !strings.Contains(got, "400 Bad Request") || !strings.Contains(got, "not received within 10s") {
			t.Errorf("lone slow client: answered %s, want a 400 for the body not received within 10s", got)
		}
	case <-time.After(5 * time.Second):
		t.Errorf("lone slow client: still held %s after it connected", time.Since(floodStart))
	}
	var st api.Status
	a1.jsonOut(&st, "status")
	if !st.LastReconcile.After(floodStart.Add(hold / 2)) {
		t.Errorf("last reconcile at %s, flood from %s for %s: the resyncs stalled", st.LastReconcile, floodStart, hold)
	}
	for _, line := range strings.Split(a1.log()[logStart:], "\n") {
		if datapathChangeRE.MatchString(line) {
			t.Errorf("the agent changed its datapath or ran out of descriptors under the slow clients: %s", line)
		}
	}
}

// lastLines returns the last n non-empty lines of s, joined by "; ".
func lastLines(s string, n int) string {
	lines := slices.DeleteFunc(strings.Split(s, "\n"), func(l string) bool { return strings.TrimSpace(l) == "" })
	return strings.Join(lines[max(0, len(lines)-n):], "; ")
}

// A second agent on the run dir or the state dir of a running one refuses
// to start, naming the running one's pid, and touches nothing: the first
// agent's namespaces and containers stay. --cleanup on the state dir of a
// running agent is refused likewise.
func TestSecondAgentSameRunDirRefused(t *testing.T) {
	tn := testnet.New(t)
	h := tn.AddHost("solo")
	a := startAgent(t, h, "solo", "")
	a.mustVxnet("network", "create", "local", "--subnet", "10.9.0.0/24")
	c1, c2 := tn.AddNS("l1"), tn.AddNS("l2")
	a.mustVxnet("attach", "local", c1, "--ip", "10.9.0.10")
	a.mustVxnet("attach", "local", c2, "--ip", "10.9.0.20")
	if err := testnet.Ping(c1, "10.9.0.20"); err != nil {
		t.Fatal(err)
	}
	namespaces := a.overlayNamespaces()
	if len(namespaces) != 1 {
		t.Fatalf("overlay namespaces %v, want one", namespaces)
	}
	pid := strconv.Itoa(a.cmd.Process.Pid)
	runDir, stateDir := filepath.Join(a.dir, "run"), filepath.Join(a.dir, "state")

	// Each second agent gets its own directories and socket but for the
	// one under test.
	other := t.TempDir()
	cases := []struct {
		name       string
		args       []string
		wantPrefix string
	}{
		{"same run dir", []string{"--state-dir", filepath.Join(other, "state1"), "--run-dir", runDir, "--socket", filepath.Join(other, "s1.sock")},
			"--run-dir " + runDir},
		{"same state dir", []string{"--state-dir", stateDir, "--run-dir", filepath.Join(other, "run2"), "--socket", filepath.Join(other, "s2.sock")},
			"--state-dir " + stateDir},
		{"cleanup on the state dir", []string{"--cleanup", "--state-dir", stateDir},
			"--state-dir " + stateDir},
	}
	for _, c := range cases {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		args := append([]string{"--net=" + h.Path, filepath.Join(binDir, "vxnetd"),
			"--node", "solo2", "--advertise", h.Addr.String(), "--resync-interval", "2s", "--log-level", "debug"}, c.args...)
		cmd := exec.CommandContext(ctx, "nsenter", args...)
		start := time.Now()
		out, err := cmd.CombinedOutput()
		took := time.Since(start)
		timedOut := ctx.Err() != nil
		cancel()
		want := c.wantPrefix + " is in use by another vxnetd (pid " + pid
		var exit *exec.ExitError
		switch {
		case timedOut:
			t.Errorf("%s: the second vxnetd was still running after 10s:\n%s", c.name, out)
		case !errors.As(err, &exit) || exit.ExitCode() == 0:
			t.Errorf("%s: second vxnetd exited with %v, want a non-zero exit:\n%s", c.name, err, out)
		case !strings.Contains(string(out), want):
			t.Errorf("%s: second vxnetd said %q, want %q", c.name, out, want)
		case took > 3*time.Second:
			t.Errorf("%s: refusing took %s", c.name, took)
		default:
			t.Logf("%s: refused in %s: %s", c.name, took.Round(time.Millisecond), strings.TrimSpace(string(out)))
		}
	}

	// The first agent and its datapath are as they were.
	if got := a.overlayNamespaces(); !slices.Equal(got, namespaces) {
		t.Errorf("overlay namespaces %v after the refused agents, want %v", got, namespaces)
	}
	if err := testnet.Ping(c1, "10.9.0.20"); err != nil {
		t.Errorf("datapath after the refused agents: %v", err)
	}
	if _, err := a.vxnet("status"); err != nil {
		t.Errorf("first agent after the refused agents: %v", err)
	}
	if out, _ := exec.Command("ip", "-n", h.Name, "link", "show", "vxnet_gwbridge").CombinedOutput(); !strings.Contains(string(out), "vxnet_gwbridge") {
		t.Errorf("the gateway bridge went with the refused --cleanup:\n%s", out)
	}
}
