package proxy

import (
	"encoding/binary"
	"math/big"
	"testing"

	"github.com/jackc/pgx/v5/pgtype"
)

// TestNumericBinaryDecodesAsPostgresWould: the console's binary numeric
// (SHOW STATS' columns, in binary for pgx) decodes to the integer encoded.
func TestNumericBinaryDecodesAsPostgresWould(t *testing.T) {
	m := pgtype.NewMap()
	for _, want := range []int64{0, 1, 9999, 10000, 10001, 123456789, 1_000_000_000_000, 9_223_372_036_854_775_807, -5, -20000} {
		buf := appendNumericBinary(nil, want)
		n := int(binary.BigEndian.Uint32(buf))
		if n != len(buf)-4 {
			t.Fatalf("%d: length prefix %d, body %d bytes", want, n, len(buf)-4)
		}
		var got pgtype.Numeric
		if err := m.Scan(pgtype.NumericOID, pgtype.BinaryFormatCode, buf[4:], &got); err != nil {
			t.Fatalf("%d: %v", want, err)
		}
		v := new(big.Int).Mul(got.Int, new(big.Int).Exp(big.NewInt(10), big.NewInt(int64(got.Exp)), nil))
		if got.Exp < 0 || v.Cmp(big.NewInt(want)) != 0 {
			t.Fatalf("numeric: want = %d, got = %v × 10^%d", want, got.Int, got.Exp)
		}
	}
}

// TestParseConsoleCommand: verbs are case-insensitive, a trailing
// semicolon and quotes around a database name are accepted, and anything
// else is a syntax error.
func TestParseConsoleCommand(t *testing.T) {
	for _, tc := range []struct {
		in, verb, arg string
		bad           bool
	}{
		{in: "show pools;", verb: "SHOW", arg: "POOLS"},
		{in: "  PAUSE \"appdb\"  ", verb: "PAUSE", arg: "appdb"},
		{in: "resume", verb: "RESUME"},
		{in: "KILL", bad: true},
		{in: "RELOAD now", bad: true},
		{in: "SHOW", bad: true},
		{in: "SHOW POOLS EXTRA", bad: true},
		{in: "SELECT 1", bad: true},
	} {
		verb, arg, err := parseConsoleCommand(tc.in)
		if tc.bad {
			if err == nil || err.code != codeSyntaxError {
				t.Fatalf("%q: want = a syntax error, got = %v %q %q", tc.in, err, verb, arg)
			}
			continue
		}
		if err != nil || verb != tc.verb || arg != tc.arg {
			t.Fatalf("%q: want = %s %q, got = %s %q (%v)", tc.in, tc.verb, tc.arg, verb, arg, err)
		}
	}
}
