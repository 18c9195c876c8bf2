package proxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/pggovernor/pggovernor/auth"
	"io"
	"net"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/wire"
)

// The admin console: a client that connects to the database "pggovernor"
// (or "pgbouncer", which PgBouncer's tools use) as a user listed in
// admin.users, authenticated like any client, talks to the governor itself.
// It answers PgBouncer's SHOW commands with PgBouncer's column names and
// types where the concept matches, and PAUSE, RESUME, RELOAD, SHUTDOWN,
// KILL and WAIT_CLOSE. It speaks the simple query protocol and enough of the
// extended one for drivers that use it by default (pgx): statements take no
// parameters, and results come in text or binary format as asked.

// ConsoleOptions connect the admin console to the rest of the process.
type ConsoleOptions struct {
	// Version is what SHOW VERSION says after "pggovernor ".
	Version string
	// UpstreamHost and UpstreamPort are shown by SHOW DATABASES.
	UpstreamHost string
	UpstreamPort int
	// Reload re-reads the configuration and the users file, as SIGHUP
	// does (RELOAD). Nil makes RELOAD fail.
	Reload func() error
	// Shutdown begins the process's orderly shutdown, as SIGTERM does
	// (SHUTDOWN). It must not block. Nil makes SHUTDOWN fail.
	Shutdown func()
}

// isConsoleDatabase reports whether a database name opens the admin
// console: "pggovernor", or "pgbouncer" for PgBouncer's tools.
func isConsoleDatabase(db string) bool { return db == "pggovernor" || db == "pgbouncer" }

// maxConsoleMessage bounds one message a console client sends.
const maxConsoleMessage = 64 << 10

// statsPeriod is the window over which SHOW STATS averages, as PgBouncer's
// stats_period default.
const statsPeriod = time.Minute

// console is an admin console session's state.
type console struct {
	mu     sync.Mutex
	cancel context.CancelFunc // of the command running; nil when none

	// Owned by the console's pump.
	stmts      map[string]string
	portals    map[string]consolePortal
	skipToSync bool
	out        []byte
	appName    string
}

type consolePortal struct {
	query   string
	formats []int16
}

// maxConsoleStatements bounds the prepared statements and portals a console
// client may keep.
const maxConsoleStatements = 256

func (c *console) cancelCommand() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cancel != nil {
		c.cancel()
	}
}

// consoleLogin authenticates a console client, checks admin.users and
// sends the welcome. No server connection is involved.
func (sess *session) consoleLogin(ctx context.Context, login auth.Login, params map[string]string) error {
	s := sess.srv
	res, err := sess.authenticate(ctx, login)
	if err != nil {
		return err
	}
	if !slices.Contains(s.live.Load().Admin.Users, res.User) {
		return fatalf(codeInsufficientPriv, "user %q may not use the pggovernor admin console", res.User).
			withHint("List the user in admin.users.")
	}
	sess.console = &console{stmts: map[string]string{}, portals: map[string]consolePortal{}, appName: params["application_name"]}
	sess.rd.SetMaxLen(maxConsoleMessage)
	if err := s.register(sess); err != nil {
		return err
	}
	s.assignCancelKey(sess)
	buf, _ := (&pgproto3.AuthenticationOk{}).Encode(nil)
	for _, p := range [...][2]string{
		{"application_name", sess.console.appName},
		{"client_encoding", "UTF8"},
		{"DateStyle", "ISO, MDY"},
		{"integer_datetimes", "on"},
		{"IntervalStyle", "postgres"},
		{"server_encoding", "UTF8"},
		{"server_version", consoleServerVersion(s.opts.Console.Version)},
		{"standard_conforming_strings", "on"},
		{"TimeZone", "UTC"},
	} {
		buf, _ = (&pgproto3.ParameterStatus{Name: p[0], Value: p[1]}).Encode(buf)
	}
	buf = binary.BigEndian.AppendUint32(append(buf, 'K'), 12)
	buf = binary.BigEndian.AppendUint32(buf, sess.key.pid)
	buf = binary.BigEndian.AppendUint32(buf, sess.key.secret)
	buf = append(buf, readyForQuery('I')...)
	if err := sess.finishLogin(buf); err != nil {
		return err
	}
	sess.log.Info("admin console session started")
	return nil
}

// consoleServerVersion is the server_version a console client is told:
// PgBouncer's form (version/name), with a numeric version first so that
// libpq's PQserverVersion parses it.
func consoleServerVersion(v string) string {
	v = strings.TrimPrefix(v, "v")
	if v == "" || v[0] < '0' || v[0] > '9' {
		return "0.0.0/pggovernor " + v
	}
	return v + "/pggovernor"
}

// serveConsole runs a console session until the client leaves.
func (sess *session) serveConsole() {
	err := sess.consoleLoop()
	sess.srv.unregister(sess)
	_ = sess.conn.Close()
	outcome := "closed"
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		outcome = err.Error()
	}
	sess.log.Info("admin console session ended", zap.Duration("duration", time.Since(sess.started)), zap.String("outcome", outcome))
}

func (sess *session) consoleLoop() error {
	c := sess.console
	for {
		typ, n, err := sess.rd.Header()
		if err != nil {
			var fe *wire.FrameError
			if errors.As(err, &fe) {
				return sess.protocolError(err)
			}
			return err
		}
		frame, err := sess.rd.Frame(n)
		if err != nil {
			if isBudgetError(err) {
				sess.srv.stats.bufferRefusals.Add(1)
				sess.sendError(sess.bufferError(typ, n, true))
			}
			return err
		}
		body := frame[wire.HeaderLen:]
		if c.skipToSync && typ != 'S' && typ != 'X' {
			continue
		}
		switch typ {
		case 'X':
			return nil
		case 'Q':
			q, _, ok := wire.CString(body)
			if !ok {
				return sess.protocolError(fatalf(codeProtocolViolation, "invalid Query message"))
			}
			sess.consoleSimpleQuery(string(q))
		case 'P':
			err = sess.consoleParse(body)
		case 'B':
			err = sess.consoleBind(body)
		case 'D':
			err = sess.consoleDescribe(body)
		case 'E':
			err = sess.consoleExecute(body)
		case 'C':
			err = sess.consoleClose(body)
		case 'S':
			c.skipToSync = false
			c.out = append(c.out, readyForQuery('I')...)
		case 'H':
		default:
			return sess.protocolError(fatalf(codeProtocolViolation, "invalid frontend message type %d", typ))
		}
		var ce *clientError
		switch {
		case errors.As(err, &ce) && ce.fatal: // malformed: the session ends
			_ = sess.sendToClient(sess.srv.appendError(c.out, ce, sess.user))
			return err
		case errors.As(err, &ce):
			c.out = sess.srv.appendError(c.out, ce, sess.user)
			c.skipToSync = true
		case err != nil:
			return err
		}
		sess.rd.Shrink()
		if sess.rd.Buffered() == 0 || typ == 'H' || len(c.out) > 64<<10 {
			if err := sess.sendToClient(c.out); err != nil {
				return err
			}
			c.out = c.out[:0]
		}
	}
}

// consoleSimpleQuery runs each statement of a Query message.
func (sess *session) consoleSimpleQuery(q string) {
	c := sess.console
	var stmts []string
	for _, st := range strings.Split(q, ";") {
		if st = strings.TrimSpace(st); st != "" {
			stmts = append(stmts, st)
		}
	}
	if len(stmts) == 0 {
		c.out = append(c.out, 'I', 0, 0, 0, 4) // EmptyQueryResponse
	}
	for _, st := range stmts {
		res, err := sess.consoleRun(st)
		if err != nil {
			c.out = sess.srv.appendError(c.out, err, sess.user)
			break
		}
		if res.cols != nil {
			c.out = appendRowDescription(c.out, res.cols, nil)
		}
		c.out = res.appendRows(c.out, nil)
	}
	c.out = append(c.out, readyForQuery('I')...)
}

func (sess *session) consoleParse(body []byte) error {
	c := sess.console
	name, rest, ok := wire.CString(body)
	query, rest, ok2 := wire.CString(rest)
	if !ok || !ok2 || len(rest) < 2 {
		return fatalf(codeProtocolViolation, "invalid Parse message")
	}
	if binary.BigEndian.Uint16(rest) != 0 || strings.Contains(string(query), "$1") {
		return &clientError{code: codeFeatureNotSupported, message: "admin console commands take no parameters"}
	}
	if _, exists := c.stmts[string(name)]; !exists && len(c.stmts) >= maxConsoleStatements {
		return &clientError{code: codeProtocolViolation, message: fmt.Sprintf("too many prepared statements (at most %d)", maxConsoleStatements)}
	}
	c.stmts[string(name)] = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(string(query)), ";"))
	c.out = append(c.out, '1', 0, 0, 0, 4)
	return nil
}

func (sess *session) consoleBind(body []byte) error {
	c := sess.console
	var b pgproto3.Bind
	if err := b.Decode(body); err != nil {
		return fatalf(codeProtocolViolation, "invalid Bind message")
	}
	q, ok := c.stmts[b.PreparedStatement]
	if !ok {
		return &clientError{code: codeNoSuchStatement, message: fmt.Sprintf("prepared statement %q does not exist", b.PreparedStatement)}
	}
	if len(b.Parameters) > 0 {
		return &clientError{code: codeFeatureNotSupported, message: "admin console commands take no parameters"}
	}
	if _, exists := c.portals[b.DestinationPortal]; !exists && len(c.portals) >= maxConsoleStatements {
		return &clientError{code: codeProtocolViolation, message: fmt.Sprintf("too many portals (at most %d)", maxConsoleStatements)}
	}
	c.portals[b.DestinationPortal] = consolePortal{query: q, formats: b.ResultFormatCodes}
	c.out = append(c.out, '2', 0, 0, 0, 4)
	return nil
}

func (sess *session) consoleDescribe(body []byte) error {
	c := sess.console
	if len(body) < 2 {
		return fatalf(codeProtocolViolation, "invalid Describe message")
	}
	name, _, _ := wire.CString(body[1:])
	var query string
	var formats []int16
	switch body[0] {
	case 'S':
		q, ok := c.stmts[string(name)]
		if !ok {
			return &clientError{code: codeNoSuchStatement, message: fmt.Sprintf("prepared statement %q does not exist", name)}
		}
		query = q
		c.out = append(c.out, 't', 0, 0, 0, 6, 0, 0) // ParameterDescription: none
	case 'P':
		p, ok := c.portals[string(name)]
		if !ok {
			return &clientError{code: codeNoSuchPortal, message: fmt.Sprintf("portal %q does not exist", name)}
		}
		query, formats = p.query, p.formats
	default:
		return fatalf(codeProtocolViolation, "invalid Describe message")
	}
	cols, err := consoleColumns(query)
	if err != nil {
		return err
	}
	if cols == nil {
		c.out = append(c.out, 'n', 0, 0, 0, 4) // NoData
		return nil
	}
	c.out = appendRowDescription(c.out, cols, formats)
	return nil
}

func (sess *session) consoleExecute(body []byte) error {
	c := sess.console
	name, _, ok := wire.CString(body)
	if !ok {
		return fatalf(codeProtocolViolation, "invalid Execute message")
	}
	p, exists := c.portals[string(name)]
	if !exists {
		return &clientError{code: codeNoSuchPortal, message: fmt.Sprintf("portal %q does not exist", name)}
	}
	if p.query == "" {
		c.out = append(c.out, 'I', 0, 0, 0, 4)
		return nil
	}
	res, cerr := sess.consoleRun(p.query)
	if cerr != nil {
		return cerr
	}
	c.out = res.appendRows(c.out, p.formats)
	return nil
}

func (sess *session) consoleClose(body []byte) error {
	c := sess.console
	if len(body) < 2 {
		return fatalf(codeProtocolViolation, "invalid Close message")
	}
	name, _, _ := wire.CString(body[1:])
	if body[0] == 'S' {
		delete(c.stmts, string(name))
	} else {
		delete(c.portals, string(name))
	}
	c.out = append(c.out, '3', 0, 0, 0, 4)
	return nil
}

// Column types, as PgBouncer declares them.
const (
	oidInt8    = 20
	oidInt4    = 23
	oidText    = 25
	oidNumeric = 1700
)

type consoleColumn struct {
	name string
	oid  uint32
}

// consoleResult is what a console command answers: rows of columns (nil
// for a command without a result set), a command tag, and a notice.
type consoleResult struct {
	cols   []consoleColumn
	rows   [][]any // each value a string, an int64 or nil (NULL)
	tag    string
	notice string
}

func cols(spec string, names ...string) []consoleColumn {
	out := make([]consoleColumn, len(names))
	for i, n := range names {
		var oid uint32
		switch spec[i] {
		case 's':
			oid = oidText
		case 'i':
			oid = oidInt4
		case 'q':
			oid = oidInt8
		case 'N':
			oid = oidNumeric
		}
		out[i] = consoleColumn{name: n, oid: oid}
	}
	return out
}

// showColumns returns the result columns of SHOW what, with PgBouncer
// 1.18's names and types; ok is false for an unknown SHOW (HELP has no
// columns). SHOW STATS adds total_requests, PgBouncer's name before 1.8
// for total_query_count, which older exporters (Debian's
// prometheus-pgbouncer-exporter) still read.
func showColumns(what string) (_ []consoleColumn, ok bool) {
	switch what {
	case "POOLS":
		return cols("ssiiiiiiiiiiiiis", "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req",
			"cl_waiting_cancel_req", "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested",
			"sv_login", "maxwait", "maxwait_us", "pool_mode"), true
	case "CLIENTS", "SERVERS":
		return cols("sssssisissiiississ", "type", "user", "database", "state", "addr", "port", "local_addr", "local_port",
			"connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr", "link", "remote_pid", "tls",
			"application_name"), true
	case "STATS":
		return cols("sNNNNNNNNNNNNNNN", "database", "total_xact_count", "total_query_count", "total_received",
			"total_sent", "total_xact_time", "total_query_time", "total_wait_time", "avg_xact_count", "avg_query_count",
			"avg_recv", "avg_sent", "avg_xact_time", "avg_query_time", "avg_wait_time", "total_requests"), true
	case "STATS_TOTALS", "STATS_AVERAGES":
		return cols("sNNNNNNN", "database", "xact_count", "query_count", "bytes_received", "bytes_sent",
			"xact_time", "query_time", "wait_time"), true
	case "CONFIG":
		return cols("ssss", "key", "value", "default", "changeable"), true
	case "LISTS":
		return cols("si", "list", "items"), true
	case "VERSION":
		return cols("s", "version"), true
	case "DATABASES":
		return cols("ssissiiisiiii", "name", "host", "port", "database", "force_user", "pool_size",
			"min_pool_size", "reserve_pool", "pool_mode", "max_connections", "current_connections", "paused", "disabled"), true
	case "USERS":
		return cols("ss", "name", "pool_mode"), true
	case "HELP":
		return nil, true
	}
	return nil, false
}

const consoleHelp = `Console usage
	SHOW HELP|POOLS|CLIENTS|SERVERS|STATS|STATS_TOTALS|STATS_AVERAGES|CONFIG|LISTS|VERSION|DATABASES|USERS
	PAUSE [<db>]
	RESUME [<db>]
	KILL <db>
	WAIT_CLOSE [<db>]
	RELOAD
	SHUTDOWN`

// parseConsoleCommand splits a command into its verb, the SHOW subject and
// an optional database argument.
func parseConsoleCommand(q string) (verb, arg string, err *clientError) {
	words := strings.Fields(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(q), ";")))
	if len(words) == 0 || len(words) > 2 {
		return "", "", consoleSyntaxError(q)
	}
	verb = strings.ToUpper(words[0])
	if len(words) == 2 {
		arg = strings.Trim(words[1], `"`)
	}
	switch verb {
	case "SHOW":
		arg = strings.ToUpper(arg)
		if _, ok := showColumns(arg); !ok {
			return "", "", consoleSyntaxError(q)
		}
	case "KILL":
		if arg == "" {
			return "", "", consoleSyntaxError(q)
		}
	case "PAUSE", "RESUME", "WAIT_CLOSE":
	case "RELOAD", "SHUTDOWN":
		if arg != "" {
			return "", "", consoleSyntaxError(q)
		}
	default:
		return "", "", consoleSyntaxError(q)
	}
	return verb, arg, nil
}

func consoleSyntaxError(q string) *clientError {
	return &clientError{code: codeSyntaxError, message: fmt.Sprintf("invalid command %q, use SHOW HELP;", q)}
}

// consoleColumns says what a command returns, without running it.
func consoleColumns(q string) ([]consoleColumn, error) {
	if q == "" {
		return nil, nil
	}
	verb, arg, err := parseConsoleCommand(q)
	if err != nil {
		return nil, err
	}
	if verb != "SHOW" {
		return nil, nil
	}
	c, _ := showColumns(arg)
	return c, nil
}

// consoleRun runs one command.
func (sess *session) consoleRun(q string) (consoleResult, *clientError) {
	verb, arg, cerr := parseConsoleCommand(q)
	if cerr != nil {
		return consoleResult{}, cerr
	}
	s := sess.srv
	if verb == "SHOW" {
		return s.consoleShow(arg), nil
	}
	sess.log.Info("admin console command", zap.String("command", verb), zap.String("database", arg))
	p := s.pool
	switch verb {
	case "PAUSE":
		p.Pause(arg)
		ctx, done := sess.consoleCommandContext()
		defer done()
		if err := p.WaitQuiet(ctx, arg); err != nil {
			return consoleResult{}, &clientError{code: codeQueryCanceled, message: "canceling PAUSE before the server connections were closed",
				detail: "The pause stays in effect; RESUME ends it."}
		}
		sess.log.Info("paused: no server connection left", zap.String("database", arg))
	case "RESUME":
		if err := p.Resume(arg); err != nil {
			what := "no database is paused"
			if arg != "" {
				what = fmt.Sprintf("database %s is not paused", arg)
			}
			if !errors.Is(err, pool.ErrNotPaused) {
				what = err.Error()
			}
			return consoleResult{}, &clientError{code: codeNotInPrerequisite, message: what}
		}
	case "KILL":
		p.Pause(arg)
		n := s.killDatabase(arg)
		sess.log.Info("killed the database's clients; it stays paused until RESUME", zap.String("database", arg), zap.Int("clients", n))
	case "WAIT_CLOSE":
		ctx, done := sess.consoleCommandContext()
		defer done()
		if err := p.WaitClose(ctx, arg); err != nil {
			return consoleResult{}, &clientError{code: codeQueryCanceled, message: "canceling WAIT_CLOSE"}
		}
	case "RELOAD":
		if s.opts.Console.Reload == nil {
			return consoleResult{}, &clientError{code: codeFeatureNotSupported, message: "RELOAD is not available in this process"}
		}
		if err := s.opts.Console.Reload(); err != nil {
			return consoleResult{}, &clientError{code: codeInternalError, message: "reloading the configuration failed; the previous settings stay",
				detail: err.Error()}
		}
	case "SHUTDOWN":
		if s.opts.Console.Shutdown == nil {
			return consoleResult{}, &clientError{code: codeFeatureNotSupported, message: "SHUTDOWN is not available in this process"}
		}
		s.opts.Console.Shutdown()
	}
	return consoleResult{tag: verb}, nil
}

// consoleCommandContext is the context of a command that waits: cancelled
// by the client's CancelRequest or when the server shuts down.
func (sess *session) consoleCommandContext() (context.Context, func()) {
	ctx, cancel := context.WithCancel(context.Background())
	stop := context.AfterFunc(sess.srv.stopCtx, cancel)
	c := sess.console
	c.mu.Lock()
	c.cancel = cancel
	c.mu.Unlock()
	return ctx, func() {
		c.mu.Lock()
		c.cancel = nil
		c.mu.Unlock()
		stop()
		cancel()
	}
}

// killDatabase disconnects every client of database db, as KILL does, and
// returns how many.
func (s *Server) killDatabase(db string) int {
	n := 0
	for _, sess := range s.liveSessions() {
		if sess.console != nil || sess.database != db {
			continue
		}
		sess.terminate(fatalf(codeAdminShutdown, "terminating connection due to administrator command").
			withDetail(fmt.Sprintf("KILL %s from the pggovernor admin console", db)))
		n++
	}
	return n
}

// consoleShow answers a SHOW command.
func (s *Server) consoleShow(what string) consoleResult {
	c, _ := showColumns(what)
	res := consoleResult{cols: c, tag: "SHOW"}
	switch what {
	case "HELP":
		res.notice = consoleHelp
	case "POOLS":
		res.rows = s.showPools()
	case "CLIENTS":
		res.rows = s.showClients()
	case "SERVERS":
		res.rows = s.showServers()
	case "STATS", "STATS_TOTALS", "STATS_AVERAGES":
		res.rows = s.showStats(what)
	case "CONFIG":
		res.rows = s.showConfig()
	case "LISTS":
		res.rows = s.showLists()
	case "VERSION":
		res.rows = [][]any{{"pggovernor " + s.opts.Console.Version}}
	case "DATABASES":
		res.rows = s.showDatabases()
	case "USERS":
		res.rows = s.showUsers()
	}
	return res
}

// clientsByRoute counts the logged-in clients of each route: not waiting
// (PgBouncer's cl_active) and waiting.
func (s *Server) clientsByRoute() map[pool.Route][2]int {
	out := map[pool.Route][2]int{}
	for _, sess := range s.liveSessions() {
		if sess.console != nil {
			continue
		}
		c := out[sess.route]
		if sess.stats.waitingSince.Load() != 0 {
			c[1]++
		} else {
			c[0]++
		}
		out[sess.route] = c
	}
	return out
}

func (s *Server) showPools() [][]any {
	clients := s.clientsByRoute()
	stats := s.pool.Routes()
	seen := map[pool.Route]bool{}
	var rows [][]any
	add := func(r pool.Route, st pool.RouteStat) {
		cl := clients[r]
		rows = append(rows, []any{r.Database, r.User, int64(cl[0]), int64(cl[1]), int64(0), int64(0),
			int64(st.InUse), int64(0), int64(0), int64(st.Idle), int64(0), int64(0), int64(st.Opening),
			int64(st.MaxWait / time.Second), int64((st.MaxWait % time.Second) / time.Microsecond), s.cfg.PoolMode})
	}
	for _, st := range stats {
		seen[st.Route] = true
		add(st.Route, st)
	}
	var extra []pool.Route
	for r := range clients {
		if !seen[r] {
			extra = append(extra, r)
		}
	}
	sort.Slice(extra, func(i, j int) bool { return extra[i].String() < extra[j].String() })
	for _, r := range extra {
		add(r, pool.RouteStat{Route: r})
	}
	return rows
}

// pgbTime formats a time as PgBouncer does in SHOW CLIENTS and SERVERS.
func pgbTime(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05 MST") }

func splitAddr(a net.Addr) (string, int64) {
	if a == nil {
		return "", 0
	}
	if _, ok := a.(*net.UnixAddr); ok {
		return "unix", 0
	}
	host, port, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String(), 0
	}
	n, _ := strconv.Atoi(port)
	return host, int64(n)
}

func (s *Server) showClients() [][]any {
	sessions := s.liveSessions()
	sort.Slice(sessions, func(i, j int) bool { return sessions[i].id < sessions[j].id })
	now := time.Now()
	var rows [][]any
	for _, sess := range sessions {
		addr, port := splitAddr(sess.conn.RemoteAddr())
		laddr, lport := splitAddr(sess.conn.LocalAddr())
		state := "active"
		var wait time.Duration
		if t := sess.stats.waitingSince.Load(); t != 0 {
			state = "waiting"
			wait = now.Sub(time.Unix(0, t))
		}
		link, app := "", ""
		request := sess.started
		if sess.console != nil {
			app = sess.console.appName
		} else {
			app = sess.settings["application_name"] // as the client logged in
			sess.mu.Lock()
			if sess.server != nil {
				link = fmt.Sprintf("s%d", sess.server.ID())
			}
			if !sess.stats.lastRequest.IsZero() {
				request = sess.stats.lastRequest
			}
			sess.mu.Unlock()
		}
		rows = append(rows, []any{"C", sess.user, sess.database, state, addr, port, laddr, lport,
			pgbTime(sess.started), pgbTime(request), int64(wait / time.Second), int64((wait % time.Second) / time.Microsecond),
			int64(0), fmt.Sprintf("c%d", sess.id), link, int64(0), "", app})
	}
	return rows
}

func (s *Server) showServers() [][]any {
	holders := map[uint64]uint64{}
	for _, sess := range s.liveSessions() {
		sess.mu.Lock()
		if sess.server != nil {
			holders[sess.server.ID()] = sess.id
		}
		sess.mu.Unlock()
	}
	var rows [][]any
	for _, si := range s.pool.Servers() {
		state := "active"
		if si.Idle {
			state = "idle"
		}
		addr, port := splitAddr(si.RemoteAddr)
		laddr, lport := splitAddr(si.LocalAddr)
		link := ""
		if id, ok := holders[si.ID]; ok {
			link = fmt.Sprintf("c%d", id)
		}
		closeNeeded := int64(0)
		if si.CloseNeeded {
			closeNeeded = 1
		}
		tls := ""
		if si.TLS {
			tls = "TLS"
		}
		rows = append(rows, []any{"S", si.Route.User, si.Route.Database, state, addr, port, laddr, lport,
			pgbTime(si.Created), pgbTime(si.LastUsed), int64(0), int64(0), closeNeeded, fmt.Sprintf("s%d", si.ID), link,
			int64(si.PID), tls, ""})
	}
	return rows
}

// statsWindow keeps two snapshots of the totals, at least statsPeriod
// apart, for SHOW STATS' averages.
type statsWindow struct {
	mu        sync.Mutex
	prev, cur statsSnapshot
}

type statsSnapshot struct {
	at     time.Time
	totals map[string]Totals
}

// averages returns, per database, the per-second rates and mean durations
// over the last complete window (zero until one has passed).
func (w *statsWindow) window(now time.Time, totals map[string]Totals) (prev, cur statsSnapshot) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.cur.at.IsZero() {
		w.cur = statsSnapshot{at: now, totals: totals}
	} else if now.Sub(w.cur.at) >= statsPeriod {
		w.prev, w.cur = w.cur, statsSnapshot{at: now, totals: totals}
	}
	return w.prev, w.cur
}

func (s *Server) showStats(what string) [][]any {
	totals := s.Totals()
	for _, st := range s.pool.Routes() {
		if _, ok := totals[st.Route.Database]; !ok {
			totals[st.Route.Database] = Totals{}
		}
	}
	prev, cur := s.statsWindow.window(time.Now(), totals)
	dbs := make([]string, 0, len(totals))
	for db := range totals {
		dbs = append(dbs, db)
	}
	sort.Strings(dbs)
	us := func(d time.Duration) int64 { return int64(d / time.Microsecond) }
	var rows [][]any
	for _, db := range dbs {
		t := totals[db]
		var avg [7]int64 // xact_count, query_count, recv, sent, xact_time, query_time, wait_time
		if !prev.at.IsZero() {
			a, b := prev.totals[db], cur.totals[db]
			secs := int64(cur.at.Sub(prev.at) / time.Second)
			if secs < 1 {
				secs = 1
			}
			xacts, queries := b.Transactions-a.Transactions, b.Queries-a.Queries
			avg[0], avg[1] = xacts/secs, queries/secs
			avg[2], avg[3] = (b.BytesIn-a.BytesIn)/secs, (b.BytesOut-a.BytesOut)/secs
			if xacts > 0 {
				avg[4] = us(b.TransactionTime-a.TransactionTime) / xacts
				avg[6] = us(b.WaitTime-a.WaitTime) / xacts
			}
			if queries > 0 {
				avg[5] = us(b.QueryTime-a.QueryTime) / queries
			}
		}
		total := []any{t.Transactions, t.Queries, t.BytesIn, t.BytesOut, us(t.TransactionTime), us(t.QueryTime), us(t.WaitTime)}
		switch what {
		case "STATS_TOTALS":
			rows = append(rows, append([]any{db}, total...))
		case "STATS_AVERAGES":
			rows = append(rows, []any{db, avg[0], avg[1], avg[2], avg[3], avg[4], avg[5], avg[6]})
		default:
			row := append([]any{db}, total...)
			for _, v := range avg {
				row = append(row, v)
			}
			rows = append(rows, append(row, t.Queries))
		}
	}
	return rows
}

func (s *Server) showConfig() [][]any {
	live := s.live.Load()
	def := config.Default()
	defaults := map[string]string{}
	for _, kv := range def.Redacted() {
		defaults[kv[0]] = kv[1]
	}
	var rows [][]any
	for _, kv := range live.Redacted() {
		changeable := "no"
		if config.Reloadable(kv[0]) {
			changeable = "yes"
		}
		rows = append(rows, []any{kv[0], kv[1], defaults[kv[0]], changeable})
	}
	return rows
}

func (s *Server) showLists() [][]any {
	routes := s.pool.Routes()
	dbs, users := map[string]bool{}, map[string]bool{}
	for _, st := range routes {
		dbs[st.Route.Database] = true
		users[st.Route.User] = true
	}
	live := s.liveSessions()
	login := s.ClientCount() - int64(len(live))
	servers := len(s.pool.Servers())
	return [][]any{
		{"databases", int64(len(dbs))}, {"users", int64(len(users))}, {"pools", int64(len(routes))},
		{"free_clients", int64(0)}, {"used_clients", int64(len(live))}, {"login_clients", max(login, 0)},
		{"free_servers", int64(0)}, {"used_servers", int64(servers)},
		{"dns_names", int64(0)}, {"dns_zones", int64(0)}, {"dns_queries", int64(0)}, {"dns_pending", int64(0)},
	}
}

func (s *Server) showDatabases() [][]any {
	limit, _ := s.pool.Limit()
	open := map[string]int64{}
	for _, st := range s.pool.Routes() {
		open[st.Route.Database] += int64(st.Open + st.Opening)
	}
	for _, sess := range s.liveSessions() {
		if sess.console == nil {
			if _, ok := open[sess.database]; !ok {
				open[sess.database] = 0
			}
		}
	}
	dbs := make([]string, 0, len(open))
	for db := range open {
		dbs = append(dbs, db)
	}
	sort.Strings(dbs)
	var forceUser any
	if s.opts.UpstreamUser != "" {
		forceUser = s.opts.UpstreamUser
	}
	var rows [][]any
	for _, db := range dbs {
		paused := int64(0)
		if s.pool.IsPaused(db) {
			paused = 1
		}
		rows = append(rows, []any{db, s.opts.Console.UpstreamHost, int64(s.opts.Console.UpstreamPort), db, forceUser,
			int64(limit), int64(0), int64(0), s.cfg.PoolMode, int64(limit), open[db], paused, int64(0)})
	}
	return rows
}

func (s *Server) showUsers() [][]any {
	users := map[string]bool{}
	for _, st := range s.pool.Routes() {
		users[st.Route.User] = true
	}
	names := make([]string, 0, len(users))
	for u := range users {
		names = append(names, u)
	}
	sort.Strings(names)
	rows := make([][]any, len(names))
	for i, u := range names {
		rows[i] = []any{u, s.cfg.PoolMode}
	}
	return rows
}

// appendRowDescription encodes a RowDescription; formats are the Bind
// result format codes (none: text; one: for every column).
func appendRowDescription(dst []byte, cols []consoleColumn, formats []int16) []byte {
	rd := pgproto3.RowDescription{Fields: make([]pgproto3.FieldDescription, len(cols))}
	for i, c := range cols {
		size := int16(-1)
		switch c.oid {
		case oidInt4:
			size = 4
		case oidInt8:
			size = 8
		}
		rd.Fields[i] = pgproto3.FieldDescription{Name: []byte(c.name), DataTypeOID: c.oid, DataTypeSize: size,
			TypeModifier: -1, Format: formatOf(formats, i)}
	}
	out, err := rd.Encode(dst)
	if err != nil {
		return dst
	}
	return out
}

func formatOf(formats []int16, i int) int16 {
	switch len(formats) {
	case 0:
		return 0
	case 1:
		return formats[0]
	}
	if i < len(formats) {
		return formats[i]
	}
	return 0
}

// appendRows encodes the result's notice, rows and command tag.
func (r consoleResult) appendRows(dst []byte, formats []int16) []byte {
	if r.notice != "" {
		dst, _ = (&pgproto3.NoticeResponse{Severity: "NOTICE", SeverityUnlocalized: "NOTICE", Code: "00000", Message: r.notice}).Encode(dst)
	}
	for _, row := range r.rows {
		start := len(dst)
		dst = append(dst, 'D', 0, 0, 0, 0)
		dst = binary.BigEndian.AppendUint16(dst, uint16(len(row)))
		for i, v := range row {
			dst = appendValue(dst, r.cols[i].oid, formatOf(formats, i), v)
		}
		wire.SetLength(dst, start)
	}
	dst, _ = (&pgproto3.CommandComplete{CommandTag: []byte(r.tag)}).Encode(dst)
	return dst
}

// appendValue encodes one column value with its length, in text (format
// 0) or binary (1) format.
func appendValue(dst []byte, oid uint32, format int16, v any) []byte {
	var n int64
	switch x := v.(type) {
	case nil:
		return binary.BigEndian.AppendUint32(dst, 0xffffffff) // -1: NULL
	case string:
		dst = binary.BigEndian.AppendUint32(dst, uint32(len(x)))
		return append(dst, x...)
	case int64:
		n = x
	}
	if format == 0 {
		s := strconv.FormatInt(n, 10)
		dst = binary.BigEndian.AppendUint32(dst, uint32(len(s)))
		return append(dst, s...)
	}
	switch oid {
	case oidInt4:
		dst = binary.BigEndian.AppendUint32(dst, 4)
		return binary.BigEndian.AppendUint32(dst, uint32(int32(n)))
	case oidInt8:
		dst = binary.BigEndian.AppendUint32(dst, 8)
		return binary.BigEndian.AppendUint64(dst, uint64(n))
	}
	return appendNumericBinary(dst, n)
}

// appendNumericBinary encodes an integer as a binary numeric: digit count,
// weight, sign, display scale, then base-10000 digits, most significant
// first (src/backend/utils/adt/numeric.c, numeric_send).
func appendNumericBinary(dst []byte, n int64) []byte {
	sign := uint16(0)
	u := uint64(n)
	if n < 0 {
		sign = 0x4000
		u = uint64(-n)
	}
	var digits []uint16
	for u > 0 {
		digits = append(digits, uint16(u%10000))
		u /= 10000
	}
	weight := len(digits) - 1
	slices.Reverse(digits)
	for len(digits) > 0 && digits[len(digits)-1] == 0 {
		digits = digits[:len(digits)-1]
	}
	if len(digits) == 0 {
		weight = 0
	}
	dst = binary.BigEndian.AppendUint32(dst, uint32(8+2*len(digits)))
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(digits)))
	dst = binary.BigEndian.AppendUint16(dst, uint16(int16(weight)))
	dst = binary.BigEndian.AppendUint16(dst, sign)
	dst = binary.BigEndian.AppendUint16(dst, 0)
	for _, d := range digits {
		dst = binary.BigEndian.AppendUint16(dst, d)
	}
	return dst
}
