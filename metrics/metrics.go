// Package metrics defines vxnet's Prometheus metrics and serves them, with
// the health endpoints, on the agent's --metrics-addr.
//
// The metrics live in a registry of their own (not the global one), so
// that a test or a second agent in one process does not collide. Label
// sets are bounded: network names and kinds of things, never endpoints.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Registry holds every vxnet metric, plus the Go and process collectors.
var Registry = prometheus.NewRegistry()

// latency buckets, in seconds: from a netlink call to a store outage.
var buckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

var (
	AttachDuration = histogram("attach_duration_seconds", "Time an attach took, from the request to its answer.")
	DetachDuration = histogram("detach_duration_seconds", "Time a detach took, from the request to its answer.")
	AttachErrors   = counterVec("attach_errors_total", "Attaches that failed, by API error code.", "code")
	DetachErrors   = counterVec("detach_errors_total", "Detaches that failed, by API error code.", "code")

	Convergence = histogram("convergence_seconds",
		"Time from a store event (a peer record changed) reaching the agent to the kernel holding its neighbor and FDB entries.")
	ReconcileDuration = histogramVec("reconcile_duration_seconds", "Time a reconcile pass took, by kind (full: against the kernel; light: an event's delta).", "kind")

	StoreRequestDuration = histogramVec("store_request_duration_seconds", "Time a store request took, by operation.", "op")
	StoreRequestErrors   = counterVec("store_request_errors_total", "Store requests that failed for want of an answer, by operation.", "op")
	StoreUp              = gauge("store_up", "1 while the store answers, 0 while it does not (the datapath keeps its state meanwhile).")
	SessionUp            = gauge("session_up", "1 while this node holds a store session, which its records are bound to.")
	WatchEvents          = counter("watch_events_total", "Snapshots delivered by the store's watches.")
	WatchBytes           = counter("watch_bytes_total", "Bytes of the answers to the store's blocking queries.")

	Peers          = gaugeVec("peers", "Peer endpoints programmed in the kernel (neighbor + FDB entry each), by network.", "network")
	LocalEndpoints = gaugeVec("local_endpoints", "Endpoints attached on this host, by network.", "network")
	Repairs        = counterVec("drift_repairs_total", "Drift found in the kernel and repaired, by kind.", "kind")
	LeaksRemoved   = counterVec("leaks_removed_total", "Things of no endpoint removed (a crash's leftovers), by kind.", "kind")

	DNSQueries = counterVec("dns_queries_total", "Queries the networks' DNS servers answered, by how: local (an overlay name or its absence), forwarded, refused, dropped (over the bound).", "result")

	buildInfo = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "vxnet", Name: "build_info", Help: "Always 1; the labels say which vxnet runs."}, []string{"version", "goversion"})
)

func histogram(name, help string) prometheus.Histogram {
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "vxnet", Name: name, Help: help, Buckets: buckets})
	Registry.MustRegister(h)
	return h
}

func histogramVec(name, help string, labels ...string) *prometheus.HistogramVec {
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "vxnet", Name: name, Help: help, Buckets: buckets}, labels)
	Registry.MustRegister(h)
	return h
}

func counter(name, help string) prometheus.Counter {
	c := prometheus.NewCounter(prometheus.CounterOpts{Namespace: "vxnet", Name: name, Help: help})
	Registry.MustRegister(c)
	return c
}

func counterVec(name, help string, labels ...string) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "vxnet", Name: name, Help: help}, labels)
	Registry.MustRegister(c)
	return c
}

func gauge(name, help string) prometheus.Gauge {
	g := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "vxnet", Name: name, Help: help})
	Registry.MustRegister(g)
	return g
}

func gaugeVec(name, help string, labels ...string) *prometheus.GaugeVec {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "vxnet", Name: name, Help: help}, labels)
	Registry.MustRegister(g)
	return g
}

func init() {
	Registry.MustRegister(buildInfo, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
}

// SetBuildInfo records the running version.
func SetBuildInfo(version string) {
	buildInfo.WithLabelValues(version, runtime.Version()).Set(1)
}

// Since observes the time since start on h.
func Since(h prometheus.Observer, start time.Time) { h.Observe(time.Since(start).Seconds()) }

// Health is what the health endpoints ask the agent.
type Health interface {
	// Ready: synced from the store and reconciled once. StoreErr is why
	// the store does not answer now, if it does not.
	Health() (ready bool, storeErr error)
}

// Serve serves /metrics, /healthz and /readyz on ln until ctx is done.
//   - /healthz: 200 while the process serves at all.
//   - /readyz: 200 once the agent has synced from the store and reconciled;
//     it stays 200 while the store is unreachable (the datapath is intact)
//     and says so in its body (and in vxnet_store_up); 503 before.
func Serve(ctx context.Context, ln net.Listener, h Health, log *slog.Logger) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		ready, storeErr := h.Health()
		switch {
		case !ready:
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "not ready: not yet synced from the store and reconciled")
		case storeErr != nil:
			fmt.Fprintf(w, "ready; the store is unreachable (the datapath keeps its state): %v\n", storeErr)
		default:
			fmt.Fprintln(w, "ready")
		}
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	log.Info("serving metrics and health", "addr", ln.Addr().String())
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics: %w", err)
	}
	return nil
}
