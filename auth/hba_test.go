package auth

import (
	"context"
	"crypto/md5" //nolint:gosec // Postgres md5 auth method in tests
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/xdg-go/scram"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

const hbaPath = "/etc/pggovernor/pg_hba.conf"

// memFiles reads files from a map, as ParseHBA reads them from disk.
func memFiles(files map[string]string) HBAReadFunc {
	return func(p string) ([]byte, error) {
		s, ok := files[p]
		if !ok {
			return nil, &fs.PathError{Op: "open", Path: p, Err: fs.ErrNotExist}
		}
		return []byte(s), nil
	}
}

func parseText(text string, extra map[string]string) (*HBARules, error) {
	files := map[string]string{hbaPath: text}
	for k, v := range extra {
		files[k] = v
	}
	return ParseHBA(hbaPath, memFiles(files))
}

// tlsState is a TLS connection whose client presented a verified
// certificate with this CN ("" for none).
func tlsState(cn string) *tls.ConnectionState {
	st := &tls.ConnectionState{Version: tls.VersionTLS13}
	if cn != "" {
		c := &x509.Certificate{Subject: pkix.Name{CommonName: cn}}
		st.PeerCertificates = []*x509.Certificate{c}
		st.VerifiedChains = [][]*x509.Certificate{{c}}
	}
	return st
}

func local(user, db string) Login { return Login{User: user, Database: db} }
func tcp(addr, user, db string) Login {
	return Login{Addr: addr, User: user, Database: db}
}
func ssl(addr, user, db string) Login {
	return Login{Addr: addr, User: user, Database: db, TLS: tlsState("")}
}

// TestParseHBAMatches: valid files, and which line each login matches (0:
// none), as Postgres 15 would decide.
func TestParseHBAMatches(t *testing.T) {
	for _, tc := range []struct {
		name  string
		text  string
		extra map[string]string
		cases []struct {
			login Login
			want  int
		}
	}{
		{
			name: "connection types and first match wins",
			text: "# a comment\n\nlocal all all trust\nhostssl all all 127.0.0.1/32 cert\nhostnossl all all 127.0.0.1/32 password\nhost all all 0.0.0.0/0 reject\n",
			cases: []struct {
				login Login
				want  int
			}{
				{local("alice", "appdb"), 3},
				{ssl("127.0.0.1", "alice", "appdb"), 4},
				{tcp("127.0.0.1", "alice", "appdb"), 5},
				{tcp("10.1.2.3", "alice", "appdb"), 6},
				{ssl("10.1.2.3", "alice", "appdb"), 6},
				{tcp("::1", "alice", "appdb"), 0}, // no IPv6 line
			},
		},
		{
			name: "database and user lists, keywords and quoted names",
			text: `host appdb,"all" alice,bob 127.0.0.1/32 md5
host sameuser all 127.0.0.1/32 scram-sha-256
host replication all 127.0.0.1/32 trust
host "my db" "we""ird user" 127.0.0.1/32 password
host all "all" 127.0.0.1/32 reject
`,
			cases: []struct {
				login Login
				want  int
			}{
				{tcp("127.0.0.1", "alice", "appdb"), 1},
				{tcp("127.0.0.1", "bob", "all"), 1},           // "all" quoted: the database named all
				{tcp("127.0.0.1", "carol", "carol"), 2},       // sameuser
				{tcp("127.0.0.1", "carol", "replication"), 0}, // replication never matches an ordinary connection
				{tcp("127.0.0.1", `we"ird user`, "my db"), 4},
				{tcp("127.0.0.1", "all", "otherdb"), 5}, // "all" quoted: the user named all
				{tcp("127.0.0.1", "carol", "otherdb"), 0},
			},
		},
		{
			name: "addresses: CIDR, netmask, IPv6, all",
			text: `host all a 10.0.0.0/8 md5
host all b 192.168.1.7 255.255.0.0 md5
host all c ::1/128 md5
host all d fd00::/8 md5
host all e 10.0.0.0 255.0.255.0 md5
host all f all md5
host all g 127.0.0.1/32 md5
hostnogssenc all h 0.0.0.0/0 md5
`,
			cases: []struct {
				login Login
				want  int
			}{
				{tcp("10.255.0.1", "a", "x"), 1},
				{tcp("11.0.0.1", "a", "x"), 0},
				{tcp("192.168.200.1", "b", "x"), 2},
				{tcp("192.169.1.7", "b", "x"), 0},
				{tcp("::1", "c", "x"), 3},
				{tcp("127.0.0.1", "c", "x"), 0}, // another family
				{tcp("fd12:3456::1", "d", "x"), 4},
				{tcp("10.9.0.200", "e", "x"), 5}, // a non-contiguous netmask, bit by bit
				{tcp("10.9.1.200", "e", "x"), 0},
				{tcp("2001:db8::1", "f", "x"), 6},
				{local("f", "x"), 0}, // host lines never match the Unix socket
				{tcp("::ffff:127.0.0.1", "g", "x"), 7},
				{ssl("203.0.113.9", "h", "x"), 8},
			},
		},
		{
			name: "continuation lines, CRLF, commas and blanks",
			text: "host all \\\nalice 127.0.0.1/32 \\\nmd5\r\n# a comment that goes on \\\nhost all bob all trust\r\nhost  appdb,otherdb , carol 127.0.0.1/32 md5\nhost all dave\t127.0.0.1/32\tmd5 # trailing comment\n",
			cases: []struct {
				login Login
				want  int
			}{
				{tcp("127.0.0.1", "alice", "x"), 1},
				{tcp("127.0.0.1", "bob", "x"), 0},         // continued into the comment
				{tcp("127.0.0.1", "carol", "otherdb"), 6}, // the blank ends the list: ", carol" is the next field
				{tcp("127.0.0.1", "dave", "x"), 7},
			},
		},
		{
			name:  "@file includes, relative to the including file, nested, quoted path",
			text:  "host @dbs.txt @users/ops.txt 127.0.0.1/32 md5\nhost all @\"/abs/with space.txt\" 127.0.0.1/32 password\nhost all \"@notafile\" 127.0.0.1/32 trust\n",
			extra: map[string]string{"/etc/pggovernor/dbs.txt": "appdb\n# comment\notherdb,  thirddb\n", "/etc/pggovernor/users/ops.txt": "ops1 @more.txt\n", "/etc/pggovernor/users/more.txt": "ops2\nall\n", "/abs/with space.txt": "erin"},
			cases: []struct {
				login Login
				want  int
			}{
				{tcp("127.0.0.1", "ops1", "thirddb"), 1},
				{tcp("127.0.0.1", "anyone", "appdb"), 1}, // all from a nested @file is the keyword
				{tcp("127.0.0.1", "anyone", "nodb"), 0},
				{tcp("127.0.0.1", "erin", "nodb"), 2},
				{tcp("127.0.0.1", "@notafile", "nodb"), 3},
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rules, err := parseText(tc.text, tc.extra)
			if err != nil {
				t.Fatalf("want = parsed, got = %v", err)
			}
			for _, c := range tc.cases {
				got := 0
				if r := rules.Match(c.login); r != nil {
					got = r.Line
					if r.File != hbaPath {
						t.Errorf("%+v: want = a rule of %s, got = %s", c.login, hbaPath, r.File)
					}
				}
				if got != c.want {
					t.Errorf("login %s@%s from %q (tls %v): want = line %d, got = line %d", c.login.User, c.login.Database, c.login.Addr, c.login.TLS != nil, c.want, got)
				}
			}
		})
	}
}

// TestParseHBACommaSpace: "a ,b" is two fields in Postgres (the blank ends
// the field), so the line is shifted and refused.
func TestParseHBACommaSpace(t *testing.T) {
	_, err := parseText("host appdb ,otherdb alice 127.0.0.1/32 md5\n", nil)
	if err == nil || !strings.Contains(err.Error(), `pg_hba.conf:1: "alice" is not an IP address`) {
		t.Fatalf("want = the shifted line refused, got = %v", err)
	}
}

// TestParseHBAErrors: each invalid line is refused with an error naming
// the file and line, in Postgres' words where Postgres has them.
func TestParseHBAErrors(t *testing.T) {
	for _, tc := range []struct {
		text  string
		extra map[string]string
		want  string // in the error, after "file:line: "
		file  string // "" = the hba file
		line  int
	}{
		{text: "local all", want: "end-of-line before role specification", line: 1},
		{text: "# c\nlocal", want: "end-of-line before database specification", line: 2},
		{text: "local all all", want: "end-of-line before authentication method", line: 1},
		{text: "host all all", want: "end-of-line before IP address specification", line: 1},
		{text: "host all all 127.0.0.1", want: "end-of-line before netmask specification", line: 1},
		{text: "host all all 127.0.0.1/33 md5", want: `invalid CIDR mask in address "127.0.0.1/33"`, line: 1},
		{text: "host all all 127.0.0.1/ md5", want: `invalid CIDR mask in address "127.0.0.1/"`, line: 1},
		{text: "host all all 127.0.0.1/+8 md5", want: `invalid CIDR mask`, line: 1},
		{text: "host all all ::1/129 md5", want: `invalid CIDR mask`, line: 1},
		{text: "host all all 10.0.0.1 255.0.0.0,255.0.0.0 md5", want: "multiple values specified for netmask", line: 1},
		{text: "host all all 10.0.0.1 255.0.x.0 md5", want: `invalid IP mask "255.0.x.0"`, line: 1},
		{text: "host all all 10.0.0.1 ffff:: md5", want: "IP address and mask do not match", line: 1},
		{text: "host all all 10.0.0.0/8,11.0.0.0/8 md5", want: "multiple values specified for host address", line: 1},
		{text: "host all all db.example.com md5", want: "host names are not supported", line: 1},
		{text: "host all all \"all\" md5", want: `"all" is not an IP address`, line: 1},
		{text: "host all all fe80::1%eth0/64 md5", want: "is not an IP address", line: 1},
		{text: "host all all samenet md5", want: `"samenet" is not supported`, line: 1},
		{text: "host all all samehost md5", want: `"samehost" is not supported`, line: 1},
		{text: "local,host all all md5", want: "multiple values specified for connection type", line: 1},
		{text: "hosts all all all md5", want: `invalid connection type "hosts"`, line: 1},
		{text: "hostgssenc all all all md5", want: "GSSAPI encryption is not supported", line: 1},
		{text: "local all all md5,trust", want: "multiple values specified for authentication type", line: 1},
		{text: "local all all frob", want: `invalid authentication method "frob"`, line: 1},
		{text: "local all all peer", want: `authentication method "peer" is not supported by pggovernor`, line: 1},
		{text: "host all all all ldap ldapserver=x", want: `authentication method "ldap" is not supported`, line: 1},
		{text: "local samerole all md5", want: `"samerole" is not supported: pggovernor has no roles`, line: 1},
		{text: "local samegroup all md5", want: `"samegroup" is not supported`, line: 1},
		{text: "local all +admins md5", want: `group name "+admins" is not supported`, line: 1},
		{text: "local all @g.txt md5", extra: map[string]string{"/etc/pggovernor/g.txt": "bob\n+ops\n"}, want: `group name "+ops" is not supported`, line: 1},
		{text: "host all all all cert", want: "cert authentication is only supported on hostssl connections", line: 1},
		{text: "hostssl all all all cert map=m", want: "map= (user name maps from pg_ident.conf) is not supported", line: 1},
		{text: "hostssl all all all md5 map=m", want: `authentication option "map" is only valid for authentication methods ident, peer, gssapi, sspi, and cert`, line: 1},
		{text: "host all all all md5 clientcert=verify-ca", want: `clientcert can only be configured for "hostssl" rows`, line: 1},
		{text: "hostssl all all all cert clientcert=verify-ca", want: `clientcert only accepts "verify-full" when using "cert" authentication`, line: 1},
		{text: "hostssl all all all md5 clientcert=yes", want: `invalid value for clientcert: "yes"`, line: 1},
		{text: "hostssl all all all md5 clientname=DN", want: "clientname=DN is not supported", line: 1},
		{text: "host all all all md5 clientname=CN", want: `clientname can only be configured for "hostssl" rows`, line: 1},
		{text: "hostssl all all all md5 clientname=UID", want: `invalid value for clientname: "UID"`, line: 1},
		{text: "hostssl all all all md5 verify", want: "authentication option not in name=value format: verify", line: 1},
		{text: "hostssl all all all md5 ldapserver=x", want: `authentication option "ldapserver" is only valid for authentication methods ldap`, line: 1},
		{text: "hostssl all all all md5 frob=1", want: `unrecognized authentication option name: "frob"`, line: 1},
		{text: "local all @missing.txt md5", want: `could not open secondary authentication file "@missing.txt" as "/etc/pggovernor/missing.txt"`, line: 1},
		{text: "local all @self.txt md5", extra: map[string]string{"/etc/pggovernor/self.txt": "@self.txt"}, want: "maximum nesting depth", file: "/etc/pggovernor/self.txt", line: 1},
		{text: "local all @inc.txt md5", extra: map[string]string{"/etc/pggovernor/inc.txt": "ok\n" + strings.Repeat("x", 300)}, want: "authentication file token too long", file: "/etc/pggovernor/inc.txt", line: 2},
		{text: "local all " + strings.Repeat("u", 256) + " md5", want: "authentication file token too long", line: 1},
		{text: "local all alice md5\nlocal all bob\x00 md5", want: "NUL byte", line: 2},
		{text: "# only a comment\n\n", want: "contains no entries"},
	} {
		t.Run(tc.want, func(t *testing.T) {
			_, err := parseText(tc.text, tc.extra)
			if err == nil {
				t.Fatalf("%q: want = refused, got = parsed", tc.text)
			}
			file := tc.file
			if file == "" {
				file = hbaPath
			}
			prefix := ""
			if tc.line > 0 {
				prefix = fmt.Sprintf("%s:%d: ", file, tc.line)
			}
			if !strings.HasPrefix(err.Error(), prefix) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%q: want = an error %q…%q, got = %v", tc.text, prefix, tc.want, err)
			}
			if tc.file != "" && !strings.Contains(err.Error(), "included from "+hbaPath+":1") {
				t.Fatalf("want = the including line named, got = %v", err)
			}
		})
	}
}

// TestParseHBAEveryProblem: every bad line is reported, not only the
// first, as Postgres logs them all.
func TestParseHBAEveryProblem(t *testing.T) {
	_, err := parseText("local all all md5\nlocal all\nhost all all all frob\nlocal all all trust\n", nil)
	var he *HBAError
	if !errors.As(err, &he) || !strings.Contains(err.Error(), ":2: end-of-line") || !strings.Contains(err.Error(), `:3: invalid authentication method "frob"`) {
		t.Fatalf("want = lines 2 and 3 named, got = %v", err)
	}
}

// TestHBACheck: lines the rest of the configuration makes unusable or
// dangerous are refused, naming the line and the setting.
func TestHBACheck(t *testing.T) {
	all := HBAOptions{TLS: true, ClientCA: true, UsersFile: true}
	for _, tc := range []struct {
		line string
		opts HBAOptions
		want string // "" = accepted
	}{
		{line: "hostssl all all all md5", opts: HBAOptions{UsersFile: true}, want: "hostssl record cannot match because TLS is disabled: set clients.tls.mode"},
		{line: "hostssl all all all cert", opts: HBAOptions{TLS: true}, want: "cert needs client certificates verified against clients.tls.client_ca_file"},
		{line: "hostssl all all all md5 clientcert=verify-ca", opts: HBAOptions{TLS: true, UsersFile: true}, want: "clientcert needs client certificates verified against clients.tls.client_ca_file"},
		{line: "local all all scram-sha-256", opts: HBAOptions{}, want: "scram-sha-256 checks passwords in clients.users_file, which is not set"},
		{line: "host all all 0.0.0.0/0 trust", opts: all, want: "trust for addresses beyond loopback is refused"},
		{line: "host all all 127.0.0.0/7 trust", opts: all, want: "trust for addresses beyond loopback is refused"},
		{line: "host all all ::/0 trust", opts: all, want: "trust for addresses beyond loopback is refused"},
		{line: "host all all 0.0.0.0/0 trust", opts: HBAOptions{TrustRemote: true}},
		{line: "host all all 127.0.0.1/32 trust", opts: all},
		{line: "host all all 127.0.0.0/8 trust", opts: all},
		{line: "host all all ::1/128 trust", opts: all},
		{line: "local all all trust", opts: HBAOptions{}},
		{line: "host all all all reject", opts: HBAOptions{}},
		{line: "hostssl all all all cert", opts: all},
	} {
		t.Run(tc.line, func(t *testing.T) {
			rules, err := parseText(tc.line+"\n", nil)
			if err != nil {
				t.Fatal(err)
			}
			err = rules.check(tc.opts)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("want = accepted, got = %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), hbaPath+":1: "+tc.want)):
				t.Fatalf("want = %q, got = %v", tc.want, err)
			}
		})
	}
}

// authConnScript answers the verifier's request as a client that knows a
// password: cleartext for AuthenticationCleartextPassword, Postgres' md5
// response for AuthenticationMD5Password, SCRAM for AuthenticationSASL.
type authConnScript struct {
	user, password string
	sent           []pgproto3.BackendMessage
	scram          *scramClient
	pending        []byte
}

func (c *authConnScript) Send(msg pgproto3.BackendMessage) error {
	c.sent = append(c.sent, msg)
	body := func(m pgproto3.FrontendMessage) []byte {
		b, _ := m.Encode(nil)
		return b[5:]
	}
	switch m := msg.(type) {
	case *pgproto3.AuthenticationCleartextPassword:
		c.pending = body(&pgproto3.PasswordMessage{Password: c.password})
	case *pgproto3.AuthenticationMD5Password:
		inner := md5.Sum([]byte(c.password + c.user)) //nolint:gosec // Postgres md5
		outer := md5.Sum(append([]byte(hex.EncodeToString(inner[:])), m.Salt[:]...))
		c.pending = body(&pgproto3.PasswordMessage{Password: "md5" + hex.EncodeToString(outer[:])})
	case *pgproto3.AuthenticationSASL, *pgproto3.AuthenticationSASLContinue, *pgproto3.AuthenticationSASLFinal:
		if c.scram == nil {
			client, _ := scram.SHA256.NewClient(c.user, c.password, "")
			c.scram = &scramClient{mech: mechSCRAM, conv: client.NewConversation()}
		}
		if err := c.scram.Send(msg); err != nil {
			return err
		}
		c.pending = c.scram.pending
	}
	return nil
}

func (c *authConnScript) ReceivePassword(context.Context) ([]byte, error) { return c.pending, nil }

// requestType names the first authentication request the verifier sent.
func (c *authConnScript) requestType() string {
	if len(c.sent) == 0 {
		return "none"
	}
	return fmt.Sprintf("%T", c.sent[0])
}

func hbaVerifier(t *testing.T, text string, users string, opts ...VerifierOption) (*Verifier, *observer.ObservedLogs) {
	t.Helper()
	dir := t.TempDir()
	up := filepath.Join(dir, "userlist.txt")
	if err := os.WriteFile(up, []byte(users), 0o600); err != nil {
		t.Fatal(err)
	}
	u, err := NewUsers(up)
	if err != nil {
		t.Fatal(err)
	}
	hp := filepath.Join(dir, "pg_hba.conf")
	if err := os.WriteFile(hp, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	h, err := NewHBA(hp, HBAOptions{TLS: true, ClientCA: true, UsersFile: true, Logger: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	return NewVerifier("scram-sha-256", u, append([]VerifierOption{WithHBA(h)}, opts...)...), logs
}

// TestVerifierHBAMethods: each line's users get the line's method, the
// password method checks every form of stored secret, an unknown user
// fails like a wrong password, refusals carry Postgres' messages.
func TestVerifierHBAMethods(t *testing.T) {
	users := fmt.Sprintf("%q %q\n%q %q\n%q %q\n", "plain", "pw-plain",
		"hashed", "md5"+md5hexOf("pw-hashed"+"hashed"),
		"scrammed", scramVerifierOf(t, "pw-scrammed"))
	v, _ := hbaVerifier(t, `local all all trust
hostssl all certy 127.0.0.1/32 cert
hostssl all sslpw 127.0.0.1/32 password clientcert=verify-full
hostssl all sslca 127.0.0.1/32 scram-sha-256 clientcert=verify-ca
hostssl all trusty 127.0.0.1/32 trust clientcert=verify-full
host all rejected 127.0.0.1/32 reject
host all md5y 127.0.0.1/32 md5
host all all 127.0.0.1/32 password
`, users)
	ctx := context.Background()
	for _, tc := range []struct {
		name       string
		login      Login
		password   string
		wantReq    string
		wantErr    string // "" = logged in
		wantCode   string // of a *RefusedError
		wantFailed bool   // counts as a failed login (ErrAuthFailed / ErrCertAuthFailed)
	}{
		{name: "trust on the socket", login: local("anyone", "db"), wantReq: "none"},
		{name: "password, plaintext entry", login: tcp("127.0.0.1", "plain", "db"), password: "pw-plain", wantReq: "*pgproto3.AuthenticationCleartextPassword"},
		{name: "password, md5 entry", login: tcp("127.0.0.1", "hashed", "db"), password: "pw-hashed", wantReq: "*pgproto3.AuthenticationCleartextPassword"},
		{name: "password, SCRAM entry", login: tcp("127.0.0.1", "scrammed", "db"), password: "pw-scrammed", wantReq: "*pgproto3.AuthenticationCleartextPassword"},
		{name: "password, wrong", login: tcp("127.0.0.1", "scrammed", "db"), password: "nope", wantReq: "*pgproto3.AuthenticationCleartextPassword",
			wantErr: `password authentication failed for user "scrammed"`, wantFailed: true},
		{name: "password, unknown user", login: tcp("127.0.0.1", "mallory", "db"), password: "nope", wantReq: "*pgproto3.AuthenticationCleartextPassword",
			wantErr: `password authentication failed for user "mallory"`, wantFailed: true},
		{name: "md5 line, unknown user: SCRAM, as Postgres with password_encryption scram-sha-256", login: tcp("127.0.0.1", "md5y", "db"), wantReq: "*pgproto3.AuthenticationSASL",
			wantErr: `password authentication failed for user "md5y"`, wantFailed: true},
		{name: "reject line", login: tcp("127.0.0.1", "rejected", "db"), wantReq: "none",
			wantErr: `pg_hba.conf rejects connection for host "127.0.0.1", user "rejected", database "db", no encryption`, wantCode: "28000"},
		{name: "no line", login: tcp("10.0.0.1", "plain", "db"), wantReq: "none",
			wantErr: `no pg_hba.conf entry for host "10.0.0.1", user "plain", database "db", no encryption`, wantCode: "28000"},
		{name: "no line over TLS", login: Login{Addr: "::1", User: "plain", Database: "db", TLS: tlsState("")}, wantReq: "none",
			wantErr: `no pg_hba.conf entry for host "::1", user "plain", database "db", SSL encryption`, wantCode: "28000"},
		{name: "cert", login: Login{Addr: "127.0.0.1", User: "certy", Database: "db", TLS: tlsState("certy")}, wantReq: "none"},
		{name: "cert without a certificate", login: ssl("127.0.0.1", "certy", "db"), wantReq: "none",
			wantErr: "connection requires a valid client certificate", wantCode: "28000"},
		{name: "cert for another CN", login: Login{Addr: "127.0.0.1", User: "certy", Database: "db", TLS: tlsState("other")}, wantReq: "none",
			wantErr: `certificate authentication failed for user "certy"`, wantFailed: true},
		{name: "clientcert=verify-full: password then CN", login: Login{Addr: "127.0.0.1", User: "sslpw", Database: "db", TLS: tlsState("sslpw")}, password: "x", wantReq: "*pgproto3.AuthenticationCleartextPassword",
			wantErr: `password authentication failed for user "sslpw"`, wantFailed: true}, // sslpw has no entry
		{name: "clientcert=verify-ca: any CN, then SCRAM", login: Login{Addr: "127.0.0.1", User: "sslca", Database: "db", TLS: tlsState("someone")}, wantReq: "*pgproto3.AuthenticationSASL",
			wantErr: `password authentication failed for user "sslca"`, wantFailed: true},
		{name: "clientcert=verify-ca without a certificate", login: ssl("127.0.0.1", "sslca", "db"), wantReq: "none",
			wantErr: "connection requires a valid client certificate", wantCode: "28000"},
		{name: "trust clientcert=verify-full, right CN", login: Login{Addr: "127.0.0.1", User: "trusty", Database: "db", TLS: tlsState("trusty")}, wantReq: "none"},
		{name: "trust clientcert=verify-full, other CN", login: Login{Addr: "127.0.0.1", User: "trusty", Database: "db", TLS: tlsState("x")}, wantReq: "none",
			wantErr: `authentication failed for user "trusty": host rejected`, wantCode: "28000", wantFailed: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &authConnScript{user: tc.login.User, password: tc.password}
			res, err := v.Authenticate(ctx, c, tc.login)
			if got := c.requestType(); got != tc.wantReq {
				t.Fatalf("request: want = %s, got = %s", tc.wantReq, got)
			}
			if tc.wantErr == "" {
				if err != nil || res.User != tc.login.User {
					t.Fatalf("want = logged in as %s, got = %+v, %v", tc.login.User, res, err)
				}
				if !strings.HasPrefix(res.Rule, filepath.Dir(res.Rule)) || !strings.Contains(res.Rule, "pg_hba.conf:") {
					t.Fatalf("want = the rule named, got = %q", res.Rule)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("want = %q, got = %v", tc.wantErr, err)
			}
			var re *RefusedError
			if tc.wantCode != "" && (!errors.As(err, &re) || re.Code != tc.wantCode || re.Message != tc.wantErr) {
				t.Fatalf("want = a refusal %s %q, got = %#v", tc.wantCode, tc.wantErr, err)
			}
			if failed := errors.Is(err, ErrAuthFailed) || errors.Is(err, ErrCertAuthFailed); failed != tc.wantFailed {
				t.Fatalf("counts as a failed login: want = %v, got = %v (%v)", tc.wantFailed, failed, err)
			}
		})
	}
}

// TestVerifierHBAThrottle: failed logins through hba lines are throttled
// as without them (the answers beyond the free failures are delayed, a
// correct password never is); hba refusals are neither throttled nor
// counted.
func TestVerifierHBAThrottle(t *testing.T) {
	clock := newFakeClock()
	th := NewThrottle(ThrottleOptions{FreeFailures: 2, FirstDelay: time.Millisecond, Clock: clock})
	v, _ := hbaVerifier(t, "host all nobody 127.0.0.1/32 reject\nhost all all 127.0.0.1/32 password\n", `"alice" "pw"`+"\n", WithThrottle(th))
	ctx := context.Background()
	login := tcp("127.0.0.1", "alice", "db")
	for i := 0; i < 3; i++ {
		_, err := v.Authenticate(ctx, &authConnScript{user: "alice", password: "wrong"}, login)
		var delayed *DelayedError
		if !errors.Is(err, ErrAuthFailed) || errors.As(err, &delayed) != (i == 2) {
			t.Fatalf("attempt %d: want = failed, delayed only beyond the 2 free failures, got = %v", i, err)
		}
	}
	for i := 0; i < 3; i++ {
		var re *RefusedError
		if _, err := v.Authenticate(ctx, &authConnScript{}, tcp("127.0.0.1", "nobody", "db")); !errors.As(err, &re) || !re.Rules {
			t.Fatalf("reject line: want = the hba refusal, got = %v", err)
		}
	}
	if _, err := v.Authenticate(ctx, &authConnScript{user: "alice", password: "pw"}, login); err != nil {
		t.Fatalf("the right password after failures: want = logged in, got = %v", err)
	}
	if st := th.Stats(); st.Delayed != 1 || st.Entries != 1 {
		t.Fatalf("want = one delayed failure, of the one pair (the refusals not counted), got = %+v", st)
	}
}

// TestHBAReload: a changed file (or included file) is read on use; a
// version that does not parse is refused as a whole, logged with its file
// and line once, and the previous rules stay; Reload reads it at once.
func TestHBAReload(t *testing.T) {
	dir := t.TempDir()
	hp := filepath.Join(dir, "pg_hba.conf")
	inc := filepath.Join(dir, "users.txt")
	write := func(p, s string) {
		t.Helper()
		// A new inode each time, as an editor or the kubelet writes, so
		// the change is seen however coarse the file system's clock.
		tmp := p + ".tmp"
		if err := os.WriteFile(tmp, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, p); err != nil {
			t.Fatal(err)
		}
	}
	write(hp, "local all @users.txt trust\n")
	write(inc, "alice\n")
	core, logs := observer.New(zapcore.DebugLevel)
	h, err := NewHBA(hp, HBAOptions{Logger: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	matches := func(user string) bool { return h.Current().Match(local(user, "db")) != nil }
	if !matches("alice") || matches("bob") {
		t.Fatal("first version: want = alice only")
	}
	write(inc, "bob\n")
	if matches("alice") || !matches("bob") {
		t.Fatal("after the included file changed: want = bob only")
	}
	write(hp, "local all @users.txt trust\nlocal all all frob\n")
	if !matches("bob") {
		t.Fatal("broken version: want = the previous rules kept")
	}
	errs := logs.FilterMessageSnippet("cannot be used").All()
	if len(errs) != 1 || !strings.Contains(fmt.Sprint(errs[0].ContextMap()["error"]), hp+`:2: invalid authentication method "frob"`) {
		t.Fatalf("want = one error naming %s:2, got = %v", hp, errs)
	}
	matches("bob")
	if n := logs.FilterMessageSnippet("cannot be used").Len(); n != 1 {
		t.Fatalf("the same broken version: want = reported once, got = %d", n)
	}
	if err := h.Reload(); err == nil || !strings.Contains(err.Error(), hp+":2:") {
		t.Fatalf("Reload of the broken version: want = an error naming line 2, got = %v", err)
	}
	write(hp, "local all carol trust\n")
	if err := h.Reload(); err != nil {
		t.Fatal(err)
	}
	if !matches("carol") || matches("bob") {
		t.Fatal("after Reload: want = carol only")
	}
}

// scramVerifierOf builds a Postgres-format SCRAM-SHA-256 verifier.
func scramVerifierOf(t *testing.T, password string) string {
	t.Helper()
	client, err := scram.SHA256.NewClient("", password, "")
	if err != nil {
		t.Fatal(err)
	}
	salt := "0123456789abcdef"
	creds := client.GetStoredCredentials(scram.KeyFactors{Salt: salt, Iters: 4096})
	return fmt.Sprintf("SCRAM-SHA-256$4096:%s$%s:%s", base64.StdEncoding.EncodeToString([]byte(salt)),
		base64.StdEncoding.EncodeToString(creds.StoredKey), base64.StdEncoding.EncodeToString(creds.ServerKey))
}

func md5hexOf(s string) string {
	sum := md5.Sum([]byte(s)) //nolint:gosec // Postgres md5
	return hex.EncodeToString(sum[:])
}

// FuzzParseHBA: any bytes parse or fail with an error, never panic or
// hang; a parsed file matches logins without panicking.
func FuzzParseHBA(f *testing.F) {
	f.Add([]byte("local all all trust\nhost all all 127.0.0.1/32 md5\n"), []byte("alice\n"))
	f.Add([]byte("hostssl \"my db\",@inc.txt all ::1/128 cert clientcert=verify-full # c\\\nx\n"), []byte("a,b \"c d\"\n@inc.txt\n"))
	f.Add([]byte("host all all 10.0.0.0 255.0.255.0 password\r\nhostnossl sameuser,replication all all reject\n"), []byte(""))
	f.Fuzz(func(t *testing.T, main, inc []byte) {
		read := memFiles(map[string]string{hbaPath: string(main), "/etc/pggovernor/inc.txt": string(inc)})
		rules, err := ParseHBA(hbaPath, read)
		if err != nil {
			var he *HBAError
			if errors.As(err, &he) && (he.Line < 1 || he.File == "") {
				t.Fatalf("an error without its place: %v", err)
			}
			return
		}
		for _, l := range []Login{local("alice", "all"), tcp("127.0.0.1", "alice", "db"), ssl("::1", "all", "db"), tcp("10.1.2.3", "", "")} {
			if r := rules.Match(l); r != nil && r.Method == "" {
				t.Fatalf("a rule without a method: %+v", r)
			}
		}
		_ = rules.check(HBAOptions{})
	})
}
