package tlsconf

import (
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pggovernor/pggovernor/internal/pgtest"
)

func issue(t *testing.T, ca *pgtest.CA, cn string, notAfter time.Time) *pgtest.KeyPair {
	t.Helper()
	kp, err := ca.Issue(pgtest.CertOptions{CommonName: cn, DNSNames: []string{"localhost"}, NotAfter: notAfter})
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

func newCA(t *testing.T) *pgtest.CA {
	t.Helper()
	ca, err := pgtest.NewCA("tlsconf test CA")
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// TestCheckKeyFile: libpq's rule for private key files.
func TestCheckKeyFile(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		mode os.FileMode
		ok   bool
	}{{0o600, true}, {0o400, true}, {0o640, os.Geteuid() != 0}, {0o644, false}, {0o604, false}, {0o660, false}} {
		p := filepath.Join(dir, fmt.Sprintf("key-%04o", c.mode))
		if err := os.WriteFile(p, []byte("key"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, c.mode); err != nil {
			t.Fatal(err)
		}
		err := CheckKeyFile("upstream.ssl.key_file", p)
		if c.ok && err != nil {
			t.Errorf("mode %04o: want = accepted, got = %v", c.mode, err)
		}
		if !c.ok && (err == nil || !strings.Contains(err.Error(), "upstream.ssl.key_file "+p) || !strings.Contains(err.Error(), "chmod 0600")) {
			t.Errorf("mode %04o: want = refused naming the setting and the fix, got = %v", c.mode, err)
		}
	}
	if err := CheckKeyFile("k", dir); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("directory: want = refused, got = %v", err)
	}
}

// TestServerReloadsOnChange: the client-facing certificate is a mounted
// secret swapped the Kubernetes way; the next handshake gets the new one;
// a cert that does not match its key keeps the previous one, logged once.
func TestServerReloadsOnChange(t *testing.T) {
	ca := newCA(t)
	first := issue(t, ca, "first", time.Now().Add(48*time.Hour))
	m, err := pgtest.NewSecretMount(t.TempDir(), map[string][]byte{"tls.crt": first.CertPEM, "tls.key": first.KeyPEM, "ca.crt": ca.CertPEM})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	s, err := NewServer(ServerOptions{Mode: ModeVerifyClient, CertFile: m.Path("tls.crt"), KeyFile: m.Path("tls.key"),
		ClientCAFile: m.Path("ca.crt"), Logger: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	sc := s.Get()
	if sc.Leaf.Subject.CommonName != "first" || sc.TLS.ClientAuth != tls.RequireAndVerifyClientCert || sc.TLS.ClientCAs == nil {
		t.Fatalf("want = first cert, client certs required, got = %s, %v", sc.Leaf.Subject.CommonName, sc.TLS.ClientAuth)
	}
	// allow with a CA verifies a certificate if one is offered.
	allow, err := NewServer(ServerOptions{Mode: ModeAllow, CertFile: m.Path("tls.crt"), KeyFile: m.Path("tls.key"), ClientCAFile: m.Path("ca.crt")})
	if err != nil || allow.Get().TLS.ClientAuth != tls.VerifyClientCertIfGiven || allow.Required() {
		t.Fatalf("allow with a client CA: want = VerifyClientCertIfGiven, plaintext accepted, got = %v", err)
	}
	second := issue(t, ca, "second", time.Now().Add(72*time.Hour))
	if err := m.Update(map[string][]byte{"tls.crt": second.CertPEM, "tls.key": second.KeyPEM, "ca.crt": ca.CertPEM}); err != nil {
		t.Fatal(err)
	}
	if got := s.Get().Leaf.Subject.CommonName; got != "second" {
		t.Fatalf("after the swap: want = second, got = %s", got)
	}
	third := issue(t, ca, "third", time.Time{})
	if err := m.Update(map[string][]byte{"tls.crt": third.CertPEM, "tls.key": second.KeyPEM, "ca.crt": ca.CertPEM}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if got := s.Get().Leaf.Subject.CommonName; got != "second" {
			t.Fatalf("mismatched cert and key: want = second kept, got = %s", got)
		}
	}
	st := s.Stats()
	if st.Reloads != 1 || st.ReloadFailures != 1 || !st.CertNotAfter.Equal(second.Cert.NotAfter) {
		t.Fatalf("stats: want = 1 reload, 1 failure, expiry of second, got = %+v", st)
	}
	if n := logs.FilterMessageSnippet("failed").Len(); n != 1 {
		t.Fatalf("failure log lines: want = 1, got = %d", n)
	}
	// At start, mismatched files are an error naming the settings.
	_, err = NewServer(ServerOptions{Mode: ModeAllow, CertFile: m.Path("tls.crt"), KeyFile: m.Path("tls.key"), ClientCAFile: m.Path("ca.crt")})
	if err == nil || !strings.Contains(err.Error(), "clients.tls.cert_file") {
		t.Fatalf("mismatched files at start: want = an error naming clients.tls.cert_file, got = %v", err)
	}
}

// TestUpstreamApply: the TLS configurations come from pgconn's parse of
// the connection string (its sslmode semantics), with the server name
// override, as clones; they follow the files when these change.
func TestUpstreamApply(t *testing.T) {
	ca := newCA(t)
	first := issue(t, ca, "app", time.Now().Add(48*time.Hour))
	m, err := pgtest.NewSecretMount(t.TempDir(), map[string][]byte{"tls.crt": first.CertPEM, "tls.key": first.KeyPEM, "ca.crt": ca.CertPEM})
	if err != nil {
		t.Fatal(err)
	}
	cs := fmt.Sprintf("host=127.0.0.1 port=5432 user=app sslmode=verify-full sslrootcert=%s sslcert=%s sslkey=%s",
		m.Path("ca.crt"), m.Path("tls.crt"), m.Path("tls.key"))
	u, err := NewUpstream(UpstreamOptions{ConnString: cs, RootCertFile: m.Path("ca.crt"), CertFile: m.Path("tls.crt"),
		KeyFile: m.Path("tls.key"), ServerName: "db.internal"})
	if err != nil {
		t.Fatal(err)
	}
	base, err := pgconn.ParseConfig(cs)
	if err != nil {
		t.Fatal(err)
	}
	cfg := base.Copy()
	if err := u.Apply(cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.TLSConfig.ServerName != "db.internal" || len(cfg.TLSConfig.Certificates) != 1 || cfg.TLSConfig.InsecureSkipVerify {
		t.Fatalf("verify-full: want = ServerName db.internal, a client certificate, verification on, got = %q, %d, skip %v",
			cfg.TLSConfig.ServerName, len(cfg.TLSConfig.Certificates), cfg.TLSConfig.InsecureSkipVerify)
	}
	cfg.TLSConfig.ServerName = "changed"
	cfg2 := base.Copy()
	if err := u.Apply(cfg2); err != nil || cfg2.TLSConfig.ServerName != "db.internal" {
		t.Fatalf("Apply must hand out clones: want = db.internal, got = %q (%v)", cfg2.TLSConfig.ServerName, err)
	}
	if got := u.Stats().ClientCertNotAfter; !got.Equal(first.Cert.NotAfter) {
		t.Fatalf("client cert expiry: want = %s, got = %s", first.Cert.NotAfter, got)
	}
	second := issue(t, ca, "app", time.Now().Add(96*time.Hour))
	if err := m.Update(map[string][]byte{"tls.crt": second.CertPEM, "tls.key": second.KeyPEM, "ca.crt": ca.CertPEM}); err != nil {
		t.Fatal(err)
	}
	cfg3 := base.Copy()
	if err := u.Apply(cfg3); err != nil {
		t.Fatal(err)
	}
	leaf := cfg3.TLSConfig.Certificates[0].Leaf
	if leaf == nil || leaf.SerialNumber.Cmp(second.Cert.SerialNumber) != 0 {
		t.Fatal("after rotation: want = the new client certificate, got = the old one")
	}
	if st := u.Stats(); st.Reloads != 1 || !st.ClientCertNotAfter.Equal(second.Cert.NotAfter) {
		t.Fatalf("stats after rotation: want = 1 reload and the new expiry, got = %+v", st)
	}

	// prefer: a TLS attempt, then a plaintext fallback, kept in order.
	preferCS := "host=127.0.0.1 port=5432 user=app sslmode=prefer"
	up, err := NewUpstream(UpstreamOptions{ConnString: preferCS})
	if err != nil {
		t.Fatal(err)
	}
	pb, _ := pgconn.ParseConfig(preferCS)
	if err := up.Apply(pb); err != nil || pb.TLSConfig == nil || len(pb.Fallbacks) != 1 || pb.Fallbacks[0].TLSConfig != nil {
		t.Fatalf("prefer: want = TLS then plaintext, got = %v, %v", pb.TLSConfig, err)
	}

	// A key readable by others is refused, naming the setting.
	if err := os.Chmod(filepath.Join(m.Dir, "..data", "tls.key"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = NewUpstream(UpstreamOptions{ConnString: cs, CertFile: m.Path("tls.crt"), KeyFile: m.Path("tls.key")})
	if err == nil || !strings.Contains(err.Error(), "upstream.ssl.key_file") {
		t.Fatalf("key mode 0644: want = refused naming upstream.ssl.key_file, got = %v", err)
	}
}

func TestSecondsUntilExpiry(t *testing.T) {
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		notAfter time.Time
		want     float64
	}{{now.Add(90 * time.Second), 90}, {now.Add(-time.Second), -1}, {time.Time{}, 0}} {
		if got := SecondsUntilExpiry(c.notAfter, now); got != c.want {
			t.Errorf("SecondsUntilExpiry(%s): want = %v, got = %v", c.notAfter, c.want, got)
		}
	}
}
