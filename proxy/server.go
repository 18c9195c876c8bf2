// Package proxy is the client-facing side of pggovernor: listeners, the
// per-client session (startup, authentication, cancel keys), the relay of
// frames between a client and the server connection it holds, the
// transaction-boundary and session-state tracking that decide when that
// connection goes back to the pool, the errors sent to clients, and the
// drain at shutdown.
package proxy

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/auth"
	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/tlsconf"
	"github.com/pggovernor/pggovernor/wire"
)

// Options configure a Server.
type Options struct {
	// Config is the process configuration (listen addresses, pool mode,
	// client limits, timeouts).
	Config *config.Config
	// Pool serves server connections.
	Pool *pool.Pool
	// Verifier authenticates clients.
	Verifier *auth.Verifier
	// TLS terminates TLS for clients that ask for it (clients.tls); nil
	// answers every SSLRequest 'N'.
	TLS *tlsconf.Server
	// UpstreamUser, when set (sidecar model), is the upstream user every
	// client is served as; empty (multi-role model) sends each client's
	// own user upstream.
	UpstreamUser string
	// Logger receives the proxy's logs.
	Logger *zap.Logger
	// ReplayUnnamed releases a client's server connection at the
	// ReadyForQuery after a Parse of the unnamed statement, and prepares
	// the statement again (checked) on the connection that serves its
	// Bind, instead of keeping the connection linked until the Execute.
	// For measurements only; see docs/architecture.md.
	ReplayUnnamed bool
	// PrepareOnControl, when set, answers a prepare-only batch of a client
	// that holds no server connection while none is idle, on the
	// governor's control connection (see prepare.go); nil waits for a
	// pooled connection.
	PrepareOnControl PrepareFunc
	// Metrics are the handles the proxy reports to; the zero value
	// reports nothing.
	Metrics Metrics
	// Console connects the admin console to the rest of the process.
	Console ConsoleOptions
	// Peers, with budget.cluster, locates the other replicas for cancel
	// requests that reach the wrong one; nil otherwise.
	Peers Peers
	// PeerSecret returns the key the replicas share to authenticate
	// forwarded cancel requests (budget.cluster.secret_file), nil when
	// there is none: then cancel requests are neither forwarded to peers
	// nor accepted from them.
	PeerSecret func() []byte
	// PeerAllowed reports whether a peer's IP address may be dialled
	// (budget.cluster.peer_cidrs), checked on the address connected to,
	// after name resolution. Nil allows every one.
	PeerAllowed func(netip.Addr) bool
}

// Server accepts clients and serves them until Shutdown.
type Server struct {
	opts    Options
	cfg     *config.Config
	logger  *zap.Logger
	pool    *pool.Pool
	nextID  atomic.Uint64
	clients atomic.Int64 // connected, logged in or not
	pending pendingLogins
	// bufs lends the sessions' 8 KiB buffers while they are active.
	bufs    wire.Pool
	welcome welcomeCache
	hasher  stmtHasher
	stats   serverStats
	// buffers counts what the sessions hold for clients' messages beyond
	// their 8 KiB buffers, against limits.max_buffered_bytes; texts keeps
	// the bodies of clients' named statements, counted there too.
	buffers *wire.Budget
	texts   *stmtTexts
	// stmtIDs numbers client statements (clientStmt.id).
	stmtIDs atomic.Uint64

	mu        sync.Mutex
	listeners []net.Listener
	sessions  map[*session]struct{}
	keys      map[uint32]*session // cancel keys by process ID
	hubs      map[pool.Route]*listenHub
	draining  bool
	empty     chan struct{} // closed when draining and no session is left
	wg        sync.WaitGroup
	ready     atomic.Bool
	// ended sums the figures of ended sessions, by database.
	ended map[string]*Totals
	// stopCtx is cancelled when Shutdown begins; forceCtx when its drain
	// ends and the remaining clients are cut off (forced is then true).
	stopCtx  context.Context
	stopping context.CancelFunc
	forceCtx context.Context
	forcing  context.CancelFunc
	forced   atomic.Bool
	// watch is true when timeouts.query or timeouts.idle_in_transaction is
	// set: the sessions then run their watchdog (timeouts.go).
	watch bool
	// live is the configuration as last reloaded (admin.users, SHOW
	// CONFIG).
	live atomic.Pointer[config.Config]
	// statsWindow keeps SHOW STATS' averages (admin.go).
	statsWindow statsWindow
}

// NewServer returns a Server; call Listen then Serve.
func NewServer(opts Options) *Server {
	s := &Server{
		opts:     opts,
		cfg:      opts.Config,
		logger:   opts.Logger,
		pool:     opts.Pool,
		sessions: map[*session]struct{}{},
		keys:     map[uint32]*session{},
		hubs:     map[pool.Route]*listenHub{},
		empty:    make(chan struct{}),
		welcome:  welcomeCache{entries: map[welcomeKey]*welcomeEntry{}},
		hasher:   newStmtHasher(),
		ended:    map[string]*Totals{},
	}
	if n := opts.Config.Limits.MaxBufferedBytes; n > 0 {
		s.buffers = wire.NewBudget(int64(n))
	}
	s.texts = newStmtTexts(s.buffers)
	s.stopCtx, s.stopping = context.WithCancel(context.Background())
	s.forceCtx, s.forcing = context.WithCancel(context.Background())
	s.watch = s.cfg.Timeouts.Query > 0 || s.cfg.Timeouts.IdleInTransaction > 0
	s.live.Store(opts.Config)
	return s
}

// The TCP keepalive of client connections: Go's default for accepted
// connections (idle 15 s, then a probe every 15 s, 9 probes), so that a
// client whose host vanished is found within about 2.5 minutes.
const (
	clientKeepAliveIdle     = 15 * time.Second
	clientKeepAliveInterval = 15 * time.Second
	clientKeepAliveCount    = 9
)

// Listen opens the TCP listener (and the Unix socket when configured).
func (s *Server) Listen() error {
	lc := listenConfig()
	l, err := lc.Listen(context.Background(), "tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listening on %s (key listen): %w", s.cfg.Listen, err)
	}
	s.listeners = append(s.listeners, l)
	if dir := s.cfg.UnixSocketDir; dir != "" {
		port := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
		path := filepath.Join(dir, ".s.PGSQL."+port)
		perm, err := s.cfg.UnixSocketPerm()
		if err != nil {
			_ = l.Close()
			return err
		}
		_ = os.Remove(path)
		ul, err := net.Listen("unix", path)
		if err != nil {
			_ = l.Close()
			return fmt.Errorf("listening on unix socket %s (key unix_socket_dir): %w", path, err)
		}
		// As Postgres sets unix_socket_permissions: before any client is
		// accepted (connecting needs write permission on the socket).
		if err := os.Chmod(path, perm); err != nil {
			_ = ul.Close()
			_ = l.Close()
			return fmt.Errorf("setting the permissions of unix socket %s (key unix_socket_mode): %w", path, err)
		}
		s.listeners = append(s.listeners, ul)
	}
	return nil
}

// Addr is the TCP listener's address (useful with port 0).
func (s *Server) Addr() net.Addr { return s.listeners[0].Addr() }

// Ready reports whether the server accepts clients.
func (s *Server) Ready() bool { return s.ready.Load() }

// Serve accepts clients on every listener until Shutdown. It returns nil
// after Shutdown, or the first fatal accept error.
func (s *Server) Serve() error {
	s.ready.Store(true)
	errc := make(chan error, len(s.listeners))
	for _, l := range s.listeners {
		go func(l net.Listener) { errc <- s.acceptLoop(l) }(l) // owner: Serve; exits when l closes
	}
	var first error
	for range s.listeners {
		if err := <-errc; err != nil && first == nil {
			first = err
		}
	}
	return first
}

func (s *Server) acceptLoop(l net.Listener) error {
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			if errors.Is(err, os.ErrDeadlineExceeded) || isTemporaryAccept(err) {
				s.logger.Warn("accept failed; retrying", zap.Error(err))
				time.Sleep(100 * time.Millisecond)
				continue
			}
			return fmt.Errorf("accepting clients: %w", err)
		}
		s.mu.Lock()
		if s.draining {
			s.mu.Unlock()
			_ = c.Close()
			continue
		}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() { // owner: the Server; exits when the client's session ends
			defer s.wg.Done()
			s.serveConn(c)
		}()
	}
}

// isTemporaryAccept recognises errors after which accepting can go on
// (too many open files, connection aborted before accept).
func isTemporaryAccept(err error) bool {
	var se interface{ Temporary() bool }
	return errors.As(err, &se) && se.Temporary()
}

// register makes a session that logged in one of the clients served: it
// refuses it while draining (57P01), and beyond clients.max_connections
// (53300).
func (s *Server) register(sess *session) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		return fatalf(codeAdminShutdown, "terminating connection due to administrator command").withDetail("pggovernor is shutting down")
	}
	if max := s.cfg.Clients.MaxConnections; len(s.sessions) >= max {
		return fatalf(codeTooManyConnections, "sorry, too many clients already: clients.max_connections (%d) reached", max).
			withHint("Raise clients.max_connections, or lower the number of client connections.")
	}
	s.sessions[sess] = struct{}{}
	return nil
}

// unregister removes a session that was served, adding its figures to
// the totals of its database.
func (s *Server) unregister(sess *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.sessions[sess]; ok && sess.console == nil {
		t := s.ended[sess.database]
		if t == nil {
			t = &Totals{}
			s.ended[sess.database] = t
		}
		t.add(sess)
	}
	s.removeLocked(sess)
}

// dropSession removes a session whose login failed (registered or not).
func (s *Server) dropSession(sess *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.removeLocked(sess)
}

func (s *Server) removeLocked(sess *session) {
	delete(s.sessions, sess)
	if sess.key.pid != 0 && s.keys[sess.key.pid] == sess {
		delete(s.keys, sess.key.pid)
	}
	if s.draining && len(s.sessions) == 0 {
		select {
		case <-s.empty:
		default:
			close(s.empty)
		}
	}
}

// assignCancelKey gives a session a process ID and secret unique among live
// sessions, and publishes it for cancel requests; in cluster mode the
// process ID carries the replica's number (peers.go).
func (s *Server) assignCancelKey(sess *session) {
	var b [8]byte
	mask, prefix := uint32(0x7fffffff), uint32(0)
	if s.opts.Peers != nil {
		mask = 1<<replicaIDShift - 1
		if id := s.opts.Peers.ReplicaID(); id > 0 && id <= MaxReplicaID {
			prefix = uint32(id) << replicaIDShift
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		if _, err := rand.Read(b[:]); err != nil {
			panic("crypto/rand failed: " + err.Error())
		}
		pid := prefix | binary.BigEndian.Uint32(b[:4])&mask
		if pid == 0 || s.keys[pid] != nil {
			continue
		}
		k := cancelKey{pid: pid, secret: binary.BigEndian.Uint32(b[4:])}
		sess.key = k // under s.mu, before the key is published: sessionByKey finds it set
		s.keys[pid] = sess
		return
	}
}

func (s *Server) sessionByKey(pid uint32) *session {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.keys[pid]
}

// Shutdown stops accepting clients, disconnects idle ones, lets clients in
// a transaction finish it until ctx ends, then disconnects the rest, all
// with SQLSTATE 57P01. It returns once every session has ended, or at the
// latest forcedSessionsWait after ctx ended, whatever the clients do: no
// step waits for a client to read (see forceDrain).
func (s *Server) Shutdown(ctx context.Context) error {
	s.ready.Store(false)
	s.mu.Lock()
	s.stopping()
	s.draining = true
	for _, l := range s.listeners {
		_ = l.Close()
	}
	sessions := make([]*session, 0, len(s.sessions))
	for sess := range s.sessions {
		sessions = append(sessions, sess)
	}
	if len(s.sessions) == 0 {
		select {
		case <-s.empty:
		default:
			close(s.empty)
		}
	}
	s.mu.Unlock()
	idle := sessions[:0:0]
	for _, sess := range sessions {
		if sess.drain() {
			idle = append(idle, sess)
		}
	}
	terminateAll(idle, errShuttingDown(), time.Now().Add(time.Second))
	var err error
	select {
	case <-s.empty:
	case <-ctx.Done():
		err = fmt.Errorf("shutdown drain (timeouts.shutdown_drain) ended with clients still in a transaction: %w", ctx.Err())
		forcedAt := time.Now()
		s.forceDrain(s.liveSessions(), forcedAt.Add(forcedWriteGrace))
		ended := make(chan struct{})
		go func() { s.wg.Wait(); close(ended) }() // owner: Shutdown; exits when the sessions have ended
		t := time.NewTimer(time.Until(forcedAt.Add(forcedSessionsWait)))
		defer t.Stop()
		select {
		case <-ended:
		case <-t.C:
			s.mu.Lock()
			left := len(s.sessions)
			s.mu.Unlock()
			return fmt.Errorf("%w; %d sessions were still ending (their server connections are closed at exit)", err, left)
		}
		return err
	}
	s.wg.Wait()
	return err
}

// Draining reports whether Shutdown has begun.
func (s *Server) Draining() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.draining
}

// serverStats are the proxy's counters, read by Stats.
type serverStats struct {
	pinned          atomic.Int64
	prepareHits     atomic.Int64
	prepareMisses   atomic.Int64
	notifyQueued    atomic.Int64 // bytes in the sessions' notification backlogs
	notifyOverflows atomic.Int64
	retries         atomic.Int64
	lingerExpiries  atomic.Int64
	stateChecks     atomic.Int64
	stateFound      atomic.Int64
	bufferRefusals  atomic.Int64
	stmtRefusals    atomic.Int64
	// Clients cut off by timeouts.client_write, idle_in_transaction and
	// requests cancelled by timeouts.query (timeouts.go).
	clientWriteTimeouts       atomic.Int64
	idleInTransactionTimeouts atomic.Int64
	queryTimeouts             atomic.Int64
}

// Stats are the proxy's figures for metrics.
type Stats struct {
	// Clients is the number of connected clients, logged in or not.
	Clients int64
	// PendingLogins is the number of connections that have not finished
	// logging in (clients.max_pending_logins).
	PendingLogins int64
	// Pinned is the number of clients pinned to a server connection by
	// session state (transaction mode).
	Pinned int64
	// PrepareHits counts Bind/Describe of a statement already prepared on
	// the serving connection; PrepareMisses counts statements the
	// governor had to prepare there.
	PrepareHits, PrepareMisses int64
	// NotifyBacklog is the number of bytes of notifications waiting to be
	// written to listening clients (transaction mode), summed over them.
	NotifyBacklog int64
	// NotifyOverflows counts clients disconnected because more than
	// clients.notify_backlog_size of notifications waited for them.
	NotifyOverflows int64
	// Retries counts requests sent again on another server connection
	// because the one they were sent on was terminated before it read them
	// (retry.go).
	Retries int64
	// UnnamedLingerExpired counts connections released after holding a
	// client's unnamed statement for its Bind longer than the linger
	// allows: that Bind then prepares it again (a PrepareMiss).
	UnnamedLingerExpired int64
	// StateChecks counts verifications of a server connection's session
	// state before its release (transaction mode); StateFound those that
	// found state (or could not tell) and kept the client pinned.
	StateChecks, StateFound int64
	// BufferedBytes is what the sessions hold now for clients' messages
	// beyond their 8 KiB buffers (limits.max_buffered_bytes counts it);
	// BufferRefusals counts client messages refused (SQLSTATE 53200)
	// because holding them would have taken it over the limit.
	BufferedBytes, BufferRefusals int64
	// StatementRefusals counts Parse messages refused (SQLSTATE 53400)
	// because the client held pool.max_client_statements named
	// statements already.
	StatementRefusals int64
	// ClientWriteTimeouts counts clients disconnected because they took
	// nothing written to them for timeouts.client_write.
	ClientWriteTimeouts int64
	// IdleInTransactionTimeouts counts clients disconnected (25P03)
	// because they were idle in a transaction longer than
	// timeouts.idle_in_transaction.
	IdleInTransactionTimeouts int64
	// QueryTimeouts counts requests cancelled because they ran longer
	// than timeouts.query.
	QueryTimeouts int64
}

// notePrepared counts a statement found prepared (hit) or prepared anew
// (miss) on the connection serving a client.
func (s *Server) notePrepared(hit bool) {
	if hit {
		s.stats.prepareHits.Add(1)
	} else {
		s.stats.prepareMisses.Add(1)
	}
	s.opts.Metrics.preparedStatement(hit)
}

// Stats returns the proxy's figures.
func (s *Server) Stats() Stats {
	return Stats{
		Clients:         s.clients.Load(),
		PendingLogins:   int64(s.pending.len()),
		Pinned:          s.stats.pinned.Load(),
		PrepareHits:     s.stats.prepareHits.Load(),
		PrepareMisses:   s.stats.prepareMisses.Load(),
		NotifyBacklog:   s.stats.notifyQueued.Load(),
		NotifyOverflows: s.stats.notifyOverflows.Load(),
		Retries:         s.stats.retries.Load(),
		StateChecks:     s.stats.stateChecks.Load(),
		StateFound:      s.stats.stateFound.Load(),

		UnnamedLingerExpired: s.stats.lingerExpiries.Load(),

		BufferedBytes:     s.buffers.Held(),
		BufferRefusals:    s.stats.bufferRefusals.Load(),
		StatementRefusals: s.stats.stmtRefusals.Load(),

		ClientWriteTimeouts:       s.stats.clientWriteTimeouts.Load(),
		IdleInTransactionTimeouts: s.stats.idleInTransactionTimeouts.Load(),
		QueryTimeouts:             s.stats.queryTimeouts.Load(),
	}
}

// Reconfigure applies a reloaded configuration to what can change while
// running: the admin console's users and what SHOW CONFIG shows.
func (s *Server) Reconfigure(cfg *config.Config) { s.live.Store(cfg) }

// ClientCount is the number of connected clients.
func (s *Server) ClientCount() int64 { return s.clients.Load() }

// welcomeCache remembers, per route and set of startup parameters, the
// parameter values a client is told at login, so that logins do not need
// a server connection once the combination has been seen.
type welcomeCache struct {
	mu      sync.Mutex
	entries map[welcomeKey]*welcomeEntry
}

type welcomeKey struct {
	route  pool.Route
	params string
}

// welcomeEntry is what clients with the same route and startup parameters
// see. It is never modified once cached: its sessions share view until one
// of them changes a parameter (and takes a copy), and a server connection
// brought to these settings remembers the entry (serverState.fittedTo).
type welcomeEntry struct {
	view map[string]string
}

const maxWelcomeEntries = 4096

func (c *welcomeCache) get(k welcomeKey) *welcomeEntry {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.entries[k]
}

func (c *welcomeCache) drop(match func(pool.Route) bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k := range c.entries {
		if match(k.route) {
			delete(c.entries, k)
		}
	}
}

func (c *welcomeCache) put(k welcomeKey, e *welcomeEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.entries) >= maxWelcomeEntries {
		for old := range c.entries {
			delete(c.entries, old)
			break
		}
	}
	c.entries[k] = e
}

// freeDatabase prepares for a statement that needs no other connection to
// database db (DROP DATABASE, ALTER DATABASE … RENAME, CREATE DATABASE …
// TEMPLATE db): the governor's idle connections to it are closed, busy ones
// are closed when their clients finish (waiting briefly for that), and
// clients listening through a listener connection to it are disconnected.
func (s *Server) freeDatabase(db string) {
	match := func(r pool.Route) bool { return r.Database == db }
	s.mu.Lock()
	var hubs []*listenHub
	for r, h := range s.hubs {
		if match(r) {
			hubs = append(hubs, h)
		}
	}
	s.mu.Unlock()
	for _, h := range hubs {
		h.close("the database is being dropped, renamed or copied")
	}
	wait := min(s.cfg.Timeouts.QueryWait, 5*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	n := s.pool.CloseRoutes(ctx, match)
	s.welcome.drop(match)
	if n > 0 {
		s.logger.Info("closed pggovernor's connections to a database for a DROP/RENAME/TEMPLATE of it", zap.String("db", db), zap.Int("connections", n))
	}
}
