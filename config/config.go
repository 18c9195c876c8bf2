// Package config owns pggovernor's configuration: the Config struct, its
// defaults, loading from a YAML file, PGGOVERNOR_* environment variables and
// command-line flags (flags > env > file > defaults), the environment that
// Coder's Helm chart already sets, and validation with errors that name the
// key to change.
package config

import (
	"time"
)

// Pool modes accepted by pool_mode.
const (
	PoolModeTransaction = "transaction"
	PoolModeSession     = "session"
)

// Verification policies accepted by pool.session_state_check.
const (
	SessionStateCheckAuto   = "auto"
	SessionStateCheckAlways = "always"
)

// Client authentication methods accepted by clients.auth.
const (
	AuthSCRAM = "scram-sha-256"
	AuthMD5   = "md5"
	AuthCert  = "cert"
	AuthTrust = "trust"
)

// Upstream connectors accepted by upstream.connector.
const (
	ConnectorPassword   = "password"
	ConnectorAWSIAMRDS  = "awsiamrds"
	defaultAdminListen  = "127.0.0.1:9187"
	defaultClientListen = "127.0.0.1:6432"
)

// Config is the whole configuration of one pggovernor process. Every field is
// settable from the YAML file (by its yaml tag path), from the environment
// (PGGOVERNOR_ + upper-snake path) and from a flag (--dotted.path with
// dashes). Use Load to build one; the zero value is not valid.
type Config struct {
	// Listen is the TCP address clients connect to, host:port.
	Listen string `yaml:"listen"`
	// UnixSocketDir, when set, is a directory in which pggovernor also
	// listens on a Unix socket named .s.PGSQL.<port>, as Postgres does.
	UnixSocketDir string `yaml:"unix_socket_dir"`
	// UnixSocketMode is the permissions of that socket, in octal (as
	// Postgres' unix_socket_permissions): connecting needs write
	// permission, so the default 0770 admits pggovernor's user and group
	// only; 0777 admits every local user.
	UnixSocketMode string `yaml:"unix_socket_mode"`
	// AdminListen is the HTTP address serving /metrics, /healthz and /readyz.
	// Empty disables the HTTP endpoint.
	AdminListen string `yaml:"admin_listen"`
	// PoolMode is how server connections are shared: "transaction" attaches
	// one for each transaction, "session" for the whole client session.
	PoolMode string `yaml:"pool_mode" enum:"transaction,session"`
	// Upstream says where the real Postgres server is and how to log in to it.
	Upstream Upstream `yaml:"upstream"`
	// Budget bounds the server connections pggovernor opens.
	Budget Budget `yaml:"budget"`
	// Pool tunes the server connection pools.
	Pool Pool `yaml:"pool"`
	// Clients configures the client-facing side.
	Clients Clients `yaml:"clients"`
	// Limits bound the memory clients can make pggovernor hold.
	Limits Limits `yaml:"limits"`
	// Timeouts bound every wait.
	Timeouts Timeouts `yaml:"timeouts"`
	// Log configures logging.
	Log Log `yaml:"log"`
	// Admin configures the operators' interfaces: the admin console and the
	// HTTP endpoints on admin_listen.
	Admin Admin `yaml:"admin"`

	// libpqEnv holds the PG* variables that decide, as in libpq, what the
	// URL leaves out (read by Load, used by Validate).
	libpqEnv libpqEnv
	// authSet records that clients.auth was given (by Load, for Validate:
	// it means nothing with clients.hba_file).
	authSet bool
	// upstreamFrom names where upstream.url came from when it was not set
	// as a pggovernor key (Coder's environment); see UpstreamSource.
	upstreamFrom string
}

type libpqEnv struct{ user, sslMode string }

// Upstream describes the Postgres server behind pggovernor.
type Upstream struct {
	// URL is a libpq connection URL or key=value DSN. PG* environment
	// variables fill in what it leaves out, as with libpq. A user in it
	// selects the sidecar model (every client is served as that user); no
	// user selects the multi-role model (each client's own role goes
	// upstream, with its password from clients.users_file). It may name
	// several hosts (postgres://h1:5432,h2:5432/db, or host=h1,h2
	// port=5432,5432), tried in order by every new server connection and
	// the control connection, with libpq's target_session_attrs (any,
	// read-write, read-only, primary, standby, prefer-standby) and
	// load_balance_hosts (disable, random); target_session_attrs holds for a
	// connection's whole life: the connections to a server that stops
	// being what it asks for are retired and new ones opened where the URL
	// leads then (README, Failover). Host names are resolved again for
	// every connection.
	URL string `yaml:"url" secret:"url"`
	// Password is the upstream password for the sidecar model, when it is
	// not in the URL or a file. Prefer PasswordFile.
	Password string `yaml:"password" secret:"true"`
	// PasswordFile is a file holding the upstream password (Coder's
	// DB_PASSWORD_PATH, a mounted secret). It is checked for each new server
	// connection and read again when it changed, also when Kubernetes swaps
	// the secret's ..data symlink, so a rotated secret is used without a
	// restart. Surrounding whitespace is trimmed, with a one-time warning.
	// Missing, unreadable or empty stops the start; later, the last password
	// read is kept and the problem logged.
	PasswordFile string `yaml:"password_file"`
	// Connector selects how upstream credentials are obtained: "password"
	// (URL, Password or PasswordFile) or "awsiamrds" (an RDS IAM token from
	// the AWS default credential chain, cached and renewed every 10 minutes;
	// needs a user in the URL and ssl.mode verify-full, or verify-ca with
	// ssl.allow_verify_ca_for_iam).
	Connector string `yaml:"connector" enum:"password,awsiamrds"`
	// AWSRegion is the AWS region of the database, used to sign RDS IAM
	// tokens; empty uses the AWS SDK's default (AWS_REGION, the shared
	// config). awsiamrds does not start without one.
	AWSRegion string `yaml:"aws_region"`
	// SSL configures TLS to the upstream server. Fields left empty keep what
	// the URL says.
	SSL UpstreamSSL `yaml:"ssl"`
}

// UpstreamSSL configures TLS to the upstream server with libpq's semantics.
type UpstreamSSL struct {
	// Mode is libpq's sslmode. Empty keeps the URL's sslmode (libpq's
	// default is prefer).
	Mode string `yaml:"mode" enum:",disable,allow,prefer,require,verify-ca,verify-full"`
	// RootCertFile is a PEM file of CA certificates trusted to sign the
	// server's certificate (libpq's sslrootcert). Like CertFile and KeyFile
	// it is read again, for new server connections, when it changes.
	RootCertFile string `yaml:"root_cert_file"`
	// CertFile is the PEM client certificate presented to the server (mTLS);
	// a rotated one is used by new server connections, established ones
	// keep theirs.
	CertFile string `yaml:"cert_file"`
	// KeyFile is the PEM private key of CertFile; as libpq requires, it must
	// not be readable by group or others (0600; 0640 is accepted for a file
	// owned by root when pggovernor does not run as root).
	KeyFile string `yaml:"key_file"`
	// ServerName overrides the host name checked against the server's
	// certificate in verify-full mode and sent as SNI.
	ServerName string `yaml:"server_name"`
	// AllowVerifyCAForIAM accepts Mode verify-ca with upstream.connector
	// awsiamrds, which otherwise needs verify-full. verify-ca checks who
	// signed the server's certificate, not that it names the server, so
	// any server with a certificate from the same CA could read the token.
	// RDS certificates name their endpoints; set this only for an endpoint
	// whose name the certificate does not carry (a custom DNS name, a
	// proxy), and prefer ServerName with verify-full there.
	AllowVerifyCAForIAM bool `yaml:"allow_verify_ca_for_iam"`
}

// Budget bounds the total number of server connections.
type Budget struct {
	// Max is the number of server connections pggovernor may hold. Zero
	// derives it from the live server: max_connections −
	// superuser_reserved_connections − reserved_connections − Reserve, minus
	// pggovernor's own control connection. With cluster.enabled it is the
	// budget of all replicas together, their control connections included.
	Max int `yaml:"max" min:"0"`
	// Reserve is the number of server slots left for humans and other
	// applications when Max is derived from the server.
	Reserve int `yaml:"reserve" min:"0"`
	// RefreshInterval is how often the server's limits are re-read (with
	// cluster.enabled, they are re-read at every heartbeat instead).
	RefreshInterval time.Duration `yaml:"refresh_interval" min:"1s"`
	// Cluster shares one budget among all replicas pointed at the same
	// server, coordinated through Postgres.
	Cluster Cluster `yaml:"cluster"`
}

// Cluster configures sharing one budget among replicas.
type Cluster struct {
	// Enabled turns on budget sharing with other replicas: every replica
	// pointed at the same server (and namespace) holds its share of one
	// budget as session-level advisory locks on its control connection, and
	// opens a server connection only under a lease. The budget is then
	// max_connections − superuser_reserved_connections − reserved_connections
	// − Reserve (or budget.max when set), minus one control connection per
	// replica and one slot kept free so that another replica can join.
	Enabled bool `yaml:"enabled"`
	// Namespace is the first 32-bit key of the advisory locks that hold
	// leases, so that several independent fleets can share one server.
	// Replicas of one fleet must use the same value; applications on the
	// server must not use two-key advisory locks with it.
	Namespace int `yaml:"namespace"`
	// CountForeign subtracts connections of other applications, seen in
	// pg_stat_activity, from the shared budget, so that the total stays
	// under max_connections − reserved even when someone else connects.
	CountForeign bool `yaml:"count_foreign"`
	// Table is the table where replicas publish their membership: replica
	// number, address for forwarded cancel requests, leases, waiting
	// clients and a heartbeat. It is created (UNLOGGED) in the upstream
	// database when missing, which needs CREATE on its schema; otherwise
	// create it once as docs/architecture.md shows.
	Table string `yaml:"table"`
	// HeartbeatInterval is how often a replica renews its membership,
	// re-reads the server's limits and the other replicas' demand, and
	// rebalances its leases.
	HeartbeatInterval time.Duration `yaml:"heartbeat_interval" min:"10ms"`
	// MemberTimeout is how long after its last heartbeat a replica that
	// vanished (crashed, cut off) keeps its leases reserved; then the others
	// take them over. A replica that cannot renew its heartbeat stops
	// opening server connections at once and closes those it still holds
	// before three quarters of this time. Keepalives and tcp_user_timeout on
	// its connections are derived from it. At least 4 × HeartbeatInterval.
	MemberTimeout time.Duration `yaml:"member_timeout" min:"100ms"`
	// AdvertiseAddress is the host:port other replicas use to forward a
	// cancel request for one of this replica's clients. Empty: the host of
	// listen, or when listen is a wildcard (0.0.0.0), the address this
	// replica connects to the server from, with listen's port. An address
	// outside PeerCIDRs is not published (no cancel request is forwarded
	// to this replica).
	AdvertiseAddress string `yaml:"advertise_address"`
	// PeerCIDRs are the networks forwarded cancel requests may go to: a
	// row of the membership table whose cancel address is an IP address
	// outside them is ignored, and a replica dials a peer only at an
	// address inside them (a DNS name is checked once resolved). The
	// default is the private ranges pod networks use (RFC 1918, CGNAT
	// 100.64.0.0/10, IPv6 ULA fc00::/7) and loopback; set the pod network's
	// CIDRs where it uses public addresses. Every replica of a fleet must
	// use the same value.
	PeerCIDRs []string `yaml:"peer_cidrs"`
	// SecretFile is a file holding the key (at least 16 bytes; surrounding
	// whitespace trimmed) that authenticates cancel requests forwarded
	// between replicas, the same on every replica, e.g. a Kubernetes Secret
	// made with `openssl rand -base64 32`. It is read again when it
	// changes. Empty: cancel requests are not forwarded between replicas
	// (a cancel request reaching a replica that did not issue the key is
	// dropped), and forwarded ones are refused.
	SecretFile string `yaml:"secret_file"`
	// ControlUser is the role of the control connection in cluster mode:
	// it takes the leases (advisory locks) and owns and writes the
	// membership table. Empty: the upstream user. Make it a role that
	// application clients cannot log in as, and give the application role
	// no privilege on the table (README, Cluster mode): whoever may write
	// the table can stop forwarded cancel requests and skew the shares.
	ControlUser string `yaml:"control_user"`
	// ControlPasswordFile is a file holding ControlUser's password, read
	// again when it changes. Empty with upstream.connector awsiamrds: an
	// RDS IAM token for ControlUser; otherwise no password (the server may
	// authenticate the role otherwise, e.g. by certificate).
	ControlPasswordFile string `yaml:"control_password_file"`
}

// Pool tunes the per-route server connection pools.
type Pool struct {
	// MaxPreparedStatements bounds the statements pggovernor keeps prepared
	// on each server connection in transaction mode; the least recently
	// used one is closed beyond it.
	MaxPreparedStatements int `yaml:"max_prepared_statements" min:"1"`
	// SessionStateCheck says when a server connection is verified before it
	// goes back to the pool in transaction mode: "auto" after a transaction
	// that ran code whose session state the governor cannot see in the
	// query text (DO, CALL, functions that are not known built-ins,
	// unlocks, RESET of a parameter); "always" after every transaction, for
	// state that triggers, views, rules or defaults may create unseen. One
	// query on the connection, not the client's round trip; see README
	// "Transaction pooling" for what it covers and costs.
	SessionStateCheck string `yaml:"session_state_check" enum:"auto,always"`
	// RouteIdleTimeout is how long a pool (a database and upstream user)
	// is kept once it has no server connection, no waiting client and no
	// client logged in: then its row in SHOW POOLS and its go_sql_* series
	// go (they come back, from zero, at its next use). A pool appears only
	// once a server connection to its database has been opened, so logins
	// to databases that do not exist leave none behind.
	RouteIdleTimeout time.Duration `yaml:"route_idle_timeout" min:"1s"`
	// MaxClientStatements bounds the named prepared statements one client
	// may hold at once in transaction mode, where pggovernor keeps each
	// one's text to prepare it on whichever server connection serves the
	// client. A Parse beyond it gets SQLSTATE 53400
	// (configuration_limit_exceeded, as Postgres answers a PREPARE
	// TRANSACTION beyond max_prepared_transactions) naming this setting;
	// the session goes on. Counted in
	// pggovernor_client_statement_refusals_total. pgx's statement cache
	// holds at most 512 per connection by default.
	MaxClientStatements int `yaml:"max_client_statements" min:"1"`
}

// Clients configures the client-facing side.
type Clients struct {
	// MaxConnections is the number of logged-in clients (admin console
	// included) served at once, as PgBouncer's max_client_conn; a client
	// that logs in beyond it gets SQLSTATE 53300 naming this key.
	// Connections still logging in are bounded by MaxPendingLogins, so at
	// most MaxConnections + MaxPendingLogins client sockets are open.
	MaxConnections int `yaml:"max_connections" min:"1"`
	// MaxPendingLogins bounds the connections that have not finished
	// logging in (TLS handshake, startup packet, password exchange, first
	// server connection). When one more arrives, the oldest of them is
	// dropped, with SQLSTATE 53300 naming this key if it can be written
	// at once, and counted in
	// pggovernor_login_failures_total{reason="too_many_pending"}: silent or
	// stalled connections can never keep a real client out. Each silent
	// one takes about 8 KiB of pggovernor's memory (a goroutine and its
	// session), besides the kernel's socket buffers.
	MaxPendingLogins int `yaml:"max_pending_logins" min:"1"`
	// Auth is how clients prove who they are: scram-sha-256 (with
	// SCRAM-SHA-256-PLUS offered over TLS), md5, cert (the client
	// certificate's CN is the user name; needs tls.mode verify-client) or
	// trust. trust is refused on non-loopback listeners unless
	// AllowTrustRemote is set. Not used with HBAFile.
	Auth string `yaml:"auth" enum:"scram-sha-256,md5,cert,trust"`
	// HBAFile is a file of client authentication rules in Postgres'
	// pg_hba.conf format (local, host, hostssl, hostnossl lines; database
	// and user lists with all, sameuser and @file; addresses with a CIDR
	// mask or a netmask; methods scram-sha-256, md5, password, cert, trust
	// and reject; clientcert=). The first line that matches a login decides
	// its method; no line refuses it, with Postgres' 28000 "no pg_hba.conf
	// entry" error. It replaces Auth entirely, for the admin console too.
	// What pggovernor cannot do (+group, samerole, samehost, host names,
	// map=, other methods) is refused with an error naming the line. It is
	// read again when it or a file it includes changes (checked at each
	// login) and on SIGHUP; a version that does not parse is logged and the
	// previous one kept.
	HBAFile string `yaml:"hba_file"`
	// UsersFile is a file in PgBouncer's userlist.txt format: one
	// "user" "password" pair per line, the password in plaintext, md5 or
	// SCRAM-SHA-256 verifier form. It is read again when it changes
	// (checked at each login, a Kubernetes ..data swap included) and on
	// SIGHUP, and fails closed: a version with a line that does not parse
	// adds and changes nothing, but the users it removes or breaks can no
	// longer log in (an error names each bad line); a deleted or
	// unreadable file means no users until it is back. At start, either
	// stops pggovernor.
	UsersFile string `yaml:"users_file"`
	// PasswordEncryption is how Postgres would store the users' passwords
	// (its password_encryption: scram-sha-256, Postgres' default since 14,
	// or md5). With the md5 method, a user whose entry is an md5 verifier
	// gets an md5 exchange and one with a SCRAM verifier gets SCRAM, as in
	// Postgres; an unknown user, and a plaintext entry, get what a
	// password stored this way would get, so that the exchange offered
	// does not tell which users exist. Set it to the server's
	// password_encryption (pggovernor doctor compares them).
	PasswordEncryption string `yaml:"password_encryption" enum:"scram-sha-256,md5"`
	// AllowTrustRemote permits Auth trust on a listener that is not
	// loopback. Anyone who can reach the port then logs in as anyone.
	AllowTrustRemote bool `yaml:"allow_trust_remote"`
	// MaxMessageSize bounds one protocol message from a client, in bytes;
	// a longer one ends the session with SQLSTATE 08P01 before its body is
	// read. The default is Postgres' own limit (1 GiB), so that whatever a
	// server accepts passes: messages that stream through pggovernor
	// (Bind with its parameters, COPY data, function calls) cost no memory
	// whatever their size, and those it must hold whole (Query, Parse) are
	// bounded by limits.max_buffered_bytes instead.
	MaxMessageSize int `yaml:"max_message_size" min:"1024"`
	// NotifyBacklogSize bounds, in bytes, the notifications waiting to be
	// written to one listening client (transaction mode, where LISTEN goes
	// through the route's shared listener connection). Notifications are
	// never held up for the other clients by one that does not read: a
	// client with more than this waiting is disconnected with SQLSTATE
	// 53200, counted in pggovernor_notify_backlog_overflows_total and
	// logged. A notification is at most about 8 KiB.
	NotifyBacklogSize int `yaml:"notify_backlog_size" min:"16384"`
	// TLS configures TLS termination for clients.
	TLS ClientTLS `yaml:"tls"`
}

// Limits bound the memory clients can make pggovernor hold.
type Limits struct {
	// MaxBufferedBytes bounds, over all clients together, the memory
	// pggovernor holds for the contents of their messages beyond each
	// connection's fixed 8 KiB buffers: a Query or Parse (or another
	// message read whole) while it is read, the text of each distinct named
	// prepared statement kept to prepare it on another server connection
	// (transaction mode), a client's last unnamed statement text and the
	// request kept for a retry where they are over 8 KiB. A message that
	// would take the total over it gets SQLSTATE 53200 (out of memory)
	// naming this setting — an ERROR, after which the session goes on, as
	// Postgres answers a message it cannot allocate — counted in
	// pggovernor_buffer_refusals_total; pggovernor_buffered_bytes shows the
	// total. A single Query or Parse longer than this is always refused:
	// send large values as parameters (Bind), which stream. The default,
	// 64 MiB, keeps the process under a 256 MiB container memory limit: its
	// peak was measured at about three times what it holds (Go's garbage
	// collector at its defaults; README, Operations, Memory).
	MaxBufferedBytes int `yaml:"max_buffered_bytes" min:"1048576"`
}

// ClientTLS configures TLS termination for clients.
type ClientTLS struct {
	// Mode is disable, allow (TLS offered), require (TCP clients without
	// TLS refused) or verify-client (TLS with a client certificate signed by
	// ClientCAFile). Clients on the Unix socket never need TLS.
	Mode string `yaml:"mode" enum:"disable,allow,require,verify-client"`
	// CertFile is the PEM server certificate (chain) presented to clients;
	// it is read again, with KeyFile, for new clients when either changes.
	CertFile string `yaml:"cert_file"`
	// KeyFile is the PEM private key of CertFile; it must not be readable by
	// group or others (0600; 0640 is accepted for a file owned by root when
	// pggovernor does not run as root).
	KeyFile string `yaml:"key_file"`
	// ClientCAFile is a PEM file of CAs trusted to sign client
	// certificates. In allow and require modes a certificate a client offers
	// is checked against it; verify-client requires one.
	ClientCAFile string `yaml:"client_ca_file"`
}

// Timeouts bound every wait.
type Timeouts struct {
	// QueryWait is how long a client waits in the queue for a server
	// connection before it gets SQLSTATE 53300.
	QueryWait time.Duration `yaml:"query_wait" min:"1ms"`
	// ClientLogin is how long a client may take from connecting to being
	// logged in.
	ClientLogin time.Duration `yaml:"client_login" min:"1ms"`
	// ServerConnect bounds one attempt to open a server connection, and
	// each read of the server's limits on the control connection.
	ServerConnect time.Duration `yaml:"server_connect" min:"1ms"`
	// ServerIdle closes server connections unused for this long.
	ServerIdle time.Duration `yaml:"server_idle" min:"1s"`
	// ServerLifetime closes server connections older than this (with 10%
	// jitter) at their next release.
	ServerLifetime time.Duration `yaml:"server_lifetime" min:"1s"`
	// ServerCheckDelay is how long a server connection may sit idle before
	// it is checked with a round trip before reuse.
	ServerCheckDelay time.Duration `yaml:"server_check_delay" min:"0s"`
	// ShutdownDrain is how long in-flight transactions may run after
	// SIGTERM before the remaining clients are disconnected; the process
	// exits within a second after that, whatever the clients do.
	ShutdownDrain time.Duration `yaml:"shutdown_drain" min:"0s"`
	// ClientWrite disconnects a client that takes none of the bytes
	// pggovernor writes to it for this long (it stopped reading, with its
	// socket full), so that it cannot hold its server connection: counted
	// in pggovernor_client_timeouts_total{timeout="client_write"} and
	// logged; no error can reach such a client. A client that reads
	// slowly but steadily is not cut off. 0 never disconnects.
	ClientWrite time.Duration `yaml:"client_write" min:"0s"`
	// IdleInTransaction disconnects a client that sends nothing for this
	// long while inside a transaction (as Postgres'
	// idle_in_transaction_session_timeout: FATAL 25P03), and rolls back
	// and returns its server connection, so that idle transactions cannot
	// hold the budget. 0 (the default) never does.
	IdleInTransaction time.Duration `yaml:"idle_in_transaction" min:"0s"`
	// Query cancels a request (a simple query, or an extended-protocol
	// batch up to its Sync) that runs longer than this, from its first
	// message to its ReadyForQuery, with a CancelRequest to the server:
	// the client gets 57014 "canceling statement due to statement
	// timeout". 0 (the default) never does.
	Query time.Duration `yaml:"query" min:"0s"`
	// ServerUnreachable is how long the server's host may stay silent — a
	// network black-hole, a host gone without closing its sockets — before
	// pggovernor gives up a server connection or its control connection
	// (TCP keepalives and TCP_USER_TIMEOUT on its sockets; 3 s at least):
	// a request in flight then fails instead of waiting for TCP's own
	// limit (about 15 minutes). The server is asked, with
	// tcp_keepalives_idle, tcp_keepalives_interval, tcp_keepalives_count
	// and tcp_user_timeout in the startup packet, to drop the connections
	// of a pggovernor it cannot reach within half of this (3 s at least),
	// so that by the time pggovernor replaces one the server has let go of
	// it and the budget holds (otherwise an abandoned backend can hold its
	// slot of max_connections for hours). 0 leaves both to the operating
	// systems. In cluster mode budget.cluster.member_timeout sets them
	// instead. An upstream that refuses these startup parameters (PgBouncer
	// without ignore_startup_parameters) needs 0.
	ServerUnreachable time.Duration `yaml:"server_unreachable" min:"0s"`
}

// Log configures logging.
type Log struct {
	// Level is debug, info, warn or error. RELOAD (admin console) and SIGHUP
	// apply a new value without a restart.
	Level string `yaml:"level" enum:"debug,info,warn,error" reload:"true"`
	// Format is json or console.
	Format string `yaml:"format" enum:"json,console"`
	// RepeatInterval limits repeated warnings and errors: one logged again
	// with the same message within this interval is not written but
	// counted, and the next one written carries the count in its
	// "skipped" field. 0 writes every one.
	RepeatInterval time.Duration `yaml:"repeat_interval" min:"0s"`
}

// Admin configures the admin console and the HTTP endpoints.
type Admin struct {
	// Users are the client users who may open the admin console by
	// connecting to the database "pggovernor" (or "pgbouncer", so that
	// PgBouncer's tools work unchanged). They authenticate like any client,
	// against clients.users_file. RELOAD and SIGHUP apply a new list.
	Users []string `yaml:"users" reload:"true"`
	// Pprof serves Go's profiler at /debug/pprof/ on admin_listen (without
	// /debug/pprof/cmdline, which would show the command line's flags).
	// Enable it only with admin_listen on loopback (127.0.0.1, reached with
	// kubectl port-forward): a warning is logged otherwise.
	Pprof bool `yaml:"pprof"`
	// ProbeInterval is how often pggovernor checks that the upstream server
	// answers, for /readyz and pggovernor_upstream_up, and is still what
	// upstream.url's target_session_attrs asks for (pg_is_in_recovery() and
	// the server's default_transaction_read_only; one that is not has its
	// connections retired): a round trip on the control connection when the
	// budget is derived from the server; with budget.max, on a server
	// connection idle for this long, if any (none is opened for it). Every
	// attempt to open a server connection counts as evidence too. In
	// cluster mode the heartbeats are the probe.
	ProbeInterval time.Duration `yaml:"probe_interval" min:"100ms"`
}

// DefaultPeerCIDRs are budget.cluster.peer_cidrs' default: the private
// ranges (RFC 1918, CGNAT used by some pod networks, IPv6 unique local)
// and loopback.
func DefaultPeerCIDRs() []string {
	return []string{"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7", "127.0.0.0/8", "::1/128"}
}

// Default returns the configuration used where nothing else is said.
func Default() Config {
	return Config{
		Listen:         defaultClientListen,
		UnixSocketMode: "0770",
		AdminListen:    defaultAdminListen,
		PoolMode:       PoolModeTransaction,
		Upstream: Upstream{
			Connector: ConnectorPassword,
		},
		Budget: Budget{
			RefreshInterval: time.Minute,
			Cluster: Cluster{
				Namespace:         0x70676776, // "pggv"
				Table:             "pggovernor_members",
				HeartbeatInterval: time.Second,
				MemberTimeout:     10 * time.Second,
				PeerCIDRs:         DefaultPeerCIDRs(),
			},
		},
		Pool: Pool{MaxPreparedStatements: 200, SessionStateCheck: SessionStateCheckAuto, RouteIdleTimeout: time.Hour, MaxClientStatements: 1000},
		Clients: Clients{
			MaxConnections:     10000,
			MaxPendingLogins:   1000,
			Auth:               AuthSCRAM,
			PasswordEncryption: AuthSCRAM,
			MaxMessageSize:     1 << 30,
			NotifyBacklogSize:  1 << 20,
			TLS:                ClientTLS{Mode: "disable"},
		},
		Limits: Limits{MaxBufferedBytes: 64 << 20},
		Timeouts: Timeouts{
			QueryWait:         30 * time.Second,
			ClientLogin:       15 * time.Second,
			ServerConnect:     10 * time.Second,
			ServerIdle:        10 * time.Minute,
			ServerLifetime:    time.Hour,
			ServerCheckDelay:  30 * time.Second,
			ShutdownDrain:     30 * time.Second,
			ClientWrite:       30 * time.Second,
			ServerUnreachable: 10 * time.Second,
		},
		Log:   Log{Level: "info", Format: "json", RepeatInterval: 10 * time.Second},
		Admin: Admin{ProbeInterval: 5 * time.Second},
	}
}
