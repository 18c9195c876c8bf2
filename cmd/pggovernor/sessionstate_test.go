package main

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/lib/pq"

	"github.com/pggovernor/pggovernor/config"
)

// TestListenMultiplexed: clients LISTEN through the governor without being
// pinned; one upstream connection listens for all of them; notifications
// sent from other connections reach every listener; UNLISTEN stops them and
// the last one gives the connection back.
func TestListenMultiplexed(t *testing.T) {
	g := txGov(t, nil)
	ctx := context.Background()
	const listeners = 10
	conns := make([]*pgx.Conn, listeners)
	for i := range conns {
		c, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(ctx)
		mustExec(t, c, "LISTEN events")
		conns[i] = c
	}
	mustExec(t, conns[0], `LISTEN "Other Channel"`)
	if st := g.g.proxy.Stats(); st.Pinned != 0 {
		t.Fatalf("listening clients pinned: want = 0, got = %d", st.Pinned)
	}
	if open := g.g.pool.Stats().Open; open != 1 {
		t.Fatalf("server connections while %d clients listen: want = 1 (the listener), got = %d", listeners, open)
	}
	// Other clients keep working on the remaining connection of the budget.
	sender, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer sender.Close(ctx)
	for k := 0; k < 3; k++ {
		mustExec(t, sender, "SELECT pg_notify('events', $1)", fmt.Sprint("payload-", k))
	}
	mustExec(t, sender, `NOTIFY "Other Channel", 'x'`)
	for i, c := range conns {
		for k := 0; k < 3; k++ {
			wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			n, err := c.WaitForNotification(wctx)
			cancel()
			if err != nil {
				t.Fatalf("listener %d, notification %d: %v", i, k, err)
			}
			if n.Channel != "events" || n.Payload != fmt.Sprint("payload-", k) {
				t.Fatalf("listener %d: want = events/payload-%d, got = %s/%s", i, k, n.Channel, n.Payload)
			}
		}
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	n, err := conns[0].WaitForNotification(wctx)
	cancel()
	if err != nil || n.Channel != "Other Channel" {
		t.Fatalf("quoted channel: want = Other Channel, got = %v (%v)", n, err)
	}
	// A listener also runs queries and transactions between notifications.
	var v int
	if err := conns[1].QueryRow(ctx, "SELECT $1::int", 5).Scan(&v); err != nil || v != 5 {
		t.Fatalf("query on a listening client: want = 5, got = %d (%v)", v, err)
	}
	// UNLISTEN: no more notifications; the last one releases the listener.
	for _, c := range conns {
		mustExec(t, c, "UNLISTEN *")
	}
	mustExec(t, sender, "SELECT pg_notify('events', 'late')")
	wctx, cancel = context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = conns[2].WaitForNotification(wctx)
	cancel()
	if err == nil {
		t.Fatal("a notification arrived after UNLISTEN *")
	}
	waitFor(t, 5*time.Second, "the listener connection to go back to the pool", func() bool {
		rows, err := shared.Exec(ctx, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND wait_event = 'ClientRead' AND query LIKE 'LISTEN%'")
		return err == nil && rows[0][0] == "0" || g.g.pool.Stats().InUse == 0
	})
}

// TestPqListenerThroughGovernor: lib/pq's Listener (what coderd runs, one
// per replica) receives NOTIFY sent from a database/sql pool; when the
// listener connection is lost, it is told (disconnected), reconnects, and
// receives again — never a silent loss.
func TestPqListenerThroughGovernor(t *testing.T) {
	g := txGov(t, nil)
	events := make(chan pq.ListenerEventType, 16)
	l := pq.NewListener(g.url("alice", userPass, "appdb"), 10*time.Millisecond, 100*time.Millisecond,
		func(ev pq.ListenerEventType, err error) { events <- ev })
	defer l.Close()
	if err := l.Listen("coder_events"); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("postgres", g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	receive := func(want string) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case n := <-l.Notify:
				if n == nil {
					continue // the reconnection marker
				}
				if n.Channel != "coder_events" || n.Extra != want {
					t.Fatalf("want = coder_events/%s, got = %s/%s", want, n.Channel, n.Extra)
				}
				return
			case <-deadline:
				t.Fatalf("notification %q did not arrive", want)
			}
		}
	}
	if _, err := db.Exec("SELECT pg_notify($1, $2)", "coder_events", "one"); err != nil {
		t.Fatal(err)
	}
	receive("one")
	// Lose the listener connection: terminate its backend.
	if _, err := shared.Exec(context.Background(),
		"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app' AND query LIKE 'LISTEN%'"); err != nil {
		t.Fatal(err)
	}
	deadline := time.After(15 * time.Second)
	for reconnected := false; !reconnected; {
		select {
		case ev := <-events:
			reconnected = ev == pq.ListenerEventReconnected
		case <-deadline:
			t.Fatal("the Listener was not told of the lost connection (no reconnect)")
		}
	}
	if _, err := db.Exec("SELECT pg_notify($1, $2)", "coder_events", "two"); err != nil {
		t.Fatal(err)
	}
	receive("two")
}

// TestSessionStatePins: each kind of session state pins its client: it
// keeps seeing it, and no other client can.
func TestSessionStatePins(t *testing.T) {
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 3 })
	ctx := context.Background()
	kinds := []struct {
		name, setup, check, want string
	}{
		{"SET", "SET statement_timeout = 1234", "SHOW statement_timeout", "1234ms"},
		{"set_config", "SELECT set_config('work_mem', '7MB', false)", "SHOW work_mem", "7MB"},
		{"advisory lock", "SELECT pg_advisory_lock(99)", "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND objid = 99 AND pid = pg_backend_pid()", "1"},
		{"temp table", "CREATE TEMP TABLE mine (v int)", "SELECT coalesce(to_regclass('pg_temp.mine')::text, 'none')", "mine"},
		{"SQL PREPARE", "PREPARE q1 AS SELECT 'prepared'", "EXECUTE q1", "prepared"},
		{"cursor WITH HOLD", "DECLARE c1 SCROLL CURSOR WITH HOLD FOR SELECT 'held'", "FETCH ABSOLUTE 1 FROM c1", "held"},
		// LOAD needs a superuser upstream: run through a governor for one.
		{"LOAD", "LOAD 'auto_explain'", "SHOW auto_explain.log_min_duration", "-1"},
	}
	if err := shared.CreateRole(ctx, "loader", "loader-pw", true); err != nil {
		t.Fatal(err)
	}
	superGov := txGov(t, func(c *config.Config) {
		c.Budget.Max = 3
		c.Upstream.URL = shared.URL("loader", "", "appdb")
		c.Upstream.Password = "loader-pw"
	})
	for _, k := range kinds {
		g := g
		if k.name == "LOAD" {
			g = superGov
		}
		t.Run(k.name, func(t *testing.T) {
			owner, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
			if err != nil {
				t.Fatal(err)
			}
			defer owner.Close(ctx)
			if _, err := owner.Exec(ctx, k.setup); err != nil {
				t.Fatal(err)
			}
			before := g.g.proxy.Stats().Pinned
			if before < 1 {
				t.Fatalf("pinned clients after %q: want >= 1, got = %d", k.setup, before)
			}
			// Others run many transactions meanwhile, on every connection.
			parallel(t, 6, func(i int) error {
				c, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
				if err != nil {
					return err
				}
				defer c.Close(ctx)
				for j := 0; j < 10; j++ {
					var got string
					err := c.QueryRow(ctx, k.check, pgx.QueryExecModeSimpleProtocol).Scan(&got)
					if err == nil && got == k.want {
						return fmt.Errorf("another client sees the state: %s = %s", k.check, got)
					}
				}
				return nil
			})
			// The owner keeps seeing it.
			for j := 0; j < 3; j++ {
				var got string
				if err := owner.QueryRow(ctx, k.check, pgx.QueryExecModeSimpleProtocol).Scan(&got); err != nil || got != k.want {
					t.Fatalf("the owner: want %s = %s, got = %q (%v)", k.check, k.want, got, err)
				}
			}
		})
	}
	// Transaction-scoped state does not pin.
	c, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	before := g.g.proxy.Stats().Pinned
	err = pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SET LOCAL statement_timeout = 99"); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(5)")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if after := g.g.proxy.Stats().Pinned; after != before {
		t.Fatalf("SET LOCAL / pg_advisory_xact_lock pinned the client: %d → %d", before, after)
	}
	const pinMsg = "client pinned to its server connection by session state"
	if g.logs.FilterMessage(pinMsg).Len()+superGov.logs.FilterMessage(pinMsg).Len() < len(kinds) {
		t.Fatal("pins are not logged with their reason")
	}
}

// TestParametersFollowTheClient: a client's SET of a reported parameter
// holds on whichever connection serves it next: SHOW TimeZone always
// answers what this client set, and other clients keep theirs.
func TestParametersFollowTheClient(t *testing.T) {
	g := txGov(t, nil)
	ctx := context.Background()
	zones := []string{"Europe/Paris", "Asia/Tokyo", "America/Denver", "UTC"}
	parallel(t, 12, func(i int) error {
		c, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
		if err != nil {
			return err
		}
		defer c.Close(ctx)
		zone := zones[i%len(zones)]
		app := fmt.Sprint("client-", i)
		if _, err := c.Exec(ctx, fmt.Sprintf("SET TimeZone = '%s'; SET application_name = '%s'; SET DateStyle = 'SQL, DMY'", zone, app)); err != nil {
			return err
		}
		for j := 0; j < 20; j++ {
			var tz, name, ds string
			if err := c.QueryRow(ctx, "SELECT current_setting('TimeZone'), current_setting('application_name'), current_setting('DateStyle')").Scan(&tz, &name, &ds); err != nil {
				return err
			}
			if tz != zone || name != app || ds != "SQL, DMY" {
				return fmt.Errorf("want = %s %s SQL, DMY, got = %s %s %s", zone, app, tz, name, ds)
			}
			if c.PgConn().ParameterStatus("TimeZone") != zone {
				return fmt.Errorf("reported TimeZone: want = %s, got = %s", zone, c.PgConn().ParameterStatus("TimeZone"))
			}
		}
		return nil
	})
	if st := g.g.proxy.Stats(); st.Pinned != 0 {
		t.Fatalf("SET of reported parameters pinned: %d", st.Pinned)
	}
}

// TestDatabaseDDLThroughGovernor: CREATE DATABASE … TEMPLATE, ALTER
// DATABASE … RENAME and DROP DATABASE succeed while the governor pools
// connections to those databases, like Coder's test harness. Each round
// leaves an idle server connection to the database the next statement
// needs without sessions, so every round exercises the three paths; three
// rounds show that they repeat (one more round proves nothing new, and
// each CREATE DATABASE costs the server a checkpoint-sized copy).
func TestDatabaseDDLThroughGovernor(t *testing.T) {
	ctx := context.Background()
	if _, err := shared.Exec(ctx, "ALTER ROLE app CREATEDB"); err != nil {
		t.Fatal(err)
	}
	if _, err := shared.Exec(ctx, "CREATE DATABASE ddl_template OWNER app"); err != nil {
		t.Fatal(err)
	}
	g := txGov(t, func(c *config.Config) { c.Budget.Max = 4 })
	admin, err := pgx.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	// Someone uses the template through the governor, leaving an idle
	// server connection to it.
	useDB := func(db string) {
		t.Helper()
		c, err := pgx.Connect(ctx, g.url("alice", userPass, db))
		if err != nil {
			t.Fatal(err)
		}
		mustExec(t, c, "SELECT 1")
		c.Close(ctx)
		// The connection goes back to the pool once its ReadyForQuery is
		// on its way to the client: wait for it, so that the DDL that
		// follows meets a pooled connection.
		waitFor(t, 10*time.Second, "an idle server connection to "+db, func() bool {
			idle := 0
			for _, r := range g.g.pool.Routes() {
				if r.Route.Database == db {
					idle += r.Idle
				}
			}
			return idle > 0
		})
	}
	const rounds = 3
	for round := 0; round < rounds; round++ {
		useDB("ddl_template")
		name := fmt.Sprint("ddl_copy_", round)
		if _, err := admin.Exec(ctx, fmt.Sprintf("CREATE DATABASE %s TEMPLATE ddl_template", name)); err != nil {
			t.Fatalf("round %d: CREATE DATABASE … TEMPLATE: %v", round, err)
		}
		useDB(name)
		if _, err := admin.Exec(ctx, fmt.Sprintf("ALTER DATABASE %s RENAME TO %s_renamed", name, name)); err != nil {
			t.Fatalf("round %d: ALTER DATABASE … RENAME: %v", round, err)
		}
		useDB(name + "_renamed")
		if _, err := admin.Exec(ctx, fmt.Sprintf("DROP DATABASE %s_renamed", name)); err != nil {
			t.Fatalf("round %d: DROP DATABASE: %v", round, err)
		}
	}
	if open := g.g.pool.Stats().Open; open > 4 {
		t.Fatalf("server connections: want <= 4, got = %d", open)
	}
}

// TestPipelineOverSimpleAndExtended: a multi-statement simple query and an
// extended-protocol pipeline with an error in the middle behave as on a
// direct connection, through pgconn's batch.
func TestPipelineOverSimpleAndExtended(t *testing.T) {
	g := txGov(t, nil)
	ctx := context.Background()
	c, err := pgconn.Connect(ctx, g.url("alice", userPass, "appdb"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	batch := &pgconn.Batch{}
	batch.ExecParams("SELECT 1", nil, nil, nil, nil)
	batch.ExecParams("SELECT $1::int", [][]byte{[]byte("2")}, nil, nil, nil)
	batch.ExecParams("SELECT nope", nil, nil, nil, nil)
	batch.ExecParams("SELECT 4", nil, nil, nil, nil)
	results, err := c.ExecBatch(ctx, batch).ReadAll()
	if err == nil || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("want the error of the third statement, got %v", err)
	}
	if len(results) < 2 || string(results[1].Rows[0][0]) != "2" {
		t.Fatalf("results before the error: %v", results)
	}
	res, err := c.Exec(ctx, "BEGIN; CREATE TEMP TABLE pipe (a int) ON COMMIT DROP; INSERT INTO pipe VALUES (1), (2); SELECT sum(a) FROM pipe; COMMIT").ReadAll()
	if err != nil || string(res[3].Rows[0][0]) != "3" {
		t.Fatalf("multi-statement transaction: %v (%v)", res, err)
	}
	if st := g.g.proxy.Stats(); st.Pinned != 0 {
		t.Fatalf("ON COMMIT DROP pinned: %d", st.Pinned)
	}
	var wg sync.WaitGroup
	wg.Wait()
}
