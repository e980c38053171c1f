// Package test holds the integration tests: several simulated hosts on one
// machine, each with its own vxnetd, a real Consul, and real packets across
// the VTEPs.
package test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/testnet"
	"github.com/vxnet/vxnet/vtep"
)

var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "vxnet-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	args := []string{"build", "-o", dir + "/"}
	if os.Getenv("VXNET_RACE") != "" {
		args = append(args, "-race") // agents built with the race detector
	}
	cmd := exec.Command("go", append(args, "../cmd/vxnetd", "../cmd/vxnet", "../cmd/vxnet-cni")...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build binaries:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// agent is one vxnetd running inside a simulated host's namespace.
type agent struct {
	t      *testing.T
	host   *testnet.Host
	node   string
	dir    string
	socket string
	store  string
	args   []string
	env    []string // extra environment for the next start
	wrap   []string // a command to start nsenter under (e.g. unshare)
	cmd    *exec.Cmd
	logf   *os.File
	done   chan struct{}
}

// waitExit waits for the agent to die by itself (a crash test hook).
func (a *agent) waitExit(timeout time.Duration) {
	a.t.Helper()
	select {
	case <-a.done:
		a.cmd = nil
		a.logf.Close()
	case <-time.After(timeout):
		a.t.Fatalf("agent %s did not exit", a.node)
	}
}

// log returns the agent's whole log.
func (a *agent) log() string {
	data, _ := os.ReadFile(filepath.Join(a.dir, "vxnetd.log"))
	return string(data)
}

func startAgent(t *testing.T, host *testnet.Host, node, store string, extra ...string) *agent {
	t.Helper()
	a := newAgent(t, host, node, store, extra...)
	a.start()
	return a
}

// newAgent prepares an agent without starting it, for tests that set its
// environment first.
func newAgent(t *testing.T, host *testnet.Host, node, store string, extra ...string) *agent {
	t.Helper()
	dir, err := os.MkdirTemp("", "vxnet-agent-")
	if err != nil {
		t.Fatal(err)
	}
	a := &agent{t: t, host: host, node: node, dir: dir, socket: filepath.Join(dir, "vxnet.sock"), store: store, args: extra}
	t.Cleanup(a.cleanup)
	return a
}

func (a *agent) netnsDir() string { return filepath.Join(a.dir, "run", "netns") }

func (a *agent) start() {
	a.t.Helper()
	a.launch()
	a.waitReady(true)
}

// startNoWait starts the agent and waits only for its API, not for the
// store (which may be down).
func (a *agent) startNoWait() {
	a.t.Helper()
	a.launch()
	a.waitReady(false)
}

func (a *agent) launch() {
	a.t.Helper()
	args := []string{"--net=" + a.host.Path, filepath.Join(binDir, "vxnetd"),
		"--node", a.node, "--advertise", a.host.Addr.String(),
		"--state-dir", filepath.Join(a.dir, "state"), "--run-dir", filepath.Join(a.dir, "run"),
		"--socket", a.socket, "--resync-interval", "2s", "--log-level", "debug"}
	if a.store != "" {
		args = append(args, "--store", a.store)
	}
	args = append(args, a.args...)
	logf, err := os.OpenFile(filepath.Join(a.dir, "vxnetd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		a.t.Fatal(err)
	}
	a.logf = logf
	// nsenter switches only the network namespace: the agent's namespace
	// mounts must live in the machine's mount table to outlive the agent.
	cmdline := append(append(slices.Clone(a.wrap), "nsenter"), args...)
	a.cmd = exec.Command(cmdline[0], cmdline[1:]...)
	a.cmd.Env = append(os.Environ(), a.env...)
	a.cmd.Stdout, a.cmd.Stderr = logf, logf
	if err := a.cmd.Start(); err != nil {
		a.t.Fatal(err)
	}
	a.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { cmd.Wait(); close(done) }(a.cmd, a.done)
}

// waitReady waits until the agent answers and, if store is set, sees the
// store and has reconciled.
func (a *agent) waitReady(store bool) {
	a.t.Helper()
	cl, _ := api.NewClient(a.socket)
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		s, err := cl.Status(ctx)
		cancel()
		if err == nil && (!store || s.StoreReachable && s.Ready) {
			return
		}
		select {
		case <-a.done:
			a.t.Fatalf("agent %s exited during start:\n%s", a.node, a.logTail())
		default:
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("agent %s not ready after 20s (status %+v, err %v):\n%s", a.node, s, err, a.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop sends sig and waits for the agent to exit.
func (a *agent) stop(sig syscall.Signal) {
	if a.cmd == nil || a.cmd.Process == nil {
		return
	}
	a.cmd.Process.Signal(sig)
	select {
	case <-a.done:
	case <-time.After(10 * time.Second):
		a.cmd.Process.Kill()
		<-a.done
	}
	a.cmd = nil
	a.logf.Close()
}

func (a *agent) logTail() string {
	data, _ := os.ReadFile(filepath.Join(a.dir, "vxnetd.log"))
	lines := strings.Split(string(data), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return strings.Join(lines, "\n")
}

// cleanup stops the agent and removes every namespace mount it made, so a
// failed test leaves nothing behind.
func (a *agent) cleanup() {
	a.stop(syscall.SIGKILL)
	if strings.Contains(a.log(), "DATA RACE") {
		a.t.Errorf("agent %s: the race detector found a data race:\n%s", a.node, a.log())
	}
	if a.t.Failed() {
		a.t.Logf("agent %s log:\n%s", a.node, a.logTail())
	}
	entries, _ := os.ReadDir(a.netnsDir())
	for _, e := range entries {
		vtep.DeleteNetNS(filepath.Join(a.netnsDir(), e.Name()))
	}
	os.RemoveAll(a.dir)
}

// vxnet runs the CLI against this agent.
func (a *agent) vxnet(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(binDir, "vxnet"), append([]string{"-H", "unix://" + a.socket}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// mustVxnet runs the CLI and fails the test on error.
func (a *agent) mustVxnet(args ...string) string {
	a.t.Helper()
	out, err := a.vxnet(args...)
	if err != nil {
		a.t.Fatalf("vxnet %s on %s: %v\n%s", strings.Join(args, " "), a.node, err, out)
	}
	return out
}

// jsonOut runs the CLI with -o json and decodes the result into v.
func (a *agent) jsonOut(v any, args ...string) {
	a.t.Helper()
	out := a.mustVxnet(append([]string{"-o", "json"}, args...)...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		a.t.Fatalf("vxnet %s: bad JSON: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// inNS runs a command inside one of the agent's overlay namespaces.
func (a *agent) inNS(ns string, args ...string) (string, error) {
	out, err := exec.Command("nsenter", append([]string{"--net=" + filepath.Join(a.netnsDir(), ns)}, args...)...).CombinedOutput()
	return string(out), err
}

func (a *agent) overlayNamespaces() []string {
	entries, _ := os.ReadDir(a.netnsDir())
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// eventually retries fn until it succeeds or the timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after %s: %v", what, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func nsName(networkID string) string { return "1-" + networkID[:10] }

func jsonDecode(s string, v any) error { return json.Unmarshal([]byte(s), v) }
