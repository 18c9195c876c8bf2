package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/pggovernor/pggovernor/config"
)

// Tests of limits.max_buffered_bytes and pool.max_client_statements: what
// a client can make the governor hold.

const (
	mib = 1 << 20
	// memLimit is limits.max_buffered_bytes in these tests (the default).
	memLimit = 64 * mib
	// rssBound is what the governor's resident memory must stay under,
	// peak included, while clients send it messages of 200 MB: under a
	// 256 MiB container limit with the default limits.max_buffered_bytes.
	// What it holds live is at most the limit and its own ~20 MiB; the
	// garbage collector lets the heap reach about twice what was live at
	// its last cycle (GOGC=100, no GOMEMLIMIT), and a buffer that grew or
	// was let go is garbage until then (measured: 205 MiB).
	rssBound = 3*memLimit + 48*mib
)

// procMemory returns a process' resident memory now and its peak (VmRSS,
// VmHWM), in bytes.
func procMemory(t *testing.T, pid int) (rss, hwm int64) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			rss = kb << 10
		case "VmHWM:":
			hwm = kb << 10
		}
	}
	return rss, hwm
}

// scrapeAddr reads the /metrics of the admin listener at addr.
func scrapeAddr(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return mfs
}

// memClient is a raw client connection, logged in.
type memClient struct {
	c  net.Conn
	fe *pgproto3.Frontend
}

func dialMem(t *testing.T, p *process) *memClient {
	t.Helper()
	c, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	fe := pgproto3.NewFrontend(bufio.NewReader(c), c)
	loginRaw(t, c, fe, "alice", userPass)
	return &memClient{c: c, fe: fe}
}

// sendLarge writes a message of type typ ('Q', or 'P' for a named Parse
// followed by a Sync) whose statement text is "SELECT length('xx…x')" with
// size x's: its header first, then its body, the first sent bytes of the
// text only (all of it when sent is negative).
func (m *memClient) sendLarge(typ byte, name string, size, sent int) error {
	head := "SELECT length('"
	tail := "')"
	var pre []byte
	if typ == 'P' {
		pre = append([]byte(name), 0)
	}
	post := []byte{0}
	if typ == 'P' {
		post = append(post, 0, 0) // no parameter types
	}
	bodyLen := len(pre) + len(head) + size + len(tail) + len(post)
	msg := binary.BigEndian.AppendUint32([]byte{typ}, uint32(4+bodyLen))
	msg = append(append(msg, pre...), head...)
	if _, err := m.c.Write(msg); err != nil {
		return err
	}
	if sent < 0 {
		sent = size
	}
	chunk := bytes.Repeat([]byte("x"), mib)
	for left := sent; left > 0; {
		n := min(left, len(chunk))
		if _, err := m.c.Write(chunk[:n]); err != nil {
			return err
		}
		left -= n
	}
	if sent < size {
		return nil
	}
	end := append([]byte(tail), post...)
	if typ == 'P' {
		end = append(end, 'S', 0, 0, 0, 4)
	}
	_, err := m.c.Write(end)
	return err
}

// finishLarge sends the rest of a message sendLarge began.
func (m *memClient) finishLarge(typ byte, size, sent int) error {
	chunk := bytes.Repeat([]byte("x"), mib)
	for left := size - sent; left > 0; {
		n := min(left, len(chunk))
		if _, err := m.c.Write(chunk[:n]); err != nil {
			return err
		}
		left -= n
	}
	end := []byte("')\x00")
	if typ == 'P' {
		end = append(end, 0, 0, 'S', 0, 0, 0, 4)
	}
	_, err := m.c.Write(end)
	return err
}

// response reads up to ReadyForQuery: the error and the first column of
// the last row, if any.
func (m *memClient) response() (*pgproto3.ErrorResponse, string, error) {
	var er *pgproto3.ErrorResponse
	var row string
	_ = m.c.SetReadDeadline(time.Now().Add(2 * time.Minute))
	defer func() { _ = m.c.SetReadDeadline(time.Time{}) }()
	for {
		msg, err := m.fe.Receive()
		if err != nil {
			return er, row, err
		}
		switch msg := msg.(type) {
		case *pgproto3.ErrorResponse:
			e := *msg
			er = &e
		case *pgproto3.DataRow:
			if len(msg.Values) > 0 {
				row = string(msg.Values[0])
			}
		case *pgproto3.ReadyForQuery:
			if msg.TxStatus != 'I' {
				return er, row, fmt.Errorf("ReadyForQuery %q, want 'I'", msg.TxStatus)
			}
			return er, row, nil
		}
	}
}

// selectOne checks that the client's session still works.
func (m *memClient) selectOne() error {
	if _, err := m.c.Write([]byte("Q\x00\x00\x00\x0dSELECT 1\x00")); err != nil {
		return err
	}
	er, row, err := m.response()
	switch {
	case err != nil:
		return err
	case er != nil:
		return fmt.Errorf("SELECT 1: %s %s", er.Code, er.Message)
	case row != "1":
		return fmt.Errorf("SELECT 1: want = 1, got = %q", row)
	}
	return nil
}

// refusedForMemory checks that er is the governor's 53200 naming
// limits.max_buffered_bytes, an ERROR (the session goes on).
func refusedForMemory(er *pgproto3.ErrorResponse) error {
	if er == nil || er.Code != "53200" || er.Severity != "ERROR" || !strings.Contains(er.Message, "limits.max_buffered_bytes") {
		return fmt.Errorf("want = ERROR 53200 naming limits.max_buffered_bytes, got = %+v", er)
	}
	return nil
}

// TestMemoryBoundedUnderLargeMessages drives the binary with clients that
// announce and send Query and Parse messages of 200 MB, fill the budget
// with a message in progress, and announce large messages they never send;
// the governor's resident memory (its peak included) stays under rssBound,
// over-limit messages get ERROR 53200 naming limits.max_buffered_bytes and
// their sessions go on, other clients are served, and nothing held is left
// counted afterwards.
func TestMemoryBoundedUnderLargeMessages(t *testing.T) {
	users := usersFile(t)
	p := startProcess(t, []string{"PGGOVERNOR_UPSTREAM_PASSWORD=" + appPass},
		"--upstream-url="+shared.URL("app", "", "appdb"), "--clients.users-file="+users,
		"--budget.max=10", "--admin-listen=127.0.0.1:0", "--log.level=info",
		"--limits.max-buffered-bytes="+strconv.Itoa(memLimit))
	var admin string
	waitFor(t, 10*time.Second, "the start log line", func() bool {
		for _, l := range logLines(t, p) {
			if l["msg"] == "pggovernor started" {
				admin, _ = l["admin_listen"].(string)
			}
		}
		return admin != ""
	})
	pid := p.cmd.Process.Pid
	metric := func(name string) float64 {
		v, _ := value(scrapeAddr(t, admin), name, nil)
		return v
	}
	rss0, _ := procMemory(t, pid)
	t.Logf("at start: VmRSS %d MiB", rss0/mib)

	// 1. Eight clients announce 200 MB (four Queries, four Parses) and
	// send it all, at once.
	const huge = 200 * 1000 * 1000
	clients := make([]*memClient, 8)
	for i := range clients {
		clients[i] = dialMem(t, p)
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(clients))
	for i, m := range clients {
		wg.Add(1)
		go func(i int, m *memClient) {
			defer wg.Done()
			typ := byte('Q')
			if i%2 == 1 {
				typ = 'P'
			}
			sendErr := make(chan error, 1)
			go func() { sendErr <- m.sendLarge(typ, fmt.Sprintf("huge%d", i), huge, -1) }()
			er, _, err := m.response()
			if err == nil {
				err = <-sendErr
			}
			if err == nil {
				err = refusedForMemory(er)
			}
			if err == nil {
				err = m.selectOne()
			}
			if err != nil {
				errs <- fmt.Errorf("client %d (%c): %w", i, typ, err)
			}
		}(i, m)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	rss1, hwm1 := procMemory(t, pid)
	t.Logf("after 8 clients sent 200 MB each: VmRSS %d MiB, VmHWM %d MiB", rss1/mib, hwm1/mib)

	// 2. The budget counts what arrived: a 48 MiB Query half sent holds
	// most of it, so a 24 MiB Query from another client is refused while
	// a small one is served; then the first completes and runs.
	a, b, c := dialMem(t, p), dialMem(t, p), dialMem(t, p)
	const big, part, other = 48 * mib, 40 * mib, 24 * mib
	if err := a.sendLarge('Q', "", big, part); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the half-sent Query held in the budget", func() bool {
		return metric("pggovernor_buffered_bytes") >= part
	})
	sendErr := make(chan error, 1)
	go func() { sendErr <- b.sendLarge('Q', "", other, -1) }()
	er, _, err := b.response()
	if err == nil {
		err = <-sendErr
	}
	if err == nil {
		err = refusedForMemory(er)
	}
	if err != nil {
		t.Fatalf("a 24 MiB Query while 48 MiB are held: %v", err)
	}
	if err := c.selectOne(); err != nil {
		t.Fatalf("another client while the budget is full: %v", err)
	}
	if err := a.finishLarge('Q', big, part); err != nil {
		t.Fatal(err)
	}
	if er, row, err := a.response(); err != nil || er != nil || row != strconv.Itoa(big) {
		t.Fatalf("the 48 MiB Query: want = %d, got = %q (%v, %v)", big, row, er, err)
	}
	if err := b.selectOne(); err != nil {
		t.Fatalf("the refused client afterwards: %v", err)
	}

	// A named Parse of 32 MiB is kept once: the budget holds its text,
	// not the reader's copy and more.
	if err := c.sendLarge('P', "kept", 32*mib, -1); err != nil {
		t.Fatal(err)
	}
	if er, _, err := c.response(); err != nil || er != nil {
		t.Fatalf("a 32 MiB Parse: %v %v", er, err)
	}
	held := metric("pggovernor_buffered_bytes")
	if held < 32*mib || held > 33*mib {
		t.Fatalf("after a 32 MiB Parse: want = its text held once (~32 MiB), got = %.0f bytes", held)
	}
	rss2, hwm2 := procMemory(t, pid)
	t.Logf("after the budget was filled and the 32 MiB Parse kept: VmRSS %d MiB, VmHWM %d MiB", rss2/mib, hwm2/mib)

	// 3. Headers alone: eight announce 60 MiB (under the limit) and send
	// a few bytes, eight announce 1 GiB (over it: refused at once). The
	// governor allocates nothing for them.
	var heap0 float64
	waitFor(t, 10*time.Second, "the heap to settle", func() bool {
		heap0 = metric("go_memstats_heap_alloc_bytes")
		return heap0 < 3*memLimit
	})
	for i := 0; i < 8; i++ {
		m := dialMem(t, p)
		if _, err := m.c.Write(append(binary.BigEndian.AppendUint32([]byte{'Q'}, 60*mib), "SELECT"...)); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 8; i++ {
		m := dialMem(t, p)
		if _, err := m.c.Write(binary.BigEndian.AppendUint32([]byte{'Q'}, 1<<30)); err != nil {
			t.Fatal(err)
		}
		_ = m.c.SetReadDeadline(time.Now().Add(30 * time.Second))
		msg, err := m.fe.Receive()
		if er, ok := msg.(*pgproto3.ErrorResponse); err != nil || !ok || refusedForMemory(er) != nil {
			t.Fatalf("a header announcing 1 GiB: want = ERROR 53200 at once, got = %#v (%v)", msg, err)
		}
	}
	if err := c.selectOne(); err != nil {
		t.Fatal(err)
	}
	heap1 := metric("go_memstats_heap_alloc_bytes")
	rss3, hwm3 := procMemory(t, pid)
	t.Logf("with 16 headers announcing 60 MiB or 1 GiB: heap %+.1f MiB, VmRSS %d MiB, VmHWM %d MiB", (heap1-heap0)/mib, rss3/mib, hwm3/mib)
	if heap1-heap0 > 16*mib {
		t.Errorf("headers without bodies grew the heap by %.0f MiB", (heap1-heap0)/mib)
	}
	if held := metric("pggovernor_buffered_bytes"); held > 33*mib {
		t.Errorf("headers without bodies are counted: %.0f bytes held", held)
	}
	if hwm3 > rssBound {
		t.Errorf("peak resident memory %d MiB, want under %d MiB (limits.max_buffered_bytes %d MiB)", hwm3/mib, rssBound/mib, memLimit/mib)
	}
	if got := metric("pggovernor_buffer_refusals_total"); got < 8+1+8 {
		t.Errorf("pggovernor_buffer_refusals_total: want >= 17, got = %v", got)
	}

	// Everything counted is given back when the clients leave.
	for _, m := range append(clients, a, b, c) {
		_ = m.c.Close()
	}
	waitFor(t, 30*time.Second, "pggovernor_buffered_bytes back to 0", func() bool {
		return metric("pggovernor_buffered_bytes") == 0
	})
}

// TestMaxClientStatements: a pgx client preparing more named statements
// than pool.max_client_statements gets 53400 naming the setting, counted,
// and its session goes on; a statement closed makes room again. Statements
// of the same text prepared by many clients are kept, and counted, once.
func TestMaxClientStatements(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) { c.Pool.MaxClientStatements = 5; c.Budget.Max = 4 })
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for i := 0; i < 5; i++ {
		if _, err := conn.Prepare(ctx, fmt.Sprintf("s%d", i), fmt.Sprintf("SELECT %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	_, err = conn.Prepare(ctx, "s5", "SELECT 5")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "53400" || !strings.Contains(pgErr.Message, "pool.max_client_statements") {
		t.Fatalf("the sixth statement: want = 53400 naming pool.max_client_statements, got = %v", err)
	}
	// (pgx's default mode would prepare this query too: the simple
	// protocol prepares nothing.)
	var one int
	if err := conn.QueryRow(ctx, "SELECT 1", pgx.QueryExecModeSimpleProtocol).Scan(&one); err != nil || one != 1 {
		t.Fatalf("after the refusal: %v", err)
	}
	if err := conn.Deallocate(ctx, "s0"); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Prepare(ctx, "s5", "SELECT 5"); err != nil {
		t.Fatalf("after a Deallocate: %v", err)
	}
	var five int
	if err := conn.QueryRow(ctx, "s5").Scan(&five); err != nil || five != 5 {
		t.Fatalf("executing s5: %d, %v", five, err)
	}
	mfs := g.scrape(t)
	if got := mustValue(t, mfs, "pggovernor_client_statement_refusals_total", nil); got != 1 {
		t.Fatalf("pggovernor_client_statement_refusals_total: want = 1, got = %v", got)
	}

	// Ten clients prepare the same 1 MiB text: it is held once.
	text := "SELECT length('" + strings.Repeat("y", mib) + "')"
	var conns []*pgx.Conn
	for i := 0; i < 10; i++ {
		c, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		if _, err := c.Prepare(ctx, "big", text); err != nil {
			t.Fatal(err)
		}
	}
	var n int
	if err := conns[3].QueryRow(ctx, "big").Scan(&n); err != nil || n != mib {
		t.Fatalf("executing the shared statement: %d, %v", n, err)
	}
	held := mustValue(t, g.scrape(t), "pggovernor_buffered_bytes", nil)
	if held < mib || held > 2*mib {
		t.Fatalf("ten clients with the same 1 MiB statement: want = it held once, got = %.0f bytes", held)
	}
	for _, c := range conns {
		c.Close(ctx)
	}
	waitFor(t, 10*time.Second, "the statement texts given back", func() bool {
		held, _ := value(g.scrape(t), "pggovernor_buffered_bytes", nil)
		return held < mib
	})
}

// TestRefusedMessageAbortsTheTransaction: a Query or Parse refused for
// limits.max_buffered_bytes while the client holds a server connection
// fails there too, so that the transaction it was part of — explicit, or
// the implicit one of an extended-protocol batch — is rolled back, as a
// direct Postgres does when it cannot allocate a message: nothing before
// the refused message is committed. The same holds for the governor's
// other refusals of a Parse (pool.max_client_statements, a name in use).
func TestRefusedMessageAbortsTheTransaction(t *testing.T) {
	ctx := context.Background()
	if _, err := shared.ExecIn(ctx, "appdb", "DROP TABLE IF EXISTS refused_tx; CREATE TABLE refused_tx (mode text, n int); GRANT ALL ON refused_tx TO app"); err != nil {
		t.Fatal(err)
	}
	huge := func(typ byte) []byte { // 2 MiB, over the 1 MiB limit
		var body []byte
		if typ == 'P' {
			body = append(body, "big\x00"...)
		}
		body = append(append(append(body, "SELECT '"...), bytes.Repeat([]byte("z"), 2*mib)...), "'\x00"...)
		if typ == 'P' {
			body = append(body, 0, 0)
		}
		return append(binary.BigEndian.AppendUint32([]byte{typ}, uint32(4+len(body))), body...)
	}
	enc := func(msgs ...pgproto3.FrontendMessage) []byte {
		var out []byte
		for _, m := range msgs {
			out, _ = m.Encode(out)
		}
		return out
	}
	// exchange writes b and reads up to ReadyForQuery: the messages' types,
	// the error, the transaction status.
	exchange := func(t *testing.T, c net.Conn, fe *pgproto3.Frontend, b []byte) (types string, er *pgproto3.ErrorResponse, status byte) {
		t.Helper()
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
		for {
			msg, err := fe.Receive()
			if err != nil {
				t.Fatalf("after %q: %v", types, err)
			}
			switch msg := msg.(type) {
			case *pgproto3.ErrorResponse:
				e := *msg
				er = &e
				types += "E"
			case *pgproto3.ReadyForQuery:
				return types, er, msg.TxStatus
			case *pgproto3.ParseComplete:
				types += "1"
			case *pgproto3.BindComplete:
				types += "2"
			case *pgproto3.CommandComplete:
				types += "C"
			}
		}
	}
	for _, mode := range []string{config.PoolModeTransaction, config.PoolModeSession} {
		t.Run(mode, func(t *testing.T) {
			g := startGov(t, nil, func(c *config.Config) {
				c.PoolMode, c.Limits.MaxBufferedBytes, c.Pool.MaxClientStatements, c.Budget.Max = mode, mib, 1, 4
			})
			c := rawConn(t, g)
			_ = c.SetDeadline(time.Now().Add(time.Minute))
			fe := pgproto3.NewFrontend(bufio.NewReader(c), c)
			loginRaw(t, c, fe, "alice", userPass)

			// An explicit transaction: the refused Query aborts it.
			exchange(t, c, fe, enc(&pgproto3.Query{String: "BEGIN"}))
			exchange(t, c, fe, enc(&pgproto3.Query{String: "INSERT INTO refused_tx VALUES ('" + mode + "', 1)"}))
			types, er, status := exchange(t, c, fe, huge('Q'))
			if err := refusedForMemory(er); err != nil || types != "E" || status != 'E' {
				t.Fatalf("a 2 MiB Query in a transaction: want = the error then ReadyForQuery 'E', got = %q %q (%v)", types, status, err)
			}
			if _, _, status := exchange(t, c, fe, enc(&pgproto3.Query{String: "COMMIT"})); status != 'I' {
				t.Fatalf("COMMIT: status %q", status)
			}

			// An extended-protocol batch: the refused Parse aborts its
			// implicit transaction, the INSERT before it included.
			batch := enc(&pgproto3.Parse{Query: "INSERT INTO refused_tx VALUES ('" + mode + "', 2)"}, &pgproto3.Bind{}, &pgproto3.Execute{})
			batch = append(batch, huge('P')...)
			batch = append(batch, enc(&pgproto3.Bind{PreparedStatement: "big"}, &pgproto3.Execute{}, &pgproto3.Sync{})...)
			types, er, status = exchange(t, c, fe, batch)
			if err := refusedForMemory(er); err != nil || types != "12CE" || status != 'I' {
				t.Fatalf("a 2 MiB Parse in a batch: want = ParseComplete, BindComplete, CommandComplete, the error, ReadyForQuery 'I', got = %q %q (%v)", types, status, err)
			}

			if mode == config.PoolModeTransaction {
				// So do the governor's own refusals of a Parse: one
				// statement beyond pool.max_client_statements (53400),
				// and one whose name the client holds already (42P05).
				if types, er, _ := exchange(t, c, fe, enc(&pgproto3.Parse{Name: "one", Query: "SELECT 1"}, &pgproto3.Sync{})); er != nil || types != "1" {
					t.Fatalf("preparing one: %q %v", types, er)
				}
				for _, tc := range []struct{ name, code string }{{"two", "53400"}, {"one", "42P05"}} {
					batch := enc(&pgproto3.Parse{Query: "INSERT INTO refused_tx VALUES ('" + mode + "', 3)"}, &pgproto3.Bind{}, &pgproto3.Execute{},
						&pgproto3.Parse{Name: tc.name, Query: "SELECT 2"}, &pgproto3.Sync{})
					types, er, status := exchange(t, c, fe, batch)
					if er == nil || er.Code != tc.code || types != "12CE" || status != 'I' {
						t.Fatalf("a Parse refused with %s in a batch: want = ParseComplete, BindComplete, CommandComplete, the error, ReadyForQuery 'I', got = %q %q %+v", tc.code, types, status, er)
					}
				}
			}

			// The session goes on.
			if types, er, _ := exchange(t, c, fe, enc(&pgproto3.Query{String: "SELECT 1"})); er != nil || types != "C" {
				t.Fatalf("SELECT 1 afterwards: %q %v", types, er)
			}
			rows, err := shared.ExecIn(ctx, "appdb", "SELECT count(*) FROM refused_tx WHERE mode = '"+mode+"'")
			if err != nil || len(rows) != 1 || rows[0][0] != "0" {
				t.Fatalf("rows committed around a refused message: want = 0, got = %v (%v)", rows, err)
			}
		})
	}
}

// TestLargeStatementHeldOnce: a large statement text is held once — in the
// buffer it was read into — not copied for keeping: with
// limits.max_buffered_bytes at 48 MiB, a 32 MiB named statement (pgx's
// Prepare) and a 32 MiB unnamed one (pgx's describe-exec mode) are
// accepted and run, which a copy next to the buffer (64 MiB) would not be.
func TestLargeStatementHeldOnce(t *testing.T) {
	g := startGov(t, nil, func(c *config.Config) { c.Limits.MaxBufferedBytes = 48 * mib; c.Budget.Max = 4 })
	ctx := context.Background()
	const size = 32 * mib
	text := "SELECT length('" + strings.Repeat("w", size) + "')"
	for _, named := range []bool{true, false} {
		conn, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		var n int
		if named {
			if _, err := conn.Prepare(ctx, "big", text); err != nil {
				t.Fatalf("a 32 MiB Parse under a 48 MiB limit: %v", err)
			}
			err = conn.QueryRow(ctx, "big").Scan(&n)
		} else {
			err = conn.QueryRow(ctx, text, pgx.QueryExecModeDescribeExec).Scan(&n)
		}
		if err != nil || n != size {
			t.Fatalf("named %v: want = %d, got = %d (%v)", named, size, n, err)
		}
		held := mustValue(t, g.scrape(t), "pggovernor_buffered_bytes", nil)
		if held < size || held > size+mib {
			t.Fatalf("named %v: want = the text held once (~32 MiB), got = %.0f bytes", named, held)
		}
		conn.Close(ctx)
		waitFor(t, 10*time.Second, "the text given back", func() bool {
			held, _ := value(g.scrape(t), "pggovernor_buffered_bytes", nil)
			return held == 0
		})
	}
}
