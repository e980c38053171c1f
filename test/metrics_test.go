package test

import (
	"bufio"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// scrape fetches a path of an agent's --metrics-addr (loopback of its
// host's namespace).
func scrape(t *testing.T, a *agent, path string) (string, int) {
	t.Helper()
	out, err := exec.Command("nsenter", "--net="+a.host.Path, "curl", "-s", "-m", "5", "-w", "\n%{http_code}", "http://127.0.0.1:9473"+path).Output()
	if err != nil {
		t.Fatalf("scrape %s on %s: %v", path, a.node, err)
	}
	s := strings.TrimRight(string(out), "\n")
	i := strings.LastIndexByte(s, '\n')
	code, _ := strconv.Atoi(s[i+1:])
	return s[:max(i, 0)], code
}

// sample is the value of one series in a scrape (-1 if absent).
func sample(body, series string) float64 {
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return -1
}

// The agents' metrics, scraped during an attach storm: the histograms
// move, the gauges say what the host holds, promtool finds nothing wrong;
// the health endpoints say ready, and stay 200 while the store is down,
// saying so.
func TestMetricsAndHealth(t *testing.T) {
	promtool, err := exec.Command("../scripts/install-promtool.sh").Output()
	if err != nil {
		t.Fatalf("install promtool: %v", err)
	}
	c := newClusterArgs(t, 2, []string{"--metrics-addr", "127.0.0.1:9473"})
	a1, a2 := c.agents[0], c.agents[1]
	if body, code := scrape(t, a1, "/readyz"); code != 200 || !strings.Contains(body, "ready") {
		t.Errorf("/readyz: %d %q", code, body)
	}
	if body, code := scrape(t, a1, "/healthz"); code != 200 {
		t.Errorf("/healthz: %d %q", code, body)
	}
	a1.mustVxnet("network", "create", "mn", "--subnet", "10.34.0.0/24")
	const n = 8
	var wg sync.WaitGroup
	for i := range n {
		for j, a := range []*agent{a1, a2} {
			ns := c.net.AddNS(fmt.Sprintf("m%d-%d", j, i))
			wg.Add(1)
			go func() {
				defer wg.Done()
				if out, err := a.vxnet("attach", "mn", ns); err != nil {
					t.Errorf("attach: %v\n%s", err, out)
				}
			}()
		}
	}
	wg.Wait()
	eventually(t, 10*time.Second, "h1 programs h2's endpoints", func() error {
		body, _ := scrape(t, a1, "/metrics")
		if v := sample(body, `vxnet_peers{network="mn"}`); v != n {
			return fmt.Errorf("vxnet_peers on h1: %v, want %d", v, n)
		}
		return nil
	})
	body, _ := scrape(t, a1, "/metrics")
	for series, want := range map[string]float64{
		"vxnet_attach_duration_seconds_count":                  n,
		`vxnet_local_endpoints{network="mn"}`:                  n,
		"vxnet_store_up":                                       1,
		"vxnet_session_up":                                     1,
		`vxnet_reconcile_duration_seconds_count{kind="light"}`: 1,
		"vxnet_convergence_seconds_count":                      1,
		`vxnet_store_request_duration_seconds_count{op="txn"}`: 1,
		"vxnet_watch_events_total":                             1,
		"vxnet_watch_bytes_total":                              1,
	} {
		if got := sample(body, series); got < want {
			t.Errorf("%s = %v, want at least %v", series, got, want)
		}
	}
	for _, want := range []string{`vxnet_build_info{goversion=`, "go_goroutines", "process_resident_memory_bytes"} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	check := exec.Command(strings.TrimSpace(string(promtool)), "check", "metrics")
	check.Stdin = strings.NewReader(body)
	if out, err := check.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}

	// The store down: ready stays 200 (the datapath is intact) and says why.
	c.consul.Stop()
	eventually(t, 15*time.Second, "readyz says the store is unreachable", func() error {
		body, code := scrape(t, a1, "/readyz")
		if code != 200 || !strings.Contains(body, "unreachable") {
			return fmt.Errorf("/readyz: %d %q", code, body)
		}
		if m, _ := scrape(t, a1, "/metrics"); sample(m, "vxnet_store_up") != 0 {
			return fmt.Errorf("vxnet_store_up is not 0")
		}
		return nil
	})
}
