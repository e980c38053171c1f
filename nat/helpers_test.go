package nat

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"
)

// requireRoot skips without root, except in CI where a skipped kernel test
// would silently hide a broken runner.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		if _, err := exec.LookPath("iptables"); err == nil {
			return
		}
		if os.Getenv("CI") != "" {
			t.Fatal("iptables binary not found")
		}
		t.Skip("iptables binary not found")
	}
	if os.Getenv("CI") != "" {
		t.Fatal("kernel tests need root (network namespaces, iptables); CI is set so this is an error")
	}
	t.Skip("kernel tests need root (network namespaces, iptables)")
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

type tlogWriter struct{ t *testing.T }

func (w tlogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// newNS creates a named network namespace with loopback up, deleted when the
// test ends (also on failure). Names carry the pid so parallel runs and
// leftovers are attributable.
func newNS(t *testing.T, suffix string) (name, path string) {
	t.Helper()
	name = fmt.Sprintf("vxn-%d-%s", os.Getpid(), suffix)
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("delete netns %s: %v: %s", name, err, out)
		}
	})
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name, "/run/netns/" + name
}

func run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// inNS runs a command inside a namespace and returns its error instead of
// failing, for probes that are expected to fail.
func inNS(ns string, args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	return string(out), err
}

func mustInNS(t *testing.T, ns string, args ...string) string {
	t.Helper()
	out, err := inNS(ns, args...)
	if err != nil {
		t.Fatalf("in %s: %s: %v\n%s", ns, strings.Join(args, " "), err, out)
	}
	return out
}

var (
	saveComment = regexp.MustCompile(`(?m)^#.*\n`)
	saveCounter = regexp.MustCompile(`\[\d+:\d+\]`)
)

// iptablesSave returns a namespace's ruleset in comparable form. The nft
// backend creates a table (with its built-in chains) on first write and never
// removes it, so tables holding nothing but empty ACCEPT built-ins are
// dropped: they are indistinguishable in effect from no table at all.
func iptablesSave(t *testing.T, ns string) string {
	t.Helper()
	out := mustInNS(t, ns, "iptables-save")
	out = saveComment.ReplaceAllString(out, "")
	out = saveCounter.ReplaceAllString(out, "[0:0]")
	var keep []string
	for _, block := range strings.SplitAfter(out, "COMMIT\n") {
		if strings.TrimSpace(block) == "" {
			continue
		}
		trivial := true
		for _, l := range strings.Split(block, "\n") {
			if strings.HasPrefix(l, "-") || (strings.HasPrefix(l, ":") && !strings.Contains(l, " ACCEPT ")) {
				trivial = false
			}
		}
		if !trivial {
			keep = append(keep, block)
		}
	}
	return strings.Join(keep, "")
}

func countRules(s string) int {
	n := 0
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "-A ") {
			n++
		}
	}
	return n
}

func randHex(n int) string {
	b := make([]byte, (n+1)/2)
	rand.Read(b)
	return hex.EncodeToString(b)[:n]
}

// linkNames lists a namespace's interfaces.
func linkNames(t *testing.T, ns string) []string {
	t.Helper()
	var names []string
	for _, l := range strings.Split(strings.TrimSpace(mustInNS(t, ns, "ip", "-o", "link", "show")), "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 {
			names = append(names, strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0])
		}
	}
	return names
}

func readSysctl(t *testing.T, ns, key string) string {
	t.Helper()
	return strings.TrimSpace(mustInNS(t, ns, "cat", "/proc/sys/"+strings.ReplaceAll(key, ".", "/")))
}

// echoServer listens inside nsPath and answers every connection with the
// remote address it sees, which shows whether the client was masqueraded.
func echoServer(t *testing.T, nsPath, addr string) string {
	t.Helper()
	var ln net.Listener
	// A socket stays in the namespace it was created in, so only the
	// Listen call needs the namespace-entered thread.
	err := withNetNS(nsPath, func() (err error) {
		ln, err = net.Listen("tcp4", addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen in %s: %v", nsPath, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s\n", c.RemoteAddr())
			c.Close()
		}
	}()
	return ln.Addr().String()
}

// dialFrom connects from inside nsPath and returns the server's answer.
func dialFrom(nsPath, addr string) (string, error) {
	return dialFromTimeout(nsPath, addr, 2*time.Second)
}

func dialFromTimeout(nsPath, addr string, timeout time.Duration) (string, error) {
	var c net.Conn
	err := withNetNS(nsPath, func() (err error) {
		c, err = net.DialTimeout("tcp4", addr, timeout)
		return err
	})
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read from %s: %w", addr, err)
	}
	return strings.TrimSpace(line), nil
}
