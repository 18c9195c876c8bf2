package proxy

// This file decides whether a client's DROP DATABASE, ALTER DATABASE …
// RENAME or CREATE DATABASE … TEMPLATE may close the governor's connections
// to the database it names (freeDatabase). Postgres refuses such a
// statement while other sessions use the database, so the governor closes
// its own (idle ones, and its listener connection) first — but only for a
// client the server would let do it: otherwise any client could close
// everyone's connections to any database, again and again, by sending a
// statement the server then refuses.
//
// Why a check before rather than a retry after the server's 55006 "being
// accessed by other users": Postgres answers 55006 only after waiting 5 s
// for the other sessions to leave (CountOtherDBBackends), so every
// legitimate DROP would take 5 s more; and a retry means holding back and
// replaying the client's statement on the relay. The check is one query on
// a pooled connection of the client's own route, before the statement is
// sent.

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
)

// maxDDLCheck bounds the privilege check's round trip; maxDDLCheckWait the
// wait for a connection to run it on, for a client that holds one already.
const (
	maxDDLCheck     = 5 * time.Second
	maxDDLCheckWait = time.Second
)

// databaseDDLCheck is a query that succeeds when the login role of the
// connection (session_user, the route's user) may run the statement on
// the database target, and fails with division_by_zero (22012) when it may
// not: Exec reports errors only. It over-approximates what the server
// checks, never under: the role may be a superuser, or any role it may SET
// ROLE to (MEMBER) may have what the statement needs — so a client that
// changed its role within the session is never wrongly refused the close.
//
//   - DROP DATABASE: the database's owner (dropdb: object_ownercheck);
//   - ALTER DATABASE … RENAME: the owner, with CREATEDB (RenameDatabase);
//   - CREATE DATABASE … TEMPLATE: CREATEDB, and the template is marked
//     datistemplate or owned (createdb).
func databaseDDLCheck(kind byte, target string) string {
	const owner = "pg_catalog.pg_has_role(r.oid, d.datdba, 'MEMBER')"
	const createdb = "EXISTS (SELECT 1 FROM pg_catalog.pg_roles c WHERE c.rolcreatedb AND pg_catalog.pg_has_role(r.oid, c.oid, 'MEMBER'))"
	var may string
	switch kind {
	case 'D':
		may = owner
	case 'R':
		may = owner + " AND " + createdb
	default:
		may = createdb + " AND (d.datistemplate OR " + owner + ")"
	}
	return "SELECT 1 / count(*) FROM pg_catalog.pg_roles r, pg_catalog.pg_database d WHERE r.rolname = session_user AND d.datname = " +
		quoteLiteral(target) + " AND (r.rolsuper OR " + may + ")"
}

// databaseDDLKind is 'D' (DROP), 'R' (ALTER … RENAME) or 'C' (CREATE) for a
// statement parseDatabaseDDL recognised.
func databaseDDLKind(q []byte) byte {
	lx := lexer{src: q}
	switch first := lx.next(); {
	case equalFold(first.text(q), "drop"):
		return 'D'
	case equalFold(first.text(q), "alter"):
		return 'R'
	}
	return 'C'
}

// mayFreeDatabase reports whether the client may run the database DDL
// statement q on target, checked on a connection of its route: when the
// client holds none (transaction mode, between transactions), the one its
// statement would wait for anyway, acquired as the statement would be and
// left idle for it; when it holds one (session mode, a transaction, session
// state), an idle one or a new one within a short wait. Without an answer
// the governor's connections are not closed: the server then refuses the
// statement (55006) if they use the database.
func (sess *session) mayFreeDatabase(q []byte, target string) bool {
	s := sess.srv
	sess.mu.Lock()
	holds := sess.server != nil
	sess.mu.Unlock()
	srv := s.pool.TryAcquire(sess.route)
	if srv == nil {
		wait := s.cfg.Timeouts.QueryWait
		if holds {
			// Its own connection is not free for the check; a new one
			// may not be either while the budget is in use.
			wait = min(wait, maxDDLCheckWait)
		}
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		var err error
		sess.stats.beginWait()
		srv, err = s.pool.Acquire(ctx, sess.route, nil)
		sess.stats.endWait()
		cancel()
		if err != nil {
			sess.log.Debug("database DDL: no connection to check the client's privilege on; pggovernor's connections to the database stay",
				zap.String("target", target), zap.Error(err))
			return false
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), min(s.cfg.Timeouts.QueryWait, maxDDLCheck))
	err := s.pool.Exec(ctx, srv, databaseDDLCheck(databaseDDLKind(q), target))
	cancel()
	var pgErr *pgconn.PgError
	if err != nil && !errors.As(err, &pgErr) {
		srv.MarkBroken() // lost, or no answer in time
	}
	s.pool.Release(srv)
	switch {
	case err == nil:
		return true
	case pgErr != nil && pgErr.Code == codeDivisionByZero:
		sess.log.Debug("database DDL by a client that may not run it, or of a database that does not exist: pggovernor's connections to it stay (the server refuses the statement)",
			zap.String("target", target))
	default:
		sess.log.Warn("database DDL: checking the client's privilege failed; pggovernor's connections to the database stay", zap.String("target", target), zap.Error(err))
	}
	return false
}

// codeDivisionByZero is what databaseDDLCheck fails with for a client
// that may not run the statement.
const codeDivisionByZero = "22012"

// freeDatabaseFor runs freeDatabase for a client's database DDL statement q
// that targets db, if the client may run it.
func (sess *session) freeDatabaseFor(q []byte, db string) {
	if sess.mayFreeDatabase(q, db) {
		sess.srv.freeDatabase(db)
	}
}
