// Package fakeagent serves a unix socket whose "agent" reads each request
// and then misbehaves as a killed or hung vxnetd would, for the client's
// and the CLI's tests.
package fakeagent

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"testing"
)

// Misbehaving serves a socket whose agent reads each request completely
// and then does what then says to the connection instead of answering. It
// returns the socket's path; the socket goes with the test.
func Misbehaving(t testing.TB, then func(net.Conn)) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "vxnet.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				if req, err := http.ReadRequest(bufio.NewReader(conn)); err == nil {
					io.Copy(io.Discard, req.Body)
				}
				then(conn)
			}()
		}
	}()
	return sock
}

// Killed is an agent that closes each connection without answering, as one
// killed with -9 mid-request does.
func Killed(t testing.TB) string {
	t.Helper()
	return Misbehaving(t, func(c net.Conn) { c.Close() })
}
