package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/auth"
	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/pool"
)

// The fuzz targets of the client side. Each runs a few seconds in make
// test and longer in make fuzz; their seeds are in testdata/fuzz.

// FuzzParseOptions: the "options" startup parameter. Nothing panics; a
// refusal is a client error with a SQLSTATE; no name accepted has a dash
// (Postgres' ParseLongOption turns them into underscores; a name the
// server does not know, "" included, it refuses at login as it would
// directly); and the settings accepted, written back as -c name=value with
// spaces and backslashes escaped, parse to the same settings.
func FuzzParseOptions(f *testing.F) {
	for _, s := range []string{
		"-c search_path=public", "-csearch_path=a,b --statement-timeout=5s", `-c application_name=my\ app`,
		`-c x=a\\b`, "-c", "--", "-c =v", "-X", "  -c  a=b\t-c c=d  ", `\`, `-c a=\`, "-c a=b -c a=c",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := parseOptions(s)
		if err != nil {
			var ce *clientError
			if !errors.As(err, &ce) || len(ce.code) != 5 {
				t.Fatalf("parseOptions(%q): error without a SQLSTATE: %v", s, err)
			}
			return
		}
		var b strings.Builder
		for k, v := range got {
			if strings.Contains(k, "-") {
				t.Fatalf("parseOptions(%q) accepted the setting name %q", s, k)
			}
			fmt.Fprintf(&b, "-c %s=%s ", escapeOption(k), escapeOption(v))
		}
		again, err := parseOptions(b.String())
		if err != nil {
			t.Fatalf("parseOptions(%q) = %v, but its settings written back (%q) fail: %v", s, got, b.String(), err)
		}
		if fmt.Sprint(again) != fmt.Sprint(got) {
			t.Fatalf("parseOptions(%q) = %v; written back as %q: %v", s, got, b.String(), again)
		}
	})
}

// escapeOption escapes what separates or escapes in the options parameter.
func escapeOption(s string) string {
	var b strings.Builder
	for _, r := range s {
		if r == '\\' || r == ' ' || r == '\t' {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

// FuzzStartup feeds arbitrary bytes to a fresh client connection of an
// in-process governor (trust authentication, a scripted server), as the
// client's whole side of the connection, then ends it. The session must
// end within a deadline, answer in whole frames (after the one-byte
// answers to SSLRequest and GSSENCRequest), carry a SQLSTATE in every
// error, and leave no server connection in use.
func FuzzStartup(f *testing.F) {
	rig := newFuzzRig(f)
	f.Add(startupPacket(map[string]string{"user": "fuzz", "database": "fuzz"}))
	f.Add(startupPacket(map[string]string{"user": "fuzz", "database": "fuzz", "options": "-c search_path=x --work-mem=64kB"}))
	f.Add(append(binary.BigEndian.AppendUint32([]byte{0, 0, 0, 8}, sslRequestCode),
		startupPacket(map[string]string{"user": "fuzz"})...))
	f.Add(append(binary.BigEndian.AppendUint32([]byte{0, 0, 0, 8}, gssEncRequestCode), 0, 0, 0, 8))
	f.Add(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32([]byte{0, 0, 0, 16}, cancelRequestCode), 1))
	f.Add(startupPacket(map[string]string{"user": "fuzz", "database": "pgbouncer"}))
	f.Add(startupPacket(map[string]string{"user": "fuzz", "replication": "database"}))
	f.Add([]byte{0, 0, 0, 9, 0, 3, 0, 1, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		out := rig.converse(t, nil, data)
		checkAnswer(t, data, out, sslAnswers(data))
		rig.settle(t)
	})
}

// FuzzSession logs a client in, then feeds arbitrary bytes to the
// session as the client's messages and ends the connection: the session
// must end within a deadline, answer in whole frames with a SQLSTATE in
// every error, forward to the server only whole frames of frontend message
// types within clients.max_message_size, and leave no server connection
// in use.
func FuzzSession(f *testing.F) {
	rig := newFuzzRig(f)
	msg := func(m pgproto3.FrontendMessage) []byte { b, _ := m.Encode(nil); return b }
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	q := func(s string) []byte { return msg(&pgproto3.Query{String: s}) }
	parse := func(name, s string) []byte { return msg(&pgproto3.Parse{Name: name, Query: s}) }
	bind := func(portal, name string) []byte {
		return msg(&pgproto3.Bind{DestinationPortal: portal, PreparedStatement: name})
	}
	exec := msg(&pgproto3.Execute{})
	sync := msg(&pgproto3.Sync{})
	f.Add(q("SELECT 1"))
	f.Add(cat(q("BEGIN"), q("SELECT 1"), q("COMMIT")))
	f.Add(cat(parse("", "SELECT 1"), bind("", ""), msg(&pgproto3.Describe{ObjectType: 'P'}), exec, sync))
	f.Add(cat(parse("s1", "SELECT $1"), msg(&pgproto3.Describe{ObjectType: 'S', Name: "s1"}), sync, bind("", "s1"), exec, sync))
	f.Add(cat(parse("s1", "fail"), bind("", "s1"), exec, sync, q("SELECT 1")))
	f.Add(cat(parse("", "SELECT 1"), msg(&pgproto3.Flush{})))
	f.Add(cat(q("SET search_path TO x"), q("PREPARE p AS SELECT 1"), q("LISTEN ch")))
	f.Add(cat(bind("", "missing"), exec, sync, msg(&pgproto3.Close{ObjectType: 'S', Name: "s1"}), sync))
	f.Add(cat(msg(&pgproto3.FunctionCall{Function: 1}), msg(&pgproto3.CopyData{Data: []byte("x")}), msg(&pgproto3.CopyDone{})))
	f.Add(cat(q("SELECT 1"), msg(&pgproto3.Terminate{}), q("SELECT 2")))
	f.Add([]byte{'Q', 0, 0, 0, 3})
	f.Add([]byte{'Q', 0x7f, 0xff, 0xff, 0xff, 'x'})
	f.Add([]byte{'P', 0, 0, 0, 8, 'a', 0, 'b'})
	f.Fuzz(func(t *testing.T, data []byte) {
		login := startupPacket(map[string]string{"user": "fuzz", "database": "fuzz"})
		out := rig.converse(t, login, data)
		checkAnswer(t, nil, out, 0)
		rig.settle(t)
	})
}

// fuzzMaxMessage is clients.max_message_size in the fuzz rig.
const fuzzMaxMessage = 1 << 16

// fuzzRig is a governor in process (transaction mode, trust) in front of
// a scripted server.
type fuzzRig struct {
	srv     *Server
	pool    *pool.Pool
	backend *fuzzBackend
}

func newFuzzRig(f *testing.F) *fuzzRig {
	f.Helper()
	fb, err := startFuzzBackend()
	if err != nil {
		f.Fatal(err)
	}
	base, err := pgconn.ParseConfig("postgres://fuzz@" + fb.ln.Addr().String() + "/fuzz?sslmode=disable")
	if err != nil {
		f.Fatal(err)
	}
	p := pool.New(pool.Options{Connector: &pool.UpstreamConnector{Base: base, Timeout: 5 * time.Second}, Logger: zap.NewNop()})
	p.SetLimit(2)
	cfg := config.Default()
	cfg.Listen = "127.0.0.1:0"
	cfg.Clients.Auth = config.AuthTrust
	cfg.Clients.MaxMessageSize = fuzzMaxMessage
	cfg.Timeouts.QueryWait = 5 * time.Second
	cfg.Timeouts.ClientLogin = 5 * time.Second
	users, _ := auth.NewUsers("")
	s := NewServer(Options{Config: &cfg, Pool: p, Verifier: auth.NewVerifier(config.AuthTrust, users), UpstreamUser: "fuzz", Logger: zap.NewNop()})
	if err := s.Listen(); err != nil {
		f.Fatal(err)
	}
	go func() { _ = s.Serve() }() // owner: the rig; exits at Shutdown
	f.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
		p.Close(ctx)
		fb.close() // first: a connection left with part of a frame would be awaited for 5 s
		_ = p.Wait(ctx)
	})
	return &fuzzRig{srv: s, pool: p, backend: fb}
}

// fuzzDeadline bounds one conversation: what a session may take to answer
// and end once its client has said everything.
const fuzzDeadline = 10 * time.Second

// converse connects, sends login (if any) and reads to its ReadyForQuery,
// sends data, closes its side, and returns everything the governor sent
// after the login until it closed the connection.
func (r *fuzzRig) converse(t *testing.T, login, data []byte) []byte {
	t.Helper()
	c, err := net.Dial("tcp", r.srv.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(fuzzDeadline))
	br := bufio.NewReader(c)
	if login != nil {
		if _, err := c.Write(login); err != nil {
			t.Fatal(err)
		}
		for {
			typ, body, err := readFrame(br)
			if err != nil {
				t.Fatalf("login: %v", err)
			}
			if typ == 'E' {
				t.Fatalf("login refused: %q", body)
			}
			if typ == 'Z' {
				break
			}
		}
	}
	// The client writes while the governor answers: a client that does not
	// read could block a governor that does not read either.
	werr := make(chan error, 1)
	go func() { // owner: converse; exits when the write ends
		_, err := c.Write(data)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	out, err := io.ReadAll(br)
	<-werr // an error writing is the governor having closed the connection
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the session did not end within %s of its client's last byte; it sent %d bytes: %q", fuzzDeadline, len(out), trim(out))
	}
	return out
}

// settle waits until the session has given its server connection back,
// and fails on a frame the server should not have received.
func (r *fuzzRig) settle(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(fuzzDeadline)
	for r.pool.Stats().InUse > 0 || r.srv.clients.Load() > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("a server connection still in use (%+v) or a session still running (%d) %s after the client left",
				r.pool.Stats(), r.srv.clients.Load(), fuzzDeadline)
		}
		time.Sleep(time.Millisecond) // the pool's figures: nothing announces them
	}
	if bad := r.backend.bad.Swap(nil); bad != nil {
		t.Fatalf("the server received %s", *bad)
	}
}

// checkAnswer checks what the governor sent: at most skip single 'N'
// bytes (its answers to SSLRequest and GSSENCRequest; a request followed
// by more bytes in the same read is refused instead, as Postgres does),
// then whole backend frames; an ErrorResponse carries a SQLSTATE.
func checkAnswer(t *testing.T, in, out []byte, skip int) {
	t.Helper()
	for i := 0; i < skip && len(out) > 0 && out[0] == 'N'; i++ {
		out = out[1:]
	}
	for len(out) > 0 {
		if len(out) < 5 {
			t.Fatalf("a partial frame at the end of the answer: %q (input %q)", out, trim(in))
		}
		n := int(binary.BigEndian.Uint32(out[1:]))
		if n < 4 || n+1 > len(out) {
			t.Fatalf("a frame of type %q announces %d bytes, %d follow (input %q)", out[0], n, len(out)-1, trim(in))
		}
		if out[0] == 'E' {
			var er pgproto3.ErrorResponse
			if err := er.Decode(out[5 : n+1]); err != nil || len(er.Code) != 5 {
				t.Fatalf("an ErrorResponse without a SQLSTATE: %q (%v)", out[:n+1], err)
			}
		}
		out = out[n+1:]
	}
}

// sslAnswers counts the one-byte answers the governor gives: one per
// SSLRequest or GSSENCRequest at the start of the input.
func sslAnswers(in []byte) int {
	n := 0
	for len(in) >= 8 && binary.BigEndian.Uint32(in) == 8 {
		code := binary.BigEndian.Uint32(in[4:])
		if code != sslRequestCode && code != gssEncRequestCode {
			break
		}
		n++
		in = in[8:]
	}
	return n
}

func startupPacket(params map[string]string) []byte {
	b, _ := (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: params}).Encode(nil)
	return b
}

func readFrame(r *bufio.Reader) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := int(binary.BigEndian.Uint32(hdr[1:]))
	if n < 4 || n > 1<<24 {
		return 0, nil, fmt.Errorf("frame of type %q with length %d", hdr[0], n)
	}
	body := make([]byte, n-4)
	_, err := io.ReadFull(r, body)
	return hdr[0], body, err
}

func trim(b []byte) []byte {
	if len(b) > 200 {
		return b[:200]
	}
	return b
}

// fuzzBackend is a scripted server that answers every message as Postgres
// would in shape (ParseComplete, BindComplete, a described statement
// with no parameters and no result, CommandComplete, ReadyForQuery; a
// Parse or Query whose text contains "fail" gets an ErrorResponse, and an
// extended-protocol error skips to Sync), and records a frame that no
// frontend may send (an unknown type, a bad length, beyond the governor's
// clients.max_message_size).
type fuzzBackend struct {
	ln  net.Listener
	wg  sync.WaitGroup
	mu  sync.Mutex
	cs  map[net.Conn]struct{}
	bad atomic.Pointer[string]
}

func startFuzzBackend() (*fuzzBackend, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	b := &fuzzBackend{ln: ln, cs: map[net.Conn]struct{}{}}
	b.wg.Add(1)
	go func() { // owner: b; exits at close
		defer b.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.mu.Lock()
			b.cs[c] = struct{}{}
			b.mu.Unlock()
			b.wg.Add(1)
			go func() { // owner: b; exits when c closes
				defer b.wg.Done()
				b.serve(c)
				_ = c.Close()
				b.mu.Lock()
				delete(b.cs, c)
				b.mu.Unlock()
			}()
		}
	}()
	return b, nil
}

func (b *fuzzBackend) close() {
	_ = b.ln.Close()
	b.mu.Lock()
	for c := range b.cs {
		_ = c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

func (b *fuzzBackend) report(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	b.bad.CompareAndSwap(nil, &s)
}

func (b *fuzzBackend) serve(c net.Conn) {
	r := bufio.NewReader(c)
	w := bufio.NewWriter(c)
	var n [4]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return
	}
	if _, err := r.Discard(int(binary.BigEndian.Uint32(n[:])) - 4); err != nil {
		return
	}
	send := func(m pgproto3.BackendMessage) { buf, _ := m.Encode(nil); _, _ = w.Write(buf) }
	send(&pgproto3.AuthenticationOk{})
	for _, p := range [][2]string{{"server_version", "15.0"}, {"client_encoding", "UTF8"}, {"DateStyle", "ISO, MDY"},
		{"TimeZone", "UTC"}, {"integer_datetimes", "on"}, {"standard_conforming_strings", "on"}, {"application_name", ""}} {
		send(&pgproto3.ParameterStatus{Name: p[0], Value: p[1]})
	}
	send(&pgproto3.BackendKeyData{ProcessID: 1, SecretKey: []byte{0, 0, 0, 2}})
	send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
	if w.Flush() != nil {
		return
	}
	fail := &pgproto3.ErrorResponse{Severity: "ERROR", Code: "42601", Message: "scripted failure"}
	skipping := false
	for {
		var hdr [5]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return
		}
		size := int(binary.BigEndian.Uint32(hdr[1:]))
		if size < 4 || size > fuzzMaxMessage || !strings.ContainsRune("BCdcfDEHFPpQSX", rune(hdr[0])) {
			b.report("a frame of type %q and length %d", hdr[0], size)
			return
		}
		body := make([]byte, size-4)
		if _, err := io.ReadFull(r, body); err != nil {
			return
		}
		if skipping && hdr[0] != 'S' {
			continue
		}
		switch hdr[0] {
		case 'Q':
			if bytes.Contains(body, []byte("fail")) {
				send(fail)
			} else if len(bytes.TrimRight(body, "\x00 ")) == 0 {
				send(&pgproto3.EmptyQueryResponse{})
			} else {
				send(&pgproto3.CommandComplete{CommandTag: []byte("SELECT 0")})
			}
			send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
		case 'P':
			if bytes.Contains(body, []byte("fail")) {
				send(fail)
				skipping = true
			} else {
				send(&pgproto3.ParseComplete{})
			}
		case 'B':
			send(&pgproto3.BindComplete{})
		case 'D':
			if len(body) > 0 && body[0] == 'S' {
				send(&pgproto3.ParameterDescription{})
			}
			send(&pgproto3.NoData{})
		case 'E':
			send(&pgproto3.CommandComplete{CommandTag: []byte("SELECT 0")})
		case 'C':
			send(&pgproto3.CloseComplete{})
		case 'S':
			skipping = false
			send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
		case 'F':
			send(&pgproto3.FunctionCallResponse{})
			send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
		case 'X':
			_ = w.Flush()
			return
		}
		if r.Buffered() == 0 || hdr[0] == 'H' {
			if w.Flush() != nil {
				return
			}
		}
	}
}
