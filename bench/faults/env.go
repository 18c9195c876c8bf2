package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pggovernor/pggovernor/bench/internal/harness"
)

const (
	password   = "faults-pw"
	clientUser = "client"
	database   = "faults"
	// maxConnections is the server's max_connections: the budget is
	// max_connections − 3 (superuser_reserved_connections) − reserve.
	maxConnections = 20
	// reserve is budget.reserve: the suite's own connections (the sampler
	// and the checks go over the Unix socket as the superuser, whose
	// reserved slots they could use too).
	reserve = 2
	// capacity is what every governor connection may use together.
	capacity = maxConnections - 3 - reserve
	// heartbeat and memberTimeout are budget.cluster's, with the member
	// timeout at the least value for which the documented keepalive bound
	// (max(T/2, 3 s)) stays within T less a heartbeat
	// (docs/architecture.md): a replica partitioned from the server leaves
	// no backend behind by the time the others may take its leases.
	heartbeat     = 200 * time.Millisecond
	memberTimeout = 4 * time.Second
)

// gov is one governor of a case: a process restarted by some faults on the
// same port, behind its link to Postgres.
type gov struct {
	s     *suite
	role  string // the upstream role it logs in as
	link  link
	args  []string
	log   string
	sock  string // its Unix socket directory
	port  int    // its listen port, kept across restarts
	proc  *harness.Process
	ns    int32 // budget.cluster.namespace, 0 for one governor alone
	since time.Time
}

// start runs the governor (again, on the port it had) and waits until it
// listens.
func (g *gov) start(ctx context.Context) error {
	listen := "127.0.0.1:0"
	if g.port != 0 {
		listen = "127.0.0.1:" + strconv.Itoa(g.port)
	}
	args := append([]string{"--listen=" + listen, "--unix-socket-dir=" + g.sock}, g.args...)
	var p *harness.Process
	var err error
	// A port just released by a killed process can still be in use for a
	// moment (its sockets closing).
	for attempt := 0; ; attempt++ {
		p, err = harness.Start(ctx, harness.Spec{Bin: g.s.bin, Args: args, Log: g.log, Prefix: g.link.prefix(),
			Env: []string{"PGGOVERNOR_UPSTREAM_PASSWORD=" + password}})
		if err == nil || g.port == 0 || attempt == 20 {
			break
		}
		time.Sleep(100 * time.Millisecond) // nothing announces a port's release
	}
	if err != nil {
		return fmt.Errorf("%s: %w", g.role, err)
	}
	if g.port == 0 {
		_, port, _ := net.SplitHostPort(p.Addr)
		g.port, _ = strconv.Atoi(port)
	}
	g.proc, g.since = p, time.Now()
	return nil
}

// dsn is how clients reach the governor: over TCP when it runs in this
// network namespace, else over its Unix socket.
func (g *gov) dsn() string {
	host := "127.0.0.1"
	if g.link.prefix() != nil {
		host = g.sock
	}
	return fmt.Sprintf("host=%s port=%d user=%s password=%s dbname=%s sslmode=disable connect_timeout=10", host, g.port, clientUser, password, database)
}

// signal sends sig and waits, up to limit, for the process to exit.
func (g *gov) signal(sig syscall.Signal, limit time.Duration) error {
	if err := g.proc.Signal(sig); err != nil {
		return err
	}
	t := time.NewTimer(limit)
	defer t.Stop()
	select {
	case <-g.proc.Exited():
		return nil
	case <-t.C:
		_ = g.proc.Signal(syscall.SIGQUIT) // a goroutine dump into its log
		select {
		case <-g.proc.Exited():
		case <-time.After(2 * time.Second):
		}
		g.proc.Stop()
		return fmt.Errorf("%s did not exit within %s of %s (goroutines in %s)", g.role, limit, sig, g.log)
	}
}

// stop ends the governor: SIGTERM, then, if it has not exited within
// shutdown_drain and a margin, a goroutine dump (SIGQUIT) and SIGKILL. It
// reports that case; nil when it exited in time or had already.
func (g *gov) stop() error {
	if g.proc == nil {
		return nil
	}
	var err error
	select {
	case <-g.proc.Exited():
	default:
		err = g.signal(syscall.SIGTERM, drain+5*time.Second)
	}
	g.proc.Stop()
	return err
}

// newGov prepares a governor of role for a case; cluster mode when ns is
// not 0. Its link is made by mk.
func (s *suite) newGov(name, role string, ns int32, l link) (*gov, error) {
	dir := filepath.Join(s.dir, name)
	sock := filepath.Join(dir, role)
	if err := os.MkdirAll(sock, 0o755); err != nil {
		return nil, err
	}
	url := fmt.Sprintf("postgres://%s@%s/%s?sslmode=disable", role, l.upstream(), database)
	args := []string{"--admin-listen=", "--upstream-url=" + url, "--clients.users-file=" + s.users,
		"--clients.max-connections=1000", "--timeouts.query-wait=" + s.o.queryWait.String(),
		"--timeouts.server-connect=2s", "--timeouts.shutdown-drain=" + drain.String(),
		"--budget.reserve=" + strconv.Itoa(reserve), "--log.level=" + s.o.logLevel}
	if ns != 0 {
		args = append(args, "--budget.cluster.enabled", "--budget.cluster.namespace="+strconv.Itoa(int(ns)),
			"--budget.cluster.heartbeat-interval="+heartbeat.String(), "--budget.cluster.member-timeout="+memberTimeout.String())
	}
	return &gov{s: s, role: role, link: l, args: args, log: filepath.Join(dir, role+".log"), sock: sock, ns: ns}, nil
}

// drain is timeouts.shutdown_drain.
const drain = 2 * time.Second

// roleList quotes role names for SQL.
func roleList(roles []string) string {
	q := make([]string, len(roles))
	for i, r := range roles {
		q[i] = "'" + r + "'"
	}
	return strings.Join(q, ", ")
}
