package test

import (
	"bufio"
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vxnet/vxnet/api"
)

// followEvents runs `vxnet events -o json [args]` against an agent and
// delivers what it prints; the process is stopped with the test.
func followEvents(t *testing.T, a *agent, args ...string) <-chan api.Event {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "vxnet"), append([]string{"-H", "unix://" + a.socket, "-o", "json", "events"}, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); cmd.Wait() })
	ch := make(chan api.Event, 1000)
	go func() {
		defer close(ch)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var ev api.Event
			if json.Unmarshal(sc.Bytes(), &ev) == nil {
				ch <- ev
			}
		}
	}()
	return ch
}

// waitEvent waits for an event that match accepts.
func waitEvent(t *testing.T, ch <-chan api.Event, what string, timeout time.Duration, match func(api.Event) bool) api.Event {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatalf("%s: the event stream ended", what)
			}
			if match(ev) {
				return ev
			}
		case <-deadline:
			t.Fatalf("%s: no such event within %s", what, timeout)
		}
	}
}

// vxnet events on one host follows an attach on another (the peer and its
// host appear) and that host's death (it goes, and why); --since replays
// what happened before.
func TestEventsFollowAttachAndDeath(t *testing.T) {
	c := newAgentCluster(t, 2)
	a1, a2 := c.agents[0], c.agents[1]
	var n api.Network
	a1.jsonOut(&n, "network", "create", "ev", "--subnet", "10.24.0.0/24")
	a1.mustVxnet("attach", "ev", c.net.AddNS("c1"), "--name", "c1")
	events := followEvents(t, a1)

	a2.mustVxnet("attach", "ev", c.net.AddNS("c2"), "--ip", "10.24.0.20")
	waitEvent(t, events, "host2 appears", 5*time.Second, func(ev api.Event) bool {
		return ev.Kind == "node_up" && ev.Node == "host2" && ev.Network == "ev"
	})
	waitEvent(t, events, "host2's endpoint programmed", 5*time.Second, func(ev api.Event) bool {
		return ev.Kind == "peer_added" && ev.IP == "10.24.0.20" && ev.Node == "host2"
	})

	c.killHost(t, 1, nsName(n.ID), "10.24.0.20")
	down := waitEvent(t, events, "host2 goes down", 10*time.Second, func(ev api.Event) bool {
		return ev.Kind == "node_down" && ev.Node == "host2"
	})
	t.Logf("node_down: %s", down.Detail)
	waitEvent(t, events, "host2's endpoint removed", 10*time.Second, func(ev api.Event) bool {
		return ev.Kind == "peer_removed" && ev.IP == "10.24.0.20"
	})

	// --since replays the kept events: the attach of c1, before any of
	// the above.
	past := followEvents(t, a1, "--since", "10m")
	ev := waitEvent(t, past, "the earlier attach replayed", 5*time.Second, func(ev api.Event) bool {
		return ev.Kind == "attach" && ev.Endpoint == "c1"
	})
	if ev.Network != "ev" || ev.Node != "host1" || ev.IP == "" {
		t.Errorf("replayed attach: %+v", ev)
	}
	if out, err := a1.vxnet("events", "--since", "yesterday"); err == nil || !strings.Contains(out, `since "yesterday"`) {
		t.Errorf("events --since yesterday: %v: %s", err, out)
	}
}
