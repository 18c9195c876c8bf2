package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Helpers for the tests of what operators see: the admin HTTP endpoints,
// the metrics and the admin console.

// adminGet fetches a path from the governor's admin HTTP listener.
func (g *gov) adminGet(t testing.TB, path string) (int, string) {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + g.g.adminAddr() + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

// scrape reads /metrics over HTTP and parses it.
func (g *gov) scrape(t testing.TB) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := g.adminGet(t, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: want = 200, got = %d: %s", code, body)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return mfs
}

// value returns the value of the series of family name whose labels
// include want; ok is false when there is none.
func value(mfs map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	mf := mfs[name]
	if mf == nil {
		return 0, false
	}
next:
	for _, m := range mf.GetMetric() {
		have := map[string]string{}
		for _, lp := range m.GetLabel() {
			have[lp.GetName()] = lp.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

// mustValue is value for a series that must exist.
func mustValue(t testing.TB, mfs map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	t.Helper()
	v, ok := value(mfs, name, labels)
	if !ok {
		t.Fatalf("no series %s%v in /metrics", name, labels)
	}
	return v
}

// consoleURL is a URL that opens the admin console.
func (g *gov) consoleURL(user, password string) string { return g.url(user, password, "pggovernor") }

// psql runs one command with psql (unaligned, with headers, | between
// fields) and returns its output.
func psql(t testing.TB, url, command string) (string, error) {
	t.Helper()
	path, err := exec.LookPath("psql")
	if err != nil {
		t.Fatalf("psql is required (apt-get install postgresql-client): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, "-X", "-A", "-F", "|", "-P", "footer=off", "-v", "ON_ERROR_STOP=1", "-c", command, url)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	return out.String(), err
}

// mustPsql is psql for a command that must succeed.
func mustPsql(t testing.TB, url, command string) string {
	t.Helper()
	out, err := psql(t, url, command)
	if err != nil {
		t.Fatalf("psql -c %q: %v\n%s", command, err, out)
	}
	return out
}

// freeTCPPort returns a port free right now, for an external program that
// cannot listen on port 0 and report its port.
func freeTCPPort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

var _ = fmt.Sprintf
