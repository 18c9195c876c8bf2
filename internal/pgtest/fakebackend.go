package pgtest

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
)

// FakeBackend is a scripted Postgres server for what a real one cannot do
// on demand: answering with no cost of its own, so that a benchmark
// measures only the governor's relay. It accepts any user without a
// password and answers every simple Query with one row ("1") and every
// Sync with ReadyForQuery. It does not parse SQL, but for the pool's role
// query (a Query that mentions pg_is_in_recovery), answered as a primary
// does: (f, off).
type FakeBackend struct {
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	conn map[net.Conn]struct{}
	resp fakeResponses
}

// StartFakeBackend listens on 127.0.0.1:0. The caller must call Close.
func StartFakeBackend() (*FakeBackend, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	fb := &FakeBackend{ln: ln, conn: map[net.Conn]struct{}{}, resp: newFakeResponses()}
	fb.wg.Add(1)
	go fb.accept() // owner: fb; exits when Close closes the listener
	return fb, nil
}

// Addr is the listening address.
func (fb *FakeBackend) Addr() string { return fb.ln.Addr().String() }

// Close stops accepting, closes every connection and waits for them.
func (fb *FakeBackend) Close() {
	_ = fb.ln.Close()
	fb.mu.Lock()
	for c := range fb.conn {
		_ = c.Close()
	}
	fb.mu.Unlock()
	fb.wg.Wait()
}

func (fb *FakeBackend) accept() {
	defer fb.wg.Done()
	for {
		c, err := fb.ln.Accept()
		if err != nil {
			return
		}
		fb.mu.Lock()
		fb.conn[c] = struct{}{}
		fb.mu.Unlock()
		fb.wg.Add(1)
		go func() { // owner: fb; exits when the connection closes
			defer fb.wg.Done()
			_ = serveFake(c, fb.resp)
			_ = c.Close()
			fb.mu.Lock()
			delete(fb.conn, c)
			fb.mu.Unlock()
		}()
	}
}

// fakeResponses are the canned responses, built once per backend.
type fakeResponses struct{ welcome, queryResult, roleResult, sync []byte }

func newFakeResponses() fakeResponses {
	return fakeResponses{welcome: concat(
		msg('R', u32(0)), // AuthenticationOk
		msg('S', cstr("server_version"), cstr("15.0")),
		msg('S', cstr("client_encoding"), cstr("UTF8")),
		msg('S', cstr("DateStyle"), cstr("ISO, MDY")),
		msg('S', cstr("TimeZone"), cstr("UTC")),
		msg('S', cstr("application_name"), cstr("")),
		msg('S', cstr("integer_datetimes"), cstr("on")),
		msg('S', cstr("standard_conforming_strings"), cstr("on")),
		msg('K', u32(4242), u32(1234)),
		msg('Z', []byte{'I'}),
	), queryResult: concat(
		msg('T', []byte{0, 1}, cstr("?column?"), u32(0), []byte{0, 0}, u32(23), []byte{0, 4}, u32(0xffffffff), []byte{0, 0}),
		msg('D', []byte{0, 1}, u32(1), []byte("1")),
		msg('C', cstr("SELECT 1")),
		msg('Z', []byte{'I'}),
	), roleResult: concat(
		msg('T', []byte{0, 2},
			cstr("pg_is_in_recovery"), u32(0), []byte{0, 0}, u32(16), []byte{0, 1}, u32(0xffffffff), []byte{0, 0},
			cstr("reset_val"), u32(0), []byte{0, 0}, u32(25), []byte{0xff, 0xff}, u32(0xffffffff), []byte{0, 0}),
		msg('D', []byte{0, 2}, u32(1), []byte("f"), u32(3), []byte("off")),
		msg('C', cstr("SELECT 1")),
		msg('Z', []byte{'I'}),
	), sync: msg('Z', []byte{'I'})}
}

func serveFake(c net.Conn, resp fakeResponses) error {
	r := bufio.NewReaderSize(c, 8192)
	w := bufio.NewWriterSize(c, 8192)
	var hdr [5]byte
	var qbuf []byte // a Query's text, reused
	// Startup packet (SSLRequest answered 'N' first).
	for {
		if _, err := io.ReadFull(r, hdr[:4]); err != nil {
			return err
		}
		n := int(binary.BigEndian.Uint32(hdr[:4]))
		if n < 8 || n > 10000 {
			return errors.New("bad startup length")
		}
		body := make([]byte, n-4)
		if _, err := io.ReadFull(r, body); err != nil {
			return err
		}
		if binary.BigEndian.Uint32(body) == 80877103 { // SSLRequest
			if _, err := c.Write([]byte{'N'}); err != nil {
				return err
			}
			continue
		}
		break
	}
	if _, err := c.Write(resp.welcome); err != nil {
		return err
	}
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return err
		}
		n := int(binary.BigEndian.Uint32(hdr[1:])) - 4
		if n < 0 {
			return errors.New("bad message length")
		}
		role := false
		if hdr[0] == 'Q' && n <= len(roleQueryMark)+4096 {
			if cap(qbuf) < n {
				qbuf = make([]byte, n)
			}
			if _, err := io.ReadFull(r, qbuf[:n]); err != nil {
				return err
			}
			role = bytes.Contains(qbuf[:n], []byte(roleQueryMark))
		} else if _, err := r.Discard(n); err != nil {
			return err
		}
		switch hdr[0] {
		case 'Q':
			if role {
				_, _ = w.Write(resp.roleResult)
				break
			}
			_, _ = w.Write(resp.queryResult)
		case 'S':
			_, _ = w.Write(resp.sync)
		case 'X':
			return nil
		}
		if r.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				return err
			}
		}
	}
}

// roleQueryMark is what identifies the pool's role query.
const roleQueryMark = "pg_is_in_recovery"

func msg(typ byte, parts ...[]byte) []byte {
	body := concat(parts...)
	out := []byte{typ, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(out[1:], uint32(len(body)+4))
	return append(out, body...)
}

func concat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func cstr(s string) []byte { return append([]byte(s), 0) }

func u32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
