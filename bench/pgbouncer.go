package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// pgbouncerTarget is PgBouncer, run by hand as a child process with a
// generated pgbouncer.ini.
type pgbouncerTarget struct {
	e    *env
	proc *child
	port int
}

func (p *pgbouncerTarget) Name() string { return targetPgBouncer }
func (p *pgbouncerTarget) Stop()        { p.proc.stop(); p.proc = nil }
func (p *pgbouncerTarget) Exited() bool { return p.proc.hasExited() }
func (p *pgbouncerTarget) LogTail(n int) string {
	return p.proc.logTail(n)
}
func (p *pgbouncerTarget) PID() int {
	if p.proc == nil {
		return 0
	}
	return p.proc.cmd.Process.Pid
}
func (p *pgbouncerTarget) Endpoint() endpoint {
	return endpoint{Host: "127.0.0.1", Port: p.port, User: benchUser, Password: benchPassword}
}

// preparedOK reports whether this PgBouncer tracks protocol-level prepared
// statements in transaction mode (max_prepared_statements, 1.21 and later).
func (p *pgbouncerTarget) preparedOK() bool {
	var major, minor int
	_, err := fmt.Sscanf(p.e.bins.pgbouncerVersion, "%d.%d", &major, &minor)
	return err == nil && (major > 1 || major == 1 && minor >= 21)
}

func (p *pgbouncerTarget) Supports(c benchCase, _ int) (bool, string) {
	if c.Prepared && !p.preparedOK() {
		return false, fmt.Sprintf("PgBouncer %s cannot do protocol-level prepared statements in transaction mode (max_prepared_statements came in 1.21)", p.e.bins.pgbouncerVersion)
	}
	return true, ""
}

func (p *pgbouncerTarget) Start(ctx context.Context, auth string, maxClients int) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	p.port = port
	dir := filepath.Join(p.e.work, "pgbouncer-"+auth)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if p.e.cred != nil {
		_ = os.Chown(dir, int(p.e.cred.Uid), int(p.e.cred.Gid))
	}
	users := filepath.Join(dir, "userlist.txt")
	if err := writeOwned(users, p.e.userlist(auth), p.e.cred); err != nil {
		return err
	}
	budget := p.e.opts.budget
	var ini bytes.Buffer
	fmt.Fprintf(&ini, "[databases]\n%s = host=127.0.0.1 port=%d dbname=%s user=%s password=%s\n\n",
		database, p.e.cluster.Port, database, benchUser, benchPassword)
	fmt.Fprintf(&ini, `[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = %s
auth_file = %s
pool_mode = transaction
default_pool_size = %d
max_db_connections = %d
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = %d
query_wait_timeout = 60
server_tls_sslmode = disable
client_tls_sslmode = disable
ignore_startup_parameters = extra_float_digits
logfile =
pidfile =
syslog = 0
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
log_stats = 0
verbose = 0
`, port, auth, users, budget, budget, maxClients)
	if p.preparedOK() {
		fmt.Fprintf(&ini, "max_prepared_statements = 200\n")
	}
	iniPath := filepath.Join(dir, "pgbouncer.ini")
	if err := writeOwned(iniPath, ini.Bytes(), p.e.cred); err != nil {
		return err
	}
	// Not as root (PgBouncer refuses): startChild runs it as postgres.
	cmd := exec.Command(p.e.bins.pgbouncer, iniPath)
	p.proc, err = startChild(cmd, filepath.Join(dir, "pgbouncer.log"), p.e.cred)
	if err != nil {
		return fmt.Errorf("starting pgbouncer: %w", err)
	}
	if err := waitLogin(ctx, p.proc, p.Endpoint(), 15*time.Second); err != nil {
		p.Stop()
		return fmt.Errorf("pgbouncer: %w", err)
	}
	return nil
}
