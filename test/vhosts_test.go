package test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/vxnet/vxnet/api"
)

// TestBenchmarkVirtualHosts is scripts/bench.sh --virtual-hosts: scale
// beyond one machine by simulation. A load generator writes the peer
// records of N virtual hosts x E endpoints straight into Consul, with no
// kernel behind them (they stand for other machines), and churns them;
// meanwhile 3 real agents with real kernels attach on the same network.
// Per real agent it reports the convergence of a real attach, what each
// store event costs it, its memory and the kernel entries it holds, and
// what Consul costs; beside the floor measured in the same run.
func TestBenchmarkVirtualHosts(t *testing.T) {
	spec := os.Getenv("VXNET_BENCH_VHOSTS")
	if spec == "" {
		t.Skip("runs with scripts/bench.sh --virtual-hosts N[,N...]")
	}
	e := 50
	if v, err := strconv.Atoi(os.Getenv("VXNET_BENCH_ENDPOINTS")); err == nil && v > 0 {
		e = v
	}
	churn := 20.0
	if v, err := strconv.ParseFloat(os.Getenv("VXNET_BENCH_CHURN"), 64); err == nil && v > 0 {
		churn = v
	}
	// Networks the real hosts have no endpoint on, each with 50 endpoints
	// of virtual hosts, churning too: what they cost a real host (nothing,
	// by design) is the point.
	others, _ := strconv.Atoi(os.Getenv("VXNET_BENCH_OTHER_NETWORKS"))
	var rs []*vhostResult
	for _, f := range strings.Split(spec, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n*e > 60000 {
			t.Fatalf("--virtual-hosts %q: want counts whose endpoints fit a /16 (at most 60000)", spec)
		}
		ok := t.Run(fmt.Sprintf("virtual=%d", n), func(t *testing.T) { rs = append(rs, runVirtual(t, n, e, churn, others)) })
		if !ok {
			break
		}
	}
	table := vhostTable(e, churn, others, rs)
	fmt.Print(table)
	if out := os.Getenv("VXNET_BENCH_OUT"); out != "" {
		os.WriteFile(out, []byte(table), 0o644)
	}
}

type vhostResult struct {
	virtual, endpoints int
	floor              []time.Duration
	load               time.Duration // until every real host held every peer
	conv               []time.Duration
	attach             []time.Duration
	bytesPerEvent      float64
	cpuPerEvent        time.Duration
	eventsPerSec       float64
	rss                [2]float64
	neigh, fdb         int
	consulCPU          float64 // % of a core during the churn
	consulRSS          float64
	changes            int
}

// virtualAddr is the j-th address of the virtual endpoints: 10.200.0.2 on,
// away from the gateway (10.200.0.1) and from the real endpoints, which
// take 10.200.250.0/24 and up.
func virtualAddr(j int) netip.Addr {
	j += 2
	return netip.AddrFrom4([4]byte{10, 200, byte(j / 254), byte(j%254 + 1)})
}

func runVirtual(t *testing.T, nvirt, e int, churn float64, others int) *vhostResult {
	start := time.Now()
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "vhosts %5d %6.1fs: %s\n", nvirt, time.Since(start).Seconds(), fmt.Sprintf(format, args...))
	}
	r := &vhostResult{virtual: nvirt, endpoints: nvirt * e}
	c := newBenchCluster(t, 3)
	r.floor = measureFloor(t, c.cluster, 20)
	var netw api.Network
	c.agents[0].jsonOut(&netw, "network", "create", "vh", "--subnet", "10.200.0.0/16")
	for h, a := range c.agents {
		a.mustVxnet("attach", "vh", c.net.AddNS(fmt.Sprintf("vs%d", h)), "--ip", fmt.Sprintf("10.200.250.%d", h+2))
	}
	watches := make([]*neighWatch, len(c.agents))
	for h, a := range c.agents {
		w, err := watchNeighbors(filepath.Join(a.netnsDir(), nsName(netw.ID)))
		if err != nil {
			t.Fatal(err)
		}
		defer w.close()
		watches[h] = w
	}

	// The virtual hosts' records, written in transactions of 64.
	cl := hostClient(c.hosts[0].Path)
	records := make([][]netip.Addr, nvirt)
	next := 0
	for i := range records {
		for range e {
			records[i] = append(records[i], virtualAddr(next))
			next++
		}
	}
	spare := next // addresses for churn: from here on
	value := func(i int) string {
		var ips []byte
		sorted := slices.Clone(records[i])
		slices.SortFunc(sorted, netip.Addr.Compare)
		for _, ip := range sorted {
			b := ip.As4()
			ips = append(ips, b[:]...)
		}
		v, _ := json.Marshal(map[string]any{"version": 1, "node": fmt.Sprintf("v%05d", i),
			"vtep": fmt.Sprintf("198.18.%d.%d", i/250, i%250+1), "ips": ips})
		return base64.StdEncoding.EncodeToString(v)
	}
	key := func(i int) string { return fmt.Sprintf("vxnet/peers/%s/v%05d", netw.ID, i) }
	txn := func(idx []int) error {
		var ops []map[string]any
		for _, i := range idx {
			ops = append(ops, map[string]any{"KV": map[string]any{"Verb": "set", "Key": key(i), "Value": value(i)}})
		}
		body, _ := json.Marshal(ops)
		req, _ := http.NewRequest(http.MethodPut, "http://"+c.consul.Addr()+"/v1/txn", bytes.NewReader(body))
		resp, err := cl.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			b, _ := io.ReadAll(resp.Body)
			return fmt.Errorf("txn: %s: %s", resp.Status, b)
		}
		return nil
	}
	t0 := time.Now()
	for i := 0; i < nvirt; i += 64 {
		var idx []int
		for j := i; j < min(i+64, nvirt); j++ {
			idx = append(idx, j)
		}
		if err := txn(idx); err != nil {
			t.Fatal(err)
		}
	}
	want := nvirt*e + len(c.agents) - 1
	deadline := time.Now().Add(5 * time.Minute)
	for {
		done := 0
		for _, w := range watches {
			if nn, nf, err := w.counts(); err == nil && nn >= want && nf >= want {
				done++
			}
		}
		if done == len(watches) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the real hosts do not hold %d peers after 5 minutes", want)
		}
		time.Sleep(100 * time.Millisecond)
	}
	r.load = time.Since(t0)
	logf("%d virtual hosts x %d endpoints written and programmed on every real host in %v", nvirt, e, r.load)

	// The other networks: 10 virtual hosts x 5 endpoints each.
	var otherKeys []string
	for k := range others {
		var on api.Network
		c.agents[0].jsonOut(&on, "network", "create", fmt.Sprintf("other%d", k))
		var ops []map[string]any
		for h := range 10 {
			var ips []byte
			for i := range 5 {
				b := netip.MustParsePrefix(on.Subnet).Addr().As4()
				b[3] = byte(2 + h*5 + i)
				ips = append(ips, b[:]...)
			}
			v, _ := json.Marshal(map[string]any{"version": 1, "node": fmt.Sprintf("o%d", h), "vtep": fmt.Sprintf("198.19.%d.%d", k, h+1), "ips": ips})
			key := fmt.Sprintf("vxnet/peers/%s/o%d", on.ID, h)
			otherKeys = append(otherKeys, key)
			ops = append(ops, map[string]any{"KV": map[string]any{"Verb": "set", "Key": key, "Value": base64.StdEncoding.EncodeToString(v)}})
		}
		body, _ := json.Marshal(ops)
		req, _ := http.NewRequest(http.MethodPut, "http://"+c.consul.Addr()+"/v1/txn", bytes.NewReader(body))
		resp, err := cl.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}

	// Churn: one virtual host's record changes (an endpoint goes, another
	// comes) at the given rate.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var churned int
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(time.Duration(float64(time.Second) / churn))
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if len(otherKeys) > 0 && rand.IntN(2) == 0 {
				// A change on a network the real hosts are not on:
				// rewrite a record with a new value.
				key := otherKeys[rand.IntN(len(otherKeys))]
				v, _ := json.Marshal(map[string]any{"version": 1, "node": key[strings.LastIndexByte(key, '/')+1:], "vtep": "198.19.255.1", "ips": []byte{10, 0, 0, byte(rand.IntN(200) + 2)}})
				req, _ := http.NewRequest(http.MethodPut, "http://"+c.consul.Addr()+"/v1/kv/"+key, bytes.NewReader(v))
				if resp, err := cl.Do(req); err == nil {
					resp.Body.Close()
				}
				churned++
				continue
			}
			i := rand.IntN(nvirt)
			records[i][rand.IntN(e)] = virtualAddr(spare)
			spare++
			if err := txn([]int{i}); err != nil {
				t.Error(err)
				return
			}
			churned++
		}
	}()
	time.Sleep(2 * time.Second) // the churn under way
	if prof := os.Getenv("VXNET_BENCH_PROFILE"); prof != "" {
		// A CPU profile of a watching real agent during the churn.
		go exec.Command("ip", "netns", "exec", c.hosts[1].Name, "curl", "-sf", "-o", prof, "http://127.0.0.1:6060/debug/pprof/profile?seconds=5").Run()
	}
	cpu0 := c.cpu(t)
	wb0, we0 := c.vars(t, "consul_watch_bytes"), c.vars(t, "consul_watch_events")
	consul0 := procCPU(t, c.consul.Pid())
	w0 := time.Now()

	// Real attaches, one at a time on the first real host, converging on
	// the two others.
	var eps []*benchEP
	for i := range 20 {
		ep := &benchEP{host: 0, name: fmt.Sprintf("r%d", i), ns: c.net.AddNS(fmt.Sprintf("vr%d", i))}
		for _, w := range watches {
			w.reset()
		}
		t1 := time.Now()
		out, err := c.agents[0].vxnet("-o", "json", "attach", "vh", ep.ns, "--name", ep.name, "--ip", fmt.Sprintf("10.200.251.%d", i+2))
		if err != nil {
			t.Fatalf("attach: %v: %s", err, out)
		}
		ep.returned = time.Now()
		r.attach = append(r.attach, ep.returned.Sub(t1))
		var got api.Endpoint
		json.Unmarshal([]byte(out), &got)
		ep.ip, ep.mac = got.IP, got.MAC
		// From the call: on a quiet host the peers often have the entry
		// before the CLI process has even returned.
		ep.returned = t1
		r.conv = append(r.conv, converge(t, watches[1:], []*benchEP{ep}, 30*time.Second, (*neighWatch).added)...)
		eps = append(eps, ep)
		time.Sleep(200 * time.Millisecond)
	}
	window := time.Since(w0)
	cpu := sub(c.cpu(t), cpu0)
	wb, we := sub(c.vars(t, "consul_watch_bytes"), wb0), sub(c.vars(t, "consul_watch_events"), we0)
	var events float64
	for i := range wb {
		if we[i] > 0 {
			r.bytesPerEvent += wb[i] / we[i] / float64(len(wb))
			r.cpuPerEvent += time.Duration(cpu[i] / we[i] * float64(time.Second) / float64(len(wb)))
		}
		events += we[i] / float64(len(we))
	}
	r.eventsPerSec = events / window.Seconds()
	r.consulCPU = 100 * (procCPU(t, c.consul.Pid()) - consul0) / window.Seconds()
	close(stop)
	wg.Wait()
	r.changes = churned
	r.rss = c.rss(t, "VmRSS")
	r.consulRSS = procMB(t, c.consul.Pid(), "VmRSS")
	nn, nf, err := watches[1].counts()
	if err != nil {
		t.Fatal(err)
	}
	r.neigh, r.fdb = nn, nf
	logf("done: %d churned records, %d real attaches", churned, len(eps))
	return r
}

func vhostTable(e int, churn float64, others int, rs []*vhostResult) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\nvxnet virtual-hosts benchmark: %d endpoints per virtual host, %.0f record changes/s, 3 real hosts", e, churn)
	if others > 0 {
		fmt.Fprintf(&b, ", %d other networks of 50 endpoints the real hosts are not on (half the changes are theirs)", others)
	}
	b.WriteString("\n\n")
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	row := func(name string, f func(r *vhostResult) string) {
		fmt.Fprintf(tw, "%s\t", name)
		for _, r := range rs {
			fmt.Fprintf(tw, "%s\t", f(r))
		}
		fmt.Fprintln(tw)
	}
	row("virtual hosts", func(r *vhostResult) string { return strconv.Itoa(r.virtual) })
	row("endpoints on the network", func(r *vhostResult) string { return strconv.Itoa(r.endpoints) })
	row("floor p50 (ms)", func(r *vhostResult) string { return ms(pct(r.floor, 0.5)) })
	row("floor p99 (ms)", func(r *vhostResult) string { return ms(pct(r.floor, 0.99)) })
	row("real attach p50 (ms)", func(r *vhostResult) string { return ms(pct(r.attach, 0.5)) })
	row("real attach: call to entries on the others p50 (ms)", func(r *vhostResult) string { return ms(pct(r.conv, 0.5)) })
	row("real attach: call to entries on the others p99 (ms)", func(r *vhostResult) string { return ms(pct(r.conv, 0.99)) })
	row("initial load programmed (s)", func(r *vhostResult) string { return fmt.Sprintf("%.1f", r.load.Seconds()) })
	row("store events per agent (/s)", func(r *vhostResult) string { return fmt.Sprintf("%.1f", r.eventsPerSec) })
	row("bytes per event per agent", func(r *vhostResult) string { return fmt.Sprintf("%.0f", r.bytesPerEvent) })
	row("agent CPU per event (ms)", func(r *vhostResult) string { return fmt.Sprintf("%.2f", r.cpuPerEvent.Seconds()*1000) })
	row("agent RSS (MB, mean/max)", func(r *vhostResult) string { return fmt.Sprintf("%.1f/%.1f", r.rss[0], r.rss[1]) })
	row("neighbor / FDB entries per real host", func(r *vhostResult) string { return fmt.Sprintf("%d/%d", r.neigh, r.fdb) })
	row("Consul CPU (% of a core)", func(r *vhostResult) string { return fmt.Sprintf("%.1f", r.consulCPU) })
	row("Consul RSS (MB)", func(r *vhostResult) string { return fmt.Sprintf("%.0f", r.consulRSS) })
	row("record changes in the window", func(r *vhostResult) string { return strconv.Itoa(r.changes) })
	tw.Flush()
	return b.String()
}
