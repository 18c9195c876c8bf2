package cluster

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"strconv"
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
	// Members reads the rows of the namespace whose replica number is in
	// range, unchecked (see Rules.Check).
	Members(ctx context.Context) ([]Member, error)
	// Join takes the membership lock of the first of ids that is free and
	// returns its number; 0 when none was free.
	Join(ctx context.Context, ids []int) (int, error)
	// Lock tries the lease locks of slots and returns those it got. A slot
	// listed by another row whose heartbeat is younger than timeout (and
	// not beyond FutureSkew in the future) is reserved for it and not
	// tried, checked in the same statement.
	Lock(ctx context.Context, self int, slots []int, timeout time.Duration) ([]int, error)
	// Publish writes the member's row: its leases (published before they
	// are used) and figures, with the server's now() as heartbeat.
	Publish(ctx context.Context, b Beat) error
	// Release unlocks slots and then publishes b.
	Release(ctx context.Context, slots []int, b Beat) error
	// Heartbeat publishes b, deletes the rows whose heartbeat is older
	// than b.Timeout or can never count (not finite, beyond FutureSkew in
	// the future, or a replica number out of range), and reads the rows
	// (unchecked), the server's limits, with b.CountForeign the connections
	// of other applications, and with b.ProbeLocks the sessions holding
	// advisory locks of the namespace that are not members, all in one
	// round trip.
	Heartbeat(ctx context.Context, b Beat) (View, error)
	// Leave deletes the member's row and releases every lock.
	Leave(ctx context.Context, id int) error
	// Close ends the session; the server releases its locks.
	Close()
}

// Member is one replica's row.
type Member struct {
	// Invalid is set by the store when a field cannot be read as a
	// replica writes it (one of the Ignored* reasons; InvalidDetail says
	// which): the row is ignored.
	Invalid, InvalidDetail string
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
	// Age is how long ago its last heartbeat was, on the server's clock
	// (negative for a heartbeat in the future).
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
	// ProbeLocks asks the heartbeat for the sessions holding advisory
	// locks of the namespace that are not members (pg_locks).
	ProbeLocks bool
}

// View is what a heartbeat reads.
type View struct {
	Members []Member
	Limits  budget.Limits
	// Foreign counts client backends that are neither a live member's
	// control connection nor one of its published server connections
	// (with Beat.CountForeign; 0 otherwise).
	Foreign int
	// Purged counts, by Ignored* reason, the rows the heartbeat deleted
	// because they could never count (normal expiry is not counted).
	Purged map[string]int
	// LockHolders are the sessions holding advisory locks of the namespace
	// that are not the control connection of a live row, with how many
	// they hold (with Beat.ProbeLocks; nil otherwise).
	LockHolders []LockHolder
}

// LockHolder is a session holding advisory locks of the namespace.
type LockHolder struct {
	PID int
	// Leases and Members count its locks on lease and membership keys.
	Leases, Members int
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
	// MaxID is the largest replica number: rows with another are never
	// read, and deleted by the heartbeat.
	MaxID int

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
	maxID := s.MaxID
	if maxID <= 0 {
		maxID = math.MaxInt32
	}
	ps := &pgSession{c: c, ns: s.Namespace, table: pgx.Identifier(strings.Split(s.Table, ".")).Sanitize(), name: s.Table, maxID: maxID}
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
	maxID int
}

func (s *pgSession) ensureTable(ctx context.Context) error {
	var exists bool
	if err := s.c.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", s.name).Scan(&exists); err != nil {
		return fmt.Errorf("looking for the membership table %s: %w", s.name, err)
	}
	if exists {
		return nil
	}
	// The lock spares replicas starting together the error of concurrent
	// CREATEs. It is waited for only briefly, so that a session squatting
	// it cannot stop replicas from starting: then the table is created
	// without it.
	wait := time.Second
	if dl, ok := ctx.Deadline(); ok {
		wait = max(time.Until(dl)/2, 10*time.Millisecond)
	}
	create := func(lock bool) error {
		return pgx.BeginFunc(ctx, s.c, func(tx pgx.Tx) error {
			if lock {
				if _, err := tx.Exec(ctx, fmt.Sprintf("SET LOCAL lock_timeout = %d", wait.Milliseconds())); err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1, $2)", s.ns, int32(createLockKey)); err != nil {
					return err
				}
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
	}
	err := create(true)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "55P03" {
		err = create(false) // the lock is held by someone who does not let go
	}
	if errors.As(err, &pgErr) && (pgErr.Code == "23505" || pgErr.Code == "42P07" || pgErr.Code == "42710") {
		// Created by another replica at the same moment.
		if qerr := s.c.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", s.name).Scan(&exists); qerr == nil && exists {
			return nil
		}
	}
	if err != nil {
		return fmt.Errorf("creating the membership table %s (key budget.cluster.table; the control connection's role, budget.cluster.control_user or else the upstream user, needs CREATE on its schema, or create it once as docs/architecture.md shows): %w", s.name, err)
	}
	return nil
}

// membersSQL reads the rows of namespace $1 with a replica number from 1
// to $2, each column as it can be read whatever was written: a text longer
// than a replica writes, an array longer than max_connections (no replica
// holds more leases), multidimensional or with NULLs, and a time that is not
// finite read as NULL, and the row is then ignored (see scanMembers).
func (s *pgSession) membersSQL() string {
	arr := func(col string) string {
		return `CASE WHEN cardinality(` + col + `) > l.mc OR coalesce(array_ndims(` + col + `), 1) <> 1 THEN NULL
			WHEN array_position(` + col + `, NULL) IS NOT NULL THEN NULL ELSE ` + col + ` END`
	}
	return `SELECT replica_id,
		CASE WHEN octet_length(name) <= ` + strconv.Itoa(maxNameLen) + ` THEN name END,
		CASE WHEN octet_length(cancel_addr) <= ` + strconv.Itoa(maxAddrLen) + ` THEN cancel_addr END,
		` + arr("slots") + `, demand, waiting, control_pid, ` + arr("server_pids") + `,
		CASE WHEN isfinite(joined) THEN joined END,
		CASE WHEN isfinite(heartbeat) THEN extract(epoch FROM now() - heartbeat)::float8 END
		FROM ` + s.table + `, (SELECT current_setting('max_connections')::int AS mc) l
		WHERE namespace = $1 AND replica_id BETWEEN 1 AND $2 ORDER BY replica_id`
}

// scanMembers reads membersSQL's rows; a row with a column that could not
// be read says so in Member.Invalid.
func scanMembers(rows pgx.Rows) ([]Member, error) {
	defer rows.Close()
	var out []Member
	for rows.Next() {
		var (
			id                          int32
			name, addr                  *string
			slots, pids                 *[]int32
			demand, waiting, controlPID *int32
			joined                      *time.Time
			age                         *float64
		)
		if err := rows.Scan(&id, &name, &addr, &slots, &demand, &waiting, &controlPID, &pids, &joined, &age); err != nil {
			return nil, err
		}
		m := Member{ID: int(id)}
		invalid := func(reason, detail string) {
			if m.Invalid == "" {
				m.Invalid, m.InvalidDetail = reason, detail
			}
		}
		if age == nil {
			invalid(IgnoredHeartbeat, "heartbeat NULL or not finite")
		} else {
			m.Age = time.Duration(*age * float64(time.Second))
		}
		if name == nil {
			invalid(IgnoredMalformed, "name NULL or longer than "+strconv.Itoa(maxNameLen)+" bytes")
		} else {
			m.Name = *name
		}
		if addr == nil {
			invalid(IgnoredAddress, "cancel_addr NULL or longer than "+strconv.Itoa(maxAddrLen)+" bytes")
		} else {
			m.Addr = *addr
		}
		if slots == nil {
			invalid(IgnoredSlots, "slots NULL, holding a NULL, multidimensional or longer than max_connections")
		} else {
			for _, x := range *slots {
				m.Slots = append(m.Slots, int(x))
			}
		}
		if pids == nil {
			invalid(IgnoredMalformed, "server_pids NULL, holding a NULL, multidimensional or longer than max_connections")
		} else {
			for _, x := range *pids {
				m.ServerPIDs = append(m.ServerPIDs, int(x))
			}
		}
		if demand == nil || waiting == nil || controlPID == nil {
			invalid(IgnoredMalformed, "demand, waiting or control_pid NULL")
		} else {
			m.Demand, m.Waiting, m.ControlPID = int(*demand), int(*waiting), int(*controlPID)
		}
		if joined == nil {
			invalid(IgnoredMalformed, "joined NULL or not finite")
		} else {
			m.Joined = *joined
		}
		out = append(out, m)
	}
	return out, rows.Err()
}

func (s *pgSession) Members(ctx context.Context) ([]Member, error) {
	rows, err := s.c.Query(ctx, s.membersSQL(), s.ns, s.maxID)
	if err == nil {
		var ms []Member
		if ms, err = scanMembers(rows); err == nil {
			return ms, nil
		}
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42501" {
		return nil, fmt.Errorf("reading the cluster members from %s (key budget.cluster.table: the control connection's role of every replica, budget.cluster.control_user or else the upstream user, needs SELECT, INSERT, UPDATE and DELETE on it): %w", s.name, err)
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
				AND `+liveSQL("m", "$4", "$5", "$6")+` AND k = ANY (m.slots))
			THEN false ELSE pg_try_advisory_lock($1, k) END`, s.ns, int32s(slots), self, timeout, FutureSkew(timeout), s.maxID)
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

// liveSQL is the condition under which the row alias may count: a replica
// number from 1 to maxID, a heartbeat younger than timeout and not beyond
// skew in the future of the server's clock (which excludes ±infinity).
// clock_timestamp(), not now(): a row committed while this transaction
// runs may be later than its start.
func liveSQL(alias, timeout, skew, maxID string) string {
	return alias + `.replica_id BETWEEN 1 AND ` + maxID + ` AND ` + alias + `.heartbeat >= now() - ` + timeout + `::interval
		AND ` + alias + `.heartbeat <= clock_timestamp() + ` + skew + `::interval`
}

// purgeSQL deletes the other rows of namespace $1 (this member is $2) that
// are older than $3 or can never count: a replica number outside 1 to $4,
// a heartbeat NULL, not finite or beyond $5 in the future. It counts the
// latter two kinds (normal expiry is not counted).
func (s *pgSession) purgeSQL() string {
	return `WITH d AS (DELETE FROM ` + s.table + ` WHERE namespace = $1 AND replica_id <> $2 AND (
			replica_id NOT BETWEEN 1 AND $4 OR heartbeat IS NULL
			OR heartbeat < now() - $3::interval OR heartbeat > clock_timestamp() + $5::interval)
		RETURNING replica_id BETWEEN 1 AND $4 AS id_ok,
			coalesce(isfinite(heartbeat) AND heartbeat <= clock_timestamp() + $5::interval, false) AS heartbeat_ok)
		SELECT (count(*) FILTER (WHERE NOT id_ok))::int, (count(*) FILTER (WHERE id_ok AND NOT heartbeat_ok))::int FROM d`
}

// lockHoldersSQL lists the sessions holding advisory locks of namespace $1
// (two int4 keys: classid, objid, objsubid 2, in this database) that are
// not the control connection of a row live for $2 (skew $3, replica numbers
// to $4), with their locks on lease keys (0 and up) and on membership keys
// (-2 down to -1-$4); at most 100.
func (s *pgSession) lockHoldersSQL() string {
	return `SELECT l.pid, (count(*) FILTER (WHERE l.objid::int4 >= 0))::int, (count(*) FILTER (WHERE l.objid::int4 < 0))::int
		FROM pg_locks l
		WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = $1::int4::oid
			AND (l.objid::int4 >= 0 OR l.objid::int4 BETWEEN -1 - $4::int AND -2)
			AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
			AND NOT EXISTS (SELECT 1 FROM ` + s.table + ` m WHERE m.namespace = $1 AND m.control_pid = l.pid
				AND ` + liveSQL("m", "$2", "$3", "$4") + `)
		GROUP BY l.pid ORDER BY l.pid LIMIT 100`
}

func scanLockHolders(rows pgx.Rows) ([]LockHolder, error) {
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (LockHolder, error) {
		var h LockHolder
		var pid, leases, members int32
		err := r.Scan(&pid, &leases, &members)
		h.PID, h.Leases, h.Members = int(pid), int(leases), int(members)
		return h, err
	})
}

func (s *pgSession) Heartbeat(ctx context.Context, b Beat) (View, error) {
	skew := FutureSkew(b.Timeout)
	batch := &pgx.Batch{}
	batch.Queue(s.upsertSQL(), s.upsertArgs(b)...)
	batch.Queue(s.purgeSQL(), s.ns, b.ID, b.Timeout, s.maxID, skew)
	batch.Queue(s.membersSQL(), s.ns, s.maxID)
	batch.Queue(budget.LimitsSQL)
	if b.CountForeign {
		// A live member's control connection and published server
		// connections are ours; every other client backend is foreign.
		// (A server connection opened since its owner's last heartbeat
		// counts as foreign until the next: the error is on the safe side.)
		batch.Queue(s.foreignSQL(), s.ns, b.Timeout, skew, s.maxID)
	}
	if b.ProbeLocks {
		batch.Queue(s.lockHoldersSQL(), s.ns, b.Timeout, skew, s.maxID)
	}
	br := s.c.SendBatch(ctx, batch)
	var v View
	err := func() error {
		if _, err := br.Exec(); err != nil {
			return err
		}
		var badID, badHeartbeat int32
		if err := br.QueryRow().Scan(&badID, &badHeartbeat); err != nil {
			return err
		}
		if badID > 0 || badHeartbeat > 0 {
			v.Purged = map[string]int{}
			if badID > 0 {
				v.Purged[IgnoredReplicaID] = int(badID)
			}
			if badHeartbeat > 0 {
				v.Purged[IgnoredHeartbeat] = int(badHeartbeat)
			}
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
			if err := br.QueryRow().Scan(&v.Foreign); err != nil {
				return err
			}
		}
		if b.ProbeLocks {
			rows, err := br.Query()
			if err != nil {
				return err
			}
			if v.LockHolders, err = scanLockHolders(rows); err != nil {
				return err
			}
			if v.LockHolders == nil {
				v.LockHolders = []LockHolder{}
			}
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

// foreignSQL counts the client backends that are no live row's (namespace
// $1, timeout $2, skew $3, replica numbers to $4) control connection or
// published server connection.
func (s *pgSession) foreignSQL() string {
	return `SELECT count(*)::int FROM pg_stat_activity a WHERE ` + ClientBackend + `
		AND NOT EXISTS (SELECT 1 FROM ` + s.table + ` m WHERE m.namespace = $1 AND ` + liveSQL("m", "$2", "$3", "$4") + `
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

// Querier is what the doctor's functions need of a connection.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

func doctorSession(namespace int32, table string) *pgSession {
	return &pgSession{ns: namespace, table: pgx.Identifier(strings.Split(table, ".")).Sanitize(), name: table, maxID: math.MaxInt32}
}

// ReadMembers reads the rows of namespace from table over q, unchecked (see
// Rules.Check), for pggovernor doctor. A missing table reads as no rows.
func ReadMembers(ctx context.Context, q Querier, namespace int32, table string, maxID int) ([]Member, error) {
	var exists bool
	if err := q.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", table).Scan(&exists); err != nil {
		return nil, err
	}
	if !exists {
		return nil, nil
	}
	s := doctorSession(namespace, table)
	rows, err := q.Query(ctx, s.membersSQL(), namespace, maxID)
	if err != nil {
		return nil, err
	}
	return scanMembers(rows)
}

// CountForeign counts, over q, the client backends that belong to no live
// member of namespace (as the heartbeat does with
// budget.cluster.count_foreign), for pggovernor doctor. The table must
// exist.
func CountForeign(ctx context.Context, q Querier, namespace int32, table string, timeout time.Duration, maxID int) (int, error) {
	s := doctorSession(namespace, table)
	var n int
	err := q.QueryRow(ctx, s.foreignSQL(), namespace, timeout, FutureSkew(timeout), maxID).Scan(&n)
	return n, err
}

// LockHolders lists, over q, the sessions holding advisory locks of
// namespace that are not the control connection of a live row of table
// (as the heartbeat does when it probes), for pggovernor doctor. The table
// must exist.
func LockHolders(ctx context.Context, q Querier, namespace int32, table string, timeout time.Duration, maxID int) ([]LockHolder, error) {
	s := doctorSession(namespace, table)
	rows, err := q.Query(ctx, s.lockHoldersSQL(), namespace, timeout, FutureSkew(timeout), maxID)
	if err != nil {
		return nil, err
	}
	return scanLockHolders(rows)
}
