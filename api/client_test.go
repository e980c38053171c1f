package api

import (
	"context"
	"errors"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vxnet/vxnet/internal/fakeagent"
)

// misbehave is fakeagent.Misbehaving: the agent reads each request and
// then does what then says to the connection instead of answering.
var misbehave = fakeagent.Misbehaving

func closeConn(c net.Conn) { c.Close() }

func TestUnknownOutcomeOnEOF(t *testing.T) {
	cl, err := NewClient("unix://" + misbehave(t, closeConn))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	_, err = cl.Attach(ctx, "net1", AttachRequest{Netns: "c1"})
	var uo *UnknownOutcomeError
	if !errors.As(err, &uo) {
		t.Fatalf("attach: %T %v, want *UnknownOutcomeError", err, err)
	}
	if uo.Method != "POST" || uo.Path != "/v1/networks/net1/endpoints" ||
		uo.Reason != "the agent closed the connection before answering (EOF)" || !errors.Is(err, io.EOF) {
		t.Errorf("attach: %+v", uo)
	}
	for name, f := range map[string]func() error{
		"detach":         func() error { return cl.Detach(ctx, "net1", "c1") },
		"network create": func() error { _, err := cl.CreateNetwork(ctx, CreateNetworkRequest{Name: "n"}); return err },
		"network rm":     func() error { return cl.RemoveNetwork(ctx, "n") },
		"node rm":        func() error { return cl.RemoveNode(ctx, "h") },
	} {
		if err := f(); !errors.As(err, &uo) {
			t.Errorf("%s: %T %v, want *UnknownOutcomeError", name, err, err)
		}
	}

	// A read changes nothing: a plain error, but one that says the agent
	// went away rather than just "EOF".
	_, err = cl.Networks(ctx)
	if errors.As(err, &uo) {
		t.Fatalf("GET gave %T", err)
	}
	if want := "vxnetd at " + cl.socket + ": the agent closed the connection before answering (EOF); it may have stopped or be restarting"; err == nil || err.Error() != want {
		t.Errorf("GET: %v\nwant %s", err, want)
	}
}

// The agent closing with the request unread resets the connection.
func TestUnknownOutcomeOnReset(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "vxnet.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		// One byte read means the request was written; the rest left
		// unread makes the close a reset.
		conn.Read(make([]byte, 1))
		conn.Close()
	}()
	cl, _ := NewClient(sock)
	err = cl.RemoveNode(context.Background(), "h1")
	var uo *UnknownOutcomeError
	if !errors.As(err, &uo) || !errors.Is(err, syscall.ECONNRESET) ||
		uo.Reason != "the agent closed the connection before answering (connection reset)" {
		t.Fatalf("%T %v", err, err)
	}
}

func TestUnknownOutcomeOnDeadline(t *testing.T) {
	hold := make(chan struct{})
	defer close(hold)
	cl, _ := NewClient(misbehave(t, func(c net.Conn) { <-hold; c.Close() }))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := cl.CreateNetwork(ctx, CreateNetworkRequest{Name: "n"})
	var uo *UnknownOutcomeError
	if !errors.As(err, &uo) || uo.Reason != "the agent did not answer in time" {
		t.Fatalf("%T %v", err, err)
	}
}

// Nothing was sent when there was no agent to send it to: a plain error
// that says to start the agent, for reads and writes alike.
func TestNoAgent(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.sock")
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	for sock, want := range map[string]string{
		missing: "cannot reach vxnetd: no socket " + missing + ": is vxnetd running? (-H or VXNET_HOST name another socket)",
		stale:   "cannot reach vxnetd: connection refused on " + stale + ": is vxnetd running? (the socket file is left from one that stopped)",
	} {
		cl, _ := NewClient(sock)
		for _, err := range []error{
			cl.RemoveNode(context.Background(), "h"),
			func() error { _, err := cl.Status(context.Background()); return err }(),
		} {
			var uo *UnknownOutcomeError
			if err == nil || errors.As(err, &uo) || err.Error() != want {
				t.Errorf("%v\nwant %s", err, want)
			}
		}
	}
}

// Dialing a root-only socket as another user fails with EACCES, wrapped as
// net.Dial and http.Client wrap it (as root the test cannot dial for real).
func TestPermissionDenied(t *testing.T) {
	sock := "/run/vxnet/vxnet.sock"
	dialErr := &net.OpError{Op: "dial", Net: "unix", Addr: &net.UnixAddr{Name: sock, Net: "unix"},
		Err: os.NewSyscallError("connect", syscall.EACCES)}
	err := explain(sock, "GET", "/v1/status", false, &url.Error{Op: "Get", URL: "http://vxnetd/v1/status", Err: dialErr})
	want := "permission denied on /run/vxnet/vxnet.sock: run as root, or as a member of the group given to vxnetd --socket-group"
	if err == nil || err.Error() != want {
		t.Fatalf("%v\nwant %s", err, want)
	}
	if !strings.Contains(dialErr.Error(), "permission denied") {
		t.Fatalf("synthetic error is not what Dial gives: %v", dialErr)
	}
}
