package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/fakeagent"
)

// With VXNET_TEST_MAIN=1 the test binary is the vxnet command, so that a
// test sees its real stderr and exit code.
func TestMain(m *testing.M) {
	if os.Getenv("VXNET_TEST_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func runMain(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "VXNET_TEST_MAIN=1", "VXNET_HOST=")
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return o.String(), e.String(), code
}

func run(args ...string) (string, error) {
	var out bytes.Buffer
	root := newRoot(&out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

// killedAgent is an agent killed with -9 mid-request: it reads each
// request and closes the connection without answering.
var killedAgent = fakeagent.Killed

func TestUnknownOutcomeMessages(t *testing.T) {
	sock := killedAgent(t)
	h := "unix://" + sock
	const eof = "the agent closed the connection before answering (EOF)"
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"attach", "net1", "c1"},
			`attach net1 c1: ` + eof + `: the attach may or may not have happened; check with "vxnet -H ` + h + ` endpoint ls --network net1" once the agent is back`},
		{[]string{"detach", "net1", "c1"},
			`detach net1 c1: ` + eof + `: the detach may or may not have happened; check with "vxnet -H ` + h + ` endpoint ls --network net1" once the agent is back`},
		{[]string{"network", "create", "net1", "--subnet", "10.9.0.0/24"},
			`network create net1: ` + eof + `: the creation may or may not have happened; check with "vxnet -H ` + h + ` network ls" once the agent is back`},
		{[]string{"node", "rm", "h1"},
			`node rm h1: ` + eof + `: the removal may or may not have happened; check with "vxnet -H ` + h + ` node ls" once the agent is back`},
		// Reads keep a plain error, one that says the agent went away.
		{[]string{"network", "ls"},
			`vxnetd at ` + sock + `: ` + eof + `; it may have stopped or be restarting`},
	} {
		_, err := run(append([]string{"-H", h}, tc.args...)...)
		if err == nil || err.Error() != tc.want {
			t.Errorf("%v:\n got %v\nwant %s", tc.args, err, tc.want)
		}
	}

	// The check names no -H when the default or VXNET_HOST is in use: the
	// same shell runs it against the same agent.
	t.Setenv("VXNET_HOST", h)
	_, err := run("attach", "net1", "c1")
	if want := `check with "vxnet endpoint ls --network net1" once`; err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("got %v, want %s", err, want)
	}
}

// network rm goes on with the other names after one fails, each error on
// stderr; the command fails with exit code 1.
func TestNetworkRmUnknownOutcome(t *testing.T) {
	sock := killedAgent(t)
	stdout, stderr, code := runMain(t, "-H", sock, "network", "rm", "a", "b")
	want := `Error: network rm a: the agent closed the connection before answering (EOF): the removal may or may not have happened; check with "vxnet -H ` + sock + ` network ls" once the agent is back
Error: network rm b: the agent closed the connection before answering (EOF): the removal may or may not have happened; check with "vxnet -H ` + sock + ` network ls" once the agent is back
Error: 2 of 2 networks not removed
`
	if code != 1 || stdout != "" || stderr != want {
		t.Errorf("exit %d, stdout %q, stderr:\n%s\nwant:\n%s", code, stdout, stderr, want)
	}
}

// Every error goes to stderr with exit code 1.
func TestErrorsToStderr(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "vxnet.sock")
	for _, args := range [][]string{
		{"-H", missing, "status"},
		{"-H", killedAgent(t), "attach", "net1", "c1"},
		{"-o", "yaml", "network", "ls"},
	} {
		stdout, stderr, code := runMain(t, args...)
		if code != 1 || stdout != "" || !strings.HasPrefix(stderr, "Error: ") || strings.Count(stderr, "\n") != 1 {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, code, stdout, stderr)
		}
	}
	_, stderr, _ := runMain(t, "-H", missing, "network", "ls")
	if want := "Error: cannot reach vxnetd: no socket " + missing + ": is vxnetd running? (-H or VXNET_HOST name another socket)\n"; stderr != want {
		t.Errorf("stderr %q\nwant %q", stderr, want)
	}
}

// With -o json an error is the API's shape, its code saying whose error it
// is: the agent's answer, or the CLI's for what the agent did not answer.
func TestJSONErrorCodes(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "vxnet.sock")
	for _, tc := range []struct {
		args []string
		code string
	}{
		{[]string{"-H", missing, "status"}, api.CodeAgentUnavailable},
		{[]string{"-H", killedAgent(t), "network", "ls"}, api.CodeAgentUnavailable},
		{[]string{"-H", killedAgent(t), "attach", "net1", "c1"}, api.CodeUnknownOutcome},
		{[]string{"-H", missing, "attach", "--bogus", "net1", "c1"}, api.CodeInvalid},
		{[]string{"-H", missing, "attach", "net1"}, api.CodeInvalid},
		{[]string{"-H", missing, "network", "ls", "--filter", "nokey"}, api.CodeInvalid},
		{[]string{"-H", missing, "frobnicate"}, api.CodeInvalid},
	} {
		_, stderr, code := runMain(t, append([]string{"-o", "json"}, tc.args...)...)
		var e api.Error
		if err := json.Unmarshal([]byte(stderr), &e); err != nil {
			t.Errorf("%v: exit %d, stderr %q is no JSON error: %v", tc.args, code, stderr, err)
			continue
		}
		if code != 1 || e.Code != tc.code || e.Message == "" {
			t.Errorf("%v: exit %d, error %+v; want code %s", tc.args, code, e, tc.code)
		}
	}
}

func TestOutputArg(t *testing.T) {
	for args, want := range map[string]string{
		"-o json bogus": "json", "--output json x": "json", "--output=json x": "json", "-ojson x": "json", "-o=json x": "json",
		"bogus": "", "-H /s -o table x": "table", "x -- -o json": "",
	} {
		if got := outputArg(strings.Fields(args)); got != want {
			t.Errorf("%q: %q, want %q", args, got, want)
		}
	}
}

// A relative netns path is the user's, so it is sent absolute; a bare name
// (under /var/run/netns) and absolute paths go as given.
func TestAttachRelativeNetns(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "vxnet.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req api.AttachRequest
		json.NewDecoder(r.Body).Decode(&req)
		got <- req.Netns
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		json.NewEncoder(w).Encode(api.Endpoint{Name: "c1", Network: "net1"})
	})}
	go srv.Serve(l)
	defer srv.Close()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for arg, want := range map[string]string{
		"./ns/c1":          filepath.Join(wd, "ns/c1"),
		"sub/c1":           filepath.Join(wd, "sub/c1"),
		"../c1":            filepath.Join(filepath.Dir(wd), "c1"),
		"c1":               "c1",
		"/proc/123/ns/net": "/proc/123/ns/net",
		"/var/run/netns/x": "/var/run/netns/x",
	} {
		if _, err := run("-H", sock, "attach", "net1", arg); err != nil {
			t.Fatalf("%s: %v", arg, err)
		}
		if g := <-got; g != want {
			t.Errorf("%s: sent %q, want %q", arg, g, want)
		}
	}
}
