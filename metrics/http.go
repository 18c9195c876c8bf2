// Package metrics owns pggovernor's Prometheus registry, its metrics (every
// name, help string and unit declared in metrics.go), the collector that
// reads the pool's and the proxy's figures at scrape time, and the admin
// HTTP endpoints: /metrics, /healthz (alive), /readyz (serving) and, when
// asked, /debug/pprof.
package metrics

import (
	"net/http"
	"net/http/pprof"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// NewRegistry returns a registry with the Go runtime and process
// collectors; pggovernor's own collectors are added by their owners.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// HandlerOptions configure the admin HTTP handler.
type HandlerOptions struct {
	// Gatherer serves /metrics.
	Gatherer prometheus.Gatherer
	// Ready returns nil when pggovernor can serve clients, or why not.
	Ready func() error
	// Pprof mounts Go's profiler at /debug/pprof/, without
	// /debug/pprof/cmdline: the command line may hold secrets (a
	// --upstream.password flag).
	Pprof bool
}

// NewHandler returns the admin HTTP handler.
func NewHandler(o HandlerOptions) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(o.Gatherer, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if err := o.Ready(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("not ready: " + err.Error() + "\n"))
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	if o.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		// Not pprof.Cmdline: the command line may hold a password. The
		// index would look the name up as a profile, and answer 404 too.
		mux.Handle("/debug/pprof/cmdline", http.NotFoundHandler())
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}
