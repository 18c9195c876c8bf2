package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"
)

// governorTarget is pggovernor in transaction mode.
type governorTarget struct {
	e     *env
	proc  *child
	port  int
	admin int // the admin HTTP port (/readyz, /debug/pprof)
}

func (g *governorTarget) Name() string { return targetGovernor }
func (g *governorTarget) Stop()        { g.proc.stop(); g.proc = nil }
func (g *governorTarget) Exited() bool { return g.proc.hasExited() }
func (g *governorTarget) LogTail(n int) string {
	return g.proc.logTail(n)
}
func (g *governorTarget) PID() int {
	if g.proc == nil {
		return 0
	}
	return g.proc.cmd.Process.Pid
}
func (g *governorTarget) Endpoint() endpoint {
	return endpoint{Host: "127.0.0.1", Port: g.port, User: benchUser, Password: benchPassword}
}
func (g *governorTarget) Supports(benchCase, int) (bool, string) { return true, "" }

func (g *governorTarget) Start(ctx context.Context, auth string, maxClients int) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	admin, err := freePort()
	if err != nil {
		return err
	}
	g.port, g.admin = port, admin
	dir := filepath.Join(g.e.work, "pggovernor-"+auth)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	users := filepath.Join(dir, "userlist.txt")
	if err := writeOwned(users, g.e.userlist(auth), nil); err != nil {
		return err
	}
	upstream := fmt.Sprintf("postgres://%s@127.0.0.1:%d/%s?sslmode=disable", benchUser, g.e.cluster.Port, database)
	cmd := exec.Command(g.e.bins.governor, "run",
		"--listen=127.0.0.1:"+strconv.Itoa(port),
		"--admin-listen=127.0.0.1:"+strconv.Itoa(admin),
		"--admin.pprof=true", // for the diagnostics' CPU profile; loopback only
		"--pool-mode=transaction",
		"--upstream.url="+upstream,
		"--clients.auth="+auth,
		"--clients.users-file="+users,
		"--budget.max="+strconv.Itoa(g.e.opts.budget),
		"--clients.max-connections="+strconv.Itoa(maxClients),
		"--timeouts.query-wait=60s",
		"--timeouts.shutdown-drain=1s",
		"--log.level="+g.e.opts.logLevel,
		"--log.format=json",
	)
	// The password through the environment rather than the command line.
	cmd.Env = append(os.Environ(), "PGGOVERNOR_UPSTREAM_PASSWORD="+benchPassword)
	g.proc, err = startChild(cmd, filepath.Join(dir, "pggovernor.log"), nil)
	if err != nil {
		return fmt.Errorf("starting pggovernor: %w", err)
	}
	if err := waitReady(ctx, g.proc, "http://127.0.0.1:"+strconv.Itoa(admin)+"/readyz", 30*time.Second); err != nil {
		g.Stop()
		return fmt.Errorf("pggovernor: %w", err)
	}
	if err := waitLogin(ctx, g.proc, g.Endpoint(), 15*time.Second); err != nil {
		g.Stop()
		return fmt.Errorf("pggovernor: %w", err)
	}
	return nil
}

// waitReady polls an HTTP readiness URL until it answers 200.
func waitReady(ctx context.Context, c *child, url string, timeout time.Duration) error {
	client := &http.Client{Timeout: 2 * time.Second}
	return c.waitUntil(ctx, timeout, "not ready", func() error {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s", url, resp.Status)
		}
		return nil
	})
}
