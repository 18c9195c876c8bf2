package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/auth"
	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/pool"
)

// upstream is the parsed upstream: where, as whom, with which password.
type upstream struct {
	connString string
	base       *pgconn.Config
	// sidecarUser is the one upstream user (sidecar model), "" for the
	// multi-role model.
	sidecarUser string
	password    pool.PasswordFunc
	// passwordFile is set when the password comes from a file.
	passwordFile *auth.PasswordFile
}

// connStringWithSSL returns the upstream URL or DSN with upstream.ssl.*
// applied on top, so pgconn implements libpq's sslmode semantics.
func connStringWithSSL(c *config.Config) string {
	s := c.Upstream.URL
	set := map[string]string{}
	if c.Upstream.SSL.Mode != "" {
		set["sslmode"] = c.Upstream.SSL.Mode
	}
	if c.Upstream.SSL.RootCertFile != "" {
		set["sslrootcert"] = c.Upstream.SSL.RootCertFile
	}
	if c.Upstream.SSL.CertFile != "" {
		set["sslcert"] = c.Upstream.SSL.CertFile
	}
	if c.Upstream.SSL.KeyFile != "" {
		set["sslkey"] = c.Upstream.SSL.KeyFile
	}
	if len(set) == 0 {
		return s
	}
	if strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://") {
		u, err := url.Parse(s)
		if err != nil {
			return s
		}
		q := u.Query()
		for k, v := range set {
			q.Set(k, v)
		}
		u.RawQuery = q.Encode()
		return u.String()
	}
	for k, v := range set {
		s += " " + k + "='" + strings.ReplaceAll(strings.ReplaceAll(v, `\`, `\\`), `'`, `\'`) + "'"
	}
	return strings.TrimSpace(s)
}

// newUpstream parses the upstream configuration. In the sidecar model the
// password comes from upstream.password_file, upstream.password, the URL
// or PGPASSWORD; in the multi-role model from the users file.
func newUpstream(c *config.Config, users *auth.Users, logger *zap.Logger) (*upstream, error) {
	cs := connStringWithSSL(c)
	base, err := pgconn.ParseConfig(cs)
	if err != nil {
		return nil, fmt.Errorf("key upstream.url: %s", redactParseError(err, c.Upstream.URL))
	}
	if name := c.Upstream.SSL.ServerName; name != "" {
		if base.TLSConfig != nil {
			base.TLSConfig.ServerName = name
		}
		for _, fb := range base.Fallbacks {
			if fb.TLSConfig != nil {
				fb.TLSConfig.ServerName = name
			}
		}
	}
	u := &upstream{connString: cs, base: base}
	if c.UpstreamHasUser() {
		u.sidecarUser = base.User
	}
	switch {
	case u.sidecarUser == "":
		u.password = func(_ context.Context, r pool.Route) (string, error) {
			if s, ok := users.Current().Lookup(r.User); ok && s.Plain != "" {
				return s.Plain, nil
			}
			return "", nil // the server may not need one; if it does, its error says so
		}
	case c.Upstream.PasswordFile != "":
		pf, err := auth.NewPasswordFile(c.Upstream.PasswordFile, logger)
		if err != nil {
			return nil, err
		}
		u.passwordFile = pf
		u.password = func(ctx context.Context, _ pool.Route) (string, error) { return pf.Password(ctx) }
	case c.Upstream.Password != "":
		pw := auth.StaticPassword(c.Upstream.Password)
		u.password = func(ctx context.Context, _ pool.Route) (string, error) { return pw.Password(ctx) }
	}
	return u, nil
}

// redactParseError describes a parse failure without the password.
func redactParseError(err error, raw string) string {
	msg := err.Error()
	var pe *pgconn.ParseConfigError
	if errors.As(err, &pe) {
		msg = "cannot parse " + config.RedactURL(raw)
		if pe.Unwrap() != nil {
			msg += ": " + pe.Unwrap().Error()
		}
	}
	return msg
}
