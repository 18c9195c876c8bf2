package cluster

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pggovernor/pggovernor/pool/budget"
)

// Store opens control sessions on the server. The manager uses one session
// at a time; its advisory locks live exactly as long as the session.
type Store interface {
	Open(ctx context.Context) (Session, error)
}

// Session is one control connection.
type Session interface {
	// Members reads every member row of the namespace.
	Members(ctx context.Context) ([]Member, error)
	// Join takes the membership lock of the first of ids that is free and
	// returns its number; 0 when none was free.
	Join(ctx context.Context, ids []int) (int, error)
	// Lock tries the lease locks of slots and returns those it got. A slot
	// listed by another member whose heartbeat is younger than timeout is
	// reserved for it and not tried, checked in the same statement.
	Lock(ctx context.Context, self int, slots []int, timeout time.Duration) ([]int, error)
	// Publish writes the member's row: its leases (published before they
	// are used) and figures, with the server's now() as heartbeat.
	Publish(ctx context.Context, b Beat) error
	// Release unlocks slots and then publishes b.
	Release(ctx context.Context, slots []int, b Beat) error
	// Heartbeat publishes b, forgets members whose heartbeat is older than
	// b.Timeout, and reads the members, the server's limits and, with
	// b.CountForeign, the connections of other applications, all in one
	// round trip.
	Heartbeat(ctx context.Context, b Beat) (View, error)
	// Leave deletes the member's row and releases every lock.
	Leave(ctx context.Context, id int) error
	// Close ends the session; the server releases its locks.
	Close()
}

// Member is one replica's row.
type Member struct {
	// ID is the replica number (1 and up), encoded in its cancel keys.
	ID int
	// Name says which process it is (host and PID), for people.
	Name string
	// Addr is where forwarded cancel requests for its clients go.
	Addr string
	// Slots are the leases it published: held, or reserved for it while it
	// reconnects.
	Slots []int
	// Demand is how many server connections it wanted recently (in use,
	// being opened and waited for; the peak of its last heartbeats).
	Demand int
	// Waiting counts its clients waiting for a server connection.
	Waiting int
	// ControlPID is the backend PID of its control connection.
	ControlPID int
	// ServerPIDs are the backend PIDs of its server connections (published
	// with budget.cluster.count_foreign only).
	ServerPIDs []int
	// Joined is when the process first joined.
	Joined time.Time
	// Age is how long ago its last heartbeat was, on the server's clock.
	Age time.Duration
}

// Beat is what a member publishes about itself.
type Beat struct {
	ID         int
	Name, Addr string
	Slots      []int
	Demand     int
	Waiting    int
	ServerPIDs []int
	Joined     time.Time
	// Timeout is budget.cluster.member_timeout: rows older than this are
	// deleted by the heartbeat.
	Timeout time.Duration
	// CountForeign asks the heartbeat to count other applications'
	// connections.
	CountForeign bool
}

// View is what a heartbeat reads.
type View struct {
	Members []Member
	Limits  budget.Limits
	// Foreign counts client backends that are neither a live member's
	// control connection nor one of its published server connections
	// (with Beat.CountForeign; 0 otherwise).
	Foreign int
}

// PgStore opens control sessions from a pgxpool of one connection (the
// control pool, whose configuration carries the upstream credentials, TLS
// and keepalives); the session holds the pool's connection for its life.
type PgStore struct {
	// Pool is the control pool.
	Pool *pgxpool.Pool
	// Namespace is the first key of every advisory lock (budget.cluster.namespace).
	Namespace int32
	// Table is the membership table (budget.cluster.table).
	Table string

	localHost atomic.Pointer[string]
}

// LocalHost is the address this replica reaches the server from, as of
// the last session opened ("" before any, or over a Unix socket): the
// default address peers forward cancel requests to.
func (s *PgStore) LocalHost() string {
	if h := s.localHost.Load(); h != nil {
		return *h
	}
	return ""
}

// createLockKey is the second key of the transaction lock that serialises
// the creation of the membership table among replicas starting at once;
// it lies outside both key spaces (leases: 0 and up; members: -2 down to
// -1-MaxReplicaID).
const createLockKey = math.MinInt32

// Open acquires the control connection and makes sure the membership table
// exists.
func (s *PgStore) Open(ctx context.Context) (Session, error) {
	c, err := s.Pool.Acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("opening the control connection: %w", err)
	}
	if a, ok := c.Conn().PgConn().Conn().LocalAddr().(*net.TCPAddr); ok {
		h := a.IP.String()
		s.localHost.Store(&h)
	}
	ps := &pgSession{c: c, ns: s.Namespace, table: pgx.Identifier(strings.Split(s.Table, ".")).Sanitize(), name: s.Table}
	if err := ps.ensureTable(ctx); err != nil {
		ps.Close()
		return nil, err
	}
	return ps, nil
}

type pgSession struct {
	c     *pgxpool.Conn
	ns    int32
	table string // sanitized
	name  string // as configured, for messages
}

func (s *pgSession) ensureTable(ctx context.Context) error {
	var exists bool
	if err := s.c.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", s.name).Scan(&exists); err != nil {
		return fmt.Errorf("looking for the membership table %s: %w", s.name, err)
	}
	if exists {
		return nil
	}
	err := pgx.BeginFunc(ctx, s.c, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1, $2)", s.ns, int32(createLockKey)); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `CREATE UNLOGGED TABLE IF NOT EXISTS `+s.table+` (
			namespace   int         NOT NULL,
			replica_id  int         NOT NULL,
			name        text        NOT NULL,
			cancel_addr text        NOT NULL,
			slots       int[]       NOT NULL,
			demand      int         NOT NULL,
			waiting     int         NOT NULL,
			control_pid int         NOT NULL,
			server_pids int[]       NOT NULL,
			joined      timestamptz NOT NULL,
			heartbeat   timestamptz NOT NULL,
			PRIMARY KEY (namespace, replica_id))`)
		return err
	})
	if err != nil {
		return fmt.Errorf("creating the membership table %s (key budget.cluster.table; the upstream user needs CREATE on its schema, or create it once as docs/architecture.md shows): %w", s.name, err)
	}
	return nil
}

func (s *pgSession) membersSQL() string {
	return `SELECT replica_id, name, cancel_addr, slots, demand, waiting, control_pid, server_pids, joined,
		extract(epoch FROM now() - heartbeat)::float8
		FROM ` + s.table + ` WHERE namespace = $1 ORDER BY replica_id`
}

func scanMembers(rows pgx.Rows) ([]Member, error) {
	defer rows.Close()
	var out []Member
	for rows.Next() {
		var m Member
		var slots, pids []int32
		var age float64
		if err := rows.Scan(&m.ID, &m.Name, &m.Addr, &slots, &m.Demand, &m.Waiting, &m.ControlPID, &pids, &m.Joined, &age); err != nil {
			return nil, err
		}
		for _, x := range slots {
			m.Slots = append(m.Slots, int(x))
		}
		for _, x := range pids {
			m.ServerPIDs = append(m.ServerPIDs, int(x))
		}
		m.Age = time.Duration(age * float64(time.Second))
		out = append(out, m)
	}
	return out, rows.Err()
}

func (s *pgSession) Members(ctx context.Context) ([]Member, error) {
	rows, err := s.c.Query(ctx, s.membersSQL(), s.ns)
	if err == nil {
		var ms []Member
		if ms, err = scanMembers(rows); err == nil {
			return ms, nil
		}
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42501" {
		return nil, fmt.Errorf("reading the cluster members from %s (key budget.cluster.table: the upstream user of every replica needs SELECT, INSERT, UPDATE and DELETE on it): %w", s.name, err)
	}
	return nil, fmt.Errorf("reading the cluster members: %w", err)
}

func int32s(xs []int) []int32 {
	out := make([]int32, len(xs))
	for i, x := range xs {
		out[i] = int32(x)
	}
	return out
}

// Join relies on LIMIT 1 ending the scan at the first row that passes the
// WHERE clause, so that exactly one lock is taken (pgSession tests check
// it against the server).
func (s *pgSession) Join(ctx context.Context, ids []int) (int, error) {
	keys := make([]int32, len(ids))
	for i, id := range ids {
		keys[i] = int32(-1 - id)
	}
	var key int32
	err := s.c.QueryRow(ctx, `SELECT k FROM unnest($2::int[]) WITH ORDINALITY AS u(k, n)
		WHERE pg_try_advisory_lock($1, k) LIMIT 1`, s.ns, keys).Scan(&key)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("taking a replica number: %w", err)
	}
	return int(-1 - key), nil
}

// Lock checks each slot's reservation before trying its lock; CASE fixes
// that order (the planner may reorder the terms of an AND).
func (s *pgSession) Lock(ctx context.Context, self int, slots []int, timeout time.Duration) ([]int, error) {
	if len(slots) == 0 {
		return nil, nil
	}
	rows, err := s.c.Query(ctx, `SELECT k FROM unnest($2::int[]) AS u(k)
		WHERE CASE WHEN EXISTS (SELECT 1 FROM `+s.table+` m WHERE m.namespace = $1 AND m.replica_id <> $3
				AND m.heartbeat >= now() - $4::interval AND k = ANY (m.slots))
			THEN false ELSE pg_try_advisory_lock($1, k) END`, s.ns, int32s(slots), self, timeout)
	if err != nil {
		return nil, fmt.Errorf("taking leases: %w", err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		return nil, fmt.Errorf("taking leases: %w", err)
	}
	out := make([]int, len(got))
	for i, x := range got {
		out[i] = int(x)
	}
	return out, nil
}

func (s *pgSession) upsertSQL() string {
	return `INSERT INTO ` + s.table + ` AS m (namespace, replica_id, name, cancel_addr, slots, demand, waiting, control_pid, server_pids, joined, heartbeat)
		VALUES ($1, $2, $3, $4, $5, $6, $7, pg_backend_pid(), $8, $9, now())
		ON CONFLICT (namespace, replica_id) DO UPDATE SET name = excluded.name, cancel_addr = excluded.cancel_addr,
			slots = excluded.slots, demand = excluded.demand, waiting = excluded.waiting, control_pid = excluded.control_pid,
			server_pids = excluded.server_pids, joined = excluded.joined, heartbeat = excluded.heartbeat`
}

func (s *pgSession) upsertArgs(b Beat) []any {
	return []any{s.ns, b.ID, b.Name, b.Addr, int32s(b.Slots), b.Demand, b.Waiting, int32s(b.ServerPIDs), b.Joined}
}

func (s *pgSession) Publish(ctx context.Context, b Beat) error {
	if _, err := s.c.Exec(ctx, s.upsertSQL(), s.upsertArgs(b)...); err != nil {
		return fmt.Errorf("publishing the leases: %w", err)
	}
	return nil
}

func (s *pgSession) Release(ctx context.Context, slots []int, b Beat) error {
	batch := &pgx.Batch{}
	batch.Queue(`SELECT pg_advisory_unlock($1, k) FROM unnest($2::int[]) AS u(k)`, s.ns, int32s(slots))
	batch.Queue(s.upsertSQL(), s.upsertArgs(b)...)
	if err := s.c.SendBatch(ctx, batch).Close(); err != nil {
		return fmt.Errorf("giving back leases: %w", err)
	}
	return nil
}

func (s *pgSession) Heartbeat(ctx context.Context, b Beat) (View, error) {
	batch := &pgx.Batch{}
	batch.Queue(s.upsertSQL(), s.upsertArgs(b)...)
	batch.Queue(`DELETE FROM `+s.table+` WHERE namespace = $1 AND replica_id <> $2 AND heartbeat < now() - $3::interval`,
		s.ns, b.ID, b.Timeout)
	batch.Queue(s.membersSQL(), s.ns)
	batch.Queue(budget.LimitsSQL)
	if b.CountForeign {
		// A live member's control connection and published server
		// connections are ours; every other client backend is foreign.
		// (A server connection opened since its owner's last heartbeat
		// counts as foreign until the next: the error is on the safe side.)
		batch.Queue(s.foreignSQL(), s.ns, b.Timeout)
	}
	br := s.c.SendBatch(ctx, batch)
	var v View
	err := func() error {
		if _, err := br.Exec(); err != nil {
			return err
		}
		if _, err := br.Exec(); err != nil {
			return err
		}
		rows, err := br.Query()
		if err != nil {
			return err
		}
		if v.Members, err = scanMembers(rows); err != nil {
			return err
		}
		l := &v.Limits
		if err := br.QueryRow().Scan(&l.ServerVersion, &l.MaxConnections, &l.SuperuserReserved, &l.Reserved); err != nil {
			return err
		}
		if b.CountForeign {
			return br.QueryRow().Scan(&v.Foreign)
		}
		return nil
	}()
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return View{}, fmt.Errorf("heartbeat: %w", err)
	}
	return v, nil
}

// ClientBackend is a condition on pg_stat_activity a that holds for client
// backends. Without pg_read_all_stats a role sees backend_type only for its
// own backends; for the others it falls back to "connected to a database as
// a role", which also takes in background workers such as parallel query
// workers (counted as foreign then: the error is on the safe side).
const ClientBackend = `coalesce(a.backend_type = 'client backend', a.datid IS NOT NULL AND a.usesysid IS NOT NULL)`

func (s *pgSession) foreignSQL() string {
	return `SELECT count(*)::int FROM pg_stat_activity a WHERE ` + ClientBackend + `
		AND NOT EXISTS (SELECT 1 FROM ` + s.table + ` m WHERE m.namespace = $1 AND m.heartbeat >= now() - $2::interval
			AND (a.pid = m.control_pid OR a.pid = ANY (m.server_pids)))`
}

func (s *pgSession) Leave(ctx context.Context, id int) error {
	batch := &pgx.Batch{}
	batch.Queue(`DELETE FROM `+s.table+` WHERE namespace = $1 AND replica_id = $2`, s.ns, id)
	batch.Queue(`SELECT pg_advisory_unlock_all()`)
	if err := s.c.SendBatch(ctx, batch).Close(); err != nil {
		return fmt.Errorf("leaving the cluster: %w", err)
	}
	return nil
}

// Close is idempotent.
func (s *pgSession) Close() {
	if s.c == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = s.c.Conn().Close(ctx) // the pool destroys a closed connection at Release
	s.c.Release()
	s.c = nil
}

// ReadMembers reads the member rows of namespace from table over q, for
// pggovernor doctor. A missing table reads as no members.
func ReadMembers(ctx context.Context, q interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}, namespace int32, table string) ([]Member, error) {
	var exists bool
	if err := q.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", table).Scan(&exists); err != nil {
		return nil, err
	}
	if !exists {
		return nil, nil
	}
	s := &pgSession{ns: namespace, table: pgx.Identifier(strings.Split(table, ".")).Sanitize(), name: table}
	rows, err := q.Query(ctx, s.membersSQL(), namespace)
	if err != nil {
		return nil, err
	}
	return scanMembers(rows)
}

// CountForeign counts, over q, the client backends that belong to no live
// member of namespace (as the heartbeat does with
// budget.cluster.count_foreign), for pggovernor doctor. The table must
// exist.
func CountForeign(ctx context.Context, q interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}, namespace int32, table string, timeout time.Duration) (int, error) {
	s := &pgSession{ns: namespace, table: pgx.Identifier(strings.Split(table, ".")).Sanitize(), name: table}
	var n int
	err := q.QueryRow(ctx, s.foreignSQL(), namespace, timeout).Scan(&n)
	return n, err
}
