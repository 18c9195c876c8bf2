package proxy

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pggovernor/pggovernor/internal/pgtest"
	"github.com/pggovernor/pggovernor/pool"
)

// BenchmarkCheckQuery measures the verification query against a real
// Postgres, directly (no governor): its round trip next to SELECT 1's is
// what one verification costs the server connection, and the difference
// is the server's work. "settings" adds two startup settings to compare;
// "temp" runs it in a session that has a temporary schema (the catalog
// scans then run).
func BenchmarkCheckQuery(b *testing.B) {
	ctx := context.Background()
	c, err := pgtest.Start(ctx, pgtest.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	conn, err := pgconn.Connect(ctx, c.SuperuserDSN("postgres"))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	params := conn.ParameterStatus
	reported := map[string]string{}
	for _, k := range []string{"application_name", "client_encoding", "DateStyle", "IntervalStyle", "TimeZone", "standard_conforming_strings", "default_transaction_read_only", "integer_datetimes", "is_superuser", "server_encoding", "server_version", "session_authorization", "in_hot_standby"} {
		reported[k] = params(k)
	}
	login := params("session_authorization")
	plain := checkQuery(&pool.Server{Params: reported, Settings: map[string]string{}}, login)
	withSettings := checkQuery(&pool.Server{Params: reported, Settings: map[string]string{"statement_timeout": "1234", "search_path": "public"}}, login)
	run := func(b *testing.B, q string) {
		for b.Loop() {
			if _, err := conn.Exec(ctx, q).ReadAll(); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("SELECT 1", func(b *testing.B) { run(b, "SELECT 1") })
	b.Run("check", func(b *testing.B) { run(b, plain) })
	if _, err := conn.Exec(ctx, "SELECT pg_catalog.set_config('statement_timeout', '1234', false); SELECT pg_catalog.set_config('search_path', 'public', false)").ReadAll(); err != nil {
		b.Fatal(err)
	}
	b.Run("check/settings", func(b *testing.B) { run(b, withSettings) })
	if _, err := conn.Exec(ctx, "CREATE TEMP TABLE bench_t(a int); DROP TABLE bench_t").ReadAll(); err != nil {
		b.Fatal(err)
	}
	b.Run("check/temp", func(b *testing.B) { run(b, withSettings) })
	// The answer must be clean, or the benchmark measured a failing check.
	res, err := conn.Exec(ctx, withSettings).ReadAll()
	if err != nil {
		b.Fatal(err)
	}
	for i, v := range res[0].Rows[0] {
		if (i < 6 && string(v) != "f") || (i >= 6 && v != nil) {
			b.Fatalf("the check finds state in a clean session: column %d = %q (%s)", i, v, withSettings)
		}
	}
}
