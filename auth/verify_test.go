package auth

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/xdg-go/scram"

	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// scramClient plays a SCRAM client against the verifier, message by
// message, with xdg-go/scram's client.
type scramClient struct {
	mech     string
	conv     *scram.ClientConversation
	offered  []string
	pending  []byte
	sent     int  // messages the verifier sent
	verified bool // the server's final message verified
}

func (c *scramClient) Send(msg pgproto3.BackendMessage) error {
	c.sent++
	body := func(m pgproto3.FrontendMessage) []byte {
		b, _ := m.Encode(nil)
		return b[5:]
	}
	switch m := msg.(type) {
	case *pgproto3.AuthenticationSASL:
		c.offered = m.AuthMechanisms
		first, err := c.conv.Step("")
		if err != nil {
			return err
		}
		c.pending = body(&pgproto3.SASLInitialResponse{AuthMechanism: c.mech, Data: []byte(first)})
	case *pgproto3.AuthenticationSASLContinue:
		final, err := c.conv.Step(string(m.Data))
		if err != nil {
			return err
		}
		c.pending = body(&pgproto3.SASLResponse{Data: []byte(final)})
	case *pgproto3.AuthenticationSASLFinal:
		_, err := c.conv.Step(string(m.Data))
		c.verified = err == nil
	}
	return nil
}

func (c *scramClient) ReceivePassword(context.Context) ([]byte, error) { return c.pending, nil }

func endpointBinding(t *testing.T, cert *x509.Certificate) scram.ChannelBinding {
	t.Helper()
	cb, err := scram.NewTLSServerEndpointBinding(&tls.ConnectionState{PeerCertificates: []*x509.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	return cb
}

func testUsers(t *testing.T) *Users {
	t.Helper()
	p := filepath.Join(t.TempDir(), "userlist.txt")
	if err := os.WriteFile(p, []byte(`"alice" "alice-pw"`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	u, err := NewUsers(p)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// TestSCRAMChannelBinding: over TLS the verifier offers SCRAM-SHA-256-PLUS
// first and binds it to the certificate it presented (tls-server-end-point),
// as Postgres does; in plaintext it offers SCRAM-SHA-256 only.
func TestSCRAMChannelBinding(t *testing.T) {
	ca, err := pgtest.NewCA("test CA")
	if err != nil {
		t.Fatal(err)
	}
	ours, err := ca.Issue(pgtest.CertOptions{CommonName: "pggovernor", DNSNames: []string{"localhost"}})
	if err != nil {
		t.Fatal(err)
	}
	mitm, err := ca.Issue(pgtest.CertOptions{CommonName: "someone else"})
	if err != nil {
		t.Fatal(err)
	}
	v := NewVerifier("scram-sha-256", testUsers(t))
	overTLS := Login{User: "alice", Addr: "192.0.2.1", TLS: &tls.ConnectionState{}, ServerCert: ours.Cert}
	plaintext := Login{User: "alice", Addr: "192.0.2.1"}
	newConv := func(user, pw, mode string, cert *x509.Certificate) *scram.ClientConversation {
		cl, err := scram.SHA256.NewClient(user, pw, "")
		if err != nil {
			t.Fatal(err)
		}
		switch mode {
		case "plus":
			return cl.NewConversationWithChannelBinding(endpointBinding(t, cert))
		case "advertise":
			return cl.NewConversationAdvertisingChannelBinding()
		}
		return cl.NewConversation()
	}
	for _, c := range []struct {
		name        string
		login       Login
		mech, mode  string
		user, pw    string
		cert        *x509.Certificate
		wantOffered []string
		wantErr     string // "", "auth", "protocol"
	}{
		{"PLUS bound to our certificate", overTLS, mechSCRAMPlus, "plus", "alice", "alice-pw", ours.Cert, []string{mechSCRAMPlus, mechSCRAM}, ""},
		{"PLUS bound to another certificate (a man in the middle)", overTLS, mechSCRAMPlus, "plus", "alice", "alice-pw", mitm.Cert, []string{mechSCRAMPlus, mechSCRAM}, "auth"},
		{"PLUS with a wrong password", overTLS, mechSCRAMPlus, "plus", "alice", "wrong", ours.Cert, []string{mechSCRAMPlus, mechSCRAM}, "auth"},
		{"PLUS for an unknown user", overTLS, mechSCRAMPlus, "plus", "mallory", "x", ours.Cert, []string{mechSCRAMPlus, mechSCRAM}, "auth"},
		{"plain SCRAM over TLS", overTLS, mechSCRAM, "none", "alice", "alice-pw", nil, []string{mechSCRAMPlus, mechSCRAM}, ""},
		{"client thinks the server cannot bind (downgrade)", overTLS, mechSCRAM, "advertise", "alice", "alice-pw", nil, []string{mechSCRAMPlus, mechSCRAM}, "protocol"},
		{"PLUS name without binding data", overTLS, mechSCRAMPlus, "none", "alice", "alice-pw", nil, []string{mechSCRAMPlus, mechSCRAM}, "protocol"},
		{"plaintext offers no PLUS", plaintext, mechSCRAM, "none", "alice", "alice-pw", nil, []string{mechSCRAM}, ""},
		{"plaintext client selecting PLUS", plaintext, mechSCRAMPlus, "plus", "alice", "alice-pw", ours.Cert, []string{mechSCRAM}, "protocol"},
	} {
		t.Run(c.name, func(t *testing.T) {
			cl := &scramClient{mech: c.mech, conv: newConv(c.user, c.pw, c.mode, c.cert)}
			login := c.login
			login.User = c.user
			res, err := v.Authenticate(context.Background(), cl, login)
			if !slices.Equal(cl.offered, c.wantOffered) {
				t.Fatalf("mechanisms: want = %v, got = %v", c.wantOffered, cl.offered)
			}
			var pe *ProtocolError
			switch c.wantErr {
			case "":
				if err != nil || !cl.verified {
					t.Fatalf("want = logged in, server verified, got = %v (verified %v)", err, cl.verified)
				}
				if res.ChannelBinding != (c.mode == "plus") {
					t.Fatalf("channel binding: want = %v, got = %v", c.mode == "plus", res.ChannelBinding)
				}
			case "auth":
				if !errors.Is(err, ErrAuthFailed) {
					t.Fatalf("want = ErrAuthFailed, got = %v", err)
				}
			case "protocol":
				if !errors.As(err, &pe) {
					t.Fatalf("want = a protocol error, got = %v", err)
				}
			}
		})
	}
}

// TestCertMethod: Postgres' cert method: a verified client certificate
// whose CN is the user name.
func TestCertMethod(t *testing.T) {
	ca, err := pgtest.NewCA("client CA")
	if err != nil {
		t.Fatal(err)
	}
	kp, err := ca.Issue(pgtest.CertOptions{CommonName: "alice"})
	if err != nil {
		t.Fatal(err)
	}
	verified := &tls.ConnectionState{PeerCertificates: []*x509.Certificate{kp.Cert}, VerifiedChains: [][]*x509.Certificate{{kp.Cert, ca.Cert}}}
	unverified := &tls.ConnectionState{PeerCertificates: []*x509.Certificate{kp.Cert}}
	v := NewVerifier("cert", testUsers(t))
	for _, c := range []struct {
		name  string
		login Login
		ok    bool
	}{
		{"CN is the user", Login{User: "alice", TLS: verified}, true},
		{"CN is another user", Login{User: "bob", TLS: verified}, false},
		{"certificate not verified", Login{User: "alice", TLS: unverified}, false},
		{"no TLS", Login{User: "alice"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			res, err := v.Authenticate(context.Background(), nil, c.login)
			if c.ok && (err != nil || res.User != "alice" || res.Secret == nil) {
				t.Fatalf("want = logged in as alice with her users-file entry, got = %+v, %v", res, err)
			}
			if !c.ok && !errors.Is(err, ErrCertAuthFailed) {
				t.Fatalf("want = ErrCertAuthFailed, got = %v", err)
			}
		})
	}
}

// TestVerifierThrottles: after the free failures of one user from one
// address, the answers to its further failures are delayed; its correct
// password is never delayed, and logs in; another user at the same address
// (unknown or not) is not affected.
func TestVerifierThrottles(t *testing.T) {
	clock := newFakeClock()
	th := NewThrottle(ThrottleOptions{FreeFailures: 2, FirstDelay: time.Millisecond, Clock: clock})
	v := NewVerifier("scram-sha-256", testUsers(t), WithThrottle(th))
	attempt := func(addr, user, pw string) error {
		cl, _ := scram.SHA256.NewClient(user, pw, "")
		c := &scramClient{mech: mechSCRAM, conv: cl.NewConversation()}
		_, err := v.Authenticate(context.Background(), c, Login{User: user, Addr: addr})
		return err
	}
	for i := 0; i < 3; i++ {
		err := attempt("192.0.2.9", "alice", "wrong")
		var de *DelayedError
		if !errors.Is(err, ErrAuthFailed) || errors.As(err, &de) != (i == 2) {
			t.Fatalf("failure %d: want = ErrAuthFailed, delayed only beyond the free failures, got = %v", i+1, err)
		}
	}
	if err := attempt("192.0.2.9", "alice", "alice-pw"); err != nil {
		t.Fatalf("the right password: want = logged in, got = %v", err)
	}
	if st := th.Stats(); st.Delayed != 1 {
		t.Fatalf("delayed answers: want = 1 (the failure, not the success), got = %+v", st)
	}
	for i := 0; i < 2; i++ {
		var de *DelayedError
		if err := attempt("192.0.2.9", "mallory", "x"); !errors.Is(err, ErrAuthFailed) || errors.As(err, &de) {
			t.Fatalf("an unknown user at the same address: want = its own free failures, got = %v", err)
		}
	}
}

// TestMD5MethodExchange: with the md5 method, the exchange is chosen as
// Postgres chooses it (CheckPWChallengeAuth): md5 for an md5 entry, SCRAM
// for a SCRAM entry, and for an unknown user what password_encryption
// says, as for a plaintext entry; each logs in with its password (and
// fails with another) whatever the exchange.
func TestMD5MethodExchange(t *testing.T) {
	users := fmt.Sprintf("%q %q\n%q %q\n%q %q\n", "plain", "pw-plain", "hashed", "md5"+md5hexOf("pw-hashed"+"hashed"),
		"scrammed", scramVerifierOf(t, "pw-scrammed"))
	p := filepath.Join(t.TempDir(), "userlist.txt")
	if err := os.WriteFile(p, []byte(users), 0o600); err != nil {
		t.Fatal(err)
	}
	u, err := NewUsers(p)
	if err != nil {
		t.Fatal(err)
	}
	const sasl, md5req = "*pgproto3.AuthenticationSASL", "*pgproto3.AuthenticationMD5Password"
	for _, c := range []struct {
		encryption, user, password, want string
	}{
		{PasswordEncryptionSCRAM, "hashed", "pw-hashed", md5req},
		{PasswordEncryptionSCRAM, "scrammed", "pw-scrammed", sasl},
		{PasswordEncryptionSCRAM, "plain", "pw-plain", sasl},
		{PasswordEncryptionSCRAM, "nobody", "", sasl},
		{PasswordEncryptionMD5, "hashed", "pw-hashed", md5req},
		{PasswordEncryptionMD5, "scrammed", "pw-scrammed", sasl},
		{PasswordEncryptionMD5, "plain", "pw-plain", md5req},
		{PasswordEncryptionMD5, "nobody", "", md5req},
	} {
		t.Run(c.encryption+"/"+c.user, func(t *testing.T) {
			v := NewVerifier("md5", u, WithPasswordEncryption(c.encryption))
			for _, pw := range []string{c.password, "wrong"} {
				conn := &authConnScript{user: c.user, password: pw}
				_, err := v.Authenticate(context.Background(), conn, Login{User: c.user, Addr: "192.0.2.1"})
				if got := conn.requestType(); got != c.want {
					t.Fatalf("request: want = %s, got = %s", c.want, got)
				}
				if ok := err == nil; ok != (pw == c.password && c.user != "nobody") {
					t.Fatalf("password %q: logged in = %v, err = %v", pw, ok, err)
				}
			}
		})
	}
}

// TestCheckSecretMode: a secret file readable by every user is reported,
// one readable by its group too unless root owns it.
func TestCheckSecretMode(t *testing.T) {
	p := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	root := os.Geteuid() == 0 // then the file is root's: 0640 is accepted
	for _, c := range []struct {
		mode os.FileMode
		want string
	}{
		{0o600, ""},
		{0o400, ""},
		{0o644, "readable by every user (mode 0644)"},
		{0o604, "readable by every user"},
		{0o640, map[bool]string{false: "readable by its group (mode 0640)", true: ""}[root]},
	} {
		if err := os.Chmod(p, c.mode); err != nil {
			t.Fatal(err)
		}
		err := CheckSecretMode("clients.users_file", p)
		if (c.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.want)) ||
			(err != nil && !strings.Contains(err.Error(), "clients.users_file "+p)) {
			t.Fatalf("mode %04o: want = %q, got = %v", c.mode, c.want, err)
		}
	}
	if err := CheckSecretMode("clients.users_file", p+".missing"); err != nil {
		t.Fatalf("a missing file: want = nothing to report here, got = %v", err)
	}
}
