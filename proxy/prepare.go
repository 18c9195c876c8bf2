package proxy

// This file answers a client's prepare-only batch (Parse, Describe of the
// statement, Sync: libpq's PQprepare, pgx's Prepare) when the client holds
// no server connection and none is idle, on the governor's own control
// connection instead of waiting for a pooled one.
//
// Why: a client that prepares synchronously while its other connections
// (on the same thread, as pgbench's clients are) hold every server
// connection inside transactions waits for a connection that only its own
// progress can free. The Parse must be answered by a server that parsed the
// text now — never from memory, which would be wrong after a schema change
// — and the control connection (counted in the budget, never held by a
// client) is such a server. The statement is then prepared on a pooled
// connection at its first Bind, and checked there against the shape the
// control connection described (resolve).

import (
	"context"
	"encoding/binary"
	"errors"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/wire"
)

// ErrNoControlPrepare is what Options.PrepareOnControl returns for a route
// the control connection cannot serve (another database or user).
var ErrNoControlPrepare = errors.New("the control connection does not serve this route")

// PrepareFunc parses and describes query with the given parameter types on
// the governor's control connection, as route's user in route's database.
// It returns the server's *pgconn.PgError if the text does not parse, and
// ErrNoControlPrepare where it cannot serve the route.
type PrepareFunc func(ctx context.Context, route pool.Route, query string, paramOIDs []uint32) (*pgconn.StatementDescription, error)

// prepareWithoutServer answers the client's Parse of cs, and the Describes
// and Sync buffered after it, on the control connection when the batch
// only prepares and no server connection is idle for the client. done is
// false when the batch must take the ordinary path (the pump then attaches
// a connection, waiting if need be).
func (sess *session) prepareWithoutServer(cs *clientStmt) (done bool, err error) {
	prep := sess.srv.opts.PrepareOnControl
	if prep == nil || !sess.parsesAsDefaults() {
		return false, nil
	}
	describes, batchLen, ok := prepareOnlyBatch(sess.rd.Bytes(), []byte(cs.name))
	if !ok {
		return false, nil
	}
	if srv := sess.srv.pool.TryAcquire(sess.route); srv != nil {
		err := sess.attachServer(srv)
		if errors.Is(err, errLostAtAttach) {
			sess.srv.pool.Release(srv)
			return false, nil // the ordinary path attaches another
		}
		return false, err
	}
	query, rest, _ := wire.CString(cs.parse)
	oids, ok := paramOIDs(rest)
	if !ok {
		return false, nil // malformed types: the server says so
	}
	ctx, cancel := context.WithTimeout(context.Background(), sess.srv.cfg.Timeouts.QueryWait)
	desc, err := prep(ctx, sess.route, string(query), oids)
	cancel()
	var pgErr *pgconn.PgError
	var connErr *pgconn.ConnectError
	switch {
	case errors.As(err, &pgErr) && !errors.As(err, &connErr) && pgErr.Severity != "FATAL" && pgErr.Severity != "PANIC":
		// The server's answer to the statement. Not a failure to open
		// the control connection, nor its loss (a server shutting down,
		// full, failing over): those are not the client's, who waits for
		// a server connection instead.
		sess.rd.Discard(batchLen)
		out := appendPgError(nil, pgErr)
		sess.mu.Lock()
		sess.pushSynthetic(string(append(out, readyForQuery('I')...)))
		sess.mu.Unlock()
		return true, nil
	case err != nil:
		if !errors.Is(err, ErrNoControlPrepare) {
			sess.log.Debug("preparing on the control connection failed; waiting for a server connection", zap.Error(err))
		}
		return false, nil
	}
	params, rows := describeStatement(desc)
	cs.shape = sess.srv.hasher.shape(params[wire.HeaderLen:], rowsBody(rows))
	cs.paramTypes = append([]byte(nil), params[wire.HeaderLen:]...)
	out := []byte(parseCompleteMsg)
	for i := 0; i < describes; i++ {
		out = append(append(out, params...), rows...)
	}
	out = append(out, readyForQuery('I')...)
	sess.rd.Discard(batchLen)
	sess.mu.Lock()
	sess.stmts[cs.name] = cs
	sess.pushSynthetic(string(out))
	sess.mu.Unlock()
	sess.srv.notePrepared(false)
	return true, nil
}

// parsesAsDefaults reports whether a text parses for the client as it does
// on a connection with the server's defaults (the control connection's):
// no startup setting but application_name (search_path, DateStyle,
// TimeZone, standard_conforming_strings… change what a text means), and no
// reported parameter changed since login. Called by the pump.
func (sess *session) parsesAsDefaults() bool {
	for k := range sess.settings {
		if !equalFold([]byte(k), "application_name") {
			return false
		}
	}
	sess.mu.Lock()
	defer sess.mu.Unlock()
	// A verification in flight may give the client its connection back
	// (attach waits for it).
	return sess.fit != nil && sess.vs.done == nil
}

// prepareOnlyBatch reports whether buf (the client's bytes after a Parse of
// name) holds, complete, only Describes of that statement and then a
// Sync: how many Describes, and the batch's length up to and including
// the Sync.
func prepareOnlyBatch(buf, name []byte) (describes, n int, ok bool) {
	for {
		if len(buf)-n < wire.HeaderLen {
			return 0, 0, false
		}
		typ := buf[n]
		l := int(binary.BigEndian.Uint32(buf[n+1:]))
		if l < 4 || len(buf)-n < 1+l {
			return 0, 0, false
		}
		body := buf[n+wire.HeaderLen : n+1+l]
		n += 1 + l
		switch {
		case typ == 'S' && len(body) == 0:
			return describes, n, true
		case typ == 'D' && len(body) == len(name)+2 && body[0] == 'S' && string(body[1:1+len(name)]) == string(name) && body[len(body)-1] == 0:
			describes++
		default:
			return 0, 0, false
		}
	}
}

// paramOIDs decodes the parameter types of a Parse body after the query.
func paramOIDs(b []byte) ([]uint32, bool) {
	if len(b) < 2 {
		return nil, false
	}
	k := int(binary.BigEndian.Uint16(b))
	if len(b) != 2+4*k {
		return nil, false
	}
	oids := make([]uint32, k)
	for i := range oids {
		oids[i] = binary.BigEndian.Uint32(b[2+4*i:])
	}
	return oids, true
}

// describeStatement encodes a statement's description as the server sends
// it for a Describe: ParameterDescription, then RowDescription or NoData.
func describeStatement(desc *pgconn.StatementDescription) (params, rows []byte) {
	params, _ = (&pgproto3.ParameterDescription{ParameterOIDs: desc.ParamOIDs}).Encode(nil)
	if len(desc.Fields) == 0 {
		rows, _ = (&pgproto3.NoData{}).Encode(nil)
		return params, rows
	}
	rd := &pgproto3.RowDescription{Fields: make([]pgproto3.FieldDescription, len(desc.Fields))}
	for i, f := range desc.Fields {
		rd.Fields[i] = pgproto3.FieldDescription{
			Name: []byte(f.Name), TableOID: f.TableOID, TableAttributeNumber: f.TableAttributeNumber,
			DataTypeOID: f.DataTypeOID, DataTypeSize: f.DataTypeSize, TypeModifier: f.TypeModifier, Format: f.Format,
		}
	}
	rows, _ = rd.Encode(nil)
	return params, rows
}

// rowsBody is the body of an encoded RowDescription, nil for NoData.
func rowsBody(frame []byte) []byte {
	if frame[0] != 'T' {
		return nil
	}
	return frame[wire.HeaderLen:]
}

// appendPgError encodes a server error as the server sent it.
func appendPgError(dst []byte, e *pgconn.PgError) []byte {
	out, _ := (&pgproto3.ErrorResponse{
		Severity: e.Severity, SeverityUnlocalized: e.SeverityUnlocalized, Code: e.Code, Message: e.Message,
		Detail: e.Detail, Hint: e.Hint, Position: e.Position, InternalPosition: e.InternalPosition,
		InternalQuery: e.InternalQuery, Where: e.Where, SchemaName: e.SchemaName, TableName: e.TableName,
		ColumnName: e.ColumnName, DataTypeName: e.DataTypeName, ConstraintName: e.ConstraintName,
		File: e.File, Line: e.Line, Routine: e.Routine,
	}).Encode(dst)
	return out
}
