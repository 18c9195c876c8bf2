package proxy

import (
	"context"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/auth"
	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/rawsock"
	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/wire"
)

// Startup-phase request codes (src/include/libpq/pqcomm.h).
const (
	sslRequestCode    = 80877103
	gssEncRequestCode = 80877104
	cancelRequestCode = 80877102
	protocolMajor3    = 3
)

// cancelKey is the BackendKeyData the governor gives a client.
type cancelKey struct {
	pid    uint32
	secret uint32
}

// serveConn runs one client connection from accept to close.
func (s *Server) serveConn(c net.Conn) {
	c = rawsock.Wrap(c) // the relay's reads and writes, as raw system calls
	s.clients.Add(1)
	defer s.clients.Add(-1)
	id := s.nextID.Add(1)
	log := s.logger.WithLazy(zap.Uint64("conn_id", id), zap.String("client", c.RemoteAddr().String()), zap.String("mode", s.cfg.PoolMode))

	sess := &session{
		srv:     s,
		id:      id,
		conn:    c,
		log:     log,
		started: time.Now(),
		txMode:  s.cfg.PoolMode == config.PoolModeTransaction,
		tx:      'I',
		stmts:   map[string]*clientStmt{},
		// verifyCh holds one answer: the pump waits for at most one.
		verifyCh: make(chan verifyResult, 1),
		quit:     make(chan struct{}),
	}
	sess.virtual = sess.txMode
	sess.linkUnnamed = !s.opts.ReplayUnnamed
	sess.slot = pool.NewHandlerSlot(sess)
	if rc, ok := c.(*rawsock.Conn); ok && s.cfg.Timeouts.ClientWrite > 0 {
		rc.SetWriteTimeout(s.cfg.Timeouts.ClientWrite, sess.clientWriteTimedOut)
	}
	// Buffers are lent while the session is active: an idle client holds
	// none (see pump).
	sess.rd = wire.NewPooledReader(c, &s.bufs, s.cfg.Clients.MaxMessageSize)
	sess.rd.SetBudget(s.buffers)
	sess.cw = wire.NewPooledWriter(c, &s.bufs)
	sess.sw = wire.NewPooledWriter(nil, &s.bufs)
	defer sess.releaseBuffers()
	defer sess.releaseHeld()

	_ = c.SetDeadline(time.Now().Add(s.cfg.Timeouts.ClientLogin))
	// A login in progress when the shutdown begins ends then: it would be
	// refused, and nothing may wait on a client that is slow to log in.
	ctx, cancel := context.WithTimeout(s.stopCtx, s.cfg.Timeouts.ClientLogin)
	stopCut := context.AfterFunc(s.stopCtx, func() { _ = c.SetDeadline(time.Now()) })
	// Counted among the connections logging in once its deadline is set:
	// dropping it sets another.
	sess.pending = &pendingLogin{conn: c, cancel: cancel}
	s.pending.add(sess.pending, s.cfg.Clients.MaxPendingLogins)
	err := sess.startup(ctx)
	s.pending.leave(sess.pending)
	stopCut()
	cancel()
	if err != nil {
		if !errors.Is(err, errCancelRequest) {
			sess.loginFailed(err)
		}
		s.dropSession(sess)
		_ = c.Close()
		return
	}
	_ = c.SetDeadline(time.Time{})
	if sess.console != nil {
		sess.serveConsole()
		return
	}
	sess.serve()
}

var errCancelRequest = errors.New("cancel request handled")

// startup reads startup packets until a StartupMessage, authenticates the
// client and sends the welcome. On error nothing final has been sent; the
// caller reports it.
func (sess *session) startup(ctx context.Context) error {
	s := sess.srv
	var ct *clientTLS // set once TLS is established
	for {
		body, err := sess.rd.ReadStartup()
		if err != nil {
			return err
		}
		code := binary.BigEndian.Uint32(body)
		switch {
		case code == sslRequestCode && len(body) == 4:
			if sess.rd.Buffered() > 0 {
				return fatalf(codeProtocolViolation, "received unencrypted data after SSL request")
			}
			if ct != nil {
				return fatalf(codeProtocolViolation, "SSL request received on a connection that is already encrypted")
			}
			if s.opts.TLS != nil {
				if ct, err = sess.startTLS(ctx); err != nil {
					return err
				}
				continue
			}
			// TLS termination is not configured: refuse, as Postgres does
			// without ssl = on, and read the next packet in plaintext.
			if _, err := sess.conn.Write([]byte{'N'}); err != nil {
				return err
			}
		case code == gssEncRequestCode && len(body) == 4:
			if sess.rd.Buffered() > 0 {
				return fatalf(codeProtocolViolation, "received unencrypted data after GSSAPI encryption request")
			}
			if _, err := sess.conn.Write([]byte{'N'}); err != nil {
				return err
			}
		case code == cancelRequestCode && len(body) == 12:
			s.handleCancel(binary.BigEndian.Uint32(body[4:]), binary.BigEndian.Uint32(body[8:]))
			return errCancelRequest
		case code == peerCancelRequestCode && len(body) == 8 && s.opts.Peers != nil:
			sess.servePeerCancel(binary.BigEndian.Uint32(body[4:]))
			return errCancelRequest
		case code>>16 == protocolMajor3:
			return sess.login(ctx, body, ct)
		default:
			return fatalf(codeFeatureNotSupported, "unsupported frontend protocol %d.%d: server supports 3.0", code>>16, code&0xffff)
		}
	}
}

// handleCancel forwards a client's CancelRequest to the server connection
// that the client with this key holds right now, and drops it otherwise. A
// key this replica does not know that another replica issued goes to that
// replica (budget.cluster). The result is counted
// (pggovernor_cancel_requests_total).
func (s *Server) handleCancel(pid, secret uint32) {
	s.opts.Metrics.cancelRequest(s.cancel(pid, secret))
}

// cancel deals with a CancelRequest for handleCancel and returns its
// result, one of the Cancel* constants.
func (s *Server) cancel(pid, secret uint32) string {
	sess := s.sessionByKey(pid)
	if sess == nil && s.forwardCancel(pid, secret) {
		return CancelForwarded
	}
	if sess == nil || subtle.ConstantTimeEq(int32(sess.key.secret), int32(secret)) != 1 {
		s.logger.Debug("cancel request for an unknown key dropped")
		return CancelDropped
	}
	return sess.cancelQuery()
}

// cancelQuery cancels what the session runs now, if anything: its query
// on the server, or its console command. It returns the result, one of the
// Cancel* constants.
func (sess *session) cancelQuery() string {
	if sess.console != nil {
		sess.console.cancelCommand()
		return CancelSent
	}
	sess.mu.Lock()
	srv := sess.server
	busy := !sess.q.empty()
	sess.mu.Unlock()
	if srv == nil || !busy {
		sess.log.Debug("cancel request dropped: the client has no query running")
		return CancelIdle
	}
	if err := srv.Cancel(context.Background()); err != nil {
		sess.log.Warn("forwarding cancel request failed", zap.Error(err))
		return CancelDropped
	}
	sess.log.Debug("cancel request forwarded", zap.Uint32("backend_pid", srv.PID()))
	return CancelSent
}

// login handles a StartupMessage: checks, authentication, welcome. ct is
// the TLS the client established, nil in plaintext.
func (sess *session) login(ctx context.Context, body []byte, ct *clientTLS) error {
	s := sess.srv
	var sm pgproto3.StartupMessage
	minor := binary.BigEndian.Uint32(body) & 0xffff
	if minor != 0 {
		// Accept 3.x as 3.0, as Postgres does: decode with the 3.0 number.
		binary.BigEndian.PutUint32(body, pgproto3.ProtocolVersion30)
	}
	if err := sm.Decode(body); err != nil {
		return fatalf(codeProtocolViolation, "invalid startup packet layout")
	}
	sess.user = sm.Parameters["user"]
	if sess.user == "" {
		return fatalf(codeInvalidAuthSpec, "no PostgreSQL user name specified in startup packet")
	}
	sess.database = sm.Parameters["database"]
	if sess.database == "" {
		sess.database = sess.user
	}
	sess.log = sess.log.With(zap.String("db", sess.database), zap.String("user", sess.user))
	// A Unix socket is local and libpq never asks for TLS on one (as
	// Postgres' "local" hba lines): only TCP clients must use TLS.
	if ct == nil && s.opts.TLS != nil && s.opts.TLS.Required() && clientIP(sess.conn) != "" {
		return fatalf(codeInvalidAuthSpec, "connection without TLS refused for user %q, database %q: pggovernor requires TLS (clients.tls.mode is %s)", sess.user, sess.database, s.opts.TLS.Mode()).
			withHint("Connect with sslmode=require, verify-ca or verify-full, or set clients.tls.mode to allow to accept clients without TLS.")
	}
	if r := sm.Parameters["replication"]; r != "" && r != "false" && r != "off" && r != "no" && r != "0" {
		return fatalf(codeFeatureNotSupported, "replication connections are not supported through pggovernor").
			withHint("Connect replication clients to the server directly.")
	}
	if minor != 0 {
		var unrecognized []string
		for k := range sm.Parameters {
			if strings.HasPrefix(k, "_pq_.") {
				unrecognized = append(unrecognized, k)
			}
		}
		sort.Strings(unrecognized)
		if err := sess.sendStartup(&pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0, UnrecognizedOptions: unrecognized}); err != nil {
			return err
		}
	}
	login := auth.Login{User: sess.user, Addr: clientIP(sess.conn), Database: sess.database}
	if ct != nil {
		login.TLS, login.ServerCert = &ct.state, ct.leaf
	}
	if isConsoleDatabase(sess.database) {
		return sess.consoleLogin(ctx, login, sm.Parameters)
	}
	params, err := startupSettings(sm.Parameters)
	if err != nil {
		return err
	}
	sess.settings = params
	sess.vs.tempPath = startupTempPath(params)

	res, err := sess.authenticate(ctx, login)
	if err != nil {
		return err
	}
	upstreamUser := s.opts.UpstreamUser
	if upstreamUser == "" {
		upstreamUser = res.User
	}
	sess.route = pool.Route{Database: sess.database, User: upstreamUser}
	if err := s.register(sess); err != nil {
		return err
	}
	s.assignCancelKey(sess)
	if err := sess.welcome(ctx); err != nil {
		// Not served after all: forget the session and its cancel key, or
		// a drain would wait for it and the maps would keep it; it adds
		// nothing to its database's totals (the database may not exist).
		s.dropSession(sess)
		return err
	}
	s.pool.AddClient(sess.route) // until serve ends: the route is kept
	return nil
}

// authenticate runs the verifier's exchange; the log of the session names
// the hba line that decided, if any. A failure the throttle delays is
// answered at once when pggovernor shuts down.
func (sess *session) authenticate(ctx context.Context, login auth.Login) (auth.Result, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer context.AfterFunc(sess.srv.stopCtx, cancel)()
	defer cancel()
	res, err := sess.srv.opts.Verifier.Authenticate(ctx, (*authConn)(sess), login)
	if res.Rule != "" {
		sess.log = sess.log.With(zap.String("hba_rule", res.Rule))
	}
	return res, err
}

// startupSettings keeps the run-time parameters of a StartupMessage that go
// to the server (everything but user, database, replication and protocol
// options), with "options" split into its -c name=value settings.
func startupSettings(p map[string]string) (map[string]string, error) {
	out := map[string]string{}
	for k, v := range p {
		switch {
		case k == "user" || k == "database" || k == "replication" || strings.HasPrefix(k, "_pq_."):
		case k == "options":
			opts, err := parseOptions(v)
			if err != nil {
				return nil, err
			}
			for ok, ov := range opts {
				out[ok] = ov
			}
		default:
			out[k] = v
		}
	}
	return out, nil
}

// parseOptions parses the "options" startup parameter: command-line style
// "-c name=value" and "--name=value" settings, with backslash escapes.
func parseOptions(s string) (map[string]string, error) {
	var args []string
	var cur strings.Builder
	escaped, in := false, false
	for _, r := range s {
		switch {
		case escaped:
			cur.WriteRune(r)
			escaped, in = false, true
		case r == '\\':
			escaped = true
		case r == ' ' || r == '\t':
			if in {
				args = append(args, cur.String())
				cur.Reset()
				in = false
			}
		default:
			cur.WriteRune(r)
			in = true
		}
	}
	if in {
		args = append(args, cur.String())
	}
	out := map[string]string{}
	for i := 0; i < len(args); i++ {
		a := args[i]
		var kv string
		switch {
		case a == "-c" && i+1 < len(args):
			i++
			kv = args[i]
		case strings.HasPrefix(a, "-c"):
			kv = a[2:]
		case strings.HasPrefix(a, "--"):
			kv = a[2:]
		default:
			return nil, fatalf(codeFeatureNotSupported, "unsupported switch %q in the options startup parameter: pggovernor accepts only -c name=value", a)
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fatalf(codeProtocolViolation, "invalid setting %q in the options startup parameter: expected name=value", kv)
		}
		out[strings.ReplaceAll(k, "-", "_")] = v
	}
	return out, nil
}

// welcome completes the login: AuthenticationOk, the parameters the client
// sees, its BackendKeyData and ReadyForQuery. The parameters come from the
// cache for this route and settings, or from a server connection on which
// the client's settings are applied (which also checks that the database
// exists and the settings are valid, as a direct login would).
func (sess *session) welcome(ctx context.Context) error {
	s := sess.srv
	key := welcomeKey{route: sess.route, params: settingsKey(sess.settings)}
	entry := s.welcome.get(key)
	if entry == nil || !sess.txMode {
		// A login waits behind a PAUSE only within timeouts.client_login.
		wctx, cancel := context.WithTimeout(pool.PauseCounts(ctx), s.cfg.Timeouts.QueryWait)
		srv, err := s.pool.Acquire(wctx, sess.route, nil)
		cancel()
		if err != nil {
			return toClientError(err, true, s.cfg.Timeouts.QueryWait)
		}
		if stmts := sess.settingStatements(srv, sess.loginView(srv, s.pool.Welcome(sess.route))); stmts != "" {
			if err := s.pool.Exec(ctx, srv, stmts); err != nil {
				s.pool.Release(srv)
				return toClientError(err, true, s.cfg.Timeouts.QueryWait)
			}
			sess.recordSettings(srv)
			sess.stateOf(srv).paramsChanged()
		}
		view := make(map[string]string, len(srv.Params))
		for k, v := range srv.Params {
			view[k] = v
		}
		entry = &welcomeEntry{view: view}
		s.welcome.put(key, entry)
		if sess.txMode {
			s.pool.Release(srv)
		} else {
			sess.server = srv
			sess.tx = srv.TxStatus
			srv.SetHandler(sess.slot)
			sess.sw.Reset(srv.Conn())
		}
	}
	// Shared with every session of the same settings until one changes a
	// parameter (ServerMessage copies it then).
	sess.view, sess.fit = entry.view, entry
	view := entry.view
	sess.noteParam("standard_conforming_strings", view["standard_conforming_strings"])
	buf := make([]byte, 0, 512)
	buf, _ = (&pgproto3.AuthenticationOk{}).Encode(buf)
	names := make([]string, 0, len(view))
	for k := range view {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		buf, _ = (&pgproto3.ParameterStatus{Name: k, Value: view[k]}).Encode(buf)
	}
	buf = binary.BigEndian.AppendUint32(append(buf, 'K'), 12)
	buf = binary.BigEndian.AppendUint32(buf, sess.key.pid)
	buf = binary.BigEndian.AppendUint32(buf, sess.key.secret)
	buf, _ = (&pgproto3.ReadyForQuery{TxStatus: 'I'}).Encode(buf)
	return sess.finishLogin(buf)
}

// errPendingDropped ends a login that was dropped to make room for a newer
// one (clients.max_pending_logins).
var errPendingDropped = errors.New("dropped to make room for a newer connection (clients.max_pending_logins)")

// finishLogin writes the welcome, unless the login was dropped meanwhile
// to make room for a newer one: once the session has left the connections
// logging in, it can no longer be dropped.
func (sess *session) finishLogin(welcome []byte) error {
	if !sess.srv.pending.leave(sess.pending) {
		return errPendingDropped
	}
	_, err := sess.conn.Write(welcome)
	return err
}

func settingsKey(m map[string]string) string {
	if len(m) == 0 {
		return ""
	}
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, k := range names {
		fmt.Fprintf(&b, "%s=%s\x00", k, m[k])
	}
	return b.String()
}

// loginFailed reports a failed login to the client (if it is still there)
// and to the log, once.
func (sess *session) loginFailed(err error) {
	if sess.srv.pending.wasDropped(sess.pending) {
		sess.pendingDropped(err)
		return
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
		sess.log.Debug("client left during login", zap.Error(err))
		return
	}
	var hsErr *handshakeError
	if errors.As(err, &hsErr) {
		// Nothing can reach the client: it expects TLS records.
		sess.log.Info("login failed", zap.Error(err))
		return
	}
	var ce *clientError
	switch {
	case sess.srv.stopCtx.Err() != nil:
		ce = errShuttingDown() // the shutdown cut the login short
	case errors.Is(err, os.ErrDeadlineExceeded):
		ce = fatalf(codeQueryCanceled, "canceling authentication due to timeout").
			withHint(fmt.Sprintf("The client did not finish logging in within timeouts.client_login (%s).", sess.srv.cfg.Timeouts.ClientLogin))
	default:
		ce = toClientError(err, true, sess.srv.cfg.Timeouts.QueryWait)
	}
	ce.fatal = true
	reason := loginFailureReason(err, ce)
	if ce.code == codeAdminShutdown {
		reason = LoginFailureShutdown
	}
	sess.srv.opts.Metrics.loginFailed(reason)
	level := zap.InfoLevel
	if errors.Is(err, auth.ErrAuthFailed) || errors.Is(err, auth.ErrCertAuthFailed) {
		level = zap.WarnLevel
	}
	sess.log.Log(level, "login failed", zap.String("sqlstate", ce.code), zap.Error(err))
	_ = sess.conn.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = sess.conn.Write(sess.srv.appendError(nil, ce, sess.user))
}

// pendingDropped reports a connection dropped while logging in to make room
// for a newer one: counted, logged (repeats are counted by the log's
// rate limit), and told with 53300 if that can be written at once — not
// in the middle of a TLS handshake, where the client expects TLS records.
func (sess *session) pendingDropped(cause error) {
	s := sess.srv
	s.opts.Metrics.loginFailed(LoginFailureTooManyPending)
	sess.log.Warn("a connection still logging in was dropped to make room for a new one: more than clients.max_pending_logins connections were logging in",
		zap.Int("max_pending_logins", s.cfg.Clients.MaxPendingLogins), zap.NamedError("cause", cause))
	var hsErr *handshakeError
	if errors.As(cause, &hsErr) {
		return
	}
	ce := fatalf(codeTooManyConnections, "too many connections waiting to log in: clients.max_pending_logins (%d) reached, and this one was the oldest", s.cfg.Clients.MaxPendingLogins).
		withHint("Log in within less time, or raise clients.max_pending_logins.")
	ce.fatal = true
	_ = sess.conn.SetWriteDeadline(time.Now().Add(pendingDropWrite))
	_, _ = sess.conn.Write(s.appendError(nil, ce, sess.user))
}

// pendingDropWrite bounds the write of the error to a dropped connection:
// its socket buffer is normally empty, so the error goes out at once or
// not at all.
const pendingDropWrite = 50 * time.Millisecond

func (sess *session) sendStartup(msg pgproto3.BackendMessage) error {
	buf, err := msg.Encode(nil)
	if err != nil {
		return err
	}
	_, err = sess.conn.Write(buf)
	return err
}

// authConn adapts a session to auth.Conn for the login exchange.
type authConn session

func (a *authConn) Send(msg pgproto3.BackendMessage) error { return (*session)(a).sendStartup(msg) }

func (a *authConn) ReceivePassword(context.Context) ([]byte, error) {
	sess := (*session)(a)
	sess.rd.SetMaxLen(maxAuthMessage)
	defer sess.rd.SetMaxLen(sess.srv.cfg.Clients.MaxMessageSize)
	typ, n, err := sess.rd.Header()
	if err != nil {
		return nil, err
	}
	if typ != 'p' {
		return nil, fatalf(codeProtocolViolation, "expected password response, got message type %d", typ)
	}
	frame, err := sess.rd.Frame(n)
	if err != nil {
		return nil, err
	}
	return frame[wire.HeaderLen:], nil
}

// maxAuthMessage bounds a password or SASL message.
const maxAuthMessage = 8192

// loginFailureReason classifies a failed login for the metrics.
func loginFailureReason(err error, ce *clientError) string {
	var waitErr *pool.WaitError
	var pgErr *pgconn.PgError
	var refused *auth.RefusedError
	switch {
	case errors.As(err, &refused) && refused.Rules:
		return LoginFailureHBA
	case errors.Is(err, auth.ErrAuthFailed), errors.Is(err, auth.ErrCertAuthFailed), errors.As(err, &refused):
		return LoginFailureAuth
	case errors.Is(err, os.ErrDeadlineExceeded), ce.code == codeQueryCanceled:
		return LoginFailureTimeout
	case ce.code == codeAdminShutdown:
		return LoginFailureShutdown
	case errors.As(err, &waitErr):
		return LoginFailureNoServer
	case ce.code == codeTooManyConnections:
		return LoginFailureTooMany
	case ce.code == codeInsufficientPriv:
		return LoginFailureConsoleUser
	case errors.As(err, &pgErr):
		return LoginFailureServer
	case ce.code == codeProtocolViolation, ce.code == codeFeatureNotSupported, ce.code == codeInvalidAuthSpec:
		return LoginFailureProtocol
	}
	return LoginFailureOther
}
