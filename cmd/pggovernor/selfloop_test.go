package main

import (
	"context"
	"errors"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pggovernor/pggovernor/config"
)

// freePort returns a TCP port that was free on 127.0.0.1 a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

// TestUpstreamIsSelfRefused runs the binary the way a sidecar that
// inherits coderd's environment runs: CODER_PG_CONNECTION_URL names the
// governor itself. It must refuse to start, saying why, instead of opening
// server connections to itself (with budget.max it would start and loop).
func TestUpstreamIsSelfRefused(t *testing.T) {
	port := freePort(t)
	users := usersFile(t)
	for _, tc := range []struct {
		name     string
		env      []string
		args     []string
		wantFrom string
	}{
		{name: "CODER_PG_CONNECTION_URL at localhost", env: []string{"CODER_PG_CONNECTION_URL=postgres://coder:pw@localhost:" + port + "/coder?sslmode=disable"},
			args: []string{"--listen=127.0.0.1:" + port}, wantFrom: "CODER_PG_CONNECTION_URL"},
		{name: "DB_HOST at 127.0.0.1", env: []string{"DB_HOST=127.0.0.1", "DB_PORT=" + port, "DB_USER=coder", "DB_NAME=coder"},
			args: []string{"--listen=127.0.0.1:" + port}, wantFrom: "DB_HOST, DB_PORT"},
		{name: "wildcard listen", args: []string{"--listen=0.0.0.0:" + port, "--upstream-url=postgres://coder@127.0.0.1:" + port + "/coder"},
			wantFrom: "upstream.url"},
		{name: "second host of a multi-host URL", args: []string{"--listen=[::]:" + port,
			"--upstream-url=postgres://coder@db.invalid:5432,localhost:" + port + "/coder"}, wantFrom: "upstream.url"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, governorBinary(t), append([]string{"run", "--admin-listen=", "--budget.max=2",
				"--clients.users-file=" + users}, tc.args...)...)
			cmd.Env = tc.env
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 1 {
				t.Fatalf("want = exit status 1, got = %v\n%s", err, out)
			}
			for _, want := range []string{"pggovernor's own listen address", "from " + tc.wantFrom + ")",
				"a sidecar that inherits coderd's CODER_PG_CONNECTION_URL would connect to itself", "PGGOVERNOR_UPSTREAM_URL"} {
				if !strings.Contains(string(out), want) {
					t.Errorf("the error does not say %q:\n%s", want, out)
				}
			}
			if strings.Contains(string(out), ":pw@") {
				t.Errorf("the password of the URL is in the output:\n%s", out)
			}
		})
	}
}

// TestUpstreamIsSelfCases: what counts as pggovernor's own address.
func TestUpstreamIsSelfCases(t *testing.T) {
	for _, tc := range []struct {
		name, listen, socketDir, upstream string
		self                              bool
	}{
		{name: "same address", listen: "127.0.0.1:6432", upstream: "host=127.0.0.1 port=6432", self: true},
		{name: "localhost", listen: "127.0.0.1:6432", upstream: "postgres://localhost:6432/x", self: true},
		{name: "listen on localhost", listen: "localhost:6432", upstream: "postgres://127.0.0.1:6432/x", self: true},
		{name: "IPv6 loopback", listen: "[::1]:6432", upstream: "postgres://[::1]:6432/x", self: true},
		{name: "0.0.0.0 reaches loopback", listen: "127.0.0.1:6432", upstream: "host=0.0.0.0 port=6432", self: true},
		{name: "wildcard and loopback", listen: "0.0.0.0:6432", upstream: "postgres://127.0.0.1:6432/x", self: true},
		{name: "empty host wildcard", listen: ":6432", upstream: "postgres://localhost:6432/x", self: true},
		{name: "other port", listen: "127.0.0.1:6432", upstream: "postgres://127.0.0.1:5432/x"},
		{name: "other loopback address", listen: "127.0.0.1:6432", upstream: "postgres://127.0.0.2:6432/x"},
		{name: "specific listen, other host", listen: "127.0.0.1:6432", upstream: "postgres://192.0.2.10:6432/x"},
		{name: "wildcard, remote host on the same port", listen: "0.0.0.0:6432", upstream: "postgres://192.0.2.10:6432/x"},
		{name: "unresolvable name", listen: "0.0.0.0:6432", upstream: "postgres://db.invalid:6432/x"},
		{name: "own Unix socket", listen: "127.0.0.1:6432", socketDir: "/run/pggovernor", upstream: "host=/run/pggovernor port=6432", self: true},
		{name: "Postgres' Unix socket", listen: "127.0.0.1:6432", socketDir: "/run/pggovernor", upstream: "host=/var/run/postgresql port=6432"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base, err := pgconn.ParseConfig(tc.upstream)
			if err != nil {
				t.Fatal(err)
			}
			cfg := config.Default()
			cfg.Listen, cfg.UnixSocketDir, cfg.Upstream.URL = tc.listen, tc.socketDir, tc.upstream
			err = checkUpstreamNotSelf(context.Background(), &cfg, base)
			if got := err != nil; got != tc.self {
				t.Fatalf("listen %s, upstream %q: want self = %v, got = %v (%v)", tc.listen, tc.upstream, tc.self, got, err)
			}
		})
	}
}
