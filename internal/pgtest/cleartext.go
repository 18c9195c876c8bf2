package pgtest

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"

	"github.com/jackc/pgx/v5/pgproto3"
)

// CleartextBackend is a scripted server that logs clients in the way Amazon
// RDS does with IAM authentication, which a real Postgres cannot: over TLS
// it asks for the password in cleartext (AuthenticationCleartextPassword)
// and hands it to a check function, which verifies an IAM token. It then
// answers every simple Query with one row ("1") and every Sync with
// ReadyForQuery; it parses no SQL.
type CleartextBackend struct {
	ln    net.Listener
	opts  CleartextOptions
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	seen  []CleartextLogin
}

// CleartextOptions configure a CleartextBackend.
type CleartextOptions struct {
	// TLS is the server's TLS configuration. With it, an SSLRequest is
	// answered 'S' and a client that does not ask for TLS is refused, as
	// RDS refuses IAM logins without TLS.
	TLS *tls.Config
	// Check accepts or refuses a login; nil accepts all.
	Check func(user, password string) error
}

// CleartextLogin is one login attempt the backend received.
type CleartextLogin struct {
	User, Database, Password string
	// TLS reports whether the password came over TLS; ServerName is the
	// SNI the client sent.
	TLS        bool
	ServerName string
}

// StartCleartextBackend listens on 127.0.0.1:0. The caller must call Close.
func StartCleartextBackend(opts CleartextOptions) (*CleartextBackend, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	b := &CleartextBackend{ln: ln, opts: opts, conns: map[net.Conn]struct{}{}}
	b.wg.Add(1)
	go b.accept() // owner: b; exits when Close closes the listener
	return b, nil
}

// Addr is the listening address, host:port.
func (b *CleartextBackend) Addr() string { return b.ln.Addr().String() }

// Port is the listening port.
func (b *CleartextBackend) Port() int { return b.ln.Addr().(*net.TCPAddr).Port }

// Logins returns the login attempts received so far, in order.
func (b *CleartextBackend) Logins() []CleartextLogin {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]CleartextLogin(nil), b.seen...)
}

// Close stops accepting, closes every connection and waits for them.
func (b *CleartextBackend) Close() {
	_ = b.ln.Close()
	b.mu.Lock()
	for c := range b.conns {
		_ = c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

func (b *CleartextBackend) accept() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.mu.Lock()
		b.conns[c] = struct{}{}
		b.mu.Unlock()
		b.wg.Add(1)
		go func() { // owner: b; exits when the connection closes
			defer b.wg.Done()
			_ = b.serve(c)
			_ = c.Close()
			b.mu.Lock()
			delete(b.conns, c)
			b.mu.Unlock()
		}()
	}
}

func (b *CleartextBackend) serve(raw net.Conn) error {
	var conn net.Conn = raw
	be := pgproto3.NewBackend(conn, conn)
	be.SetMaxBodyLen(1 << 20)
	login := CleartextLogin{}
	var startup *pgproto3.StartupMessage
	for startup == nil {
		msg, err := be.ReceiveStartupMessage()
		if err != nil {
			return err
		}
		switch m := msg.(type) {
		case *pgproto3.SSLRequest:
			if b.opts.TLS == nil || login.TLS {
				if _, err := conn.Write([]byte{'N'}); err != nil {
					return err
				}
				continue
			}
			if _, err := conn.Write([]byte{'S'}); err != nil {
				return err
			}
			tc := tls.Server(raw, b.opts.TLS)
			if err := tc.Handshake(); err != nil {
				return err
			}
			conn = tc
			login.TLS = true
			login.ServerName = tc.ConnectionState().ServerName
			be = pgproto3.NewBackend(conn, conn)
			be.SetMaxBodyLen(1 << 20)
		case *pgproto3.GSSEncRequest:
			if _, err := conn.Write([]byte{'N'}); err != nil {
				return err
			}
		case *pgproto3.StartupMessage:
			startup = m
		default:
			return fmt.Errorf("unexpected startup message %T", msg)
		}
	}
	login.User = startup.Parameters["user"]
	login.Database = startup.Parameters["database"]
	fail := func(code, message string) error {
		be.Send(&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: code, Message: message})
		_ = be.Flush()
		return errors.New(message)
	}
	if b.opts.TLS != nil && !login.TLS {
		return fail("28000", fmt.Sprintf("pg_hba.conf rejects connection for host, user %q, no encryption", login.User))
	}
	be.Send(&pgproto3.AuthenticationCleartextPassword{})
	if err := be.Flush(); err != nil {
		return err
	}
	if err := be.SetAuthType(pgproto3.AuthTypeCleartextPassword); err != nil {
		return err
	}
	msg, err := be.Receive()
	if err != nil {
		return err
	}
	pw, ok := msg.(*pgproto3.PasswordMessage)
	if !ok {
		return fail("08P01", fmt.Sprintf("expected password response, got %T", msg))
	}
	login.Password = pw.Password
	b.mu.Lock()
	b.seen = append(b.seen, login)
	b.mu.Unlock()
	if b.opts.Check != nil {
		if err := b.opts.Check(login.User, login.Password); err != nil {
			return fail("28P01", fmt.Sprintf("PAM authentication failed for user %q", login.User))
		}
	}
	be.Send(&pgproto3.AuthenticationOk{})
	for _, p := range [][2]string{{"server_version", "15.0"}, {"client_encoding", "UTF8"}, {"DateStyle", "ISO, MDY"},
		{"TimeZone", "UTC"}, {"integer_datetimes", "on"}, {"standard_conforming_strings", "on"}, {"application_name", ""}} {
		be.Send(&pgproto3.ParameterStatus{Name: p[0], Value: p[1]})
	}
	be.Send(&pgproto3.BackendKeyData{ProcessID: 4242, SecretKey: []byte{0, 0, 4, 210}})
	be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
	if err := be.Flush(); err != nil {
		return err
	}
	for {
		msg, err := be.Receive()
		if err != nil {
			return err
		}
		switch msg.(type) {
		case *pgproto3.Query:
			be.Send(&pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{{Name: []byte("?column?"), DataTypeOID: 23, DataTypeSize: 4, TypeModifier: -1}}})
			be.Send(&pgproto3.DataRow{Values: [][]byte{[]byte("1")}})
			be.Send(&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")})
			be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
		case *pgproto3.Sync:
			be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
		case *pgproto3.Terminate:
			return nil
		}
		if err := be.Flush(); err != nil {
			return err
		}
	}
}
