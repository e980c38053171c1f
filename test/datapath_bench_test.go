package test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vxnet/vxnet/internal/testnet"
)

// datapathResult compares the overlay with the raw underlay between the
// same two hosts.
type datapathResult struct {
	underBps, overBps float64 // TCP throughput, bits per second
	underRTT, overRTT float64 // mean round trip, ms
	offloads          string
}

// measureDatapath runs iperf3 and ping between two containers on
// different hosts, and between the two hosts themselves.
func measureDatapath(t *testing.T, c *benchCluster, a, b *benchEP, seconds int) *datapathResult {
	t.Helper()
	hA, hB := c.hosts[a.host], c.hosts[b.host]
	// Offload or sysctl settings to try (scripts/bench.sh --tune): shell
	// commands run before the figures, with {h1} {h2} (the two hosts'
	// namespaces), {sw} (the switch), {c1} {c2} (the containers) and {o1}
	// {o2} (the overlay namespaces' paths) filled in.
	exp := strings.NewReplacer("{h1}", hA.Name, "{h2}", hB.Name, "{sw}", c.net.Switch, "{c1}", a.ns, "{c2}", b.ns,
		"{o1}", filepath.Join(c.agents[a.host].netnsDir(), c.agents[a.host].overlayNamespaces()[0]),
		"{o2}", filepath.Join(c.agents[b.host].netnsDir(), c.agents[b.host].overlayNamespaces()[0])).Replace(os.Getenv("VXNET_BENCH_TUNE"))
	for _, cmdline := range strings.Split(exp, ";") {
		if f := strings.Fields(cmdline); len(f) > 0 {
			out, err := exec.Command("sh", "-c", cmdline).CombinedOutput()
			fmt.Fprintf(os.Stderr, "tune: %s: %v %s\n", cmdline, err, out)
		}
	}
	var err error
	d := &datapathResult{}
	if d.underBps, err = iperf(hA.Name, hB.Name, hB.Addr.String(), seconds); err != nil {
		t.Fatal(err)
	}
	if d.overBps, err = iperf(a.ns, b.ns, b.ip, seconds); err != nil {
		t.Fatal(err)
	}
	if d.underRTT, err = meanRTT(hA.Name, hB.Addr.String()); err != nil {
		t.Fatal(err)
	}
	if d.overRTT, err = meanRTT(a.ns, b.ip); err != nil {
		t.Fatal(err)
	}
	d.offloads = offloadReport(c, a)
	return d
}

// iperf runs an iperf3 server in serverNS and a client in clientNS, and
// returns the receiver's throughput.
func iperf(clientNS, serverNS, addr string, seconds int) (float64, error) {
	srv := exec.Command("ip", "netns", "exec", serverNS, "iperf3", "-s", "-1")
	if err := srv.Start(); err != nil {
		return 0, fmt.Errorf("iperf3 server in %s: %w", serverNS, err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	type result struct {
		Error string `json:"error"`
		End   struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	var r result
	for try := 0; ; try++ {
		out, err := testnet.Exec(clientNS, "iperf3", "-c", addr, "-t", strconv.Itoa(seconds), "-J")
		r = result{}
		jerr := json.Unmarshal([]byte(out), &r)
		// Until the server listens, the client is refused (and some
		// iperf3 versions say so in the JSON with exit status 0).
		if strings.Contains(r.Error+out, "unable to connect") && try < 50 {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if err != nil || jerr != nil || r.Error != "" || r.End.SumReceived.BitsPerSecond == 0 {
			return 0, fmt.Errorf("iperf3 %s -> %s: %v %v %s: %s", clientNS, addr, err, jerr, r.Error, out)
		}
		break
	}
	return r.End.SumReceived.BitsPerSecond, nil
}

var rttRe = regexp.MustCompile(`= [\d.]+/([\d.]+)/`)

func meanRTT(ns, addr string) (float64, error) {
	out, err := testnet.Exec(ns, "ping", "-q", "-c", "200", "-i", "0.005", addr)
	if err != nil {
		return 0, fmt.Errorf("ping %s from %s: %v: %s", addr, ns, err, out)
	}
	m := rttRe.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("ping output: %s", out)
	}
	return strconv.ParseFloat(m[1], 64)
}

// The offload features that decide VXLAN's cost on veth.
var offloadFeatures = []struct{ name, short string }{
	{"tx-checksumming", "tx-csum"},
	{"scatter-gather", "sg"},
	{"tcp-segmentation-offload", "tso"},
	{"generic-segmentation-offload", "gso"},
	{"generic-receive-offload", "gro"},
	{"tx-udp_tnl-segmentation", "udp-tnl-seg"},
	{"rx-udp-gro-forwarding", "udp-gro-fwd"},
}

// offloadReport lists the offloads of every device a packet crosses from
// container a to the underlay.
func offloadReport(c *benchCluster, a *benchEP) string {
	ag := c.agents[a.host]
	ovl := ""
	if ns := ag.overlayNamespaces(); len(ns) > 0 {
		ovl = filepath.Join(ag.netnsDir(), ns[0])
	}
	hostVeth := ""
	if out, err := exec.Command("nsenter", "--net="+ovl, "ip", "-o", "link", "show", "master", "br0", "type", "veth").Output(); err == nil {
		if f := strings.Fields(string(out)); len(f) > 1 {
			hostVeth, _, _ = strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		}
	}
	devs := []struct{ what, netns, dev string }{
		{"container eth0 (veth)", "/var/run/netns/" + a.ns, "eth0"},
		{"bridge port " + hostVeth + " (veth)", ovl, hostVeth},
		{"vxlan1", ovl, "vxlan1"},
		{"underlay eth0 (veth)", c.hosts[a.host].Path, "eth0"},
	}
	var b strings.Builder
	for _, d := range devs {
		out, err := exec.Command("nsenter", "--net="+d.netns, "ethtool", "-k", d.dev).CombinedOutput()
		if err != nil {
			fmt.Fprintf(&b, "  %-26s ethtool: %v\n", d.what, strings.TrimSpace(string(out)))
			continue
		}
		fmt.Fprintf(&b, "  %-26s", d.what)
		for _, f := range offloadFeatures {
			v := "?"
			for _, line := range strings.Split(string(out), "\n") {
				if rest, ok := strings.CutPrefix(strings.TrimSpace(line), f.name+":"); ok {
					v = strings.Fields(rest)[0]
				}
			}
			fmt.Fprintf(&b, " %s=%s", f.short, v)
		}
		b.WriteString("\n")
	}
	return b.String()
}
