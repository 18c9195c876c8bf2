package main

import (
	"context"
	"testing"

	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// TestServerMadeReadOnlyStaysReadOnly: a server made read-only after the
// clients logged in (default_transaction_read_only on, reloaded: what a
// writer turned reader or an operator's maintenance does) refuses every
// client's writes, as it would on direct connections. The governor used to
// bring each client's server connection to the value the client saw at
// login (set_config … 'off'), so that a second client on the same
// connection could write on the read-only server. With
// target_session_attrs=primary the server still fits (it is no standby),
// so nothing is retired and the connection is shared.
func TestServerMadeReadOnlyStaysReadOnly(t *testing.T) {
	pg := privateCluster(t, pgtest.Options{})
	ctx := context.Background()
	if _, err := pg.ExecIn(ctx, "appdb", "CREATE TABLE ro (n int); GRANT ALL ON ro TO app"); err != nil {
		t.Fatal(err)
	}
	g := startGov(t, pg, func(c *config.Config) {
		c.Upstream.URL = pg.URL("app", "", "appdb") + "&target_session_attrs=primary"
		c.Budget.Max = 1
	})
	a := connectPgx(t, g.url("app", appPass, "appdb"))
	b := connectPgx(t, g.url("app", appPass, "appdb"))
	mustExec(t, a, "INSERT INTO ro VALUES (1)")
	mustExec(t, b, "INSERT INTO ro VALUES (2)")
	if err := pg.Reconfigure(ctx, map[string]string{"default_transaction_read_only": "on"}); err != nil {
		t.Fatal(err)
	}
	_, err := a.Exec(ctx, "INSERT INTO ro VALUES (3)")
	assertCode(t, err, "25006")
	_, err = b.Exec(ctx, "INSERT INTO ro VALUES (4)")
	assertCode(t, err, "25006")
	var ro string
	if err := b.QueryRow(ctx, "SHOW default_transaction_read_only").Scan(&ro); err != nil || ro != "on" {
		t.Fatalf("default_transaction_read_only for the second client: want = on, got = %q %v", ro, err)
	}
	if rows, err := pg.ExecIn(ctx, "appdb", "SELECT count(*) FROM ro"); err != nil || rows[0][0] != "2" {
		t.Fatalf("rows written: want = 2 (none after the server was made read-only), got = %v %v", rows, err)
	}
	if n := g.g.pool.Stats().Connects; n != 1 {
		t.Fatalf("server connections opened: want = 1 (the server still fits: nothing retired), got = %d", n)
	}
}
