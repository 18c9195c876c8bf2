package pool

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
)

// selfRetryable is an error that says whether it may go away (as
// auth.MintError does).
type selfRetryable bool

func (e selfRetryable) Error() string   { return "credentials: timeout, no such file, EOF" }
func (e selfRetryable) Retryable() bool { return bool(e) }

// missingFileError is what pgconn says of a root certificate file that is
// not there: the error a TLS build gives for a missing certificate.
func missingFileError(t *testing.T) error {
	t.Helper()
	missing := filepath.Join(t.TempDir(), "missing-ca.crt")
	_, err := pgconn.ParseConfig("postgres://u@127.0.0.1:1/db?sslmode=verify-full&sslrootcert=" + missing)
	if err == nil {
		t.Fatal("pgconn.ParseConfig with a missing sslrootcert: want = an error, got = none")
	}
	return fmt.Errorf("upstream.ssl.root_cert_file (sslrootcert): %w", errors.Unwrap(err))
}

// connectErr is what pgconn.Connect returns for connString.
func connectErr(t *testing.T, connString string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgconn.Connect(ctx, connString)
	if err == nil {
		conn.Close(ctx)
		t.Fatalf("connecting to %s: want = an error, got = none", connString)
	}
	return err
}

// closedPort is a TCP port on 127.0.0.1 nobody listens on.
func closedPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	_ = ln.Close()
	return port
}

// TestRetryable classifies connect errors by their type: what may go away
// by itself is retried until timeouts.query_wait, the rest fails the
// client at once. Texts that only look like a transient failure ("EOF",
// "timeout", "no such file") are not retried.
func TestRetryable(t *testing.T) {
	_, certErr := tls.X509KeyPair(nil, nil)
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"server: too many connections", &pgconn.PgError{Code: "53300"}, true},
		{"server: starting up", &pgconn.PgError{Code: "57P03"}, true},
		{"server: configuration limit", &pgconn.PgError{Code: "53400"}, true},
		{"server: terminated by an administrator", &pgconn.PgError{Code: "57P01"}, true},
		{"server: connection failure", fmt.Errorf("connecting: %w", &pgconn.PgError{Code: "08006"}), true},
		{"server: wrong password", &pgconn.PgError{Code: "28P01"}, false},
		{"server: no such database", &pgconn.PgError{Code: "3D000"}, false},
		{"server: no such role, with transient-looking text", &pgconn.PgError{Code: "28000", Message: "timeout EOF no such file"}, false},
		{"refused TCP connection (pgconn)", connectErr(t, "postgres://u@127.0.0.1:"+strconv.Itoa(closedPort(t))+"/db?sslmode=disable&connect_timeout=5"), true},
		{"Unix socket not there yet (pgconn)", connectErr(t, "host="+t.TempDir()+" port=5432 user=u dbname=db sslmode=disable"), true},
		{"name not resolved", &net.DNSError{Err: "no such host", Name: "db.invalid", IsNotFound: true}, true},
		{"dial timeout", &net.OpError{Op: "dial", Net: "tcp", Err: os.ErrDeadlineExceeded}, true},
		{"server closed during startup", fmt.Errorf("failed to receive message: %w", io.ErrUnexpectedEOF), true},
		{"EOF", fmt.Errorf("reading: %w", io.EOF), true},
		{"connect_timeout", fmt.Errorf("connecting: %w", context.DeadlineExceeded), true},
		{"credentials that may come back", selfRetryable(true), true},
		{"credentials that will not", selfRetryable(false), false},
		{"missing certificate file (pgconn)", missingFileError(t), false},
		{"missing file", &os.PathError{Op: "open", Path: "/etc/pgg/client.crt", Err: os.ErrNotExist}, false},
		{"certificate that does not parse", certErr, false},
		{"certificate that does not verify", &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}, false},
		{"cancelled", context.Canceled, false},
		{"text only: no such file", errors.New("open /x: no such file or directory"), false},
		{"text only: timeout", errors.New("i/o timeout"), false},
		{"text only: EOF", errors.New("unexpected EOF"), false},
		{"text only: connection refused", errors.New("connection refused"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := retryable(tc.err); got != tc.want {
				t.Errorf("retryable(%v): want = %v, got = %v", tc.err, tc.want, got)
			}
		})
	}
}

// failingConnector fails every attempt with err and counts them.
type failingConnector struct {
	err   error
	calls int
}

func (c *failingConnector) Connect(context.Context, Route, map[string]string) (*pgconn.HijackedConn, error) {
	c.calls++
	return nil, c.err
}

// TestMissingCertificateFailsAtOnce: a connect error for a certificate
// file that is not there reaches the waiting client at once, after one
// attempt, naming the file's setting; not as a timeout after the wait
// (timeouts.query_wait) spent retrying.
func TestMissingCertificateFailsAtOnce(t *testing.T) {
	conn := &failingConnector{err: missingFileError(t)}
	p := New(Options{Connector: conn, Logger: zap.NewNop()})
	defer p.Close(context.Background())
	p.SetLimit(2)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := p.Acquire(ctx, Route{Database: "db", User: "u"}, nil)
	var waitErr *WaitError
	if errors.As(err, &waitErr) || !errors.Is(err, os.ErrNotExist) || conn.calls != 1 {
		t.Fatalf("want = the missing file's error after 1 attempt, got = %v after %d attempts", err, conn.calls)
	}
	if want := "upstream.ssl.root_cert_file"; !strings.Contains(err.Error(), want) {
		t.Fatalf("want = an error naming %s, got = %v", want, err)
	}
	// A refused connection, by contrast, is retried until the wait ends.
	refused := &failingConnector{err: connectErr(t, "postgres://u@127.0.0.1:"+strconv.Itoa(closedPort(t))+"/db?sslmode=disable")}
	p2 := New(Options{Connector: refused, Logger: zap.NewNop()})
	defer p2.Close(context.Background())
	p2.SetLimit(2)
	short, cancel2 := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel2()
	_, err = p2.Acquire(short, Route{Database: "db", User: "u"}, nil)
	if !errors.As(err, &waitErr) || refused.calls < 2 {
		t.Fatalf("refused connections: want = a WaitError after retries, got = %v after %d attempts", err, refused.calls)
	}
}
