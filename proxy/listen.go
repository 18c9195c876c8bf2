package proxy

// This file multiplexes LISTEN/NOTIFY in transaction mode: the channels of
// all clients of a route are listened to on ONE server connection (the
// hub's), reference-counted; a client's LISTEN and UNLISTEN are answered by
// the governor once the hub's connection has done what they need, and each
// notification is fanned out to the clients listening on its channel. A
// client that only listens is therefore not pinned, and N replicas × one
// pq.Listener cost one server connection per governor.
//
// Which notifications a client gets is what a direct connection gets:
// those committed while it listened. Postgres signals the listening
// backends when a NOTIFY's transaction commits, before the notifier is told
// of the commit; a backend sends what it has received when idle, and
// before every ReadyForQuery. So a round trip on the hub's connection (an
// empty query) that starts after a client's request arrived ends with every
// notification committed before the request ahead of its ReadyForQuery in
// the hub's stream. Hence:
//
//   - UNLISTEN: the subscription ends only after such a round trip (then,
//     if nobody else listens, the hub's UNLISTEN); what arrived meanwhile
//     is queued for the client, and written ahead of its UNLISTEN's answer.
//     A notification committed before the client sent UNLISTEN is
//     delivered, whether the hub stops listening or goes on for others.
//   - LISTEN of a channel the hub listens on already: the subscription
//     starts after such a round trip, so nothing committed before the
//     client sent LISTEN reaches it; everything committed after the LISTEN
//     returned arrives at the hub after the subscription began. Of a new
//     channel: the subscription starts before the hub's LISTEN, so whatever
//     the hub receives on it after its LISTEN committed is the client's.
//     Either way every notification committed after the client's LISTEN
//     returned is delivered, and what committed concurrently may or may not
//     be, as on a direct connection.
//
// Fan-out never waits on a client: the hub's reader only appends to each
// listener's bounded backlog (notify.go), so a client that stops reading
// delays nobody else's notifications, nor the hub's own round trips; it is
// disconnected (53200) once more than clients.notify_backlog_size waits for
// it.
//
// If the hub's connection is lost, the clients listening through it are
// disconnected (SQLSTATE 08006), so that they know notifications may have
// been missed and listen again (lib/pq's Listener does) — never a silent
// loss.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/wire"
)

// listenHub is the listener connection of one route.
type listenHub struct {
	srv   *Server
	route pool.Route
	log   *zap.Logger

	// opMu serialises LISTEN/UNLISTEN round trips on the connection.
	opMu sync.Mutex

	mu       sync.Mutex
	conn     *pool.Server
	slot     *pool.HandlerSlot
	channels map[string]map[*session]struct{}
	waiting  chan error // the result of the command in flight
	cmdErr   error
}

// hub returns the route's listen hub, creating it.
func (s *Server) hub(r pool.Route) *listenHub {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.hubs[r]
	if h == nil {
		h = &listenHub{srv: s, route: r, log: s.logger.With(zap.String("db", r.Database), zap.String("upstream_user", r.User)),
			channels: map[string]map[*session]struct{}{}}
		h.slot = pool.NewHandlerSlot(h)
		s.hubs[r] = h
	}
	return h
}

// listen subscribes sess to channel, listening upstream first if it is the
// channel's first listener. When it returns, every notification on the
// channel committed from then on reaches sess; none committed before the
// client sent its LISTEN does (see the file comment).
func (h *listenHub) listen(sess *session, channel string) error {
	h.opMu.Lock()
	defer h.opMu.Unlock()
	h.mu.Lock()
	subs, listened := h.channels[channel]
	if _, ok := subs[sess]; ok {
		h.mu.Unlock()
		return nil // listening already: nothing changes, as in Postgres
	}
	conn := h.conn
	h.mu.Unlock()
	if listened && conn != nil {
		// The connection listens already. A round trip first: what was
		// committed before this LISTEN arrived is then in the
		// connection's stream ahead of its ReadyForQuery, and goes to the
		// channel's listeners of before.
		if err := h.command(conn, ""); err != nil {
			return err
		}
		h.mu.Lock()
		defer h.mu.Unlock()
		subs, ok := h.channels[channel]
		if !ok || h.conn != conn {
			return errListenerLost
		}
		subs[sess] = struct{}{}
		return nil
	}
	if conn == nil {
		ctx, cancel := context.WithTimeout(h.srv.stopCtx, h.srv.cfg.Timeouts.QueryWait) // no wait outlives the shutdown's start
		c, err := h.srv.pool.Acquire(ctx, h.route, nil)
		cancel()
		if err != nil {
			return err
		}
		c.SetHandler(h.slot)
		h.mu.Lock()
		h.conn = c
		h.mu.Unlock()
		h.log.Info("listener connection opened: LISTEN of every client of this route goes through it", zap.Uint64("server_id", c.ID()))
		conn = c
	}
	// Subscribed before the connection's LISTEN commits: whatever it
	// receives on the channel from then on is this client's.
	h.mu.Lock()
	h.channels[channel] = map[*session]struct{}{sess: {}}
	h.mu.Unlock()
	if err := h.command(conn, "LISTEN "+quoteIdent(channel)); err != nil {
		h.mu.Lock()
		if subs := h.channels[channel]; subs != nil {
			delete(subs, sess)
			if len(subs) == 0 {
				delete(h.channels, channel)
			}
		}
		h.mu.Unlock()
		h.releaseIfIdle(conn)
		return err
	}
	return nil
}

// errListenerLost is a LISTEN that found the listener connection gone.
var errListenerLost = errors.New("listener connection lost")

// unlisten unsubscribes sess from channel ("" for all its channels), and
// stops listening upstream on channels nobody listens to any more; the
// connection goes back to the pool when no channel is left.
//
// With barrier (a client's UNLISTEN), the subscription ends only after a
// round trip on the hub's connection that started after the UNLISTEN
// arrived: every notification committed before it is then in the
// connection's stream ahead of the round trip's ReadyForQuery, and queued
// for the client ahead of its UNLISTEN's answer — as a direct connection
// delivers what it read before its UNLISTEN took effect. Without (a client
// that left), at once.
func (h *listenHub) unlisten(sess *session, channel string, barrier bool) error {
	h.opMu.Lock()
	defer h.opMu.Unlock()
	var mine []string
	h.mu.Lock()
	for ch, subs := range h.channels {
		if channel != "" && ch != channel {
			continue
		}
		if _, ok := subs[sess]; ok {
			mine = append(mine, ch)
		}
	}
	conn := h.conn
	h.mu.Unlock()
	if len(mine) == 0 || conn == nil {
		return nil
	}
	if barrier {
		if err := h.command(conn, ""); err != nil {
			return err
		}
	}
	var drop []string
	h.mu.Lock()
	for _, ch := range mine {
		subs, ok := h.channels[ch]
		if !ok {
			continue
		}
		delete(subs, sess)
		if len(subs) == 0 {
			drop = append(drop, ch)
		}
	}
	live := h.conn == conn
	h.mu.Unlock()
	if !live {
		return nil // lost meanwhile: its clients are being disconnected
	}
	for _, ch := range drop {
		if err := h.command(conn, "UNLISTEN "+quoteIdent(ch)); err != nil {
			// The client is unsubscribed all the same; the connection
			// goes on (or was lost, and its clients are told).
			h.log.Info("UNLISTEN on the listener connection failed", zap.Error(err))
			return nil
		}
		h.mu.Lock()
		if len(h.channels[ch]) == 0 {
			delete(h.channels, ch)
		}
		h.mu.Unlock()
	}
	h.releaseIfIdle(conn)
	return nil
}

// releaseIfIdle gives conn back to the pool when no channel is left on it.
// Called with opMu held.
func (h *listenHub) releaseIfIdle(conn *pool.Server) {
	h.mu.Lock()
	idle := len(h.channels) == 0 && h.conn == conn
	if idle {
		h.conn = nil
	}
	h.mu.Unlock()
	if idle {
		// UNLISTEN of every channel left the connection clean (or it is
		// broken, and closed).
		conn.SetHandler(nil)
		h.srv.pool.Release(conn)
		h.log.Info("listener connection released: no client listens any more", zap.Uint64("server_id", conn.ID()))
	}
}

// command runs one statement on the hub's connection and waits for it.
// Called with opMu held.
func (h *listenHub) command(conn *pool.Server, sql string) error {
	done := make(chan error, 1)
	h.mu.Lock()
	h.waiting, h.cmdErr = done, nil
	h.mu.Unlock()
	buf := wire.AppendHeader(nil, 'Q', len(sql)+1)
	buf = append(append(buf, sql...), 0)
	_ = conn.Conn().SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err := conn.Conn().Write(buf)
	_ = conn.Conn().SetWriteDeadline(time.Time{})
	if err != nil {
		conn.MarkBroken()
		return fmt.Errorf("listener connection: %w", err)
	}
	t := time.NewTimer(h.srv.cfg.Timeouts.QueryWait)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		conn.MarkBroken()
		return errors.New("listener connection: the server did not answer")
	}
}

// ServerMessage implements pool.Handler for the hub's connection.
func (h *listenHub) ServerMessage(srv *pool.Server, typ byte, data []byte, more int) error {
	if more > 0 {
		return nil
	}
	switch typ {
	case 'A':
		channel, ok := notificationChannel(data)
		if !ok {
			return errors.New("listener connection: malformed NotificationResponse")
		}
		// Queued for each listener, never written here: the hub's reader
		// does not wait on any client.
		var frame []byte // shared by the recipients
		var over []*session
		h.mu.Lock()
		for s := range h.channels[string(channel)] {
			if frame == nil {
				frame = append([]byte(nil), data...)
			}
			if s.deliver(frame) {
				over = append(over, s)
			}
		}
		h.mu.Unlock()
		for _, s := range over {
			s.notifyOverflowed()
		}
	case 'E':
		var er pgproto3.ErrorResponse
		if err := er.Decode(data[wire.HeaderLen:]); err == nil {
			h.mu.Lock()
			if h.cmdErr == nil {
				h.cmdErr = pgconn.ErrorResponseToPgError(&er)
			}
			h.mu.Unlock()
		}
	case 'Z':
		if len(data) == wire.HeaderLen+1 {
			srv.TxStatus = data[wire.HeaderLen]
		}
		h.mu.Lock()
		if h.waiting != nil {
			h.waiting <- h.cmdErr
			h.waiting = nil
		}
		h.mu.Unlock()
	}
	return nil
}

// ServerFlush implements pool.Handler.
func (h *listenHub) ServerFlush(*pool.Server) error { return nil }

// ServerLost implements pool.Handler: the listener connection is gone, so
// notifications may have been missed. Every client listening through it is
// disconnected and told why; it listens again on a new connection.
func (h *listenHub) ServerLost(srv *pool.Server, err error) {
	h.mu.Lock()
	if h.conn != srv {
		h.mu.Unlock()
		return
	}
	h.conn = nil
	listeners := map[*session]struct{}{}
	for _, subs := range h.channels {
		for s := range subs {
			listeners[s] = struct{}{}
		}
	}
	h.channels = map[string]map[*session]struct{}{}
	if h.waiting != nil {
		h.waiting <- errors.New("listener connection lost")
		h.waiting = nil
	}
	h.mu.Unlock()
	h.srv.pool.Release(srv)
	h.log.Warn("listener connection lost: disconnecting its listening clients so they listen again",
		zap.Int("clients", len(listeners)), zap.Error(err))
	for s := range listeners {
		s.endAsync(fatalf(codeConnectionFailure, "pggovernor's listener connection to the server was lost; notifications may have been missed").
			withHint("Reconnect and LISTEN again."))
	}
}

// notificationChannel returns the channel of a NotificationResponse frame
// (process ID, channel, payload), checking its shape.
func notificationChannel(frame []byte) ([]byte, bool) {
	body := frame[wire.HeaderLen:]
	if len(body) < 4 {
		return nil, false
	}
	channel, rest, ok := wire.CString(body[4:])
	if !ok {
		return nil, false
	}
	if _, rest, ok = wire.CString(rest); !ok || len(rest) != 0 {
		return nil, false
	}
	return channel, true
}

// listenLocally handles a LISTEN or UNLISTEN that is a client's whole
// simple query outside a transaction (transaction mode): through the hub,
// answered by the governor. It reports false for what the server must do
// (inside a transaction, in a multi-statement query).
func (sess *session) listenLocally(text []byte) (bool, error) {
	cmd, channel, ok := parseListen(text)
	if !ok || !sess.virtual {
		return false, nil
	}
	sess.mu.Lock()
	attached := sess.server != nil
	sess.mu.Unlock()
	if attached {
		return false, nil
	}
	h := sess.srv.hub(sess.route)
	var err error
	tag := "LISTEN"
	switch cmd {
	case "LISTEN":
		sess.startNotifier()
		err = h.listen(sess, channel)
		if err == nil {
			sess.listening = true
		}
	case "UNLISTEN":
		tag = "UNLISTEN"
		err = h.unlisten(sess, channel, true)
	}
	if err != nil {
		ce := toClientError(err, false, sess.srv.cfg.Timeouts.QueryWait)
		sess.log.Warn("LISTEN/UNLISTEN through the listener connection failed", zap.String("sqlstate", ce.code), zap.Error(err))
		sess.synthOut = append(sess.srv.appendError(sess.synthOut, ce, sess.user), readyForQuery('I')...)
		return true, nil
	}
	sess.synthOut = append(sess.synthOut, commandComplete(tag)...)
	sess.synthOut = append(sess.synthOut, readyForQuery('I')...)
	return true, nil
}

// parseListen recognises a query text that is exactly one LISTEN channel,
// UNLISTEN channel or UNLISTEN * (channel ""), with the channel name as
// Postgres reads it.
func parseListen(q []byte) (cmd, channel string, ok bool) {
	lx := lexer{src: q}
	t := lx.next()
	switch {
	case t.kind == tokWord && equalFold(t.text(q), "listen"):
		cmd = "LISTEN"
	case t.kind == tokWord && equalFold(t.text(q), "unlisten"):
		cmd = "UNLISTEN"
	default:
		return "", "", false
	}
	t = lx.next()
	switch {
	case t.kind == tokWord:
		channel = lowerASCII(string(t.text(q)))
	case t.kind == tokQuotedIdent:
		channel = unquoteIdent(t.text(q))
	case cmd == "UNLISTEN" && t.kind == tokPunct && t.text(q)[0] == '*':
		channel = ""
	default:
		return "", "", false
	}
	t = lx.next()
	if t.kind == tokPunct && t.text(q)[0] == ';' {
		t = lx.next()
	}
	if t.kind != tokEOF {
		return "", "", false
	}
	return cmd, channel, true
}

func unquoteIdent(b []byte) string {
	out := make([]byte, 0, len(b))
	for i := 0; i < len(b); i++ {
		out = append(out, b[i])
		if b[i] == '"' && i+1 < len(b) && b[i+1] == '"' {
			i++
		}
	}
	return string(out)
}

// close gives the hub's connection back and disconnects its listeners
// (their notifications would stop): used before the database goes away.
func (h *listenHub) close(reason string) {
	h.opMu.Lock()
	defer h.opMu.Unlock()
	h.mu.Lock()
	conn := h.conn
	h.conn = nil
	listeners := map[*session]struct{}{}
	for _, subs := range h.channels {
		for s := range subs {
			listeners[s] = struct{}{}
		}
	}
	h.channels = map[string]map[*session]struct{}{}
	h.mu.Unlock()
	if conn == nil {
		return
	}
	conn.SetHandler(nil)
	conn.MarkBroken()
	h.srv.pool.Release(conn)
	for s := range listeners {
		s.endAsync(fatalf(codeAdminShutdown, "terminating connection: %s", reason).
			withDetail("pggovernor closed its listener connection to this database."))
	}
}
