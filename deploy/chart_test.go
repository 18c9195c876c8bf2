package deploy

import (
	"bytes"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/deploy/internal/chartrender"
)

var update = flag.Bool("update", false, "rewrite the golden files and the generated part of values.schema.json")

// loadChart loads the chart once per test.
func loadChart(t *testing.T) *chart.Chart {
	t.Helper()
	c, err := chartrender.Load()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// render renders the chart with testdata/values/<name>.yaml and sets.
func render(t *testing.T, c *chart.Chart, name string, sets map[string]any) (*chartrender.Objects, error) {
	t.Helper()
	var files []string
	if name != "" {
		files = append(files, filepath.Join("testdata", "values", name+".yaml"))
	}
	vals, err := chartrender.Values(files, sets)
	if err != nil {
		t.Fatal(err)
	}
	return chartrender.Render(c, vals)
}

// valuesCases are the values files every invariant is checked on.
func valuesCases(t *testing.T) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join("testdata", "values"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, strings.TrimSuffix(e.Name(), ".yaml"))
	}
	if len(names) < 5 {
		t.Fatalf("want at least 5 values files (defaults, single, cluster, iam, mtls), got %v", names)
	}
	return names
}

// TestChartRenders: for each values file, the chart renders, every object
// decodes strictly into its Kubernetes type, the invariants hold and the
// output matches the golden file (`go test -run TestChartRenders -update`
// rewrites them).
func TestChartRenders(t *testing.T) {
	c := loadChart(t)
	for _, name := range valuesCases(t) {
		t.Run(name, func(t *testing.T) {
			objs, err := render(t, c, name, nil)
			if err != nil {
				t.Fatal(err)
			}
			checkInvariants(t, name, objs)
			golden := filepath.Join("testdata", "golden", name+".yaml")
			if *update {
				if err := os.WriteFile(golden, []byte(objs.Manifest), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -run TestChartRenders -update in deploy/)", err)
			}
			if string(want) != objs.Manifest {
				t.Fatalf("the rendered chart differs from %s (if the change is intended: go test -run TestChartRenders -update in deploy/):\n%s",
					golden, lineDiff(string(want), objs.Manifest))
			}
		})
	}
}

// lineDiff shows the first lines that differ.
func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := 0; i < len(w) || i < len(g); i++ {
		var a, b string
		if i < len(w) {
			a = w[i]
		}
		if i < len(g) {
			b = g[i]
		}
		if a != b {
			return fmt.Sprintf("line %d:\n  want: %s\n  got:  %s", i+1, a, b)
		}
	}
	return ""
}

// testPodIP is the pod IP the kubelet would give the downward API.
const testPodIP = "10.1.2.3"

// checkInvariants checks what must hold whatever the values.
func checkInvariants(t *testing.T, name string, o *chartrender.Objects) {
	t.Helper()
	for what, obj := range map[string]any{"Deployment": o.Deployment, "Service": o.Service, "ConfigMap": o.ConfigMap, "ServiceAccount": o.ServiceAccount} {
		if reflect.ValueOf(obj).IsNil() {
			t.Fatalf("no %s rendered", what)
		}
	}
	ctr, err := o.Container()
	if err != nil {
		t.Fatal(err)
	}
	pod := o.Deployment.Spec.Template.Spec

	// The configuration loads with pggovernor's own loader, with the
	// container's environment.
	dir := t.TempDir()
	file, err := o.ConfigFile(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(ctr.Args, []string{"run", "--config=/etc/pggovernor/config/pggovernor.yaml"}) {
		t.Fatalf("container args: %v", ctr.Args)
	}
	cfg, err := config.Load(config.Source{File: file, Environ: chartrender.Environ(ctr.Env, testPodIP, "secret-from-the-kubelet")})
	if err != nil {
		t.Fatalf("the rendered configuration does not load: %v\n%s", err, o.ConfigMap.Data["pggovernor.yaml"])
	}

	// No secret in the ConfigMap: no password in the URL, no key material,
	// and no value of the test's Secrets.
	cm := o.ConfigMap.Data["pggovernor.yaml"]
	if config.RedactURL(cfg.Upstream.URL) != cfg.Upstream.URL || cfg.Upstream.Password != "" {
		t.Fatalf("a password is in the ConfigMap: %s", config.RedactURL(cfg.Upstream.URL))
	}
	for _, bad := range []string{"PRIVATE KEY", "BEGIN CERTIFICATE", "SCRAM-SHA-256$", "password:"} {
		if strings.Contains(cm, bad) {
			t.Fatalf("the ConfigMap holds %q:\n%s", bad, cm)
		}
	}

	// Every file the configuration names is in a mounted Secret, under the
	// key the values name.
	mounts := map[string]string{} // mount path → volume
	for _, m := range ctr.VolumeMounts {
		mounts[m.MountPath] = m.Name
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = v
	}
	for key, path := range map[string]string{
		"upstream.password_file": cfg.Upstream.PasswordFile, "upstream.ssl.root_cert_file": cfg.Upstream.SSL.RootCertFile,
		"upstream.ssl.cert_file": cfg.Upstream.SSL.CertFile, "upstream.ssl.key_file": cfg.Upstream.SSL.KeyFile,
		"clients.users_file": cfg.Clients.UsersFile, "clients.tls.cert_file": cfg.Clients.TLS.CertFile,
		"clients.tls.key_file": cfg.Clients.TLS.KeyFile, "clients.tls.client_ca_file": cfg.Clients.TLS.ClientCAFile,
		"clients.hba_file": cfg.Clients.HBAFile, "budget.cluster.secret_file": cfg.Budget.Cluster.SecretFile,
		"budget.cluster.control_password_file": cfg.Budget.Cluster.ControlPasswordFile,
	} {
		if path == "" {
			continue
		}
		vol, ok := volumes[mounts[filepath.Dir(path)]]
		if !ok || vol.Secret == nil {
			t.Fatalf("%s is %s, which no mounted Secret provides", key, path)
		}
		if m := vol.Secret.DefaultMode; m == nil || *m&0o007 != 0 {
			t.Fatalf("%s: the Secret's files are readable by others (defaultMode %v)", key, m)
		}
	}

	// GOMEMLIMIT, where the chart sets it, is the Go runtime's syntax and
	// below the container's memory limit, so the runtime collects before
	// the kernel kills.
	for _, e := range ctr.Env {
		if e.Name != "GOMEMLIMIT" {
			continue
		}
		n, err := strconv.ParseInt(e.Value, 10, 64)
		if err != nil || n <= 0 {
			t.Fatalf("GOMEMLIMIT %q: want a positive number of bytes", e.Value)
		}
		limit, ok := ctr.Resources.Limits[corev1.ResourceMemory]
		if !ok || n >= limit.Value() {
			t.Fatalf("GOMEMLIMIT %d: want it below the container's memory limit (%v)", n, limit.String())
		}
	}

	// Ports and probes: what the binary serves where it listens.
	ports := map[string]int32{}
	for _, p := range ctr.Ports {
		ports[p.Name] = p.ContainerPort
	}
	if want := portOf(t, cfg.Listen); ports["postgres"] != want {
		t.Fatalf("container port postgres: want = %d (listen %s), got = %d", want, cfg.Listen, ports["postgres"])
	}
	if want := portOf(t, cfg.AdminListen); ports["metrics"] != want {
		t.Fatalf("container port metrics: want = %d (admin_listen %s), got = %d", want, cfg.AdminListen, ports["metrics"])
	}
	for _, p := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{{"readiness", ctr.ReadinessProbe, "/readyz"}, {"liveness", ctr.LivenessProbe, "/healthz"}, {"startup", ctr.StartupProbe, "/healthz"}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Fatalf("no %s probe", p.name)
		}
		if p.probe.HTTPGet.Path != p.path || p.probe.HTTPGet.Port.String() != "metrics" {
			t.Fatalf("%s probe: want = GET %s on port metrics, got = GET %s on %s", p.name, p.path, p.probe.HTTPGet.Path, p.probe.HTTPGet.Port.String())
		}
	}
	for _, sp := range o.Service.Spec.Ports {
		if _, ok := ports[sp.TargetPort.String()]; !ok {
			t.Fatalf("Service port %s targets %s, which the container does not have", sp.Name, sp.TargetPort.String())
		}
	}

	// Selectors match the pods.
	podLabels := o.Deployment.Spec.Template.Labels
	matches := func(sel map[string]string) bool {
		for k, v := range sel {
			if podLabels[k] != v {
				return false
			}
		}
		return len(sel) > 0
	}
	if !matches(o.Deployment.Spec.Selector.MatchLabels) || !matches(o.Service.Spec.Selector) {
		t.Fatalf("selectors do not match the pod labels %v", podLabels)
	}
	if o.PodDisruptionBudget != nil && !matches(o.PodDisruptionBudget.Spec.Selector.MatchLabels) {
		t.Fatal("the PodDisruptionBudget does not select the pods")
	}
	for _, tsc := range pod.TopologySpreadConstraints {
		if !matches(tsc.LabelSelector.MatchLabels) {
			t.Fatal("a topology spread constraint does not select the pods")
		}
	}

	// The drain fits in the grace period, after the preStop delay.
	grace := *pod.TerminationGracePeriodSeconds
	pre := int64(0)
	if ctr.Lifecycle != nil && ctr.Lifecycle.PreStop != nil && ctr.Lifecycle.PreStop.Sleep != nil {
		pre = ctr.Lifecycle.PreStop.Sleep.Seconds
	}
	if drain := int64(cfg.Timeouts.ShutdownDrain / time.Second); grace <= pre+drain {
		t.Fatalf("terminationGracePeriodSeconds %d <= preStop %ds + shutdown_drain %ds", grace, pre, drain)
	}

	// Non-root, read-only root filesystem.
	sc, psc := ctr.SecurityContext, pod.SecurityContext
	if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot ||
		psc.RunAsUser == nil || *psc.RunAsUser == 0 || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Fatal("the container must run as non-root with a read-only root filesystem and no privilege escalation")
	}

	// The cluster budget: on with more than one replica unless said
	// otherwise; each replica advertises its own address for cancels.
	replicas := *o.Deployment.Spec.Replicas
	if cfg.Budget.Cluster.Enabled != (replicas > 1) {
		t.Fatalf("%d replicas: want budget.cluster.enabled = %v, got = %v", replicas, replicas > 1, cfg.Budget.Cluster.Enabled)
	}
	if cfg.Budget.Cluster.Enabled && cfg.Budget.Cluster.AdvertiseAddress != net.JoinHostPort(testPodIP, strconv.Itoa(int(ports["postgres"]))) {
		t.Fatalf("budget.cluster.advertise_address: want = the pod's address, got = %q", cfg.Budget.Cluster.AdvertiseAddress)
	}

	if o.PrometheusRule != nil {
		checkPrometheusRule(t, o)
	}
	if o.NetworkPolicy != nil {
		np := o.NetworkPolicy.Spec
		if len(np.Ingress) == 0 || len(np.Egress) == 0 || !matches(np.PodSelector.MatchLabels) {
			t.Fatal("the NetworkPolicy must select the pods and have ingress (clients) and egress (Postgres) rules")
		}
		if p := int32(np.Egress[0].Ports[0].Port.IntValue()); p != portOf(t, hostPortOf(t, cfg.Upstream.URL)) {
			t.Fatalf("NetworkPolicy egress to Postgres on port %d, the upstream is on %s", p, hostPortOf(t, cfg.Upstream.URL))
		}
	}
	if name == "iam" {
		if cfg.Upstream.Connector != config.ConnectorAWSIAMRDS || cfg.Upstream.AWSRegion != "eu-west-3" ||
			o.ServiceAccount.Annotations["eks.amazonaws.com/role-arn"] == "" || !*pod.AutomountServiceAccountToken {
			t.Fatalf("iam: want = awsiamrds in eu-west-3 and the IRSA annotation, got = %s %s %v", cfg.Upstream.Connector, cfg.Upstream.AWSRegion, o.ServiceAccount.Annotations)
		}
	}
}

func portOf(t *testing.T, addr string) int32 {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatal(err)
	}
	return int32(n)
}

func hostPortOf(t *testing.T, rawURL string) string {
	t.Helper()
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	if u.Port() == "" {
		return u.Host + ":5432"
	}
	return u.Host
}

// checkPrometheusRule: the rendered rules are deploy/prometheus/alerts.yaml,
// and the chart's copy of it is the same file.
func checkPrometheusRule(t *testing.T, o *chartrender.Objects) {
	t.Helper()
	src, err := os.ReadFile(filepath.Join("prometheus", "alerts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	cp, err := os.ReadFile(filepath.Join(chartrender.ChartDir(), "files", "alerts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(src, cp) {
		t.Fatal("deploy/helm/pggovernor/files/alerts.yaml differs from deploy/prometheus/alerts.yaml: cp deploy/prometheus/alerts.yaml deploy/helm/pggovernor/files/alerts.yaml")
	}
	var want struct {
		Groups []struct {
			Name  string
			Rules []struct{ Alert, Expr string }
		}
	}
	if err := yaml.Unmarshal(src, &want); err != nil {
		t.Fatal(err)
	}
	got := o.PrometheusRule.Spec.Groups
	if len(got) != len(want.Groups) {
		t.Fatalf("PrometheusRule groups: want = %d, got = %d", len(want.Groups), len(got))
	}
	for i, g := range want.Groups {
		if got[i].Name != g.Name || len(got[i].Rules) != len(g.Rules) {
			t.Fatalf("PrometheusRule group %d: want = %s with %d rules, got = %s with %d", i, g.Name, len(g.Rules), got[i].Name, len(got[i].Rules))
		}
		for j, r := range g.Rules {
			if got[i].Rules[j].Alert != r.Alert || got[i].Rules[j].Expr.String() != r.Expr {
				t.Fatalf("PrometheusRule rule %s: not the one of alerts.yaml", r.Alert)
			}
		}
	}
}

// TestChartRefusesAtInstall: wrong values fail at `helm install` time,
// with a message naming the key: the schema for types, unknown keys and
// enums; the templates for what needs two keys at once.
func TestChartRefusesAtInstall(t *testing.T) {
	c := loadChart(t)
	for _, tc := range []struct {
		name string
		sets map[string]any
		want []string
	}{
		{"wrong type", map[string]any{"replicaCount": "two"}, []string{"replicaCount", "integer"}},
		{"unknown top-level key", map[string]any{"replicas": 3}, []string{"replicas"}},
		{"unknown config key", map[string]any{"config.upstream.hostname": "db"}, []string{"hostname"}},
		{"a password in the values", map[string]any{"config.upstream.password": "hunter2"}, []string{"password"}},
		{"enum", map[string]any{"config.pool_mode": "statement"}, []string{"pool_mode"}},
		{"duration", map[string]any{"config.timeouts.query_wait": "30 seconds"}, []string{"query_wait"}},
		{"bool as a string", map[string]any{"config.budget.cluster.enabled": "yes"}, []string{"enabled"}},
		{"password in the URL", map[string]any{"config.upstream.url": "postgres://coder:hunter2@db/coder"},
			[]string{"config.upstream.url has a password in it", "secrets.upstreamPassword.name"}},
		{"password= in a DSN", map[string]any{"config.upstream.url": "host=db user=coder password=hunter2"},
			[]string{"password=", "secrets.upstreamPassword.name"}},
		{"no upstream", map[string]any{"config.upstream.url": ""}, []string{"config.upstream.url is required"}},
		{"no users file", map[string]any{"secrets.clientUsers.name": ""}, []string{"secrets.clientUsers.name is required"}},
		{"grace period too short", map[string]any{"terminationGracePeriodSeconds": 30},
			[]string{"terminationGracePeriodSeconds 30 leaves no time for the drain", "shutdown_drain (30s)"}},
		{"half of mTLS", map[string]any{"secrets.upstreamTLS.name": "x", "secrets.upstreamTLS.certKey": "tls.crt"}, []string{"certKey and keyKey"}},
		{"network policy without Postgres", map[string]any{"networkPolicy.enabled": true}, []string{"networkPolicy.postgres is required"}},
		{"control password without its role", map[string]any{"secrets.controlPassword.name": "x"}, []string{"config.budget.cluster.control_user"}},
		{"hba file twice", map[string]any{"secrets.clientHBA.name": "x", "config.clients.hba_file": "/etc/hba"}, []string{"secrets.clientHBA.name or config.clients.hba_file"}},
		{"GOMEMLIMIT over the limit", map[string]any{"goMemLimitPercent": 120}, []string{"goMemLimitPercent"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := render(t, c, "defaults", tc.sets)
			if err == nil {
				t.Fatal("want an error, got none")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("want the error to name %q, got: %v", w, err)
				}
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("the error shows the password: %v", err)
			}
		})
	}
}

// TestChartLint runs Helm's linter (helm lint --strict) on the chart with
// each values file.
func TestChartLint(t *testing.T) {
	for _, name := range valuesCases(t) {
		vals, err := chartrender.Values([]string{filepath.Join("testdata", "values", name+".yaml")}, nil)
		if err != nil {
			t.Fatal(err)
		}
		linter := lint.AllWithKubeVersion(chartrender.ChartDir(), vals, chartrender.Release.Namespace, nil)
		for _, m := range linter.Messages {
			if m.Severity > support.InfoSev {
				t.Errorf("helm lint with %s: %s", name, m)
			}
		}
	}
}

// TestSchemaFollowsConfig: the config part of values.schema.json has every
// key of pggovernor's configuration with its type, accepted values and
// bounds (generated from the config package: -update rewrites it), and
// values.yaml sets each to the binary's default, but for the chart's own
// choices.
func TestSchemaFollowsConfig(t *testing.T) {
	schemaPath := filepath.Join(chartrender.ChartDir(), "values.schema.json")
	data, err := os.ReadFile(schemaPath)
	if err != nil {
		t.Fatal(err)
	}
	var schema map[string]any
	if err := yaml.Unmarshal(data, &schema); err != nil {
		t.Fatal(err)
	}
	want := configSchema(reflect.TypeOf(config.Config{}), "")
	props := schema["properties"].(map[string]any)
	if *update {
		props["config"] = want
		out, err := marshalSchema(schema)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(schemaPath, out, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	gotJSON, _ := yaml.Marshal(props["config"])
	wantJSON, _ := yaml.Marshal(want)
	if string(gotJSON) != string(wantJSON) {
		t.Fatalf("values.schema.json's config does not follow the config package (go test -run TestSchemaFollowsConfig -update in deploy/):\n%s",
			lineDiff(string(wantJSON), string(gotJSON)))
	}

	// values.yaml: every key, with the binary's defaults.
	vals, err := chartrender.Values([]string{filepath.Join(chartrender.ChartDir(), "values.yaml")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	chartChoices := map[string]string{
		"listen":                 "0.0.0.0:6432 (a Service forwards to it)",
		"admin_listen":           "0.0.0.0:9187 (the kubelet probes it)",
		"budget.cluster.enabled": "null: replicaCount > 1",
	}
	def := config.Default()
	root := reflect.ValueOf(def)
	seen := map[string]bool{}
	for _, k := range config.Keys() {
		if k == "upstream.password" {
			continue // a secret: secrets.upstreamPassword instead
		}
		seen[k] = true
		v, ok := lookup(vals["config"], k)
		if !ok {
			t.Errorf("values.yaml has no config.%s", k)
			continue
		}
		if _, chart := chartChoices[k]; chart {
			continue
		}
		if got, want := fmt.Sprint(normalize(v)), fmt.Sprint(fieldValue(root, k)); got != want {
			t.Errorf("values.yaml config.%s: want = %s (the binary's default), got = %s", k, want, got)
		}
	}
	var walk func(prefix string, v any)
	walk = func(prefix string, v any) {
		for k, sub := range v.(map[string]any) {
			p := strings.TrimPrefix(prefix+"."+k, ".")
			if m, ok := sub.(map[string]any); ok {
				walk(p, m)
				continue
			}
			if !seen[p] {
				t.Errorf("values.yaml config.%s is not a pggovernor key", p)
			}
		}
	}
	walk("", vals["config"])
}

var durationPattern = `^0$|^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$`

// configSchema is the JSON schema of a config struct type.
func configSchema(t reflect.Type, prefix string) map[string]any {
	props := map[string]any{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name := strings.Split(f.Tag.Get("yaml"), ",")[0]
		if name == "" || name == "-" || f.Tag.Get("secret") == "true" {
			continue
		}
		path := strings.TrimPrefix(prefix+"."+name, ".")
		var s map[string]any
		switch {
		case f.Type == reflect.TypeOf(time.Duration(0)):
			s = map[string]any{"type": "string", "pattern": durationPattern}
		case f.Type.Kind() == reflect.Struct:
			props[name] = configSchema(f.Type, path)
			continue
		case f.Type.Kind() == reflect.String:
			s = map[string]any{"type": "string"}
		case f.Type.Kind() == reflect.Bool:
			s = map[string]any{"type": "boolean"}
			if path == "budget.cluster.enabled" {
				s["type"] = []any{"boolean", "null"}
			}
		case f.Type.Kind() == reflect.Int:
			s = map[string]any{"type": "integer"}
			if m := f.Tag.Get("min"); m != "" {
				n, _ := strconv.Atoi(m)
				s["minimum"] = n
			}
		case f.Type.Kind() == reflect.Slice:
			s = map[string]any{"type": "array", "items": map[string]any{"type": "string"}}
		default:
			panic("config field of an unexpected type: " + path)
		}
		if e := f.Tag.Get("enum"); e != "" {
			var vals []any
			for _, v := range strings.Split(e, ",") {
				vals = append(vals, v)
			}
			s["enum"] = vals
		}
		s["description"] = "pggovernor's " + path + " (see values.yaml and README.md's configuration reference)."
		props[name] = s
	}
	return map[string]any{"type": "object", "additionalProperties": false, "properties": props}
}

// marshalSchema writes the schema as indented JSON with sorted keys.
func marshalSchema(s map[string]any) ([]byte, error) {
	js, err := yaml.YAMLToJSON(mustYAML(s))
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if err := jsonIndent(&buf, js); err != nil {
		return nil, err
	}
	buf.WriteByte('\n')
	return buf.Bytes(), nil
}

func mustYAML(v any) []byte {
	b, err := yaml.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// lookup finds a dotted path in nested maps.
func lookup(v any, path string) (any, bool) {
	for _, p := range strings.Split(path, ".") {
		m, ok := v.(map[string]any)
		if !ok {
			return nil, false
		}
		if v, ok = m[p]; !ok {
			return nil, false
		}
	}
	return v, true
}

// normalize makes a values.yaml scalar comparable with a config field
// printed by fmt: numbers as integers, durations parsed, lists of strings.
func normalize(v any) any {
	switch x := v.(type) {
	case float64:
		return int64(x)
	case int64:
		return x
	case string:
		if d, err := time.ParseDuration(x); err == nil && regexp.MustCompile(`[hms]$`).MatchString(x) {
			return d
		}
		return x
	case []any:
		var out []string
		for _, e := range x {
			out = append(out, fmt.Sprint(e))
		}
		return fmt.Sprint(out)
	}
	return v
}

// fieldValue is the value of the config field at a key path.
func fieldValue(root reflect.Value, path string) any {
	v := root
	for _, p := range strings.Split(path, ".") {
		t := v.Type()
		for i := 0; i < t.NumField(); i++ {
			if strings.Split(t.Field(i).Tag.Get("yaml"), ",")[0] == p {
				v = v.Field(i)
				break
			}
		}
	}
	switch v.Kind() {
	case reflect.Int:
		return v.Int()
	case reflect.Slice:
		var out []string
		for i := 0; i < v.Len(); i++ {
			out = append(out, v.Index(i).String())
		}
		return fmt.Sprint(out)
	}
	return v.Interface()
}

// TestDockerfileGoVersion: the Dockerfile builds with the Go release the
// product's go.mod names.
func TestDockerfileGoVersion(t *testing.T) {
	dockerfile, err := os.ReadFile(filepath.Join("docker", "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	gomod, err := os.ReadFile(filepath.Join("..", "go.mod"))
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
