package config_test

import (
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"gopkg.in/yaml.v3"

	"github.com/pggovernor/pggovernor/config"
)

// usersFile is a clients.users_file value; Validate does not open it.
const usersFile = "/etc/pggovernor/userlist.txt"

// usersEnv satisfies the default clients.auth (scram-sha-256), which needs
// clients.users_file.
const usersEnv = "PGGOVERNOR_CLIENTS_USERS_FILE=" + usersFile

// fixture returns the path of a file in testdata.
func fixture(name string) string {
	return filepath.Join("testdata", name)
}

// writeYAML writes an inline YAML document to a temporary file.
func writeYAML(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pggovernor.yaml")
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// newFlags registers every flag on a fresh FlagSet and parses args, as
// `pggovernor run` does.
func newFlags(t *testing.T, args ...string) *config.Flags {
	t.Helper()
	fs := flag.NewFlagSet("pggovernor", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fl := config.RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatalf("parsing flags %q: want = no error, got = %v", args, err)
	}
	return fl
}

// load runs Load with a file (may be empty), an environment and flag
// arguments.
func load(t *testing.T, file string, environ []string, args ...string) (config.Config, error) {
	t.Helper()
	return config.Load(config.Source{File: file, Environ: environ, Flags: newFlags(t, args...)})
}

// mustLoad is load that fails the test on an error.
func mustLoad(t *testing.T, file string, environ []string, args ...string) config.Config {
	t.Helper()
	cfg, err := load(t, file, environ, args...)
	if err != nil {
		t.Fatalf("Load(file=%q, env=%q, args=%q): want = no error, got = %v", file, environ, args, err)
	}
	return cfg
}

// checkErr asserts that err is nil when want is empty, and otherwise that it
// contains every string of want.
func checkErr(t *testing.T, err error, want []string) {
	t.Helper()
	if len(want) == 0 {
		if err != nil {
			t.Fatalf("error: want = nil, got = %v", err)
		}
		return
	}
	if err == nil {
		t.Fatalf("error: want = an error containing %q, got = nil", want)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error: want = containing %q, got = %v", w, err)
		}
	}
}

// withUsers returns Default() with clients.users_file set, the smallest
// configuration that validates.
func withUsers() config.Config {
	c := config.Default()
	c.Clients.UsersFile = usersFile
	return c
}

func TestLoadDefaults(t *testing.T) {
	t.Run("nothing set fails on users_file", func(t *testing.T) {
		_, err := config.Load(config.Source{})
		checkErr(t, err, []string{"clients.users_file", "scram-sha-256"})
	})
	t.Run("Default fails Validate only on users_file", func(t *testing.T) {
		c := config.Default()
		err := c.Validate()
		checkErr(t, err, []string{"key clients.users_file: required when clients.auth is scram-sha-256"})
		if n := strings.Count(err.Error(), "\n") + 1; n != 1 {
			t.Errorf("number of problems: want = 1, got = %d (%v)", n, err)
		}
	})
	t.Run("Default with users_file validates", func(t *testing.T) {
		c := withUsers()
		if err := c.Validate(); err != nil {
			t.Errorf("Validate: want = nil, got = %v", err)
		}
	})
	for _, tc := range []struct {
		name string
		src  config.Source
	}{
		{name: "users_file from env", src: config.Source{Environ: []string{usersEnv}}},
		{name: "users_file from file", src: config.Source{File: fixture("users_file.yaml")}},
		{name: "users_file from flag", src: config.Source{Flags: newFlags(t, "--clients.users-file="+usersFile)}},
		{name: "comment-only file", src: config.Source{File: fixture("empty.yaml"), Environ: []string{usersEnv}}},
		{name: "empty file", src: config.Source{File: writeYAML(t, ""), Environ: []string{usersEnv}}},
		{name: "null groups", src: config.Source{File: fixture("null_groups.yaml")}},
		{name: "nil flags and unrelated env", src: config.Source{Environ: []string{usersEnv, "HOME=/root", "PATH=/bin", "NOEQUALS", "PGHOST=ignored"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := config.Load(tc.src)
			if err != nil {
				t.Fatalf("Load: want = no error, got = %v", err)
			}
			if diff := cmp.Diff(withUsers(), got, ignoreEnv); diff != "" {
				t.Errorf("Load: want = Default() with clients.users_file, got = diff (-want +got):\n%s", diff)
			}
		})
	}
}

func TestDefaultValues(t *testing.T) {
	d := config.Default()
	for _, tc := range []struct {
		key       string
		got, want any
	}{
		{"listen", d.Listen, "127.0.0.1:6432"},
		{"admin_listen", d.AdminListen, "127.0.0.1:9187"},
		{"pool_mode", d.PoolMode, config.PoolModeTransaction},
		{"upstream.connector", d.Upstream.Connector, config.ConnectorPassword},
		{"upstream.url", d.Upstream.URL, ""},
		{"budget.refresh_interval", d.Budget.RefreshInterval, time.Minute},
		{"budget.cluster.namespace", d.Budget.Cluster.Namespace, 0x70676776},
		{"budget.cluster.table", d.Budget.Cluster.Table, "pggovernor_members"},
		{"budget.cluster.heartbeat_interval", d.Budget.Cluster.HeartbeatInterval, time.Second},
		{"budget.cluster.member_timeout", d.Budget.Cluster.MemberTimeout, 10 * time.Second},
		{"pool.max_prepared_statements", d.Pool.MaxPreparedStatements, 200},
		{"pool.session_state_check", d.Pool.SessionStateCheck, "auto"},
		{"clients.max_connections", d.Clients.MaxConnections, 10000},
		{"clients.auth", d.Clients.Auth, config.AuthSCRAM},
		{"clients.max_message_size", d.Clients.MaxMessageSize, 1 << 30},
		{"clients.notify_backlog_size", d.Clients.NotifyBacklogSize, 1 << 20},
		{"limits.max_buffered_bytes", d.Limits.MaxBufferedBytes, 64 << 20},
		{"pool.max_client_statements", d.Pool.MaxClientStatements, 1000},
		{"clients.tls.mode", d.Clients.TLS.Mode, "disable"},
		{"timeouts.query_wait", d.Timeouts.QueryWait, 30 * time.Second},
		{"timeouts.server_lifetime", d.Timeouts.ServerLifetime, time.Hour},
		{"log.level", d.Log.Level, "info"},
		{"log.format", d.Log.Format, "json"},
	} {
		if tc.got != tc.want {
			t.Errorf("Default() %s: want = %v, got = %v", tc.key, tc.want, tc.got)
		}
	}
}

// fullWant is what testdata/full.yaml says.
func fullWant() config.Config {
	return config.Config{
		Listen:         "0.0.0.0:7432",
		UnixSocketDir:  "/var/run/pggovernor",
		UnixSocketMode: "0700",
		AdminListen:    "0.0.0.0:9188",
		PoolMode:       config.PoolModeSession,
		Upstream: config.Upstream{
			URL:          "postgres://coder@db.internal:5433/coder?sslmode=verify-full",
			PasswordFile: "/run/secrets/pg-password",
			Connector:    config.ConnectorAWSIAMRDS,
			AWSRegion:    "eu-west-1",
			SSL: config.UpstreamSSL{
				Mode:                "verify-full",
				RootCertFile:        "/etc/ssl/rds-ca.pem",
				CertFile:            "/etc/ssl/client.crt",
				KeyFile:             "/etc/ssl/client.key",
				ServerName:          "db.example.com",
				AllowVerifyCAForIAM: true,
			},
		},
		Budget: config.Budget{
			Reserve:         3,
			RefreshInterval: 2 * time.Minute,
			Cluster: config.Cluster{Enabled: true, Namespace: 42, CountForeign: true, Table: "fleet.members",
				HeartbeatInterval: 500 * time.Millisecond, MemberTimeout: 5 * time.Second, AdvertiseAddress: "10.0.0.7:7432",
				PeerCIDRs: []string{"10.0.0.0/8", "fd00::/8"}, SecretFile: "/run/secrets/pggovernor-cluster",
				ControlUser: "pggovernor_control", ControlPasswordFile: "/run/secrets/pggovernor-control-password"},
		},
		Pool:   config.Pool{MaxPreparedStatements: 50, SessionStateCheck: config.SessionStateCheckAlways, RouteIdleTimeout: 5 * time.Minute, MaxClientStatements: 100},
		Limits: config.Limits{MaxBufferedBytes: 32 << 20},
		Clients: config.Clients{
			MaxConnections:     500,
			MaxPendingLogins:   64,
			PasswordEncryption: "md5",
			Auth:               config.AuthCert,
			HBAFile:            "/etc/pggovernor/pg_hba.conf",
			UsersFile:          usersFile,
			AllowTrustRemote:   true,
			MaxMessageSize:     1 << 20,
			NotifyBacklogSize:  256 << 10,
			TLS: config.ClientTLS{
				Mode:         "verify-client",
				CertFile:     "/etc/pggovernor/server.crt",
				KeyFile:      "/etc/pggovernor/server.key",
				ClientCAFile: "/etc/pggovernor/clients-ca.pem",
			},
		},
		Timeouts: config.Timeouts{
			QueryWait:         5 * time.Second,
			ClientLogin:       3 * time.Second,
			ServerConnect:     2 * time.Second,
			ServerIdle:        5 * time.Minute,
			ServerLifetime:    30 * time.Minute,
			ServerCheckDelay:  time.Second,
			ShutdownDrain:     time.Minute,
			ClientWrite:       45 * time.Second,
			IdleInTransaction: 2 * time.Minute,
			Query:             90 * time.Second,
			ServerUnreachable: 20 * time.Second,
		},
		Log:   config.Log{Level: "debug", Format: "console", RepeatInterval: time.Minute},
		Admin: config.Admin{Users: []string{"ops", "exporter"}, Pprof: true, ProbeInterval: 250 * time.Millisecond},
	}
}

// fullSettings flattens testdata/full.yaml to key path → value.
func fullSettings(t *testing.T) map[string]string {
	t.Helper()
	data, err := os.ReadFile(fixture("full.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	var walk func(m map[string]any, prefix string)
	walk = func(m map[string]any, prefix string) {
		for k, v := range m {
			if prefix != "" {
				k = prefix + "." + k
			}
			if sub, ok := v.(map[string]any); ok {
				walk(sub, k)
				continue
			}
			if list, ok := v.([]any); ok {
				items := make([]string, len(list))
				for i, item := range list {
					items[i] = fmt.Sprint(item)
				}
				out[k] = strings.Join(items, ",")
				continue
			}
			out[k] = fmt.Sprint(v)
		}
	}
	walk(doc, "")
	return out
}

func TestFullFileCoversEveryKey(t *testing.T) {
	var inFile []string
	for k := range fullSettings(t) {
		inFile = append(inFile, k)
	}
	sort.Strings(inFile)
	keys := config.Keys()
	sort.Strings(keys)
	if diff := cmp.Diff(keys, inFile); diff != "" {
		t.Errorf("keys in testdata/full.yaml: want = config.Keys(), got = diff (-want +got):\n%s", diff)
	}
}

// TestEverySourceSetsEveryKey loads testdata/full.yaml, then the same
// settings as PGGOVERNOR_* variables, then as flags, and expects the same
// Config each time.
func TestEverySourceSetsEveryKey(t *testing.T) {
	settings := fullSettings(t)
	var environ, args []string
	for k, v := range settings {
		environ = append(environ, config.EnvName(k)+"="+v)
		args = append(args, "--"+config.FlagName(k)+"="+v)
	}
	sort.Strings(environ)
	sort.Strings(args)
	for _, tc := range []struct {
		name    string
		file    string
		environ []string
		args    []string
	}{
		{name: "file", file: fixture("full.yaml")},
		{name: "env", environ: environ},
		{name: "flags", args: args},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := mustLoad(t, tc.file, tc.environ, tc.args...)
			if diff := cmp.Diff(fullWant(), got, ignoreEnv); diff != "" {
				t.Errorf("Load: want = testdata/full.yaml's settings, got = diff (-want +got):\n%s", diff)
			}
		})
	}
}

func TestPrecedence(t *testing.T) {
	type level int
	const (
		lDefault level = iota
		lFile
		lEnv
		lFlag
	)
	levelName := []string{"default", "file", "env", "flag"}
	// Each key has a value per level; testdata/precedence.yaml holds the
	// file values.
	keys := []struct {
		path   string
		values [4]string // default, file, env, flag
		get    func(config.Config) string
	}{
		{"listen", [4]string{"127.0.0.1:6432", "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"},
			func(c config.Config) string { return c.Listen }},
		{"pool_mode", [4]string{"transaction", "session", "transaction", "session"},
			func(c config.Config) string { return c.PoolMode }},
		{"upstream.url", [4]string{"", "postgres://file@file-host/db", "postgres://env@env-host/db", "postgres://flag@flag-host/db"},
			func(c config.Config) string { return c.Upstream.URL }},
		{"upstream.password_file", [4]string{"", "/file/password", "/env/password", "/flag/password"},
			func(c config.Config) string { return c.Upstream.PasswordFile }},
		{"budget.cluster.enabled", [4]string{"false", "true", "false", "true"},
			func(c config.Config) string { return fmt.Sprint(c.Budget.Cluster.Enabled) }},
		{"clients.max_connections", [4]string{"10000", "100", "200", "300"},
			func(c config.Config) string { return fmt.Sprint(c.Clients.MaxConnections) }},
		{"timeouts.query_wait", [4]string{"30s", "1s", "2s", "3s"},
			func(c config.Config) string { return c.Timeouts.QueryWait.String() }},
	}
	envLevel := []string{
		"PGGOVERNOR_LISTEN=127.0.0.1:7002",
		"PGGOVERNOR_POOL_MODE=transaction",
		"PGGOVERNOR_UPSTREAM_URL=postgres://env@env-host/db",
		"PGGOVERNOR_UPSTREAM_PASSWORD_FILE=/env/password",
		"PGGOVERNOR_BUDGET_CLUSTER_ENABLED=false",
		"PGGOVERNOR_CLIENTS_MAX_CONNECTIONS=200",
		"PGGOVERNOR_TIMEOUTS_QUERY_WAIT=2s",
	}
	flagLevel := []string{
		"--listen=127.0.0.1:7003",
		"--pool-mode", "session",
		"--upstream-url=postgres://flag@flag-host/db", // the short alias
		"--upstream.password-file=/flag/password",
		"--budget.cluster.enabled", // a bool flag without a value
		"--clients.max-connections=300",
		"--timeouts.query-wait=3s",
	}
	for _, tc := range []struct {
		file, env, flags bool
		want             level
	}{
		{false, false, false, lDefault},
		{true, false, false, lFile},
		{false, true, false, lEnv},
		{false, false, true, lFlag},
		{true, true, false, lEnv},
		{true, false, true, lFlag},
		{false, true, true, lFlag},
		{true, true, true, lFlag},
	} {
		name := fmt.Sprintf("file=%v,env=%v,flags=%v", tc.file, tc.env, tc.flags)
		t.Run(name, func(t *testing.T) {
			var file string
			environ := []string{usersEnv}
			var args []string
			if tc.file {
				file = fixture("precedence.yaml")
			}
			if tc.env {
				environ = append(environ, envLevel...)
			}
			if tc.flags {
				args = flagLevel
			}
			cfg := mustLoad(t, file, environ, args...)
			for _, k := range keys {
				if got, want := k.get(cfg), k.values[tc.want]; got != want {
					t.Errorf("%s (from %s): want = %v, got = %v", k.path, levelName[tc.want], want, got)
				}
			}
		})
	}
}

func TestFlags(t *testing.T) {
	for _, tc := range []struct {
		name    string
		environ []string
		args    []string
		get     func(config.Config) any
		want    any
	}{
		{
			name: "alias --upstream-url",
			args: []string{"--timeouts.query-wait=5s", "--upstream-url=postgres://u@h/db"},
			get:  func(c config.Config) any { return c.Upstream.URL },
			want: "postgres://u@h/db",
		},
		{
			name: "long flag and alias: the last one wins (alias last)",
			args: []string{"--upstream.url=postgres://long@h/db", "--upstream-url=postgres://alias@h/db"},
			get:  func(c config.Config) any { return c.Upstream.URL },
			want: "postgres://alias@h/db",
		},
		{
			name: "long flag and alias: the last one wins (long last)",
			args: []string{"--upstream-url=postgres://alias@h/db", "--upstream.url=postgres://long@h/db"},
			get:  func(c config.Config) any { return c.Upstream.URL },
			want: "postgres://long@h/db",
		},
		{
			name: "duration flag",
			args: []string{"--timeouts.query-wait=5s", "--upstream-url=postgres://u@h/db"},
			get:  func(c config.Config) any { return c.Timeouts.QueryWait },
			want: 5 * time.Second,
		},
		{
			name: "single-dash flag",
			args: []string{"-timeouts.query-wait", "250ms"},
			get:  func(c config.Config) any { return c.Timeouts.QueryWait },
			want: 250 * time.Millisecond,
		},
		{
			name: "bool flag without value",
			args: []string{"--budget.cluster.enabled"},
			get:  func(c config.Config) any { return c.Budget.Cluster.Enabled },
			want: true,
		},
		{
			name:    "bool flag =false beats env true",
			environ: []string{"PGGOVERNOR_BUDGET_CLUSTER_ENABLED=true"},
			args:    []string{"--budget.cluster.enabled=false"},
			get:     func(c config.Config) any { return c.Budget.Cluster.Enabled },
			want:    false,
		},
		{
			name: "repeated flag: the last one wins",
			args: []string{"--listen=127.0.0.1:1", "--listen=127.0.0.1:2"},
			get:  func(c config.Config) any { return c.Listen },
			want: "127.0.0.1:2",
		},
		{
			name: "int flag",
			args: []string{"--budget.cluster.namespace=-7"},
			get:  func(c config.Config) any { return c.Budget.Cluster.Namespace },
			want: -7,
		},
		{
			name: "empty string flag clears admin_listen",
			args: []string{"--admin-listen="},
			get:  func(c config.Config) any { return c.AdminListen },
			want: "",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := mustLoad(t, "", append([]string{usersEnv}, tc.environ...), tc.args...)
			if got := tc.get(cfg); got != tc.want {
				t.Errorf("want = %v, got = %v", tc.want, got)
			}
		})
	}

	t.Run("unknown flag is refused by the FlagSet", func(t *testing.T) {
		fs := flag.NewFlagSet("pggovernor", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		config.RegisterFlags(fs)
		err := fs.Parse([]string{"--listen-addr=0.0.0.0:6432"})
		checkErr(t, err, []string{"listen-addr"})
	})
	t.Run("bad flag value is reported by Load with the flag name", func(t *testing.T) {
		_, err := load(t, "", []string{usersEnv}, "--timeouts.query-wait=soon")
		checkErr(t, err, []string{"flag --timeouts.query-wait", "key timeouts.query_wait", `"soon" is not a duration`})
	})
	t.Run("bad bool flag value", func(t *testing.T) {
		_, err := load(t, "", []string{usersEnv}, "--budget.cluster.enabled=maybe")
		checkErr(t, err, []string{"flag --budget.cluster.enabled", `"maybe" is not true or false`})
	})
}

func TestConfigFileSelection(t *testing.T) {
	a := writeYAML(t, "listen: 127.0.0.1:1001\nclients:\n  users_file: /a\n")
	b := writeYAML(t, "listen: 127.0.0.1:1002\nclients:\n  users_file: /b\n")
	c := writeYAML(t, "listen: 127.0.0.1:1003\nclients:\n  users_file: /c\n")
	for _, tc := range []struct {
		name    string
		src     func() config.Source
		want    string
		wantErr []string
	}{
		{
			name: "PGGOVERNOR_CONFIG",
			src:  func() config.Source { return config.Source{Environ: []string{"PGGOVERNOR_CONFIG=" + a}} },
			want: "127.0.0.1:1001",
		},
		{
			name: "--config beats PGGOVERNOR_CONFIG",
			src: func() config.Source {
				return config.Source{Environ: []string{"PGGOVERNOR_CONFIG=" + a}, Flags: newFlags(t, "--config="+b)}
			},
			want: "127.0.0.1:1002",
		},
		{
			name: "Source.File beats --config and PGGOVERNOR_CONFIG",
			src: func() config.Source {
				return config.Source{File: c, Environ: []string{"PGGOVERNOR_CONFIG=" + a}, Flags: newFlags(t, "--config="+b)}
			},
			want: "127.0.0.1:1003",
		},
		{
			name: "missing file",
			src: func() config.Source {
				return config.Source{File: filepath.Join(t.TempDir(), "nope.yaml"), Environ: []string{usersEnv}}
			},
			wantErr: []string{"reading config file", "nope.yaml"},
		},
		{
			name: "missing file from PGGOVERNOR_CONFIG",
			src: func() config.Source {
				return config.Source{Environ: []string{usersEnv, "PGGOVERNOR_CONFIG=/nonexistent/pggovernor.yaml"}}
			},
			wantErr: []string{"reading config file", "/nonexistent/pggovernor.yaml"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := config.Load(tc.src())
			checkErr(t, err, tc.wantErr)
			if err == nil && cfg.Listen != tc.want {
				t.Errorf("listen: want = %v, got = %v", tc.want, cfg.Listen)
			}
		})
	}
}

func TestLoadErrors(t *testing.T) {
	for _, tc := range []struct {
		name    string
		file    string // a testdata fixture
		yaml    string // or an inline document
		environ []string
		args    []string
		wantErr []string // empty: Load must succeed
	}{
		// Unknown keys.
		{
			name:    "unknown top-level key",
			file:    "unknown_top.yaml",
			wantErr: []string{`line 2: unknown key "listen_addr"`, "known keys here: listen, unix_socket_dir, unix_socket_mode, admin_listen, pool_mode, upstream, budget, pool, clients, limits, timeouts, log", fixture("unknown_top.yaml")},
		},
		{
			name:    "unknown nested key",
			file:    "unknown_nested.yaml",
			wantErr: []string{`line 4: unknown key "upstream.passwrd_file"`, "known keys here: url, password, password_file, connector, aws_region, ssl"},
		},
		{
			name:    "unknown key two levels down",
			file:    "unknown_deep.yaml",
			wantErr: []string{`unknown key "upstream.ssl.sslmode"`, "known keys here: mode, root_cert_file, cert_file, key_file, server_name"},
		},
		{
			name:    "dashes are not underscores in the file",
			yaml:    "pool-mode: session\n",
			wantErr: []string{`unknown key "pool-mode"`, "pool_mode"},
		},
		{
			name:    "unknown PGGOVERNOR_ variable",
			environ: []string{usersEnv, "PGGOVERNOR_LISTEN_ADDR=0.0.0.0:6432"},
			wantErr: []string{"environment variable PGGOVERNOR_LISTEN_ADDR is not a pggovernor setting"},
		},
		{
			name:    "unknown nested PGGOVERNOR_ variable",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_PASSWRD_FILE=/x"},
			wantErr: []string{"PGGOVERNOR_UPSTREAM_PASSWRD_FILE"},
		},
		{
			name:    "PGGOVERNOR_CONFIG is not a key but is accepted",
			environ: []string{usersEnv, "PGGOVERNOR_CONFIG=" + fixture("empty.yaml")},
		},
		{
			name:    "other prefixes are ignored",
			environ: []string{usersEnv, "PGGOVERNORX=1", "PGBOUNCER_LISTEN=x", "pggovernor_listen=bogus"},
		},

		// Enums.
		{
			name:    "pool_mode statement in the file",
			file:    "bad_enum.yaml",
			wantErr: []string{`key pool_mode: "statement" is not one of: transaction, session`},
		},
		{
			name:    "pool_mode statement in env",
			environ: []string{usersEnv, "PGGOVERNOR_POOL_MODE=statement"},
			wantErr: []string{`key pool_mode: "statement" is not one of: transaction, session`},
		},
		{
			name:    "pool_mode statement by flag",
			environ: []string{usersEnv},
			args:    []string{"--pool-mode=statement"},
			wantErr: []string{`key pool_mode: "statement" is not one of: transaction, session`},
		},
		{
			name:    "enums are case-sensitive",
			environ: []string{usersEnv, "PGGOVERNOR_POOL_MODE=Session"},
			wantErr: []string{`key pool_mode: "Session" is not one of: transaction, session`},
		},
		{
			name:    "upstream.ssl.mode lists the modes without the empty one",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_SSL_MODE=on"},
			wantErr: []string{`key upstream.ssl.mode: "on" is not one of: disable, allow, prefer, require, verify-ca, verify-full`},
		},
		{
			name:    "upstream.ssl.mode may be empty",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_SSL_MODE="},
		},
		{
			name:    "clients.auth",
			environ: []string{usersEnv, "PGGOVERNOR_CLIENTS_AUTH=password"},
			wantErr: []string{`key clients.auth: "password" is not one of: scram-sha-256, md5, cert, trust`},
		},
		{
			name:    "clients.tls.mode",
			environ: []string{usersEnv, "PGGOVERNOR_CLIENTS_TLS_MODE=prefer"},
			wantErr: []string{`key clients.tls.mode: "prefer" is not one of: disable, allow, require, verify-client`},
		},
		{
			name:    "upstream.connector",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_CONNECTOR=gcp"},
			wantErr: []string{`key upstream.connector: "gcp" is not one of: password, awsiamrds`},
		},
		{
			name:    "log.level and log.format together",
			environ: []string{usersEnv, "PGGOVERNOR_LOG_LEVEL=trace", "PGGOVERNOR_LOG_FORMAT=text"},
			wantErr: []string{`key log.level: "trace" is not one of: debug, info, warn, error`, `key log.format: "text" is not one of: json, console`},
		},

		// Parse errors.
		{
			name:    "duration without unit in the file",
			file:    "bad_duration.yaml",
			wantErr: []string{"line 4", `key timeouts.query_wait: "5" is not a duration (examples: 500ms, 30s, 10m, 1h)`},
		},
		{
			name:    "duration in env",
			environ: []string{usersEnv, "PGGOVERNOR_TIMEOUTS_SERVER_IDLE=ten minutes"},
			wantErr: []string{"environment variable PGGOVERNOR_TIMEOUTS_SERVER_IDLE", `key timeouts.server_idle: "ten minutes" is not a duration`},
		},
		{
			name:    "duration with surrounding spaces is accepted",
			environ: []string{usersEnv, "PGGOVERNOR_TIMEOUTS_QUERY_WAIT= 5s "},
		},
		{
			name:    "whole number",
			environ: []string{usersEnv, "PGGOVERNOR_CLIENTS_MAX_CONNECTIONS=1e4"},
			wantErr: []string{"environment variable PGGOVERNOR_CLIENTS_MAX_CONNECTIONS", `key clients.max_connections: "1e4" is not a whole number`},
		},
		{
			name:    "bool",
			yaml:    "clients:\n  users_file: /u\nbudget:\n  cluster:\n    enabled: yes\n",
			wantErr: []string{"line 5", `key budget.cluster.enabled: "yes" is not true or false`},
		},
		{
			name:    "null leaf int",
			yaml:    "clients:\n  users_file: /u\nbudget:\n  max:\n",
			wantErr: []string{`key budget.max: "" is not a whole number`},
		},
		{
			name:    "YAML syntax error",
			file:    "syntax_error.yaml",
			wantErr: []string{"config file " + fixture("syntax_error.yaml")},
		},

		// Minimums.
		{
			name: "below minimum",
			file: "below_min.yaml",
			wantErr: []string{
				"key clients.max_connections: 0 is below the minimum 1",
				"key clients.max_message_size: 100 is below the minimum 1024",
				"key timeouts.query_wait: 0s is below the minimum 1ms",
				"key timeouts.server_idle: 500ms is below the minimum 1s",
				"key timeouts.server_check_delay: -1s is below the minimum 0s",
				"key budget.max: -1 is below the minimum 0",
				"key budget.refresh_interval: 10ms is below the minimum 1s",
				"key pool.max_prepared_statements: 0 is below the minimum 1",
			},
		},
		{
			name: "exactly the minimums",
			yaml: "clients:\n  users_file: /u\n  max_connections: 1\n  max_message_size: 1024\n" +
				"timeouts:\n  query_wait: 1ms\n  client_login: 1ms\n  server_connect: 1ms\n  server_idle: 1s\n  server_lifetime: 1s\n  server_check_delay: 0s\n  shutdown_drain: 0s\n" +
				"budget:\n  max: 0\n  reserve: 0\n  refresh_interval: 1s\npool:\n  max_prepared_statements: 1\n",
		},
		{
			name:    "negative reserve",
			environ: []string{usersEnv, "PGGOVERNOR_BUDGET_RESERVE=-2"},
			wantErr: []string{"key budget.reserve: -2 is below the minimum 0"},
		},

		// Shapes.
		{
			name:    "scalar where a group is expected",
			file:    "group_scalar.yaml",
			wantErr: []string{"line 1: key upstream must be a mapping of keys (known keys: url, password, password_file, connector, aws_region, ssl)"},
		},
		{
			name:    "list where a group is expected",
			file:    "group_list.yaml",
			wantErr: []string{"line 2: key timeouts must be a mapping of keys", "query_wait"},
		},
		{
			name:    "nested scalar where a group is expected",
			yaml:    "upstream:\n  ssl: require\n",
			wantErr: []string{"key upstream.ssl must be a mapping of keys (known keys: mode, root_cert_file, cert_file, key_file, server_name, allow_verify_ca_for_iam)"},
		},
		{
			name:    "top level is a list",
			file:    "top_list.yaml",
			wantErr: []string{"the top level must be a mapping of keys (known keys: listen,"},
		},
		{
			name:    "top level is a scalar",
			yaml:    "listen\n",
			wantErr: []string{"the top level must be a mapping of keys"},
		},
		{
			name:    "mapping where a value is expected",
			file:    "leaf_mapping.yaml",
			wantErr: []string{"line 2: key listen must be a single value"},
		},
		{
			name:    "list where a value is expected",
			yaml:    "log:\n  level: [debug, info]\n",
			wantErr: []string{"line 2: key log.level must be a single value"},
		},

		// Listeners.
		{
			name:    "listen without a port",
			environ: []string{usersEnv, "PGGOVERNOR_LISTEN=6432"},
			wantErr: []string{`key listen: "6432" is not host:port`},
		},
		{
			name:    "admin_listen without a port",
			environ: []string{usersEnv, "PGGOVERNOR_ADMIN_LISTEN=localhost"},
			wantErr: []string{`key admin_listen: "localhost" is not host:port`},
		},
		{
			name:    "empty admin_listen disables it",
			environ: []string{usersEnv, "PGGOVERNOR_ADMIN_LISTEN="},
		},

		// Client auth.
		{
			name:    "trust on a non-loopback listener",
			file:    "trust_remote.yaml",
			wantErr: []string{"key clients.auth: trust is refused on the non-loopback listener 0.0.0.0:6432", "clients.allow_trust_remote"},
		},
		{
			name:    "trust on all interfaces",
			environ: []string{"PGGOVERNOR_CLIENTS_AUTH=trust", "PGGOVERNOR_LISTEN=:6432"},
			wantErr: []string{"trust is refused on the non-loopback listener :6432"},
		},
		{
			name:    "trust on a LAN address",
			environ: []string{"PGGOVERNOR_CLIENTS_AUTH=trust", "PGGOVERNOR_LISTEN=10.0.0.5:6432"},
			wantErr: []string{"trust is refused", "clients.allow_trust_remote"},
		},
		{
			name: "trust on a non-loopback listener with allow_trust_remote",
			file: "trust_remote_allowed.yaml",
		},
		{
			name: "trust on 127.0.0.1 needs no users_file",
			file: "trust_loopback.yaml",
		},
		{
			name:    "trust on localhost",
			environ: []string{"PGGOVERNOR_CLIENTS_AUTH=trust", "PGGOVERNOR_LISTEN=localhost:6432"},
		},
		{
			name:    "trust on [::1]",
			environ: []string{"PGGOVERNOR_CLIENTS_AUTH=trust", "PGGOVERNOR_LISTEN=[::1]:6432"},
		},
		{
			name:    "trust on 127.0.0.2",
			environ: []string{"PGGOVERNOR_CLIENTS_AUTH=trust", "PGGOVERNOR_LISTEN=127.0.0.2:6432"},
		},
		{
			name:    "md5 needs users_file",
			environ: []string{"PGGOVERNOR_CLIENTS_AUTH=md5"},
			wantErr: []string{"key clients.users_file: required when clients.auth is md5"},
		},
		{
			name:    "cert needs verify-client",
			environ: []string{"PGGOVERNOR_CLIENTS_AUTH=cert", "PGGOVERNOR_CLIENTS_TLS_MODE=require", "PGGOVERNOR_CLIENTS_TLS_CERT_FILE=/c", "PGGOVERNOR_CLIENTS_TLS_KEY_FILE=/k"},
			wantErr: []string{"key clients.auth: cert needs clients.tls.mode: verify-client"},
		},
		{
			name:    "cert with verify-client",
			environ: []string{"PGGOVERNOR_CLIENTS_AUTH=cert", "PGGOVERNOR_CLIENTS_TLS_MODE=verify-client", "PGGOVERNOR_CLIENTS_TLS_CERT_FILE=/c", "PGGOVERNOR_CLIENTS_TLS_KEY_FILE=/k", "PGGOVERNOR_CLIENTS_TLS_CLIENT_CA_FILE=/ca"},
		},
		{
			name:    "client TLS needs a certificate and key",
			environ: []string{usersEnv, "PGGOVERNOR_CLIENTS_TLS_MODE=allow", "PGGOVERNOR_CLIENTS_TLS_CERT_FILE=/c"},
			wantErr: []string{"keys clients.tls.cert_file and clients.tls.key_file: required when clients.tls.mode is allow"},
		},
		{
			name:    "verify-client needs a CA",
			environ: []string{usersEnv, "PGGOVERNOR_CLIENTS_TLS_MODE=verify-client", "PGGOVERNOR_CLIENTS_TLS_CERT_FILE=/c", "PGGOVERNOR_CLIENTS_TLS_KEY_FILE=/k"},
			wantErr: []string{"key clients.tls.client_ca_file: required when clients.tls.mode is verify-client"},
		},

		// Upstream.
		{
			name:    "password and password_file together",
			file:    "both_passwords.yaml",
			wantErr: []string{"keys upstream.password and upstream.password_file: set only one of them"},
		},
		{
			name:    "password from env and password_file from flag",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_PASSWORD=hunter2"},
			args:    []string{"--upstream.password-file=/run/secrets/pg"},
			wantErr: []string{"set only one of them"},
		},
		{
			name:    "awsiamrds with upstream.ssl.mode prefer",
			file:    "iam_prefer.yaml",
			wantErr: []string{"key upstream.ssl.mode", "needs TLS that verifies the server", "set upstream.ssl.mode to verify-full", "(it is prefer)"},
		},
		{
			name:    "awsiamrds with sslmode=prefer in the URL",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_CONNECTOR=awsiamrds", "PGGOVERNOR_UPSTREAM_URL=postgres://coder@db/coder?sslmode=prefer"},
			wantErr: []string{"needs TLS", "verify-full", "(it is prefer)"},
		},
		{
			name:    "awsiamrds with no sslmode anywhere defaults to prefer",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_CONNECTOR=awsiamrds", "PGGOVERNOR_UPSTREAM_URL=postgres://coder@db/coder"},
			wantErr: []string{"needs TLS", "(it is prefer)"},
		},
		{
			name:    "awsiamrds with sslmode=disable in a DSN",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_CONNECTOR=awsiamrds", "PGGOVERNOR_UPSTREAM_URL=host=db user=coder sslmode=disable"},
			wantErr: []string{"needs TLS", "(it is disable)"},
		},
		{
			name:    "upstream.ssl.mode overrides the URL's sslmode",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_CONNECTOR=awsiamrds", "PGGOVERNOR_UPSTREAM_URL=postgres://coder@db/coder?sslmode=require", "PGGOVERNOR_UPSTREAM_SSL_MODE=allow"},
			wantErr: []string{"needs TLS", "(it is allow)"},
		},
		{
			// TLS without verification: a man in the middle reads the token.
			name:    "awsiamrds with sslmode=require in the URL",
			file:    "iam_require.yaml",
			wantErr: []string{"key upstream.ssl.mode", "man in the middle", "verify-full", "(it is require)"},
		},
		{
			name:    "awsiamrds with sslmode=require and a root certificate (verify-ca for pgconn)",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_CONNECTOR=awsiamrds", "PGGOVERNOR_UPSTREAM_URL=postgres://coder@db/coder?sslmode=require&sslrootcert=/ca.pem"},
			wantErr: []string{"key upstream.ssl.mode", "verify-full", "(it is require)"},
		},
		{
			name:    "awsiamrds with upstream.ssl.mode verify-ca and a DSN",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_CONNECTOR=awsiamrds", "PGGOVERNOR_UPSTREAM_URL=host=db user=coder", "PGGOVERNOR_UPSTREAM_SSL_MODE=verify-ca"},
			wantErr: []string{"key upstream.ssl.mode", "verify-ca does not check that the certificate names the server", "upstream.ssl.allow_verify_ca_for_iam"},
		},
		{
			name: "awsiamrds with verify-ca and upstream.ssl.allow_verify_ca_for_iam",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_CONNECTOR=awsiamrds", "PGGOVERNOR_UPSTREAM_URL=host=db user=coder",
				"PGGOVERNOR_UPSTREAM_SSL_MODE=verify-ca", "PGGOVERNOR_UPSTREAM_SSL_ALLOW_VERIFY_CA_FOR_IAM=true"},
		},
		{
			name:    "awsiamrds with sslmode=verify-full in the URL",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_CONNECTOR=awsiamrds", "PGGOVERNOR_UPSTREAM_URL=postgres://coder@db/coder?sslmode=verify-full"},
		},
		{
			name:    "awsiamrds with verify-full from PGSSLMODE",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_CONNECTOR=awsiamrds", "PGGOVERNOR_UPSTREAM_URL=postgres://coder@db/coder", "PGSSLMODE=verify-full"},
		},
		{
			name:    "awsiamrds without a user",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_CONNECTOR=awsiamrds", "PGGOVERNOR_UPSTREAM_URL=postgres://db/coder?sslmode=require"},
			wantErr: []string{"key upstream.url: upstream.connector awsiamrds needs the database user in the URL"},
		},
		{
			name:    "upstream client certificate without key",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_SSL_CERT_FILE=/c"},
			wantErr: []string{"keys upstream.ssl.cert_file and upstream.ssl.key_file: set both or neither"},
		},
		{
			name:    "upstream client key without certificate",
			environ: []string{usersEnv, "PGGOVERNOR_UPSTREAM_SSL_KEY_FILE=/k"},
			wantErr: []string{"set both or neither"},
		},

		// Budget.
		{
			name:    "budget.max and budget.reserve together",
			environ: []string{usersEnv, "PGGOVERNOR_BUDGET_MAX=90", "PGGOVERNOR_BUDGET_RESERVE=5"},
			wantErr: []string{"keys budget.max and budget.reserve"},
		},
		{
			name:    "budget.max alone",
			environ: []string{usersEnv, "PGGOVERNOR_BUDGET_MAX=90"},
		},
		{
			name:    "cluster namespace beyond 32 bits",
			environ: []string{usersEnv, "PGGOVERNOR_BUDGET_CLUSTER_ENABLED=true", "PGGOVERNOR_BUDGET_CLUSTER_NAMESPACE=4294967296"},
			wantErr: []string{"key budget.cluster.namespace: 4294967296 does not fit in 32 bits"},
		},
		{
			name: "cluster member timeout below four heartbeats",
			environ: []string{usersEnv, "PGGOVERNOR_BUDGET_CLUSTER_ENABLED=true", "PGGOVERNOR_BUDGET_CLUSTER_HEARTBEAT_INTERVAL=1s",
				"PGGOVERNOR_BUDGET_CLUSTER_MEMBER_TIMEOUT=3s"},
			wantErr: []string{"key budget.cluster.member_timeout: 3s is less than 4 × budget.cluster.heartbeat_interval (1s)"},
		},
		{
			name:    "cluster table name that needs quoting",
			environ: []string{usersEnv, "PGGOVERNOR_BUDGET_CLUSTER_ENABLED=true", "PGGOVERNOR_BUDGET_CLUSTER_TABLE=Members; DROP"},
			wantErr: []string{`key budget.cluster.table: "Members; DROP" is not a table name`},
		},
		{
			name:    "cluster advertise address without a port",
			environ: []string{usersEnv, "PGGOVERNOR_BUDGET_CLUSTER_ENABLED=true", "PGGOVERNOR_BUDGET_CLUSTER_ADVERTISE_ADDRESS=10.0.0.7"},
			wantErr: []string{`key budget.cluster.advertise_address: "10.0.0.7" is not host:port`},
		},
		{
			name:    "cluster peer CIDR that does not parse",
			environ: []string{usersEnv, "PGGOVERNOR_BUDGET_CLUSTER_ENABLED=true", "PGGOVERNOR_BUDGET_CLUSTER_PEER_CIDRS=10.0.0.0/8,10.1.2.3"},
			wantErr: []string{`key budget.cluster.peer_cidrs: "10.1.2.3" is not a CIDR`},
		},
		{
			name: "cluster advertise address outside the peer CIDRs",
			environ: []string{usersEnv, "PGGOVERNOR_BUDGET_CLUSTER_ENABLED=true", "PGGOVERNOR_BUDGET_CLUSTER_ADVERTISE_ADDRESS=203.0.113.7:6432",
				"PGGOVERNOR_BUDGET_CLUSTER_PEER_CIDRS=10.0.0.0/8"},
			wantErr: []string{"key budget.cluster.advertise_address: 203.0.113.7:6432 is outside budget.cluster.peer_cidrs (10.0.0.0/8)"},
		},
		{
			name:    "cluster advertise address by name: checked when dialled",
			environ: []string{usersEnv, "PGGOVERNOR_BUDGET_CLUSTER_ENABLED=true", "PGGOVERNOR_BUDGET_CLUSTER_ADVERTISE_ADDRESS=coder-0.coder:6432"},
		},
		{
			name:    "cluster control password file without a control user",
			environ: []string{usersEnv, "PGGOVERNOR_BUDGET_CLUSTER_ENABLED=true", "PGGOVERNOR_BUDGET_CLUSTER_CONTROL_PASSWORD_FILE=/run/secrets/x"},
			wantErr: []string{"key budget.cluster.control_password_file: set budget.cluster.control_user too"},
		},
		{
			name: "cluster settings are not checked while it is off",
			environ: []string{usersEnv, "PGGOVERNOR_BUDGET_CLUSTER_MEMBER_TIMEOUT=100ms",
				"PGGOVERNOR_BUDGET_CLUSTER_TABLE=Members"},
		},

		// Several problems are all reported.
		{
			name:    "every problem at once",
			environ: []string{"PGGOVERNOR_POOL_MODE=statement", "PGGOVERNOR_TIMEOUTS_QUERY_WAIT=0s", "PGGOVERNOR_LISTEN=nowhere"},
			wantErr: []string{"key pool_mode", "key timeouts.query_wait", "key listen", "key clients.users_file"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := tc.file
			switch {
			case file != "":
				file = fixture(file)
			case tc.yaml != "":
				file = writeYAML(t, tc.yaml)
			}
			_, err := load(t, file, tc.environ, tc.args...)
			checkErr(t, err, tc.wantErr)
		})
	}
}

func TestCoderEnv(t *testing.T) {
	type check func(t *testing.T, c config.Config)
	wantURL := func(want string) check {
		return func(t *testing.T, c config.Config) {
			t.Helper()
			if c.Upstream.URL != want {
				t.Errorf("upstream.url: want = %v, got = %v", want, c.Upstream.URL)
			}
		}
	}
	wantParam := func(name, want string) check {
		return func(t *testing.T, c config.Config) {
			t.Helper()
			if got := config.URLParam(c.Upstream.URL, name); got != want {
				t.Errorf("URLParam(%q, %q): want = %v, got = %v", c.Upstream.URL, name, want, got)
			}
		}
	}
	wantHostPort := func(host, port string) check {
		return func(t *testing.T, c config.Config) {
			t.Helper()
			u, err := url.Parse(c.Upstream.URL)
			if err != nil {
				t.Fatalf("parsing upstream.url %q: want = no error, got = %v", c.Upstream.URL, err)
			}
			if u.Scheme != "postgres" {
				t.Errorf("scheme: want = %v, got = %v", "postgres", u.Scheme)
			}
			if u.Hostname() != host || u.Port() != port {
				t.Errorf("host, port: want = %v, got = %v", host+" "+port, u.Hostname()+" "+u.Port())
			}
		}
	}
	wantField := func(name string, get func(config.Config) string, want string) check {
		return func(t *testing.T, c config.Config) {
			t.Helper()
			if got := get(c); got != want {
				t.Errorf("%s: want = %v, got = %v", name, want, got)
			}
		}
	}
	passwordFile := func(want string) check {
		return wantField("upstream.password_file", func(c config.Config) string { return c.Upstream.PasswordFile }, want)
	}
	password := func(want string) check {
		return wantField("upstream.password", func(c config.Config) string { return c.Upstream.Password }, want)
	}
	sslMode := func(want string) check {
		return wantField("upstream.ssl.mode", func(c config.Config) string { return c.Upstream.SSL.Mode }, want)
	}
	connector := func(want string) check {
		return wantField("upstream.connector", func(c config.Config) string { return c.Upstream.Connector }, want)
	}
	// untouched asserts that nothing came from Coder's variables.
	untouched := func(url string) check {
		return func(t *testing.T, c config.Config) {
			t.Helper()
			want := withUsers()
			want.Upstream.URL = url
			if diff := cmp.Diff(want.Upstream, c.Upstream); diff != "" {
				t.Errorf("upstream: want = only upstream.url %q, got = diff (-want +got):\n%s", url, diff)
			}
		}
	}
	const iamURL = "postgres://coder@db.rds.amazonaws.com:5432/coder?sslmode=verify-full"
	// coderEnv is everything Coder's chart may set; an explicit upstream.url
	// must ignore all of it.
	coderEnv := []string{
		"CODER_PG_CONNECTION_URL=postgres://coder@coder-url/coder",
		"CODER_PG_AUTH=awsiamrds",
		"DB_HOST=db-host", "DB_PORT=5433", "DB_USER=dbuser", "DB_NAME=dbname",
		"DB_PASSWORD=hunter2", "DB_PASSWORD_PATH=/run/secrets/pg",
		"DB_SSL_MODE=verify-full", "DB_SEARCH_PATH=coder",
		"DB_CERT=/c", "DB_KEY=/k", "DB_ROOT_CERT=/ca", "DB_CONNECTOR=awsiamrds",
	}
	const explicitURL = "postgres://explicit@explicit-host:6543/explicit"

	for _, tc := range []struct {
		name    string
		environ []string
		file    string
		args    []string
		wantErr []string
		checks  []check
	}{
		{
			name:    "no Coder environment",
			environ: []string{"DB_PORT=5433", "DB_USER=coder", "DB_PASSWORD=hunter2", "DB_SSL_MODE=require", "DB_CONNECTOR=awsiamrds"},
			checks:  []check{untouched("")},
		},
		{
			name:    "CODER_PG_CONNECTION_URL",
			environ: []string{"CODER_PG_CONNECTION_URL=postgres://coder:pw@db:5432/coder?sslmode=disable"},
			checks:  []check{wantURL("postgres://coder:pw@db:5432/coder?sslmode=disable"), wantParam("user", "coder"), wantParam("sslmode", "disable")},
		},
		{
			name:    "CODER_PG_CONNECTION_URL beats DB_HOST",
			environ: []string{"CODER_PG_CONNECTION_URL=postgres://coder@coder-url/coder", "DB_HOST=db-host", "DB_USER=other"},
			checks:  []check{wantURL("postgres://coder@coder-url/coder")},
		},
		{
			name:    "empty CODER_PG_CONNECTION_URL falls back to DB_HOST",
			environ: []string{"CODER_PG_CONNECTION_URL=", "DB_HOST=db-host", "DB_USER=coder"},
			checks:  []check{wantHostPort("db-host", "5432"), wantParam("user", "coder")},
		},
		{
			name:    "DB_HOST, DB_PORT, DB_USER, DB_NAME",
			environ: []string{"DB_HOST=db.example.com", "DB_PORT=5433", "DB_USER=coder", "DB_NAME=coderdb"},
			checks: []check{
				wantURL("postgres://coder@db.example.com:5433/coderdb"),
				wantHostPort("db.example.com", "5433"),
				wantParam("user", "coder"),
				wantParam("dbname", "coderdb"),
				wantParam("search_path", ""),
				password(""), passwordFile(""), sslMode(""), connector(config.ConnectorPassword),
			},
		},
		{
			name:    "DB_PORT defaults to 5432",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_NAME=coder"},
			checks:  []check{wantHostPort("db", "5432")},
		},
		{
			name:    "no DB_USER selects the multi-role model",
			environ: []string{"DB_HOST=db", "DB_NAME=coder"},
			checks:  []check{wantParam("user", ""), wantParam("dbname", "coder")},
		},
		{
			name:    "no DB_NAME",
			environ: []string{"DB_HOST=db", "DB_USER=coder"},
			checks:  []check{wantParam("dbname", ""), wantHostPort("db", "5432")},
		},
		{
			name:    "IPv6 DB_HOST",
			environ: []string{"DB_HOST=fd00::5", "DB_PORT=5433", "DB_USER=coder"},
			checks:  []check{wantHostPort("fd00::5", "5433"), wantURL("postgres://coder@[fd00::5]:5433/")},
		},
		{
			name:    "DB_USER and DB_NAME with reserved characters",
			environ: []string{"DB_HOST=db", "DB_USER=coder@corp:x", "DB_NAME=my db/1"},
			checks:  []check{wantParam("user", "coder@corp:x"), wantParam("dbname", "my db/1"), wantHostPort("db", "5432")},
		},
		{
			name:    "DB_SEARCH_PATH",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_NAME=coder", "DB_SEARCH_PATH=coder,public"},
			checks:  []check{wantParam("search_path", "coder,public"), wantURL("postgres://coder@db:5432/coder?search_path=coder%2Cpublic")},
		},
		{
			name:    "DB_PASSWORD_PATH",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_PASSWORD_PATH=/run/secrets/pg"},
			checks:  []check{passwordFile("/run/secrets/pg"), password("")},
		},
		{
			name:    "DB_PASSWORD",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_PASSWORD=hunter2"},
			checks:  []check{password("hunter2"), passwordFile(""), wantParam("password", "")},
		},
		{
			name:    "DB_PASSWORD_PATH beats DB_PASSWORD",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_PASSWORD=hunter2", "DB_PASSWORD_PATH=/run/secrets/pg"},
			checks:  []check{passwordFile("/run/secrets/pg"), password("")},
		},
		{
			name:    "DB_PASSWORD with CODER_PG_CONNECTION_URL",
			environ: []string{"CODER_PG_CONNECTION_URL=postgres://coder@db/coder", "DB_PASSWORD=hunter2"},
			checks:  []check{password("hunter2")},
		},
		{
			name:    "explicit upstream.password_file beats DB_PASSWORD",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_PASSWORD=hunter2", "PGGOVERNOR_UPSTREAM_PASSWORD_FILE=/etc/pg"},
			checks:  []check{passwordFile("/etc/pg"), password("")},
		},
		{
			name:    "explicit upstream.password beats DB_PASSWORD_PATH",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_PASSWORD_PATH=/run/secrets/pg"},
			args:    []string{"--upstream.password=s3cret"},
			checks:  []check{password("s3cret"), passwordFile("")},
		},
		{
			name:    "DB_SSL_MODE",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_SSL_MODE=verify-full"},
			checks:  []check{sslMode("verify-full")},
		},
		{
			name:    "explicit upstream.ssl.mode beats DB_SSL_MODE",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_SSL_MODE=disable", "PGGOVERNOR_UPSTREAM_SSL_MODE=require"},
			checks:  []check{sslMode("require")},
		},
		{
			name:    "invalid DB_SSL_MODE",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_SSL_MODE=on"},
			wantErr: []string{`key upstream.ssl.mode: "on" is not one of`},
		},
		{
			name:    "DB_CERT, DB_KEY, DB_ROOT_CERT",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_CERT=/tls/client.crt", "DB_KEY=/tls/client.key", "DB_ROOT_CERT=/tls/ca.crt"},
			checks: []check{
				wantField("upstream.ssl.cert_file", func(c config.Config) string { return c.Upstream.SSL.CertFile }, "/tls/client.crt"),
				wantField("upstream.ssl.key_file", func(c config.Config) string { return c.Upstream.SSL.KeyFile }, "/tls/client.key"),
				wantField("upstream.ssl.root_cert_file", func(c config.Config) string { return c.Upstream.SSL.RootCertFile }, "/tls/ca.crt"),
			},
		},
		{
			name:    "DB_CERT without DB_KEY",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_CERT=/tls/client.crt"},
			wantErr: []string{"keys upstream.ssl.cert_file and upstream.ssl.key_file: set both or neither"},
		},
		{
			name:    "DB_CONNECTOR=awsiamrds",
			environ: []string{"DB_HOST=db.rds.amazonaws.com", "DB_USER=coder", "DB_NAME=coder", "DB_SSL_MODE=verify-full", "DB_CONNECTOR=awsiamrds"},
			checks:  []check{connector(config.ConnectorAWSIAMRDS), sslMode("verify-full")},
		},
		{
			// TLS that does not verify the server: refused.
			name:    "DB_CONNECTOR=awsiamrds with DB_SSL_MODE=require",
			environ: []string{"DB_HOST=db.rds.amazonaws.com", "DB_USER=coder", "DB_NAME=coder", "DB_SSL_MODE=require", "DB_CONNECTOR=awsiamrds"},
			wantErr: []string{"key upstream.ssl.mode", "verify-full", "(it is require)"},
		},
		{
			name:    "CODER_PG_AUTH=awsiamrds",
			environ: []string{"CODER_PG_CONNECTION_URL=" + iamURL, "CODER_PG_AUTH=awsiamrds"},
			checks:  []check{connector(config.ConnectorAWSIAMRDS), wantURL(iamURL)},
		},
		{
			name:    "DB_CONNECTOR beats CODER_PG_AUTH",
			environ: []string{"CODER_PG_CONNECTION_URL=" + iamURL, "CODER_PG_AUTH=awsiamrds", "DB_CONNECTOR=password"},
			checks:  []check{connector(config.ConnectorPassword)},
		},
		{
			name:    "DB_CONNECTOR=awsiamrds without TLS",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_CONNECTOR=awsiamrds"},
			wantErr: []string{"key upstream.ssl.mode", "needs TLS", "verify-full"},
		},
		{
			name:    "CODER_PG_AUTH=awsiamrds without a user",
			environ: []string{"CODER_PG_CONNECTION_URL=postgres://db/coder?sslmode=require", "CODER_PG_AUTH=awsiamrds"},
			wantErr: []string{"needs the database user in the URL"},
		},
		{
			name:    "DB_CONNECTOR=postgres (Coder v1's chart default) is the password connector",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_CONNECTOR=postgres"},
			checks:  []check{connector(config.ConnectorPassword)},
		},
		{
			name:    "unknown DB_CONNECTOR",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_CONNECTOR=gcp"},
			wantErr: []string{"environment variable DB_CONNECTOR/CODER_PG_AUTH", `"gcp" is not one of: password (or postgres, Coder v1's name), awsiamrds`},
		},
		{
			name:    "explicit upstream.connector beats DB_CONNECTOR",
			environ: []string{"DB_HOST=db", "DB_USER=coder", "DB_CONNECTOR=awsiamrds", "PGGOVERNOR_UPSTREAM_CONNECTOR=password"},
			checks:  []check{connector(config.ConnectorPassword)},
		},
		{
			name:    "invalid DB_PORT",
			environ: []string{"DB_HOST=db", "DB_PORT=fivefourthreetwo", "DB_USER=coder"},
			wantErr: []string{`environment variable DB_PORT: "fivefourthreetwo" is not a port number`},
		},
		{
			name:    "DB_PORT without DB_HOST is ignored",
			environ: []string{"DB_PORT=nonsense"},
			checks:  []check{untouched("")},
		},
		{
			name:    "explicit upstream.url in the file disables Coder's environment",
			file:    fixture("upstream_url.yaml"),
			environ: coderEnv,
			checks:  []check{untouched(explicitURL)},
		},
		{
			name:    "explicit upstream.url in env disables Coder's environment",
			environ: append([]string{"PGGOVERNOR_UPSTREAM_URL=" + explicitURL}, coderEnv...),
			checks:  []check{untouched(explicitURL)},
		},
		{
			name:    "explicit upstream.url by flag disables Coder's environment",
			environ: coderEnv,
			args:    []string{"--upstream.url=" + explicitURL},
			checks:  []check{untouched(explicitURL)},
		},
		{
			name:    "explicit upstream.url by alias disables Coder's environment",
			environ: coderEnv,
			args:    []string{"--upstream-url", explicitURL},
			checks:  []check{untouched(explicitURL)},
		},
		{
			name:    "explicit upstream.url disables the DB_PORT check",
			environ: []string{"PGGOVERNOR_UPSTREAM_URL=" + explicitURL, "DB_HOST=db", "DB_PORT=nonsense"},
			checks:  []check{untouched(explicitURL)},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			environ := append([]string{usersEnv}, tc.environ...)
			cfg, err := load(t, tc.file, environ, tc.args...)
			checkErr(t, err, tc.wantErr)
			for _, c := range tc.checks {
				c(t, cfg)
			}
		})
	}
}

func TestURLParam(t *testing.T) {
	for _, tc := range []struct {
		conn, name, want string
	}{
		// URLs.
		{"postgres://alice:pw@db:5432/app?sslmode=require", "user", "alice"},
		{"postgres://alice:pw@db:5432/app?sslmode=require", "dbname", "app"},
		{"postgres://alice:pw@db:5432/app?sslmode=require", "sslmode", "require"},
		{"postgres://alice:pw@db:5432/app?sslmode=require", "application_name", ""},
		{"postgres://alice:pw@db:5432/app", "password", ""}, // the userinfo password is not a parameter
		{"postgresql://bob@db/app", "user", "bob"},
		{"postgresql://bob@db/app", "dbname", "app"},
		{"postgres://db/app", "user", ""},
		{"postgres://db", "dbname", ""},
		{"postgres://db/", "dbname", ""},
		{"postgres://alice@db/app?user=bob", "user", "bob"},
		{"postgres://alice@db/app?dbname=other", "dbname", "other"},
		{"postgres://al%40ice@db/my%20db", "user", "al@ice"},
		{"postgres://al%40ice@db/my%20db", "dbname", "my db"},
		{"postgres://db/app?search_path=coder%2Cpublic", "search_path", "coder,public"},
		{"postgres://db/app?options=-c%20statement_timeout%3D5s", "options", "-c statement_timeout=5s"},
		{"postgres://%zz@db/app", "user", ""}, // unparsable
		{"mysql://alice@db/app", "user", ""},  // not a libpq URL, read as a DSN
		// key=value DSNs.
		{"host=db port=5433 user=alice dbname=app sslmode=verify-full", "user", "alice"},
		{"host=db port=5433 user=alice dbname=app sslmode=verify-full", "dbname", "app"},
		{"host=db port=5433 user=alice dbname=app sslmode=verify-full", "sslmode", "verify-full"},
		{"host=db port=5433 user=alice dbname=app sslmode=verify-full", "host", "db"},
		{"host=db port=5433 user=alice dbname=app sslmode=verify-full", "port", "5433"},
		{"host=db port=5433 user=alice dbname=app sslmode=verify-full", "password", ""},
		{"user='alice smith' dbname=app", "user", "alice smith"},
		{`user=alice password='it\'s a secret' dbname=app`, "password", "it's a secret"},
		{`user=alice password='it\'s a secret' dbname=app`, "dbname", "app"},
		{`password='back\\slash'`, "password", `back\slash`},
		{`password=un\ quoted`, "password", "un quoted"},
		{"user='' dbname=app", "user", ""},
		{"user='' dbname=app", "dbname", "app"},
		{"  user = alice \t dbname =\tapp  ", "user", "alice"},
		{"  user = alice \t dbname =\tapp  ", "dbname", "app"},
		{"host=db\nuser=alice\r\ndbname=app", "dbname", "app"},
		{"options='-c search_path=coder'", "options", "-c search_path=coder"},
		{"user=alice dbname", "user", "alice"}, // trailing garbage
		{"", "user", ""},
	} {
		if got := config.URLParam(tc.conn, tc.name); got != tc.want {
			t.Errorf("URLParam(%q, %q): want = %q, got = %q", tc.conn, tc.name, tc.want, got)
		}
	}
}

func TestRedactURL(t *testing.T) {
	const unparsableDSN = "(unparsable connection string)"
	for _, tc := range []struct {
		name, in, want string
		secrets        []string // must never appear in the output
	}{
		{
			name: "URL with a password",
			in:   "postgres://alice:s3cret@db:5432/app?sslmode=require",
			want: "postgres://alice:xxxxx@db:5432/app?sslmode=require", secrets: []string{"s3cret"},
		},
		{
			name: "postgresql URL with a password",
			in:   "postgresql://alice:s3cret@db/app",
			want: "postgresql://alice:xxxxx@db/app", secrets: []string{"s3cret"},
		},
		{
			name: "URL with an encoded password",
			in:   "postgres://alice:s3%40cr%3Aet@db/app",
			want: "postgres://alice:xxxxx@db/app", secrets: []string{"s3", "cr", "%40"},
		},
		{
			name: "URL with a password parameter",
			in:   "postgres://alice@db/app?password=s3cret&sslmode=require",
			want: "postgres://alice@db/app?password=xxxxx&sslmode=require", secrets: []string{"s3cret"},
		},
		{
			name: "URL with both",
			in:   "postgres://alice:s3cret1@db/app?password=s3cret2",
			want: "postgres://alice:xxxxx@db/app?password=xxxxx", secrets: []string{"s3cret1", "s3cret2"},
		},
		{
			name: "URL with sslpassword",
			in:   "postgres://alice@db/app?sslmode=verify-full&sslkey=/k.pem&sslpassword=k3ypass",
			want: "postgres://alice@db/app?sslmode=verify-full&sslkey=/k.pem&sslpassword=xxxxx", secrets: []string{"k3ypass"},
		},
		{
			name: "URL with every secret",
			in:   "postgres://alice:s3cret1@db/app?password=s3cret2&sslpassword=s3cret3",
			want: "postgres://alice:xxxxx@db/app?password=xxxxx&sslpassword=xxxxx", secrets: []string{"s3cret1", "s3cret2", "s3cret3"},
		},
		{
			name: "URL with a percent-encoded secret key",
			in:   "postgres://alice@db/app?sslpass%77ord=s3cret&pass%77ord=s3cret2",
			want: "postgres://alice@db/app?sslpass%77ord=xxxxx&pass%77ord=xxxxx", secrets: []string{"s3cret"},
		},
		{
			name: "URL with a value url.Values cannot decode",
			in:   "postgres://alice@db/app?sslpassword=s3c%zzret",
			want: "postgres://alice@db/app?sslpassword=xxxxx", secrets: []string{"s3c", "zzret"},
		},
		{
			name: "URL with a key that cannot be decoded",
			in:   "postgres://alice@db/app?pass%zzword=s3cret&sslmode=require",
			want: "postgres://alice@db/app?pass%zzword=xxxxx&sslmode=require", secrets: []string{"s3cret"},
		},
		{
			name: "URL with an upper-case secret key and a fragment",
			in:   "postgres://alice@db/app?SSLPassword=s3cret#password=s3cret2",
			want: "postgres://alice@db/app?SSLPassword=xxxxx#xxxxx", secrets: []string{"s3cret"},
		},
		{
			name: "URL with a secret repeated",
			in:   "postgres://alice@db/app?sslpassword=s3cret1&sslmode=require&sslpassword=s3cret2",
			want: "postgres://alice@db/app?sslpassword=xxxxx&sslmode=require&sslpassword=xxxxx", secrets: []string{"s3cret"},
		},
		{
			name: "URL with an empty password",
			in:   "postgres://alice:@db/app",
			want: "postgres://alice:xxxxx@db/app",
		},
		{
			name: "URL without a password is unchanged",
			in:   "postgres://alice@db:5432/app?sslmode=require&search_path=coder%2Cpublic",
			want: "postgres://alice@db:5432/app?sslmode=require&search_path=coder%2Cpublic",
		},
		{
			name: "URL without a user",
			in:   "postgres://db/app",
			want: "postgres://db/app",
		},
		{
			name: "unparsable URL",
			in:   "postgres://alice:s3cret@db:port/app",
			want: "(unparsable URL)", secrets: []string{"s3cret"},
		},
		{
			name: "DSN with a password",
			in:   "host=db user=alice password=s3cret dbname=app",
			want: "dbname=app host=db password=xxxxx user=alice", secrets: []string{"s3cret"},
		},
		{
			name: "DSN with a quoted password with spaces and escaped quotes",
			in:   `host=db password='my s3cret \'qu0ted\' \\ b4ckslash' user=alice`,
			want: "host=db password=xxxxx user=alice", secrets: []string{"s3cret", "qu0ted", "b4ckslash"},
		},
		{
			name: "DSN with sslpassword",
			in:   "host=db sslkey=/k.pem sslpassword='k3y pass' user=alice",
			want: "host=db sslkey=/k.pem sslpassword=xxxxx user=alice", secrets: []string{"k3y", "pass'"},
		},
		{
			name: "DSN with both secrets",
			in:   "host=db password=s3cret1 sslpassword=s3cret2",
			want: "host=db password=xxxxx sslpassword=xxxxx", secrets: []string{"s3cret"},
		},
		{
			name: "DSN with an upper-case secret key",
			in:   "host=db SSLPASSWORD=s3cret",
			want: "SSLPASSWORD=xxxxx host=db", secrets: []string{"s3cret"},
		},
		{
			name: "DSN keeps other quoted values quoted",
			in:   `application_name='pg governor' password=s3cret options='-c x=\'y z\''`,
			want: `application_name='pg governor' options='-c x=\'y z\'' password=xxxxx`, secrets: []string{"s3cret"},
		},
		{
			name: "DSN keeps empty values",
			in:   "user='' password=s3cret",
			want: "password=xxxxx user=''", secrets: []string{"s3cret"},
		},
		{
			name: "DSN with spaces around =",
			in:   "user = alice password = s3cret",
			want: "password=xxxxx user=alice", secrets: []string{"s3cret"},
		},
		{
			name: "DSN without a password is unchanged",
			in:   "host=db  user='alice smith'",
			want: "host=db  user='alice smith'",
		},
		{
			name: "empty",
			in:   "",
			want: "",
		},
		{
			name: "malformed DSN hiding the password key",
			in:   "host=db oops password=s3cret",
			want: unparsableDSN, secrets: []string{"s3cret"},
		},
		{
			name: "upper-case scheme (not a libpq URL)",
			in:   "POSTGRES://alice:s3cret@db/app?sslmode=require",
			want: unparsableDSN, secrets: []string{"s3cret"},
		},
		{
			name: "misspelt scheme",
			in:   "postgre://alice:s3cret@db/app",
			want: unparsableDSN, secrets: []string{"s3cret"},
		},
		{
			name: "empty keyword",
			in:   "=s3cret host=db",
			want: unparsableDSN, secrets: []string{"s3cret"},
		},
		{
			name: "server parameter with a dot in its name",
			in:   "pgaudit.log=all password=s3cret",
			want: "password=xxxxx pgaudit.log=all", secrets: []string{"s3cret"},
		},
		{
			name: "DSN separated by tabs and newlines",
			in:   "host=db\tpassword=s3cret\nsslmode=require",
			want: "host=db password=xxxxx sslmode=require", secrets: []string{"s3cret"},
		},
		{
			name: "unterminated quote",
			in:   "host=db password='s3cret",
			want: unparsableDSN, secrets: []string{"s3cret"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := config.RedactURL(tc.in)
			if got != tc.want {
				t.Errorf("RedactURL(%q): want = %v, got = %v", tc.in, tc.want, got)
			}
			for _, s := range tc.secrets {
				if strings.Contains(got, s) {
					t.Errorf("RedactURL(%q) contains %q: want = no secret, got = %v", tc.in, s, got)
				}
			}
			// What RedactURL shows must be read the same way, minus the password.
			if got == tc.want && got != unparsableDSN && got != "(unparsable URL)" {
				for _, p := range []string{"user", "dbname", "sslmode", "host", "application_name", "options"} {
					if want, g := config.URLParam(tc.in, p), config.URLParam(got, p); want != g {
						t.Errorf("URLParam(RedactURL(%q), %q): want = %v, got = %v", tc.in, p, want, g)
					}
				}
			}
		})
	}
}

func TestRedacted(t *testing.T) {
	for _, tc := range []struct {
		name    string
		mutate  func(*config.Config)
		want    map[string]string
		secrets []string
	}{
		{
			name: "defaults",
			want: map[string]string{
				"listen":                  "127.0.0.1:6432",
				"upstream.url":            "",
				"upstream.password":       "",
				"timeouts.query_wait":     "30s",
				"budget.cluster.enabled":  "false",
				"clients.max_connections": "10000",
				"clients.users_file":      usersFile,
			},
		},
		{
			name: "URL password and upstream.password",
			mutate: func(c *config.Config) {
				c.Upstream.URL = "postgres://alice:s3cret-url@db/app?sslmode=require"
				c.Upstream.Password = "s3cret-pw"
			},
			want: map[string]string{
				"upstream.url":      "postgres://alice:xxxxx@db/app?sslmode=require",
				"upstream.password": "********",
			},
			secrets: []string{"s3cret-url", "s3cret-pw"},
		},
		{
			name: "DSN password; password_file is a path, shown as is",
			mutate: func(c *config.Config) {
				c.Upstream.URL = "host=db user=alice password='s3cret dsn'"
				c.Upstream.PasswordFile = "/run/secrets/pg"
			},
			want: map[string]string{
				"upstream.url":           "host=db password=xxxxx user=alice",
				"upstream.password":      "",
				"upstream.password_file": "/run/secrets/pg",
			},
			secrets: []string{"s3cret"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := withUsers()
			if tc.mutate != nil {
				tc.mutate(&c)
			}
			pairs := c.Redacted()
			var gotKeys []string
			got := map[string]string{}
			for _, p := range pairs {
				gotKeys = append(gotKeys, p[0])
				got[p[0]] = p[1]
				for _, s := range tc.secrets {
					if strings.Contains(p[1], s) {
						t.Errorf("Redacted() %s: want = no %q, got = %v", p[0], s, p[1])
					}
				}
			}
			if diff := cmp.Diff(config.Keys(), gotKeys); diff != "" {
				t.Errorf("Redacted() keys: want = Keys() in order, got = diff (-want +got):\n%s", diff)
			}
			for k, want := range tc.want {
				if got[k] != want {
					t.Errorf("Redacted() %s: want = %v, got = %v", k, want, got[k])
				}
			}
		})
	}
}

func TestKeysEnvFlags(t *testing.T) {
	keys := config.Keys()
	if len(keys) < 30 {
		t.Fatalf("len(Keys()): want = at least 30, got = %d", len(keys))
	}
	fs := flag.NewFlagSet("pggovernor", flag.ContinueOnError)
	config.RegisterFlags(fs)
	boolKeys := map[string]bool{}
	rt := reflect.TypeOf(config.Config{})
	for _, k := range keys {
		// Find the field by walking the yaml tags, to know its kind.
		typ := rt
		var f reflect.StructField
		for _, part := range strings.Split(k, ".") {
			for i := 0; i < typ.NumField(); i++ {
				if strings.Split(typ.Field(i).Tag.Get("yaml"), ",")[0] == part {
					f = typ.Field(i)
					break
				}
			}
			typ = f.Type
		}
		if f.Type.Kind() == reflect.Bool {
			boolKeys[k] = true
		}
	}
	seenEnv, seenFlag := map[string]string{}, map[string]string{}
	for _, k := range keys {
		env := config.EnvName(k)
		if !strings.HasPrefix(env, "PGGOVERNOR_") {
			t.Errorf("EnvName(%q): want = PGGOVERNOR_ prefix, got = %v", k, env)
		}
		if want := "PGGOVERNOR_" + strings.ToUpper(strings.ReplaceAll(k, ".", "_")); env != want {
			t.Errorf("EnvName(%q): want = %v, got = %v", k, want, env)
		}
		if other, dup := seenEnv[env]; dup {
			t.Errorf("EnvName(%q): want = unique, got = %v shared with %s", k, env, other)
		}
		seenEnv[env] = k
		name := config.FlagName(k)
		if strings.Contains(name, "_") {
			t.Errorf("FlagName(%q): want = no underscore, got = %v", k, name)
		}
		if other, dup := seenFlag[name]; dup {
			t.Errorf("FlagName(%q): want = unique, got = %v shared with %s", k, name, other)
		}
		seenFlag[name] = k
		f := fs.Lookup(name)
		if f == nil {
			t.Errorf("flag --%s for %s: want = registered, got = nil", name, k)
			continue
		}
		if !strings.Contains(f.Usage, env) || !strings.Contains(f.Usage, k) {
			t.Errorf("flag --%s usage: want = mentioning %s and %s, got = %v", name, k, env, f.Usage)
		}
		isBool := false
		if bf, ok := f.Value.(interface{ IsBoolFlag() bool }); ok {
			isBool = bf.IsBoolFlag()
		}
		if isBool != boolKeys[k] {
			t.Errorf("flag --%s is a bool flag: want = %v, got = %v", name, boolKeys[k], isBool)
		}
	}
	for _, tc := range []struct{ fn, in, want string }{
		{"EnvName", "upstream.password_file", "PGGOVERNOR_UPSTREAM_PASSWORD_FILE"},
		{"EnvName", "timeouts.query_wait", "PGGOVERNOR_TIMEOUTS_QUERY_WAIT"},
		{"EnvName", "listen", "PGGOVERNOR_LISTEN"},
		{"FlagName", "timeouts.query_wait", "timeouts.query-wait"},
		{"FlagName", "upstream.ssl.root_cert_file", "upstream.ssl.root-cert-file"},
		{"FlagName", "pool_mode", "pool-mode"},
	} {
		got := config.FlagName(tc.in)
		if tc.fn == "EnvName" {
			got = config.EnvName(tc.in)
		}
		if got != tc.want {
			t.Errorf("%s(%q): want = %v, got = %v", tc.fn, tc.in, tc.want, got)
		}
	}
	for _, name := range []string{"config", "upstream-url"} {
		if fs.Lookup(name) == nil {
			t.Errorf("flag --%s: want = registered, got = nil", name)
		}
	}
	if f := fs.Lookup("pool-mode"); f == nil || !strings.Contains(f.Usage, "one of transaction,session") {
		t.Errorf("flag --pool-mode usage: want = listing transaction,session, got = %v", f)
	}
	if f := fs.Lookup("upstream.ssl.mode"); f == nil || !strings.Contains(f.Usage, "one of disable,allow") {
		t.Errorf("flag --upstream.ssl.mode usage: want = listing the modes without a leading comma, got = %v", f)
	}
	if got, want := config.EnvConfigFile, "PGGOVERNOR_CONFIG"; got != want {
		t.Errorf("EnvConfigFile: want = %v, got = %v", want, got)
	}
	wantOrder := []string{"listen", "unix_socket_dir", "unix_socket_mode", "admin_listen", "pool_mode", "upstream.url"}
	if diff := cmp.Diff(wantOrder, keys[:len(wantOrder)]); diff != "" {
		t.Errorf("Keys() order: want = declaration order, got = diff (-want +got):\n%s", diff)
	}
}

func TestIsLoopback(t *testing.T) {
	for _, tc := range []struct {
		addr string
		want bool
	}{
		{"127.0.0.1:6432", true},
		{"127.1.2.3:6432", true},
		{"localhost:6432", true},
		{"[::1]:6432", true},
		{"0.0.0.0:6432", false},
		{":6432", false},
		{"[::]:6432", false},
		{"10.0.0.1:6432", false},
		{"db.example.com:6432", false},
		{"127.0.0.1", false}, // not host:port
		{"", false},
	} {
		if got := config.IsLoopback(tc.addr); got != tc.want {
			t.Errorf("IsLoopback(%q): want = %v, got = %v", tc.addr, tc.want, got)
		}
	}
}

func TestEffectiveSSLModeAndUser(t *testing.T) {
	for _, tc := range []struct {
		url, mode   string
		wantMode    string
		wantHasUser bool
	}{
		{"", "", "prefer", false},
		{"postgres://db/app", "", "prefer", false},
		{"postgres://alice@db/app?sslmode=require", "", "require", true},
		{"postgres://alice@db/app?sslmode=require", "disable", "disable", true},
		{"host=db user=alice sslmode=verify-ca", "", "verify-ca", true},
		{"host=db sslmode=verify-ca", "verify-full", "verify-full", false},
		{"postgres://db/app?user=bob", "", "prefer", true},
	} {
		c := config.Default()
		c.Upstream.URL, c.Upstream.SSL.Mode = tc.url, tc.mode
		if got := c.EffectiveSSLMode(); got != tc.wantMode {
			t.Errorf("EffectiveSSLMode(url=%q, mode=%q): want = %v, got = %v", tc.url, tc.mode, tc.wantMode, got)
		}
		if got := c.UpstreamHasUser(); got != tc.wantHasUser {
			t.Errorf("UpstreamHasUser(url=%q): want = %v, got = %v", tc.url, tc.wantHasUser, got)
		}
	}
}

// ignoreEnv skips the PG* environment Load records for validation.
var ignoreEnv = cmpopts.IgnoreUnexported(config.Config{})

// TestLibpqEnvironmentInValidation: PGUSER and PGSSLMODE count as libpq
// counts them when the URL leaves them out; hex integers are accepted.
func TestLibpqEnvironmentInValidation(t *testing.T) {
	users := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(users, []byte(`"u" "p"`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	base := []string{"PGGOVERNOR_CLIENTS_USERS_FILE=" + users, "PGGOVERNOR_UPSTREAM_URL=postgres://db.internal/app",
		"PGGOVERNOR_UPSTREAM_CONNECTOR=awsiamrds", "PGGOVERNOR_BUDGET_CLUSTER_NAMESPACE=0x10"}
	if _, err := config.Load(config.Source{Environ: base}); err == nil {
		t.Fatal("want = an error without a user and TLS, got = nil")
	}
	cfg, err := config.Load(config.Source{Environ: append(base, "PGUSER=coder", "PGSSLMODE=verify-full")})
	if err != nil {
		t.Fatalf("with PGUSER and PGSSLMODE: want = nil, got = %v", err)
	}
	if got := cfg.EffectiveSSLMode(); got != "verify-full" {
		t.Fatalf("EffectiveSSLMode: want = verify-full, got = %s", got)
	}
	if !cfg.UpstreamHasUser() {
		t.Fatal("UpstreamHasUser: want = true with PGUSER, got = false")
	}
	if cfg.Budget.Cluster.Namespace != 16 {
		t.Fatalf("hex namespace: want = 16, got = %d", cfg.Budget.Cluster.Namespace)
	}
}
