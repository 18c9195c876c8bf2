package proxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pggovernor/pggovernor/auth"
	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/wire"
)

// SQLSTATEs the governor sends for its own errors
// (https://www.postgresql.org/docs/current/errcodes-appendix.html).
const (
	codeProtocolViolation   = "08P01"
	codeConnectionFailure   = "08006"
	codeInvalidPassword     = "28P01"
	codeInvalidAuthSpec     = "28000"
	codeTooManyConnections  = "53300"
	codeOutOfMemory         = "53200"
	codeConfigLimitExceeded = "53400"
	codeAdminShutdown       = "57P01"
	codeQueryCanceled       = "57014"
	codeFeatureNotSupported = "0A000"
	codeInternalError       = "XX000"
	codeInsufficientPriv    = "42501"
	codeSyntaxError         = "42601"
	codeNotInPrerequisite   = "55000"
	codeNoSuchStatement     = "26000"
	codeNoSuchPortal        = "34000"
)

// msgCertAuthFailed is completed with the user name when sent, as
// Postgres words it.
const msgCertAuthFailed = "certificate authentication failed"

// clientError is an error with what the client is told: a SQLSTATE, a
// message safe to show, and a hint naming the setting to change. Its cause,
// if any, is for the log only.
type clientError struct {
	fatal   bool
	code    string
	message string
	detail  string
	hint    string
	cause   error
}

func (e *clientError) Error() string {
	s := e.message
	if e.cause != nil {
		s += ": " + e.cause.Error()
	}
	return s
}

func (e *clientError) Unwrap() error { return e.cause }

func fatalf(code, format string, args ...any) *clientError {
	return &clientError{fatal: true, code: code, message: fmt.Sprintf(format, args...)}
}

func (e *clientError) withHint(h string) *clientError   { e.hint = h; return e }
func (e *clientError) withDetail(d string) *clientError { e.detail = d; return e }
func (e *clientError) withCause(c error) *clientError   { e.cause = c; return e }

// toClientError classifies any error once, into what the client may see.
// Errors that come from the upstream server pass through as Postgres said
// them; anything unexpected becomes a generic message.
func toClientError(err error, fatal bool, waitTimeout time.Duration) *clientError {
	var ce *clientError
	if errors.As(err, &ce) {
		return ce
	}
	var waitErr *pool.WaitError
	if errors.As(err, &waitErr) {
		e := &clientError{fatal: fatal, code: codeTooManyConnections, cause: err}
		switch {
		case waitErr.Paused:
			e.message = fmt.Sprintf("no server connection available within the wait allowed (%s): the database is paused by the pggovernor admin console", waitTimeout)
			e.hint = "RESUME in the admin console ends the pause."
		case !waitErr.LimitKnown:
			e.message = fmt.Sprintf("no server connection available within timeouts.query_wait (%s): the connection budget is not known yet because pggovernor cannot read max_connections from the server", waitTimeout)
			e.hint = "Check that the server is reachable with the configured credentials (pggovernor doctor), or set budget.max."
		case waitErr.Cause != nil:
			e.code = codeConnectionFailure
			e.message = fmt.Sprintf("no server connection available within timeouts.query_wait (%s): connecting to the server failed", waitTimeout)
			e.detail = safeUpstreamDetail(waitErr.Cause)
			e.hint = "Check that the server is up and reachable from pggovernor (pggovernor doctor)."
			if h := credentialsHint(waitErr.Cause, e.detail); h != "" {
				e.hint = h
			}
		case waitErr.Note != "":
			e.message = fmt.Sprintf("no server connection available within timeouts.query_wait (%s): all %d server connections of %s are in use", waitTimeout, waitErr.Limit, waitErr.Note)
			e.hint = "The replicas with budget.cluster.enabled share one budget derived from the server's max_connections: raise max_connections (or budget.max), lower budget.reserve, raise timeouts.query_wait, or shorten transactions."
		default:
			e.message = fmt.Sprintf("no server connection available within timeouts.query_wait (%s): all %d server connections of the budget are in use", waitTimeout, waitErr.Limit)
			e.hint = "Raise budget.max (or the server's max_connections, from which the budget is derived), raise timeouts.query_wait, or shorten transactions."
		}
		return e
	}
	if errors.Is(err, pool.ErrClosed) {
		return &clientError{fatal: true, code: codeAdminShutdown, message: "terminating connection due to administrator command", detail: "pggovernor is shutting down", cause: err}
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		e := &clientError{fatal: fatal, code: pgErr.Code, message: pgErr.Message, detail: pgErr.Detail, hint: pgErr.Hint, cause: err}
		if pgErr.Code == codeInvalidPassword || pgErr.Code == codeInvalidAuthSpec {
			// The client proved who it is; the server refused the
			// governor's own credentials.
			e.message = "the server refused pggovernor's credentials: " + pgErr.Message
			e.hint = "Check upstream.password_file (or upstream.password, the URL, or the users file in the multi-role model); " +
				"upstream.ssl.cert_file and upstream.ssl.key_file when the server requires a client certificate; " +
				"the IAM policy (rds-db:connect) and upstream.aws_region with upstream.connector awsiamrds."
		}
		return e
	}
	var mintErr *auth.MintError
	if errors.As(err, &mintErr) {
		return &clientError{fatal: fatal, code: codeConnectionFailure, message: "pggovernor could not obtain upstream credentials",
			detail: mintErr.Error(), hint: credentialsHint(err, ""), cause: err}
	}
	var refused *auth.RefusedError
	if errors.As(err, &refused) {
		return &clientError{fatal: true, code: refused.Code, message: refused.Message, cause: err}
	}
	if errors.Is(err, auth.ErrAuthFailed) {
		return &clientError{fatal: true, code: codeInvalidPassword, cause: err}
	}
	if errors.Is(err, auth.ErrCertAuthFailed) {
		return &clientError{fatal: true, code: codeInvalidAuthSpec, message: msgCertAuthFailed, cause: err}
	}
	var pe *auth.ProtocolError
	if errors.As(err, &pe) {
		return &clientError{fatal: true, code: codeProtocolViolation, message: pe.Msg, cause: err}
	}
	var be *wire.BudgetError
	if errors.As(err, &be) {
		return &clientError{fatal: true, code: codeOutOfMemory, cause: err,
			message: fmt.Sprintf("out of memory: holding this message would take what pggovernor holds for clients' messages over limits.max_buffered_bytes (%d bytes)", be.Limit),
			hint:    "Raise limits.max_buffered_bytes."}
	}
	var fe *wire.FrameError
	if errors.As(err, &fe) {
		e := &clientError{fatal: true, code: codeProtocolViolation, message: "invalid message length", cause: err}
		switch {
		case fe.Type == 0: // a startup packet
			e.message = fmt.Sprintf("invalid startup packet length %d (from 8 to %d bytes)", fe.Length, wire.MaxStartupLen)
		case errors.Is(err, wire.ErrMessageTooLarge):
			e.message = fmt.Sprintf("message of type %q is %d bytes, more than the limit of %d bytes", fe.Type, fe.Length, fe.Limit)
			e.hint = "Raise clients.max_message_size."
		}
		return e
	}
	e := &clientError{fatal: fatal, code: codeConnectionFailure, message: "pggovernor could not serve the request", detail: safeUpstreamDetail(err), cause: err}
	e.hint = credentialsHint(err, e.detail)
	return e
}

// credentialsHint names the settings behind an upstream connect failure
// that is about TLS or RDS IAM tokens, "" for others.
func credentialsHint(err error, detail string) string {
	var mintErr *auth.MintError
	if errors.As(err, &mintErr) {
		return "pggovernor could not mint an RDS IAM token: give it AWS credentials (environment, shared files, EKS IRSA or an instance role) and upstream.aws_region; its log names the cause."
	}
	// pgconn does not always wrap the TLS error (verify-ca's own check).
	var certErr *tls.CertificateVerificationError
	if errors.As(err, &certErr) || strings.Contains(detail, "tls error") || strings.Contains(detail, "x509: ") {
		return "Check upstream.ssl.mode, upstream.ssl.root_cert_file and upstream.ssl.server_name (pggovernor doctor shows the TLS state)."
	}
	return ""
}

// safeUpstreamDetail describes a connect error without the connection
// string's secrets: server errors by their message, others by type.
func safeUpstreamDetail(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return fmt.Sprintf("server said: %s (SQLSTATE %s)", pgErr.Message, pgErr.Code)
	}
	var connErr *pgconn.ConnectError
	if errors.As(err, &connErr) {
		return connErr.Error() // pgconn prints host, user and database, never the password
	}
	return err.Error()
}

// appendError encodes e as an ErrorResponse. Every error the governor
// itself sends to a client is encoded here, once, and counted by SQLSTATE.
func (s *Server) appendError(dst []byte, e *clientError, user string) []byte {
	s.opts.Metrics.errorSent(e.code)
	sev := "ERROR"
	if e.fatal {
		sev = "FATAL"
	}
	msg := e.message
	switch {
	case msg == "" && e.code == codeInvalidPassword:
		msg = fmt.Sprintf("password authentication failed for user %q", user)
	case msg == msgCertAuthFailed:
		msg = fmt.Sprintf("%s for user %q", msgCertAuthFailed, user) // Postgres' words
	}
	out, err := (&pgproto3.ErrorResponse{
		Severity:            sev,
		SeverityUnlocalized: sev,
		Code:                e.code,
		Message:             msg,
		Detail:              e.detail,
		Hint:                e.hint,
	}).Encode(dst)
	if err != nil {
		return dst
	}
	return out
}
