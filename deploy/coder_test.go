package deploy

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/deploy/internal/chartrender"
)

// coderV2Values are the keys of Coder v2's chart (helm/coder/values.yaml)
// that the recipes use, with the Kubernetes types the chart passes them
// into the Deployment as (toYaml): a key the chart does not have, or a
// value that is not of the type, fails the strict decode.
type coderV2Values struct {
	Coder struct {
		ReplicaCount       int                        `json:"replicaCount"`
		Env                []corev1.EnvVar            `json:"env"`
		PodSecurityContext *corev1.PodSecurityContext `json:"podSecurityContext"`
		InitContainers     []corev1.Container         `json:"initContainers"`
		Volumes            []corev1.Volume            `json:"volumes"`
		VolumeMounts       []corev1.VolumeMount       `json:"volumeMounts"`
	} `json:"coder"`
	ExtraTemplates []json.RawMessage `json:"extraTemplates"`
}

// coderV1Values is the postgres: block of Coder v1's chart
// (coder/enterprise-helm values.yaml).
type coderV1Values struct {
	Postgres struct {
		Default struct {
			Enable *bool `json:"enable"`
		} `json:"default"`
		Host           string `json:"host"`
		Port           string `json:"port"`
		User           string `json:"user"`
		Database       string `json:"database"`
		SearchPath     string `json:"searchPath"`
		PasswordSecret string `json:"passwordSecret"`
		NoPasswordEnv  bool   `json:"noPasswordEnv"`
		SSLMode        string `json:"sslMode"`
		SSL            struct {
			CertSecret     struct{ Name, Key string } `json:"certSecret"`
			KeySecret      struct{ Name, Key string } `json:"keySecret"`
			RootCertSecret struct{ Name, Key string } `json:"rootCertSecret"`
		} `json:"ssl"`
		Connector string `json:"connector"`
	} `json:"postgres"`
}

func readStrict(t *testing.T, path string, v any) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := chartrender.DecodeYAMLStrict(data, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func envValue(env []string, name string) string {
	for _, kv := range env {
		if k, v, _ := strings.Cut(kv, "="); k == name {
			return v
		}
	}
	return ""
}

// upstreamHostPort is the host:port a libpq URL names.
func upstreamHostPort(t *testing.T, raw string) string {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	if u.Port() == "" {
		return net.JoinHostPort(u.Hostname(), "5432")
	}
	return u.Host
}

// TestCoderV2Sidecar validates coder-v2-sidecar.values.yaml against the
// shapes Coder's chart turns it into: pggovernor a native sidecar, its
// volumes in the pod, its configuration loading with pggovernor's loader,
// coderd pointed at it, both scraped; and the trap shut: the governor's
// upstream is not coderd's CODER_PG_CONNECTION_URL, and a governor that
// got only coderd's environment refuses to start, saying why.
func TestCoderV2Sidecar(t *testing.T) {
	var v coderV2Values
	readStrict(t, filepath.Join("coder", "coder-v2-sidecar.values.yaml"), &v)
	if len(v.Coder.InitContainers) != 1 || v.Coder.InitContainers[0].Name != "pggovernor" {
		t.Fatalf("want one init container named pggovernor, got %d", len(v.Coder.InitContainers))
	}
	sc := v.Coder.InitContainers[0]
	if sc.RestartPolicy == nil || *sc.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Fatal("the pggovernor init container must have restartPolicy: Always (a native sidecar, started before coderd and stopped after it)")
	}
	if sc.StartupProbe == nil || sc.StartupProbe.HTTPGet == nil || sc.StartupProbe.HTTPGet.Path != "/healthz" {
		t.Fatal("the sidecar needs a startup probe on /healthz: coderd starts once it passes")
	}
	if sc.ReadinessProbe == nil || sc.ReadinessProbe.HTTPGet.Path != "/readyz" || sc.LivenessProbe == nil || sc.LivenessProbe.HTTPGet.Path != "/healthz" {
		t.Fatal("the sidecar's readiness probe is GET /readyz and its liveness probe GET /healthz")
	}
	if s := sc.SecurityContext; s == nil || s.ReadOnlyRootFilesystem == nil || !*s.ReadOnlyRootFilesystem || s.RunAsNonRoot == nil || !*s.RunAsNonRoot {
		t.Fatal("the sidecar runs as non-root with a read-only root filesystem")
	}
	volumes := map[string]corev1.Volume{}
	for _, vol := range v.Coder.Volumes {
		volumes[vol.Name] = vol
	}
	mounts := map[string]string{}
	for _, m := range sc.VolumeMounts {
		if _, ok := volumes[m.Name]; !ok {
			t.Fatalf("the sidecar mounts %s, which coder.volumes does not define", m.Name)
		}
		mounts[m.MountPath] = m.Name
	}

	// The sidecar's configuration: the ConfigMap's file, with its own
	// environment and with coderd's on top (as if it had inherited it).
	var cfgFile string
	for _, a := range sc.Args {
		if f, ok := strings.CutPrefix(a, "--config="); ok {
			cfgFile = f
		}
	}
	if vol := volumes[mounts[filepath.Dir(cfgFile)]]; vol.ConfigMap == nil {
		t.Fatalf("--config=%s is not in a mounted ConfigMap", cfgFile)
	}
	local := filepath.Join("coder", "pggovernor-sidecar.yaml")
	coderEnv := chartrender.Environ(v.Coder.Env, "10.1.2.3", "client-secret")
	sidecarEnv := chartrender.Environ(sc.Env, "10.1.2.3", "")
	for name, environ := range map[string][]string{"its own": sidecarEnv, "coderd's inherited": append(append([]string(nil), coderEnv...), sidecarEnv...)} {
		cfg, err := config.Load(config.Source{File: local, Environ: environ})
		if err != nil {
			t.Fatalf("deploy/coder/pggovernor-sidecar.yaml with %s environment: %v", name, err)
		}
		if upstreamHostPort(t, cfg.Upstream.URL) == cfg.Listen || config.IsLoopback(upstreamHostPort(t, cfg.Upstream.URL)) {
			t.Fatalf("with %s environment the sidecar's upstream is %s, its own listen address", name, config.RedactURL(cfg.Upstream.URL))
		}
		if !config.IsLoopback(cfg.Listen) || !cfg.Budget.Cluster.Enabled {
			t.Fatalf("the sidecar listens on loopback and shares the budget: got listen %s, cluster %v", cfg.Listen, cfg.Budget.Cluster.Enabled)
		}
		for key, path := range map[string]string{"upstream.password_file": cfg.Upstream.PasswordFile,
			"upstream.ssl.root_cert_file": cfg.Upstream.SSL.RootCertFile, "clients.users_file": cfg.Clients.UsersFile} {
			if vol := volumes[mounts[filepath.Dir(path)]]; vol.Secret == nil {
				t.Fatalf("%s is %s, which no mounted Secret provides", key, path)
			}
		}
		if cfg.Timeouts.ShutdownDrain > 30*time.Second {
			t.Fatalf("shutdown_drain %s: Coder's chart gives the pod 60 s, coderd stops first", cfg.Timeouts.ShutdownDrain)
		}
		ports := map[string]int32{}
		for _, p := range sc.Ports {
			ports[p.Name] = p.ContainerPort
		}
		if ports[sc.ReadinessProbe.HTTPGet.Port.String()] != portOf(t, cfg.AdminListen) || config.IsLoopback(cfg.AdminListen) {
			t.Fatalf("the probes' port %s is not admin_listen %s on the pod's address", sc.ReadinessProbe.HTTPGet.Port.String(), cfg.AdminListen)
		}

		// coderd's URL is the governor's listen address.
		if got := upstreamHostPort(t, envValue(coderEnv, "CODER_PG_CONNECTION_URL")); got != cfg.Listen {
			t.Fatalf("coderd's CODER_PG_CONNECTION_URL points at %s, the governor listens on %s", got, cfg.Listen)
		}
	}
	if strings.Contains(envValue(coderEnv, "CODER_PG_CONNECTION_URL"), "$(") {
		t.Fatal("CODER_PG_CONNECTION_URL refers to a variable not defined before it")
	}

	// The trap: a governor that gets only coderd's environment (no
	// configuration of its own) refuses to start, saying why.
	bin := governorBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "run", "--listen=127.0.0.1:6432", "--admin-listen=", "--budget.max=2", "--clients.auth=trust")
	cmd.Env = coderEnv
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || !strings.Contains(string(out), "a sidecar that inherits coderd's CODER_PG_CONNECTION_URL would connect to itself") {
		t.Fatalf("pggovernor with coderd's environment only: want a refusal naming the trap, got %v:\n%s", err, out)
	}

	// Both scraped: coderd's prometheus-http port (CODER_PROMETHEUS_ENABLE)
	// and the governor's metrics port.
	if envValue(coderEnv, "CODER_PROMETHEUS_ENABLE") != "true" {
		t.Fatal("CODER_PROMETHEUS_ENABLE must be true for coderd's metrics port (prometheus-http)")
	}
	if len(v.ExtraTemplates) != 1 {
		t.Fatalf("want one extra template (the PodMonitor), got %d", len(v.ExtraTemplates))
	}
	var pm monitoringv1.PodMonitor
	if err := chartrender.DecodeStrict(v.ExtraTemplates[0], &pm); err != nil {
		t.Fatal(err)
	}
	scraped := map[string]bool{}
	for _, ep := range pm.Spec.PodMetricsEndpoints {
		if ep.Port != nil {
			scraped[*ep.Port] = true
		}
	}
	if !scraped["prometheus-http"] || !scraped[sc.ReadinessProbe.HTTPGet.Port.String()] || pm.Spec.Selector.MatchLabels["app.kubernetes.io/name"] != "coder" {
		t.Fatalf("the PodMonitor must scrape prometheus-http (coderd) and %s (pggovernor) of Coder's pods: %v", sc.ReadinessProbe.HTTPGet.Port.String(), scraped)
	}
}

// standaloneService renders the standalone chart with
// pggovernor-standalone.values.yaml and returns the Service's in-cluster
// address and the configuration.
func standaloneService(t *testing.T) (string, config.Config) {
	t.Helper()
	vals, err := chartrender.Values([]string{filepath.Join("coder", "pggovernor-standalone.values.yaml")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := chartrender.Render(loadChart(t), vals)
	if err != nil {
		t.Fatal(err)
	}
	checkInvariants(t, "coder-standalone", objs)
	file, err := objs.ConfigFile(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctr, _ := objs.Container()
	cfg, err := config.Load(config.Source{File: file, Environ: chartrender.Environ(ctr.Env, testPodIP, "")})
	if err != nil {
		t.Fatal(err)
	}
	svc := objs.Service
	var port int32
	for _, p := range svc.Spec.Ports {
		if p.Name == "postgres" {
			port = p.Port
		}
	}
	return net.JoinHostPort(svc.Name+"."+svc.Namespace+".svc.cluster.local", strconv.Itoa(int(port))), cfg
}

// TestCoderV2Standalone: Coder v2 pointed at the standalone chart's
// Service, with TLS since the chart's clients.tls is on.
func TestCoderV2Standalone(t *testing.T) {
	addr, cfg := standaloneService(t)
	var v coderV2Values
	readStrict(t, filepath.Join("coder", "coder-v2-standalone.values.yaml"), &v)
	env := chartrender.Environ(v.Coder.Env, "10.1.2.3", "client-secret")
	raw := envValue(env, "CODER_PG_CONNECTION_URL")
	if got := upstreamHostPort(t, raw); got != addr {
		t.Fatalf("CODER_PG_CONNECTION_URL points at %s, the chart's Service is %s", got, addr)
	}
	if mode := config.URLParam(raw, "sslmode"); cfg.Clients.TLS.Mode == "disable" || (mode != "require" && mode != "verify-ca" && mode != "verify-full") {
		t.Fatalf("coderd's sslmode %q with the governor's clients.tls.mode %s", mode, cfg.Clients.TLS.Mode)
	}
	if len(v.Coder.InitContainers) != 0 {
		t.Fatal("the standalone recipe has no sidecar")
	}
}

// TestCoderV1: Coder v1's postgres: block pointed at the standalone
// chart's Service.
func TestCoderV1(t *testing.T) {
	addr, cfg := standaloneService(t)
	var v coderV1Values
	readStrict(t, filepath.Join("coder", "coder-v1.values.yaml"), &v)
	pg := v.Postgres
	if got := net.JoinHostPort(pg.Host, pg.Port); got != addr {
		t.Fatalf("postgres.host:port is %s, the chart's Service is %s", got, addr)
	}
	if pg.Default.Enable == nil || *pg.Default.Enable || pg.PasswordSecret == "" || !pg.NoPasswordEnv || pg.Connector != "postgres" {
		t.Fatalf("postgres: want default.enable false, a passwordSecret mounted as a file (noPasswordEnv), connector postgres; got %+v", pg)
	}
	if cfg.Clients.TLS.Mode == "disable" || pg.SSLMode != "require" || pg.SSL.RootCertSecret.Name == "" {
		t.Fatalf("postgres.sslMode %s, ssl.rootCertSecret %q with the governor's clients.tls.mode %s", pg.SSLMode, pg.SSL.RootCertSecret.Name, cfg.Clients.TLS.Mode)
	}
	// The environment Coder v1's chart makes of the block
	// (templates/_common.tpl) is one pggovernor also reads, DB_CONNECTOR=postgres included.
	env := []string{"DB_HOST=" + pg.Host, "DB_PORT=" + pg.Port, "DB_USER=" + pg.User, "DB_NAME=" + pg.Database,
		"DB_PASSWORD_PATH=/run/secrets/" + pg.PasswordSecret + "/password", "DB_CONNECTOR=" + pg.Connector, "DB_SSL_MODE=" + pg.SSLMode,
		"DB_ROOT_CERT=/etc/ssl/certs/pg/rootcert/" + pg.SSL.RootCertSecret.Key}
	if _, err := config.Load(config.Source{Environ: append(env, "PGGOVERNOR_CLIENTS_AUTH=trust")}); err != nil {
		t.Fatalf("Coder v1's environment of this block: %v", err)
	}
}
