package test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vxnet/vxnet/vtep"
)

// The floor of convergence for any design on Consul: from one write until
// a blocking query on every simulated host has woken. Each host gets one
// watcher of one key, its connection made inside the host's namespace, so
// that its packets take the agents' path; a figure counts against the
// floor measured in the same run.

// hostClient is an HTTP client whose connections are made in the network
// namespace at path.
func hostClient(path string) *http.Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var c net.Conn
			err := vtep.WithNetNS(path, func() error {
				var err error
				c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
		DisableCompression: true,
	}
	return &http.Client{Transport: tr}
}

// measureFloor runs rounds writes of one key and returns, for each, the
// time until the last host's blocking query returned.
func measureFloor(t *testing.T, c *cluster, rounds int) []time.Duration {
	t.Helper()
	base := "http://" + c.consul.Addr() + "/v1/kv/vxnet-floor/key"
	writer := hostClient(c.hosts[0].Path)
	put := func(v int) (uint64, error) {
		req, _ := http.NewRequest(http.MethodPut, base, strings.NewReader(strconv.Itoa(v)))
		resp, err := writer.Do(req)
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return 0, nil
	}
	// get returns the key's index, blocking while it is at most index.
	get := func(cl *http.Client, index uint64) (uint64, error) {
		resp, err := cl.Get(fmt.Sprintf("%s?index=%d&wait=10s", base, index))
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return strconv.ParseUint(resp.Header.Get("X-Consul-Index"), 10, 64)
	}
	if _, err := put(0); err != nil {
		t.Fatalf("floor: %v", err)
	}
	clients := make([]*http.Client, len(c.hosts))
	for i, h := range c.hosts {
		clients[i] = hostClient(h.Path)
	}
	var out []time.Duration
	for r := 1; r <= rounds; r++ {
		idx, err := get(clients[0], 0)
		if err != nil {
			t.Fatalf("floor: %v", err)
		}
		woke := make([]time.Time, len(clients))
		var wg, parked sync.WaitGroup
		for i, cl := range clients {
			wg.Add(1)
			parked.Add(1)
			go func() {
				defer wg.Done()
				parked.Done()
				if _, err := get(cl, idx); err == nil {
					woke[i] = time.Now()
				}
			}()
		}
		parked.Wait()
		time.Sleep(30 * time.Millisecond) // the queries are parked in Consul
		t0 := time.Now()
		if _, err := put(r); err != nil {
			t.Fatalf("floor: %v", err)
		}
		wg.Wait()
		last := t0
		for _, w := range woke {
			if w.IsZero() {
				t.Fatalf("floor: a watcher did not wake")
			}
			last = maxTime(last, w)
		}
		out = append(out, last.Sub(t0))
	}
	slices.Sort(out)
	return out
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
