package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"gopkg.in/yaml.v3"

	"github.com/pggovernor/pggovernor/config"
)

// The dashboard and the alert rules in deploy/ are validated against what
// the governor exports: both parse, and every metric named in every
// expression is exported by a running governor.

// exportedNames returns every series name a running governor exports
// (histograms with their _bucket, _sum and _count). It terminates TLS so
// that the certificate expiry series exists, and shares a cluster budget
// (alone) so that the cluster series exist.
func exportedNames(t *testing.T) map[string]bool {
	t.Helper()
	pki := newClientPKI(t)
	g := startGov(t, nil, func(c *config.Config) {
		c.Clients.TLS = config.ClientTLS{Mode: "allow", CertFile: pki.mount.Path("tls.crt"), KeyFile: pki.mount.Path("tls.key")}
		c.Budget.Cluster = config.Cluster{Enabled: true, Namespace: int(newNamespace()), Table: "pggovernor_members",
			HeartbeatInterval: 50 * time.Millisecond, MemberTimeout: time.Second}
	})
	conn := connectPgx(t, g.url("alice", userPass, "appdb"))
	mustExec(t, conn, "SELECT 1")
	mfs, err := g.g.registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
		switch mf.GetType() {
		case dto.MetricType_HISTOGRAM:
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				names[mf.GetName()+s] = true
			}
		case dto.MetricType_SUMMARY:
			for _, s := range []string{"_sum", "_count"} {
				names[mf.GetName()+s] = true
			}
		}
	}
	return names
}

// promqlKeywords are the words of PromQL that are not metric names when
// they are not followed by "(" (aggregation modifiers, binary operators,
// aggregations written "sum by (x) (...)").
var promqlKeywords = map[string]bool{
	"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true, "bool": true,
	"and": true, "or": true, "unless": true, "offset": true, "atan2": true, "inf": true, "nan": true,
	"sum": true, "min": true, "max": true, "avg": true, "group": true, "stddev": true, "stdvar": true, "count": true,
	"count_values": true, "bottomk": true, "topk": true, "quantile": true, "limitk": true, "limit_ratio": true,
}

// metricNames returns the metric names a PromQL expression selects: the
// identifiers that are not function calls, keywords, label names, strings,
// numbers, durations or Grafana variables.
func metricNames(expr string) []string {
	var out []string
	isStart := func(c byte) bool { return c == '_' || c == ':' || (c|0x20 >= 'a' && c|0x20 <= 'z') }
	isPart := func(c byte) bool { return isStart(c) || (c >= '0' && c <= '9') }
	skipSpace := func(i int) int {
		for i < len(expr) && strings.IndexByte(" \t\r\n", expr[i]) >= 0 {
			i++
		}
		return i
	}
	// skipGroup skips from an opening bracket to its match, over strings.
	skipGroup := func(i int, open, close byte) int {
		depth := 0
		for ; i < len(expr); i++ {
			switch c := expr[i]; {
			case c == '"' || c == '\'' || c == '`':
				for i++; i < len(expr) && expr[i] != c; i++ {
					if expr[i] == '\\' && c != '`' {
						i++
					}
				}
			case c == open:
				depth++
			case c == close:
				depth--
				if depth == 0 {
					return i + 1
				}
			}
		}
		return i
	}
	for i := 0; i < len(expr); {
		c := expr[i]
		switch {
		case c == '"' || c == '\'' || c == '`':
			j := i + 1
			for j < len(expr) && expr[j] != c {
				if expr[j] == '\\' && c != '`' {
					j++
				}
				j++
			}
			i = j + 1
		case c == '{':
			i = skipGroup(i, '{', '}')
		case c == '[':
			i = skipGroup(i, '[', ']')
		case c == '$': // a Grafana variable: $name, ${name}, $__rate_interval
			i++
			if i < len(expr) && expr[i] == '{' {
				i = skipGroup(i, '{', '}')
			}
			for i < len(expr) && isPart(expr[i]) {
				i++
			}
		case c >= '0' && c <= '9' || c == '.':
			for i < len(expr) && (isPart(expr[i]) || expr[i] == '.') {
				i++
			}
		case isStart(c):
			j := i
			for j < len(expr) && isPart(expr[j]) {
				j++
			}
			word := expr[i:j]
			next := skipSpace(j)
			switch {
			case next < len(expr) && expr[next] == '(':
				// A function call, an aggregation, or the label list of
				// by/without/on/ignoring/group_left/group_right.
				switch word {
				case "by", "without", "on", "ignoring", "group_left", "group_right":
					j = skipGroup(next, '(', ')')
				}
			case promqlKeywords[strings.ToLower(word)]:
			default:
				out = append(out, word)
			}
			i = j
		default:
			i++
		}
	}
	return out
}

func TestMetricNamesOfPromQL(t *testing.T) {
	for _, tc := range []struct {
		name, expr string
		want       []string
	}{
		{name: "selector", expr: `pggovernor_clients{state="waiting", job=~"$job"} > 0`, want: []string{"pggovernor_clients"}},
		{name: "aggregation", expr: `sum by (le, instance) (rate(pggovernor_wait_seconds_bucket{x="a}b"}[$__rate_interval]))`,
			want: []string{"pggovernor_wait_seconds_bucket"}},
		{name: "binary", expr: "a_total / on (instance) group_left (db) b_info and c offset 5m", want: []string{"a_total", "b_info", "c"}},
		{name: "arithmetic", expr: "min by (certificate) (x_seconds) - time() < 14 * 86400", want: []string{"x_seconds"}},
		{name: "subquery", expr: "max_over_time(rate(y_total[5m])[1h:1m])", want: []string{"y_total"}},
		{name: "templated", expr: `max by (instance) (z{instance=~"${instance}"}) == bool 1`, want: []string{"z"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := metricNames(tc.expr); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("metricNames(%q): want = %v, got = %v", tc.expr, tc.want, got)
			}
		})
	}
}

// exprsIn collects the values of every "expr" key in a decoded JSON tree.
func exprsIn(v any, out *[]string) {
	switch x := v.(type) {
	case map[string]any:
		for k, val := range x {
			if s, ok := val.(string); ok && k == "expr" {
				*out = append(*out, s)
				continue
			}
			exprsIn(val, out)
		}
	case []any:
		for _, val := range x {
			exprsIn(val, out)
		}
	}
}

func TestDashboardAndAlertsUseExportedMetrics(t *testing.T) {
	exported := exportedNames(t)
	check := func(where, expr string) {
		t.Helper()
		names := metricNames(expr)
		if len(names) == 0 {
			t.Errorf("%s: %q names no metric", where, expr)
		}
		for _, n := range names {
			if !exported[n] {
				t.Errorf("%s: %q uses %s, which the governor does not export", where, expr, n)
			}
		}
	}

	// The dashboard.
	data, err := os.ReadFile("../../deploy/grafana/pggovernor.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		UID    string `json:"uid"`
		Panels []struct {
			Type    string `json:"type"`
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("deploy/grafana/pggovernor.json: %v", err)
	}
	var tree any
	_ = json.Unmarshal(data, &tree)
	var all []string
	exprsIn(tree, &all)
	titles := map[string]bool{}
	targets := 0
	for _, p := range dash.Panels {
		titles[p.Title] = true
		if p.Type != "row" && len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			check("dashboard panel "+p.Title, tg.Expr)
			targets++
		}
	}
	if targets != len(all) || targets < 20 {
		t.Fatalf("dashboard: %d panel queries, %d expr fields in the file", targets, len(all))
	}
	for _, v := range dash.Templating.List {
		if strings.HasPrefix(v.Definition, "label_values(") {
			inner := strings.TrimSuffix(strings.TrimPrefix(v.Definition, "label_values("), ")")
			check("dashboard variable", inner[:strings.LastIndex(inner, ",")])
		}
	}
	for _, want := range []string{"Budget saturation", "Waiting clients", "Wait time", "Server connections by state",
		"Transaction latency", "Errors sent to clients by SQLSTATE", "Pinned clients", "Leases by replica"} {
		if !titles[want] {
			t.Errorf("the dashboard has no panel %q", want)
		}
	}

	// The alert rules, in Prometheus' rule file format.
	data, err = os.ReadFile("../../deploy/prometheus/alerts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var rules struct {
		Groups []struct {
			Name  string `yaml:"name"`
			Rules []struct {
				Alert       string            `yaml:"alert"`
				Expr        string            `yaml:"expr"`
				For         string            `yaml:"for"`
				Labels      map[string]string `yaml:"labels"`
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	dec := yaml.NewDecoder(strings.NewReader(string(data)))
	dec.KnownFields(true)
	if err := dec.Decode(&rules); err != nil {
		t.Fatalf("deploy/prometheus/alerts.yaml: %v", err)
	}
	var alerts []string
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			alerts = append(alerts, r.Alert)
			check("alert "+r.Alert, r.Expr)
			if r.For != "" {
				if _, err := time.ParseDuration(r.For); err != nil {
					t.Errorf("alert %s: for %q: %v", r.Alert, r.For, err)
				}
			}
			if r.Labels["severity"] == "" || r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("alert %s needs a severity label, a summary and a description", r.Alert)
			}
		}
	}
	if promtool, err := exec.LookPath("promtool"); err == nil {
		if out, err := exec.Command(promtool, "check", "rules", "../../deploy/prometheus/alerts.yaml").CombinedOutput(); err != nil {
			t.Fatalf("promtool check rules: %v\n%s", err, out)
		}
	} else {
		t.Log("promtool is not installed: the rules' PromQL syntax is not checked beyond the names (apt-get install prometheus)")
	}
	sort.Strings(alerts)
	want := []string{"PggovernorBudgetSaturated", "PggovernorCertificateExpired", "PggovernorCertificateExpiresSoon",
		"PggovernorClientsWaiting", "PggovernorClusterLeasesLost", "PggovernorClusterLocksSquatted", "PggovernorClusterTableTampered", "PggovernorIAMTokenFailures", "PggovernorIAMTokensFailing", "PggovernorPausedLong",
		"PggovernorUpstreamDown", "PggovernorWaitTimeouts"}
	if !reflect.DeepEqual(alerts, want) {
		t.Fatalf("alerts: want = %v, got = %v", want, alerts)
	}
}

// TestCertificateExpiryMetric: the expiry the metrics export is the one of
// the certificate the governor presents to clients.
func TestCertificateExpiryMetric(t *testing.T) {
	pki := newClientPKI(t)
	g := startGov(t, nil, func(c *config.Config) {
		c.Budget.Max = 1
		c.Clients.TLS = config.ClientTLS{Mode: "allow", CertFile: pki.mount.Path("tls.crt"), KeyFile: pki.mount.Path("tls.key")}
	})
	mfs, err := g.g.registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	want := float64(pki.serverCert.Cert.NotAfter.Unix())
	for _, mf := range mfs {
		if mf.GetName() != "pggovernor_tls_certificate_expiry_timestamp_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if m.GetLabel()[0].GetValue() == "clients.tls.cert_file" {
				if got := m.GetGauge().GetValue(); got != want {
					t.Fatalf("expiry of clients.tls.cert_file: want = %v, got = %v", want, got)
				}
				return
			}
		}
	}
	t.Fatal("no expiry series for clients.tls.cert_file")
}

// TestDeployManifests: every PGGOVERNOR_* variable of the Kubernetes
// sidecar example is a setting and the configuration it makes validates;
// the Dockerfile builds with the Go release go.mod's toolchain line names.
func TestDeployManifests(t *testing.T) {
	data, err := os.ReadFile("../../deploy/kubernetes/coder-sidecar.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Spec struct {
			Template struct {
				Spec struct {
					Containers []struct {
						Name string
						Env  []struct{ Name, Value string }
					}
				}
			}
		}
	}
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	var environ []string
	for _, c := range doc.Spec.Template.Spec.Containers {
		if c.Name != "pggovernor" {
			continue
		}
		for _, e := range c.Env {
			environ = append(environ, e.Name+"="+e.Value)
		}
	}
	if len(environ) == 0 {
		t.Fatal("no pggovernor container with an environment in the manifest")
	}
	cfg, err := config.Load(config.Source{Environ: environ})
	if err != nil {
		t.Fatalf("the manifest's configuration: %v", err)
	}
	if cfg.Listen != "127.0.0.1:6432" || !cfg.Budget.Cluster.Enabled {
		t.Fatalf("want = the sidecar settings, got listen %s, cluster %v", cfg.Listen, cfg.Budget.Cluster.Enabled)
	}
	dockerfile, err := os.ReadFile("../../deploy/docker/Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	gomod, err := os.ReadFile("../../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	// The release of go.mod's toolchain line (the patch release with the
	// latest security fixes), or of its go line.
	var goVersion string
	for _, line := range strings.Split(string(gomod), "\n") {
		if v, ok := strings.CutPrefix(line, "toolchain go"); ok {
			goVersion = v
			break
		}
		if v, ok := strings.CutPrefix(line, "go "); ok {
			goVersion = v
		}
	}
	if !strings.Contains(string(dockerfile), "FROM golang:"+goVersion+" ") {
		t.Fatalf("the Dockerfile's build stage does not use Go %s (go.mod)", goVersion)
	}
}
