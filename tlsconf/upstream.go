package tlsconf

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/internal/filestamp"
)

// UpstreamOptions configure TLS to the upstream server.
type UpstreamOptions struct {
	// ConnString is the upstream libpq URL or DSN with the TLS settings
	// applied (sslmode, sslrootcert, sslcert, sslkey). pgconn parses it as
	// libpq would: the sslmode semantics are pgconn's.
	ConnString string
	// RootCertFile, CertFile and KeyFile are the files ConnString (or
	// PGSSLROOTCERT, PGSSLCERT, PGSSLKEY) names, "" for none. They are
	// watched for changes, and KeyFile's permissions are checked.
	RootCertFile, CertFile, KeyFile string
	// ServerName, when set, replaces the host as the name checked against
	// the server's certificate in verify-full mode and sent as SNI.
	ServerName string
	// Logger receives reload messages.
	Logger *zap.Logger
}

// FileSetting names the setting of the file an error could not read (an
// *fs.PathError for RootCertFile, CertFile or KeyFile), "" for another
// error.
func (o UpstreamOptions) FileSetting(err error) string {
	var pe *fs.PathError
	if !errors.As(err, &pe) {
		return ""
	}
	switch pe.Path {
	case o.RootCertFile:
		return "upstream.ssl.root_cert_file (sslrootcert)"
	case o.CertFile:
		return "upstream.ssl.cert_file (sslcert)"
	case o.KeyFile:
		return "upstream.ssl.key_file (sslkey)"
	}
	return ""
}

// Upstream builds the TLS configurations of upstream connections and
// rebuilds them when a certificate or key file changes. Its methods are
// safe for concurrent use.
type Upstream struct {
	opts     UpstreamOptions
	r        *filestamp.Reloader[*upstreamTLS]
	reloads  atomic.Uint64
	failures atomic.Uint64
}

// upstreamTLS is one build: the TLS configuration of each connection
// attempt pgconn makes, in its order (the primary, then each fallback; nil
// for a plaintext attempt), and the client certificate.
type upstreamTLS struct {
	configs []*tls.Config
	leaf    *x509.Certificate
}

// NewUpstream checks and loads the files once; an error names the setting
// to change.
func NewUpstream(o UpstreamOptions) (*Upstream, error) {
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	u := &Upstream{opts: o}
	root := o.RootCertFile
	if root == "system" { // libpq's keyword for the system's CAs, not a file
		root = ""
	}
	r, err := filestamp.NewReloader(u.load, root, o.CertFile, o.KeyFile)
	if err != nil {
		return nil, err
	}
	u.r = r
	return u, nil
}

func (u *Upstream) load() (*upstreamTLS, error) {
	o := u.opts
	if o.KeyFile != "" {
		if err := CheckKeyFile("upstream.ssl.key_file", o.KeyFile); err != nil {
			return nil, err
		}
	}
	cfg, err := pgconn.ParseConfig(o.ConnString)
	if err != nil {
		// The connection string may hold a password: report only the
		// cause, which for TLS names the file.
		var pe *pgconn.ParseConfigError
		if errors.As(err, &pe) && pe.Unwrap() != nil {
			err = pe.Unwrap()
		}
		if key := o.FileSetting(err); key != "" {
			return nil, fmt.Errorf("%s: %w", key, err)
		}
		return nil, fmt.Errorf("upstream TLS settings (upstream.ssl.*): %w", err)
	}
	out := &upstreamTLS{configs: []*tls.Config{cfg.TLSConfig}}
	for _, fb := range cfg.Fallbacks {
		out.configs = append(out.configs, fb.TLSConfig)
	}
	for _, tc := range out.configs {
		if tc == nil {
			continue
		}
		if o.ServerName != "" {
			tc.ServerName = o.ServerName
		}
		if out.leaf == nil && len(tc.Certificates) > 0 {
			c := tc.Certificates[0]
			out.leaf = c.Leaf
			if out.leaf == nil {
				if out.leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
					return nil, fmt.Errorf("upstream.ssl.cert_file %s: %w", o.CertFile, err)
				}
			}
		}
	}
	return out, nil
}

// current returns the build in force, rebuilt first when a file changed.
func (u *Upstream) current() *upstreamTLS {
	cur, reloaded, err := u.r.Get()
	switch {
	case err != nil:
		u.failures.Add(1)
		u.opts.Logger.Error("reloading the upstream TLS files (upstream.ssl.*) failed; new server connections keep the previous certificates", zap.Error(err))
	case reloaded:
		u.reloads.Add(1)
		fields := []zap.Field{zap.String("cert_file", u.opts.CertFile), zap.String("root_cert_file", u.opts.RootCertFile)}
		if cur.leaf != nil {
			fields = append(fields, zap.Time("client_cert_not_after", cur.leaf.NotAfter))
		}
		u.opts.Logger.Info("upstream TLS files changed: certificates reloaded for new server connections", fields...)
	}
	return cur
}

// Apply gives cfg, a copy of the configuration parsed from ConnString, the
// current TLS configurations: clones, so that cfg may be changed freely.
// It is meant for pool.UpstreamConnector.Prepare and pgxpool's
// BeforeConnect, called for every new server connection.
func (u *Upstream) Apply(cfg *pgconn.Config) error {
	cur := u.current()
	if len(cur.configs) != 1+len(cfg.Fallbacks) {
		return fmt.Errorf("upstream TLS: %d connection attempts configured, %d expected", 1+len(cfg.Fallbacks), len(cur.configs))
	}
	set := func(dst **tls.Config, src *tls.Config) error {
		if (*dst == nil) != (src == nil) {
			return errors.New("upstream TLS: a plaintext attempt would get TLS or the reverse")
		}
		if src != nil {
			*dst = src.Clone()
		}
		return nil
	}
	if err := set(&cfg.TLSConfig, cur.configs[0]); err != nil {
		return err
	}
	for i, fb := range cfg.Fallbacks {
		if err := set(&fb.TLSConfig, cur.configs[i+1]); err != nil {
			return err
		}
	}
	return nil
}

// UpstreamStats are the upstream TLS numbers kept for metrics.
type UpstreamStats struct {
	// ClientCertNotAfter is the end of validity of the client certificate
	// new server connections present; zero without one.
	ClientCertNotAfter time.Time
	// Reloads counts rebuilds after a file changed; ReloadFailures counts
	// rebuilds that failed (the previous configuration stayed).
	Reloads, ReloadFailures uint64
}

// Stats returns the numbers, after checking the files.
func (u *Upstream) Stats() UpstreamStats {
	cur := u.current()
	s := UpstreamStats{Reloads: u.reloads.Load(), ReloadFailures: u.failures.Load()}
	if cur.leaf != nil {
		s.ClientCertNotAfter = cur.leaf.NotAfter
	}
	return s
}

// SecondsUntilExpiry is the time left before notAfter, in seconds, as the
// metrics export it; negative once expired, 0 for the zero time.
func SecondsUntilExpiry(notAfter, now time.Time) float64 {
	if notAfter.IsZero() {
		return 0
	}
	return notAfter.Sub(now).Seconds()
}
