package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"
)

// bigResult is a query whose result (100 MB) no socket buffer holds.
const bigResult = "SELECT repeat('x', 1000000) FROM generate_series(1, 100)"

// dialSmallWindow connects to addr with a small receive buffer and
// segment size (both set before connecting): the other side of a loopback
// connection sizes its send buffer from the segment size, so the socket
// holds ~90 KB instead of ~3 MB before the writer blocks.
func dialSmallWindow(t *testing.T, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var rerr, merr error
		err := rc.Control(func(fd uintptr) {
			rerr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
			merr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, 536)
		})
		return errors.Join(err, rerr, merr)
	}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// stallAfterQuery logs in as alice on a raw connection, sends query and
// never reads again.
func stallAfterQuery(t *testing.T, addr, query string) net.Conn {
	t.Helper()
	c := dialSmallWindow(t, addr)
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	fe := pgproto3.NewFrontend(bufio.NewReaderSize(c, 1024), c)
	loginRaw(t, c, fe, "alice", userPass)
	fe.Send(&pgproto3.Query{String: query})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Time{})
	return c
}

// stallMidCopy logs in, starts COPY table FROM STDIN, sends one row and
// then neither sends nor reads anything.
func stallMidCopy(t *testing.T, addr, table string) net.Conn {
	t.Helper()
	c := dialSmallWindow(t, addr)
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	fe := pgproto3.NewFrontend(bufio.NewReaderSize(c, 1024), c)
	loginRaw(t, c, fe, "alice", userPass)
	fe.Send(&pgproto3.Query{String: "COPY " + table + " FROM STDIN"})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	for {
		msg, err := fe.Receive()
		if err != nil {
			t.Fatalf("COPY FROM STDIN: %v", err)
		}
		if _, ok := msg.(*pgproto3.CopyInResponse); ok {
			break
		}
		if e, ok := msg.(*pgproto3.ErrorResponse); ok {
			t.Fatalf("COPY FROM STDIN: %s", e.Message)
		}
	}
	fe.Send(&pgproto3.CopyData{Data: []byte("a row\n")})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Time{})
	return c
}

// countBackends counts the backends of appdb whose query starts with
// prefix and that wait for wait_event.
func countBackends(t *testing.T, prefix, waitEvent string) int {
	t.Helper()
	rows, err := shared.Exec(context.Background(), fmt.Sprintf(
		"SELECT count(*) FROM pg_stat_activity WHERE datname = 'appdb' AND state = 'active' AND query LIKE '%s%%' AND wait_event = '%s'",
		prefix, waitEvent))
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(rows[0][0])
	return n
}

// TestSIGTERMWithStalledClients: clients that stop reading never hold the
// shutdown up. 45 clients send a query with a 100 MB result and never
// read it (their server connections blocked writing to the governor, the
// governor's writes to them blocked), one stops in the middle of a COPY
// FROM STDIN, two never finish logging in, while well-behaved clients
// commit transactions. After SIGTERM the process exits within
// timeouts.shutdown_drain + 1 s, every acknowledged commit is in the
// database, and no backend of the stalled clients is left.
func TestSIGTERMWithStalledClients(t *testing.T) {
	ctx := context.Background()
	if _, err := shared.ExecIn(ctx, "appdb", "DROP TABLE IF EXISTS drained_stall, copied_stall; CREATE TABLE drained_stall (client int, n int); CREATE TABLE copied_stall (line text); GRANT ALL ON drained_stall, copied_stall TO app"); err != nil {
		t.Fatal(err)
	}
	drain := 2 * time.Second
	const (
		stalled = 45
		good    = 4
	)
	p := startProcess(t, []string{"PGGOVERNOR_UPSTREAM_PASSWORD=" + appPass},
		"--upstream-url="+shared.URL("app", "", "appdb"), "--clients.users-file="+usersFile(t),
		"--budget.max="+strconv.Itoa(stalled+1+good+1), "--timeouts.shutdown-drain="+drain.String(), "--log.level=info")

	for i := 0; i < stalled; i++ {
		stallAfterQuery(t, p.addr, bigResult)
	}
	stallMidCopy(t, p.addr, "copied_stall")
	// Two clients that never finish logging in: one sends nothing, one
	// sends its startup packet and never answers the password request.
	dialSmallWindow(t, p.addr)
	midLogin := dialSmallWindow(t, p.addr)
	if _, err := midLogin.Write(startupPacket(map[string]string{"user": "alice", "database": "appdb"})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, "every stalled client's backend to block writing its result", func() bool {
		return countBackends(t, "SELECT repeat", "ClientWrite") == stalled && countBackends(t, "COPY copied_stall", "ClientRead") == 1
	})

	var mu sync.Mutex
	acked := map[[2]int]bool{}
	var wg sync.WaitGroup
	running := make(chan struct{}, good)
	for i := 0; i < good; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			conn, err := pgx.Connect(ctx, p.url("alice", userPass, "appdb"))
			if err != nil {
				t.Errorf("client %d: %v", i, err)
				running <- struct{}{}
				return
			}
			defer conn.Close(ctx)
			for n := 0; ; n++ {
				if n == 1 {
					running <- struct{}{}
				}
				tx, err := conn.Begin(ctx)
				if err != nil {
					return
				}
				if _, err := tx.Exec(ctx, fmt.Sprintf("INSERT INTO drained_stall VALUES (%d, %d)", i, n)); err != nil {
					_ = tx.Rollback(ctx)
					return
				}
				if _, err := tx.Exec(ctx, "SELECT pg_sleep(0.01)"); err != nil {
					_ = tx.Rollback(ctx)
					return
				}
				if err := tx.Commit(ctx); err != nil {
					return
				}
				mu.Lock()
				acked[[2]int{i, n}] = true
				mu.Unlock()
			}
		}(i)
	}
	for i := 0; i < good; i++ {
		<-running // each has committed once
	}

	exitAfter := stopAndCheckCommits(t, p, drain+60*time.Second, &wg, "drained_stall", &mu, acked)
	mu.Lock()
	commits := len(acked)
	mu.Unlock()
	if exitAfter > drain+time.Second {
		t.Fatalf("exit took %s after SIGTERM, more than shutdown_drain %s + 1 s:\n%s", exitAfter, drain, p.stderr)
	}
	waitFor(t, 10*time.Second, "the stalled clients' backends to be gone", func() bool {
		rows, err := shared.Exec(ctx, "SELECT count(*) FROM pg_stat_activity WHERE datname = 'appdb' AND (query LIKE 'SELECT repeat%' OR query LIKE 'COPY copied_stall%')")
		return err == nil && rows[0][0] == "0"
	})
	t.Logf("%d acknowledged commits, all present; exit %s after SIGTERM (shutdown_drain %s)", commits, exitAfter.Round(time.Millisecond), drain)
}
