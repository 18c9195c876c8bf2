package pgtest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// ReplicaOptions shape a streaming replica (StartReplica).
type ReplicaOptions struct {
	// Synchronous makes the primary wait for the replica to flush every
	// commit before acknowledging it (synchronous_standby_names '*',
	// synchronous_commit on): an acknowledged commit is on the replica, as
	// with RDS Multi-AZ and Aurora. Without it, replication is
	// asynchronous and a failover may lose acknowledged commits.
	Synchronous bool
}

// StartReplica starts a hot standby streaming from c: a base backup of c
// (pg_basebackup -R, over c's Unix socket), started on a port of its own
// on the same host with c's settings. It returns once the replica streams
// (and, with Synchronous, once c waits for it). The caller must Close it.
// Promote makes it a primary.
func (c *Cluster) StartReplica(ctx context.Context, o ReplicaOptions) (*Cluster, error) {
	r := &Cluster{opts: c.opts, bin: c.bin, cred: c.cred, Host: c.Host, Version: c.Version}
	r.opts.Settings = maps.Clone(c.opts.Settings)
	if r.opts.Settings == nil {
		r.opts.Settings = map[string]string{}
	}
	var err error
	if r.Dir, err = os.MkdirTemp("", "pgtest-replica-"); err != nil {
		return nil, err
	}
	fail := func(err error) (*Cluster, error) {
		r.Close()
		return nil, err
	}
	if err := os.Chmod(r.Dir, 0o755); err != nil {
		return fail(err)
	}
	if err := r.chown(r.Dir); err != nil {
		return fail(err)
	}
	r.DataDir = filepath.Join(r.Dir, "data")
	bb := c.command(ctx, filepath.Join(c.bin, "pg_basebackup"), "-D", r.DataDir, "-R", "-X", "stream", "-c", "fast",
		"--no-sync", "-h", c.Dir, "-p", fmt.Sprint(c.Port), "-U", SuperUser)
	if out, err := bb.CombinedOutput(); err != nil {
		return fail(fmt.Errorf("pg_basebackup: %w: %s", err, out))
	}
	// -R wrote primary_conninfo into postgresql.auto.conf (and
	// standby.signal); the file is written again with the replica's own
	// port and socket directory.
	auto, err := os.ReadFile(filepath.Join(r.DataDir, "postgresql.auto.conf"))
	if err != nil {
		return fail(err)
	}
	for _, line := range strings.Split(string(auto), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && strings.TrimSpace(k) == "primary_conninfo" {
			r.opts.Settings["primary_conninfo"] = strings.TrimSpace(v)
		}
	}
	if r.opts.Settings["primary_conninfo"] == "" {
		return fail(errors.New("pg_basebackup -R wrote no primary_conninfo"))
	}
	delete(r.opts.Settings, "synchronous_standby_names") // the replica has no standby of its own
	if err := r.writeConfig(); err != nil {
		return fail(err)
	}
	if err := r.start(ctx); err != nil {
		return fail(err)
	}
	if err := c.waitReplication(ctx, "state = 'streaming'"); err != nil {
		return fail(err)
	}
	if o.Synchronous {
		if err := c.Reconfigure(ctx, map[string]string{"synchronous_standby_names": "'*'", "synchronous_commit": "on"}); err != nil {
			return fail(err)
		}
		if err := c.waitReplication(ctx, "sync_state = 'sync'"); err != nil {
			return fail(err)
		}
	}
	return r, nil
}

// waitReplication waits, up to 30 s, for a row of c's pg_stat_replication
// that matches cond.
func (c *Cluster) waitReplication(ctx context.Context, cond string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		rows, err := c.Exec(ctx, "SELECT count(*) FROM pg_stat_replication WHERE "+cond)
		if err == nil && len(rows) == 1 && rows[0][0] != "0" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no replica with %s in pg_stat_replication after 30s (last error: %v)", cond, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Reconfigure merges settings into the cluster's postgresql.conf settings
// and reloads the server (settings that need a restart need Restart). It
// returns once a new session sees every setting's new value: the
// postmaster has reloaded its configuration then, and signalled every
// backend, which applies it before the next command it reads
// (pg_reload_conf only signals the postmaster). Values are compared with
// pg_settings.setting, their quotes removed.
func (c *Cluster) Reconfigure(ctx context.Context, settings map[string]string) error {
	c.mu.Lock()
	if c.opts.Settings == nil {
		c.opts.Settings = map[string]string{}
	}
	maps.Copy(c.opts.Settings, settings)
	c.mu.Unlock()
	if err := c.writeConfig(); err != nil {
		return err
	}
	if _, err := c.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
		return err
	}
	deadline := time.Now().Add(10 * time.Second)
	for name, value := range settings {
		want := strings.Trim(value, "'")
		for {
			rows, err := c.Exec(ctx, "SELECT setting FROM pg_catalog.pg_settings WHERE name = "+QuoteLiteral(name))
			if err != nil {
				return err
			}
			if len(rows) == 1 && rows[0][0] == want {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("reloading the configuration: %s is %v, want %s", name, rows, want)
			}
			select { // the reload is announced nowhere a client can wait on
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	return nil
}

// Promote ends the recovery of a replica (pg_promote, waiting for it): it
// becomes a primary that takes writes.
func (c *Cluster) Promote(ctx context.Context) error {
	rows, err := c.Exec(ctx, "SELECT pg_promote(true, 60)")
	if err != nil {
		return fmt.Errorf("pg_promote: %w", err)
	}
	if len(rows) != 1 || rows[0][0] != "t" {
		return fmt.Errorf("pg_promote: not promoted within 60s: %v", rows)
	}
	return nil
}

// InRecovery reports whether the server is a standby (pg_is_in_recovery).
func (c *Cluster) InRecovery(ctx context.Context) (bool, error) {
	rows, err := c.Exec(ctx, "SELECT pg_is_in_recovery()")
	if err != nil {
		return false, err
	}
	return len(rows) == 1 && rows[0][0] == "t", nil
}
