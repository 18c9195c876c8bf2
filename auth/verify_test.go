package auth

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"slices"
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

// TestVerifierThrottles: after the free failures from one address, the
// next attempt is refused before any exchange; other addresses log in.
func TestVerifierThrottles(t *testing.T) {
	clock := newFakeClock()
	th := NewThrottle(ThrottleOptions{FreeFailures: 2, FirstDelay: time.Second, Clock: clock})
	v := NewVerifier("scram-sha-256", testUsers(t), WithThrottle(th))
	attempt := func(addr, pw string) (*scramClient, error) {
		cl, _ := scram.SHA256.NewClient("alice", pw, "")
		c := &scramClient{mech: mechSCRAM, conv: cl.NewConversation()}
		_, err := v.Authenticate(context.Background(), c, Login{User: "alice", Addr: addr})
		return c, err
	}
	for i := 0; i < 2; i++ {
		if _, err := attempt("192.0.2.9", "wrong"); !errors.Is(err, ErrAuthFailed) {
			t.Fatalf("failure %d: want = ErrAuthFailed, got = %v", i+1, err)
		}
	}
	c, err := attempt("192.0.2.9", "alice-pw")
	var te *ThrottledError
	if !errors.As(err, &te) || c.sent != 0 {
		t.Fatalf("third attempt: want = refused before any exchange, got = %v after %d messages", err, c.sent)
	}
	if _, err := attempt("192.0.2.10", "alice-pw"); err != nil {
		t.Fatalf("another address: want = logged in, got = %v", err)
	}
	clock.Advance(time.Second)
	if _, err := attempt("192.0.2.9", "alice-pw"); err != nil {
		t.Fatalf("after the wait: want = logged in, got = %v", err)
	}
}
