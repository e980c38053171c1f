package test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/vxnet/vxnet/api"
	"github.com/vxnet/vxnet/internal/testconsul"
	"github.com/vxnet/vxnet/internal/testnet"
)

// benchConfig is read from the environment that scripts/bench.sh sets.
type benchConfig struct {
	hosts     []int         // VXNET_BENCH_HOSTS: "10" or "2,5,10,20"
	endpoints int           // VXNET_BENCH_ENDPOINTS: per host
	parallel  int           // VXNET_BENCH_PARALLEL: attaches in flight per host
	idle      time.Duration // VXNET_BENCH_IDLE: the idle window measured
	iperf     int           // VXNET_BENCH_IPERF: seconds of iperf3 (0: no datapath figures)
	out       string        // VXNET_BENCH_OUT: also write the table here
}

func benchConfigFromEnv(t *testing.T) benchConfig {
	t.Helper()
	c := benchConfig{endpoints: 50, parallel: 1, idle: 10 * time.Second, iperf: 5, out: os.Getenv("VXNET_BENCH_OUT")}
	num := func(name string, def int) int {
		v := os.Getenv(name)
		if v == "" {
			return def
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			t.Fatalf("%s=%q: want a number", name, v)
		}
		return n
	}
	for _, f := range strings.Split(cmp(os.Getenv("VXNET_BENCH_HOSTS"), "10"), ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 2 || n > 200 {
			t.Fatalf("VXNET_BENCH_HOSTS=%q: want host counts from 2 to 200, comma-separated", os.Getenv("VXNET_BENCH_HOSTS"))
		}
		c.hosts = append(c.hosts, n)
	}
	c.endpoints = max(num("VXNET_BENCH_ENDPOINTS", c.endpoints), 1)
	c.parallel = max(num("VXNET_BENCH_PARALLEL", c.parallel), 1)
	c.idle = time.Duration(max(num("VXNET_BENCH_IDLE", int(c.idle/time.Second)), 1)) * time.Second
	c.iperf = num("VXNET_BENCH_IPERF", c.iperf)
	return c
}

func cmp(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

// benchResult is one column of the table: one cluster size.
type benchResult struct {
	hosts, endpoints int
	setup            time.Duration
	attach, conv     []time.Duration
	detach, dconv    []time.Duration
	soloAttach       []time.Duration
	soloConv         []time.Duration
	soloDetach       []time.Duration
	soloDconv        []time.Duration
	coldReady        time.Duration
	coldTables       time.Duration
	newReady         time.Duration
	newMesh          time.Duration
	runCPU           float64 // CPU seconds per agent during the attach storm (mean)
	runRSS, idleRSS  [2]float64
	idleCPU          float64 // percent of one core per agent (mean)
	idleReqs         float64 // Consul requests per second per agent (mean)
	blocking         [2]int  // blocking queries in flight per agent: min, max
	watches          int
	dp               *datapathResult
	total            time.Duration
	// floor: from one Consul write until a blocking query on every host
	// has woken, measured in the same run (see floor_test.go).
	floor []time.Duration
	// watchBytes: bytes an agent received from its watches per event in
	// the attach storm (mean of the agents).
	watchBytes float64
}

// soloAttaches is how many attaches the one-at-a-time figures are from.
const soloAttaches = 20

// soloGap lets the peers finish one change before the next begins.
const soloGap = 50 * time.Millisecond

// TestBenchmarkMesh is the cluster benchmark behind scripts/bench.sh: N
// simulated hosts with an agent each and a real Consul, E endpoints per
// host, and the figures of docs/benchmarks.md. It measures; it does not
// judge, so it fails only when the overlay itself misbehaves (an attach
// fails, or tables never converge).
func TestBenchmarkMesh(t *testing.T) {
	if os.Getenv("VXNET_BENCH") == "" {
		t.Skip("the mesh benchmark runs with scripts/bench.sh (VXNET_BENCH=1)")
	}
	cfg := benchConfigFromEnv(t)
	var results []*benchResult
	for _, n := range cfg.hosts {
		ok := t.Run(fmt.Sprintf("hosts=%d", n), func(t *testing.T) {
			results = append(results, runMesh(t, n, cfg))
		})
		if !ok {
			break
		}
	}
	table := benchTable(cfg, results)
	fmt.Print(table)
	if cfg.out != "" {
		if err := os.WriteFile(cfg.out, []byte(table), 0o644); err != nil {
			t.Error(err)
		}
	}
}

type benchEP struct {
	host     int
	name, ns string
	ip, mac  string
	returned time.Time
}

func runMesh(t *testing.T, n int, cfg benchConfig) *benchResult {
	start := time.Now()
	r := &benchResult{hosts: n, endpoints: cfg.endpoints}
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "bench %2d hosts %6.1fs: %s\n", n, time.Since(start).Seconds(), fmt.Sprintf(format, args...))
	}
	c := newBenchCluster(t, n)
	r.setup = time.Since(start)
	logf("%d agents ready", n)
	r.floor = measureFloor(t, c.cluster, 30)
	logf("floor measured: p50 %s ms", ms(pct(r.floor, 0.5)))

	var netw api.Network
	c.agents[0].jsonOut(&netw, "network", "create", "bench", "--subnet", "10.96.0.0/16")
	nsOf := func(a *agent) string { return filepath.Join(a.netnsDir(), nsName(netw.ID)) }

	// Containers: one seed per host (it makes the overlay namespace, so
	// there is a device to watch) and E more, all made before timing.
	seeds := make([]*benchEP, n)
	eps := make([][]*benchEP, n)
	for h := range n {
		seeds[h] = &benchEP{host: h, name: fmt.Sprintf("seed%d", h), ns: c.net.AddNS(fmt.Sprintf("s%d", h))}
		for i := range cfg.endpoints {
			eps[h] = append(eps[h], &benchEP{host: h, name: fmt.Sprintf("e%d-%d", h, i), ns: c.net.AddNS(fmt.Sprintf("c%d-%d", h, i))})
		}
	}
	for h, s := range seeds {
		var e api.Endpoint
		c.agents[h].jsonOut(&e, "attach", "bench", s.ns, "--name", s.name)
		s.ip, s.mac, s.returned = e.IP, e.MAC, time.Now()
	}
	watches := make([]*neighWatch, n)
	for h, a := range c.agents {
		w, err := watchNeighbors(nsOf(a))
		if err != nil {
			t.Fatal(err)
		}
		defer w.close()
		watches[h] = w
	}
	waitTables(t, watches, seeds, 30*time.Second)
	logf("seeds attached and meshed; %d endpoints to attach", n*cfg.endpoints)

	// Attach storm: every host at once, cfg.parallel in flight per host.
	for _, w := range watches {
		w.reset()
	}
	cpu0 := c.cpu(t)
	wb0, we0 := c.vars(t, "consul_watch_bytes"), c.vars(t, "consul_watch_events")
	var all []*benchEP
	for _, e := range eps {
		all = append(all, e...)
	}
	r.attach = c.storm(t, eps, cfg.parallel, 0, benchAttach)
	r.conv = converge(t, watches, all, 120*time.Second, (*neighWatch).added)
	r.runCPU = mean(sub(c.cpu(t), cpu0))
	wb, we := sub(c.vars(t, "consul_watch_bytes"), wb0), sub(c.vars(t, "consul_watch_events"), we0)
	for i := range wb {
		if we[i] > 0 {
			r.watchBytes += wb[i] / we[i] / float64(len(wb))
		}
	}
	r.runRSS = c.rss(t, "VmHWM")
	logf("attach storm done: %d endpoints converged on every host", len(all))

	// Idle: nothing changes; what does an agent cost?
	cpu0, reqs0 := c.cpu(t), c.vars(t, "consul_requests")
	time.Sleep(cfg.idle)
	r.idleCPU = 100 * mean(sub(c.cpu(t), cpu0)) / cfg.idle.Seconds()
	reqs := sub(c.vars(t, "consul_requests"), reqs0)
	r.idleReqs = mean(reqs) / cfg.idle.Seconds()
	r.idleRSS = c.rss(t, "VmRSS")
	bq := c.vars(t, "consul_blocking_queries")
	r.blocking = [2]int{int(slices.Min(bq)), int(slices.Max(bq))}
	r.watches = 2 // networks/ and the network's peers/: the prefixes an agent watches
	logf("idle window measured")

	// One at a time: host1 attaches and detaches alone while the cluster
	// idles. On this machine every simulated host shares two cores, so
	// the storm's figures include queueing behind the other hosts' work;
	// these show what one operation costs.
	solo := make([]*benchEP, soloAttaches)
	for i := range solo {
		solo[i] = &benchEP{host: 0, name: fmt.Sprintf("solo%d", i), ns: c.net.AddNS(fmt.Sprintf("o%d", i))}
	}
	for _, w := range watches {
		w.reset()
	}
	r.soloAttach = c.storm(t, [][]*benchEP{solo}, 1, soloGap, benchAttach)
	r.soloConv = converge(t, watches, solo, 30*time.Second, (*neighWatch).added)
	for _, w := range watches {
		w.reset()
	}
	r.soloDetach = c.storm(t, [][]*benchEP{solo}, 1, soloGap, benchDetach)
	r.soloDconv = converge(t, watches, solo, 30*time.Second, (*neighWatch).removed)
	logf("one-at-a-time attaches and detaches measured")

	if cfg.iperf > 0 {
		r.dp = measureDatapath(t, c, seeds[0], seeds[1], cfg.iperf)
		logf("datapath measured")
	}

	// Cold start: every agent killed, every host's tables wiped (as a
	// host that lost them), every agent started again.
	for _, a := range c.agents {
		a.stop(syscall.SIGKILL)
	}
	for _, w := range watches {
		if err := w.flush(); err != nil {
			t.Fatal(err)
		}
		w.reset()
	}
	everyone := append(slices.Clone(seeds), all...)
	t0 := time.Now()
	for _, a := range c.agents {
		a.launch()
	}
	// The tables beside readiness, not after it: an agent programs its
	// peers before its first full pass has checked every interface.
	tables := make(chan error, 1)
	go func() {
		err := tablesFull(watches, everyone, 120*time.Second)
		r.coldTables = time.Since(t0)
		tables <- err
	}()
	for _, a := range c.agents {
		a.waitReady(true)
	}
	r.coldReady = time.Since(t0)
	if err := <-tables; err != nil {
		t.Fatal(err)
	}
	logf("cold start: ready in %v, tables in %v", r.coldReady, r.coldTables)

	// A brand-new host: from its agent's start to a full mesh, which it
	// programs once it has an endpoint of the network.
	nh := c.net.AddHost("hnew")
	t0 = time.Now()
	na := startBenchAgent(t, nh, "hostnew", c.consul)
	r.newReady = time.Since(t0)
	nsNew := c.net.AddNS("snew")
	na.mustVxnet("attach", "bench", nsNew, "--name", "seednew")
	want := len(everyone)
	for {
		w, err := watchNeighbors(nsOf(na))
		if err == nil {
			nn, nf, err := w.counts()
			w.close()
			if err == nil && nn >= want && nf >= want {
				break
			}
		}
		if time.Since(t0) > 60*time.Second {
			t.Fatalf("the new host has not programmed %d peers after 60s", want)
		}
		time.Sleep(2 * time.Millisecond)
	}
	r.newMesh = time.Since(t0)
	logf("new host: ready in %v, full mesh in %v", r.newReady, r.newMesh)

	// Detach storm.
	for _, w := range watches {
		w.reset()
	}
	r.detach = c.storm(t, eps, cfg.parallel, 0, benchDetach)
	r.dconv = converge(t, watches, all, 120*time.Second, (*neighWatch).removed)
	logf("detach storm done")
	r.total = time.Since(start)
	return r
}

// benchAttach attaches e through the CLI and records when the CLI returned
// and what the endpoint got.
func benchAttach(a *agent, e *benchEP) error {
	out, err := a.vxnet("-o", "json", "attach", "bench", e.ns, "--name", e.name)
	if err != nil {
		return fmt.Errorf("attach %s: %v: %s", e.name, err, out)
	}
	e.returned = time.Now()
	var ep api.Endpoint
	if err := json.Unmarshal([]byte(out), &ep); err != nil {
		return fmt.Errorf("attach %s: %v: %s", e.name, err, out)
	}
	e.ip, e.mac = ep.IP, ep.MAC
	return nil
}

// benchDetach detaches e through the CLI.
func benchDetach(a *agent, e *benchEP) error {
	if out, err := a.vxnet("detach", "bench", e.name); err != nil {
		return fmt.Errorf("detach %s: %v: %s", e.name, err, out)
	}
	e.returned = time.Now()
	return nil
}

// benchCluster is newCluster with production settings: a 30 s resync,
// info logs, and the debug endpoint for the Consul request counters.
type benchCluster struct {
	*cluster
}

func newBenchCluster(t *testing.T, n int) *benchCluster {
	t.Helper()
	tn := testnet.New(t)
	consul := testconsul.Start(t, testconsul.WithNetNS("/var/run/netns/"+tn.Switch), testconsul.WithAddr(tn.SwitchAddr().String()))
	c := &cluster{net: tn, consul: consul}
	for i := range n {
		h := tn.AddHost(fmt.Sprintf("h%d", i+1))
		c.hosts = append(c.hosts, h)
		c.agents = append(c.agents, startBenchAgent(t, h, fmt.Sprintf("host%d", i+1), consul))
	}
	return &benchCluster{c}
}

func startBenchAgent(t *testing.T, h *testnet.Host, node string, consul *testconsul.Server) *agent {
	t.Helper()
	return startAgent(t, h, node, consul.URL("vxnet/"), "--resync-interval", "30s", "--log-level", "info",
		"--debug-addr", "127.0.0.1:6060")
}

// storm runs op for every endpoint, all hosts at once, parallel at a time
// per host with a pause of gap after each, and returns each op's latency.
func (c *benchCluster) storm(t *testing.T, eps [][]*benchEP, parallel int, gap time.Duration, op func(*agent, *benchEP) error) []time.Duration {
	t.Helper()
	var mu sync.Mutex
	var lat []time.Duration
	var errs []error
	var wg sync.WaitGroup
	for h, list := range eps {
		work := make(chan *benchEP)
		for range parallel {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for e := range work {
					t0 := time.Now()
					err := op(c.agents[h], e)
					d := time.Since(t0)
					if os.Getenv("VXNET_BENCH_TRACE") != "" {
						fmt.Fprintf(os.Stderr, "  op %s on host%d: %s at %s\n", e.name, h+1, ms(d), t0.Format("15:04:05.000"))
					}
					mu.Lock()
					lat = append(lat, d)
					if err != nil {
						errs = append(errs, err)
					}
					mu.Unlock()
					time.Sleep(gap)
				}
			}()
		}
		go func() {
			for _, e := range list {
				work <- e
			}
			close(work)
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d of %d operations failed; first: %v", len(errs), len(lat), errs[0])
	}
	return lat
}

// converge waits until every endpoint's change is seen on every other host
// and returns, per endpoint, the time from its CLI call returning to the
// last host's entries changing (negative: the peers were faster than the
// CLI's return).
func converge(t *testing.T, watches []*neighWatch, eps []*benchEP, timeout time.Duration,
	seen func(*neighWatch, string, string) (time.Time, bool)) []time.Duration {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var out []time.Duration
		missing := 0
		var trace strings.Builder
		for _, e := range eps {
			var last time.Time
			fmt.Fprintf(&trace, "  %s:", e.name)
			for h, w := range watches {
				if h == e.host {
					continue
				}
				at, ok := seen(w, e.ip, e.mac)
				if !ok {
					missing++
					continue
				}
				fmt.Fprintf(&trace, " %s", ms(at.Sub(e.returned)))
				if at.After(last) {
					last = at
				}
			}
			trace.WriteString("\n")
			out = append(out, last.Sub(e.returned))
		}
		if missing == 0 {
			if os.Getenv("VXNET_BENCH_TRACE") != "" {
				fmt.Fprint(os.Stderr, "convergence per host (ms after the CLI returned):\n"+trace.String())
			}
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d host-endpoint pairs not converged after %v", missing, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitTables waits until every host has a neighbor and an FDB entry for
// every endpoint of eps on other hosts.
func waitTables(t *testing.T, watches []*neighWatch, eps []*benchEP, timeout time.Duration) {
	t.Helper()
	if err := tablesFull(watches, eps, timeout); err != nil {
		t.Fatal(err)
	}
}

// tablesFull is waitTables for any goroutine: it returns what went wrong.
func tablesFull(watches []*neighWatch, eps []*benchEP, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		short := 0
		for h, w := range watches {
			want := 0
			for _, e := range eps {
				if e.host != h {
					want++
				}
			}
			nn, nf, err := w.counts()
			if err != nil {
				return err
			}
			if nn < want || nf < want {
				short++
			}
		}
		if short == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d hosts lack peers after %v", short, timeout)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// cpu returns each agent's CPU seconds (user + system) so far.
func (c *benchCluster) cpu(t *testing.T) []float64 {
	t.Helper()
	var out []float64
	for _, a := range c.agents {
		out = append(out, procCPU(t, a.cmd.Process.Pid))
	}
	return out
}

// rss returns the mean and the max over the agents of a /proc status
// field (VmRSS, VmHWM), in MB.
func (c *benchCluster) rss(t *testing.T, field string) [2]float64 {
	t.Helper()
	var vals []float64
	for _, a := range c.agents {
		vals = append(vals, procMB(t, a.cmd.Process.Pid, field))
	}
	return [2]float64{mean(vals), slices.Max(vals)}
}

// procCPU is a process's CPU seconds (user + system) so far.
func procCPU(t *testing.T, pid int) float64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// The fields after the command name, which is in parentheses.
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ is 100 on Linux
}

// procMB is a /proc status field of a process (VmRSS, VmHWM), in MB.
func procMB(t *testing.T, pid int, field string) float64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			return kb / 1024
		}
	}
	return 0
}

// vars reads one expvar counter from every agent's debug endpoint.
func (c *benchCluster) vars(t *testing.T, name string) []float64 {
	t.Helper()
	var out []float64
	for i, a := range c.agents {
		body, err := testnet.Exec(c.hosts[i].Name, "curl", "-sf", "http://127.0.0.1:6060/debug/vars")
		if err != nil {
			t.Fatalf("debug vars of %s: %v: %s", a.node, err, body)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(body), &m); err != nil {
			t.Fatalf("debug vars of %s: %v", a.node, err)
		}
		v, _ := m[name].(float64)
		out = append(out, v)
	}
	return out
}

func sub(a, b []float64) []float64 {
	out := make([]float64, len(a))
	for i := range a {
		out[i] = a[i] - b[i]
	}
	return out
}

func mean(v []float64) float64 {
	s := 0.0
	for _, x := range v {
		s += x
	}
	return s / float64(max(len(v), 1))
}

// pct returns the q-quantile (nearest rank) of d.
func pct(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(q*float64(len(s))+0.999999) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func ms(d time.Duration) string { return strconv.FormatFloat(float64(d)/1e6, 'f', 1, 64) }

func benchTable(cfg benchConfig, rs []*benchResult) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\nvxnet mesh benchmark: %d endpoints per host, %d attach(es) in flight per host, all hosts at once; %d cores\n\n",
		cfg.endpoints, cfg.parallel, runtime.NumCPU())
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	row := func(name string, f func(r *benchResult) string) {
		fmt.Fprintf(tw, "%s\t", name)
		for _, r := range rs {
			fmt.Fprintf(tw, "%s\t", f(r))
		}
		fmt.Fprintln(tw)
	}
	row("hosts", func(r *benchResult) string { return strconv.Itoa(r.hosts) })
	row("endpoints", func(r *benchResult) string { return strconv.Itoa(r.hosts * r.endpoints) })
	lat := func(name string, get func(*benchResult) []time.Duration, q float64) {
		row(name, func(r *benchResult) string { return ms(pct(get(r), q)) })
	}
	lat("floor: write to all hosts woke p50 (ms)", func(r *benchResult) []time.Duration { return r.floor }, 0.5)
	lat("floor: write to all hosts woke p99 (ms)", func(r *benchResult) []time.Duration { return r.floor }, 0.99)
	lat("attach p50 (ms)", func(r *benchResult) []time.Duration { return r.attach }, 0.5)
	lat("attach p99 (ms)", func(r *benchResult) []time.Duration { return r.attach }, 0.99)
	lat("convergence p50 (ms)", func(r *benchResult) []time.Duration { return r.conv }, 0.5)
	lat("convergence p99 (ms)", func(r *benchResult) []time.Duration { return r.conv }, 0.99)
	lat("convergence max (ms)", func(r *benchResult) []time.Duration { return r.conv }, 1)
	lat("detach p50 (ms)", func(r *benchResult) []time.Duration { return r.detach }, 0.5)
	lat("detach p99 (ms)", func(r *benchResult) []time.Duration { return r.detach }, 0.99)
	lat("detach convergence p50 (ms)", func(r *benchResult) []time.Duration { return r.dconv }, 0.5)
	lat("detach convergence p99 (ms)", func(r *benchResult) []time.Duration { return r.dconv }, 0.99)
	lat("detach convergence max (ms)", func(r *benchResult) []time.Duration { return r.dconv }, 1)
	lat("one at a time: attach p50 (ms)", func(r *benchResult) []time.Duration { return r.soloAttach }, 0.5)
	lat("one at a time: attach p99 (ms)", func(r *benchResult) []time.Duration { return r.soloAttach }, 0.99)
	lat("one at a time: convergence p50 (ms)", func(r *benchResult) []time.Duration { return r.soloConv }, 0.5)
	lat("one at a time: convergence p99 (ms)", func(r *benchResult) []time.Duration { return r.soloConv }, 0.99)
	lat("one at a time: detach p50 (ms)", func(r *benchResult) []time.Duration { return r.soloDetach }, 0.5)
	lat("one at a time: detach conv. p99 (ms)", func(r *benchResult) []time.Duration { return r.soloDconv }, 0.99)
	row("cold start: all ready (ms)", func(r *benchResult) string { return ms(r.coldReady) })
	row("cold start: all tables (ms)", func(r *benchResult) string { return ms(r.coldTables) })
	row("new host: ready (ms)", func(r *benchResult) string { return ms(r.newReady) })
	row("new host: full mesh (ms)", func(r *benchResult) string { return ms(r.newMesh) })
	row("watch bytes per event in storm (mean)", func(r *benchResult) string { return fmt.Sprintf("%.0f", r.watchBytes) })
	row("agent CPU in storm (s, mean)", func(r *benchResult) string { return fmt.Sprintf("%.2f", r.runCPU) })
	row("agent peak RSS (MB, mean/max)", func(r *benchResult) string { return fmt.Sprintf("%.1f/%.1f", r.runRSS[0], r.runRSS[1]) })
	row("idle RSS (MB, mean/max)", func(r *benchResult) string { return fmt.Sprintf("%.1f/%.1f", r.idleRSS[0], r.idleRSS[1]) })
	row("idle CPU (% of a core)", func(r *benchResult) string { return fmt.Sprintf("%.2f", r.idleCPU) })
	row("idle Consul req/s per agent", func(r *benchResult) string { return fmt.Sprintf("%.2f", r.idleReqs) })
	row("blocking queries (min-max/watches)", func(r *benchResult) string {
		return fmt.Sprintf("%d-%d/%d", r.blocking[0], r.blocking[1], r.watches)
	})
	dp := func(name string, f func(d *datapathResult) string) {
		row(name, func(r *benchResult) string {
			if r.dp == nil {
				return "-"
			}
			return f(r.dp)
		})
	}
	dp("TCP underlay (Gbit/s)", func(d *datapathResult) string { return fmt.Sprintf("%.2f", d.underBps/1e9) })
	dp("TCP overlay (Gbit/s)", func(d *datapathResult) string { return fmt.Sprintf("%.2f", d.overBps/1e9) })
	dp("TCP overlay/underlay", func(d *datapathResult) string { return fmt.Sprintf("%.2f", d.overBps/d.underBps) })
	dp("RTT underlay (ms)", func(d *datapathResult) string { return fmt.Sprintf("%.3f", d.underRTT) })
	dp("RTT overlay (ms)", func(d *datapathResult) string { return fmt.Sprintf("%.3f", d.overRTT) })
	row("run time (s)", func(r *benchResult) string { return fmt.Sprintf("%.0f", r.total.Seconds()) })
	tw.Flush()
	for _, r := range rs {
		if r.dp != nil {
			fmt.Fprintf(&b, "\noffloads (%d hosts run):\n%s", r.hosts, r.dp.offloads)
			break
		}
	}
	return b.String()
}
