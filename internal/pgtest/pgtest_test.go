package pgtest

import (
	"context"
	"testing"
)

func TestStartExecRestart(t *testing.T) {
	ctx := context.Background()
	c, err := Start(ctx, Options{MaxConnections: 20})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rows, err := c.Exec(ctx, "SHOW max_connections")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := rows[0][0], "20"; got != want {
		t.Fatalf("max_connections: want = %s, got = %s", want, got)
	}
	if err := c.Restart(ctx, map[string]string{"max_connections": "30"}); err != nil {
		t.Fatal(err)
	}
	rows, err = c.Exec(ctx, "SHOW max_connections")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := rows[0][0], "30"; got != want {
		t.Fatalf("after restart max_connections: want = %s, got = %s", want, got)
	}
}
