package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/auth"
	"github.com/pggovernor/pggovernor/config"
	"github.com/pggovernor/pggovernor/pool"
	"github.com/pggovernor/pggovernor/tlsconf"
)

// upstream is the parsed upstream: where, as whom, with which password,
// over which TLS.
type upstream struct {
	connString string
	base       *pgconn.Config
	// sidecarUser is the one upstream user (sidecar model), "" for the
	// multi-role model.
	sidecarUser string
	password    pool.PasswordFunc
	// passwordFile is set when the password comes from a file.
	passwordFile *auth.PasswordFile
	// tls gives each new connection the current TLS configuration,
	// rebuilt when a certificate or key file changes.
	tls *tlsconf.Upstream
	// iam mints RDS IAM tokens (upstream.connector awsiamrds), else nil.
	iam *auth.IAMTokenSource
	// awsRegion and awsCreds are what iam signs with.
	awsRegion string
	awsCreds  aws.CredentialsProvider
	// target is the URL's target_session_attrs (PGTARGETSESSIONATTRS):
	// which servers connections may use, for their whole life.
	target pool.Target
	// loadBalance is the URL's load_balance_hosts=random
	// (PGLOADBALANCEHOSTS), which pggovernor implements (pgconn does not).
	loadBalance bool
}

// upstreamHosts parses what libpq's multi-host connection strings add:
// target_session_attrs (pgconn checks it when connecting; the pool goes on
// checking it) and load_balance_hosts, which pgconn does not know and would
// send to the server as a run-time parameter, so it is taken out of base.
func upstreamHosts(cs string, base *pgconn.Config) (pool.Target, bool, error) {
	tsa := config.URLParam(cs, "target_session_attrs")
	if tsa == "" {
		tsa = os.Getenv("PGTARGETSESSIONATTRS")
	}
	target, err := pool.ParseTarget(tsa)
	if err != nil {
		return "", false, fmt.Errorf("key upstream.url: %w", err)
	}
	lb, ok := base.RuntimeParams["load_balance_hosts"]
	delete(base.RuntimeParams, "load_balance_hosts")
	if !ok {
		lb = os.Getenv("PGLOADBALANCEHOSTS")
	}
	switch lb {
	case "", "disable":
		return target, false, nil
	case "random":
		return target, true, nil
	}
	return "", false, fmt.Errorf("key upstream.url: unknown load_balance_hosts value %q: use disable or random", lb)
}

// controlIdentity is the role the control connection logs in as and its
// password: budget.cluster.control_user in cluster mode, with
// budget.cluster.control_password_file or, with upstream.connector
// awsiamrds, an RDS IAM token of its own; else the upstream user's.
type controlIdentity struct {
	user     string
	password pool.PasswordFunc // nil: none
	// own is true when it is budget.cluster.control_user.
	own bool
}

// newControlIdentity resolves the control connection's role.
func newControlIdentity(c *config.Config, up *upstream, logger *zap.Logger, deps startDeps) (*controlIdentity, error) {
	cl := c.Budget.Cluster
	if !cl.Enabled || cl.ControlUser == "" {
		return &controlIdentity{user: up.base.User, password: up.password}, nil
	}
	id := &controlIdentity{user: cl.ControlUser, own: true}
	switch {
	case cl.ControlPasswordFile != "":
		pf, err := auth.NewSecretFile(auth.SecretFileNames{Key: "budget.cluster.control_password_file", Noun: "control password file",
			Use: "the next control connection uses the new password", Keep: "the next control connection uses the last password read"},
			cl.ControlPasswordFile, logger)
		if err != nil {
			return nil, err
		}
		id.password = func(ctx context.Context, _ pool.Route) (string, error) { return pf.Password(ctx) }
	case up.iam != nil:
		src := auth.NewIAMTokenSource(auth.IAMOptions{
			Endpoint:    net.JoinHostPort(up.base.Host, strconv.Itoa(int(up.base.Port))),
			Region:      up.awsRegion,
			User:        cl.ControlUser,
			Credentials: up.awsCreds,
			Clock:       deps.clock,
			Logger:      logger.Named("iam-control"),
		})
		id.password = func(ctx context.Context, _ pool.Route) (string, error) { return src.Password(ctx) }
	}
	return id, nil
}

// prepare is pool.UpstreamConnector.Prepare: the current TLS files.
func (u *upstream) prepare(_ context.Context, cfg *pgconn.Config) error { return u.tls.Apply(cfg) }

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
// or PGPASSWORD, or is an RDS IAM token; in the multi-role model from the
// users file.
func newUpstream(ctx context.Context, c *config.Config, users *auth.Users, logger *zap.Logger, deps startDeps) (*upstream, error) {
	cs := connStringWithSSL(c)
	topts := tlsconf.UpstreamOptions{ConnString: cs, ServerName: c.Upstream.SSL.ServerName, Logger: logger.Named("tls")}
	if c.EffectiveSSLMode() != "disable" {
		topts.RootCertFile, topts.CertFile, topts.KeyFile = upstreamTLSFiles(cs)
		if topts.KeyFile != "" { // before pgconn reads it
			if err := tlsconf.CheckKeyFile("upstream.ssl.key_file", topts.KeyFile); err != nil {
				return nil, err
			}
		}
	}
	base, err := pgconn.ParseConfig(cs)
	if err != nil {
		if strings.Contains(err.Error(), "configure TLS") {
			if key := topts.FileSetting(err); key != "" {
				return nil, fmt.Errorf("key %s: %w", key, errors.Unwrap(err))
			}
			return nil, fmt.Errorf("keys upstream.ssl.* (or the URL's sslrootcert, sslcert, sslkey): %w", errors.Unwrap(err))
		}
		return nil, fmt.Errorf("key upstream.url: %s", redactParseError(err, c.Upstream.URL))
	}
	if deps.lookup != nil {
		base.LookupFunc = deps.lookup
	}
	target, lb, err := upstreamHosts(cs, base)
	if err != nil {
		return nil, err
	}
	if c.Budget.Cluster.Enabled && (target == pool.TargetReadOnly || target == pool.TargetStandby || target == pool.TargetPreferStandby) {
		return nil, fmt.Errorf("key upstream.url: target_session_attrs=%s with budget.cluster.enabled: the cluster's leases are written on the server, which a read-only server or a standby refuses; use read-write or primary", target)
	}
	if err := checkUpstreamNotSelf(ctx, c, base); err != nil {
		return nil, err
	}
	u := &upstream{connString: cs, base: base, target: target, loadBalance: lb}
	if u.tls, err = tlsconf.NewUpstream(topts); err != nil {
		return nil, err
	}
	if err := u.tls.Apply(base); err != nil {
		return nil, err
	}
	if c.UpstreamHasUser() {
		u.sidecarUser = base.User
	}
	switch {
	case c.Upstream.Connector == config.ConnectorAWSIAMRDS:
		for _, fb := range base.Fallbacks {
			if fb.Host != base.Host || fb.Port != base.Port {
				return nil, errors.New("key upstream.url: upstream.connector awsiamrds signs its token for one host; name only one host in the URL")
			}
		}
		if c.Upstream.Password != "" || c.Upstream.PasswordFile != "" {
			logger.Warn("upstream.connector is awsiamrds: upstream.password and upstream.password_file are not used")
		}
		region, creds, err := loadAWS(ctx, c, deps)
		if err != nil {
			return nil, err
		}
		u.awsRegion, u.awsCreds = region, creds
		u.iam = auth.NewIAMTokenSource(auth.IAMOptions{
			Endpoint:    net.JoinHostPort(base.Host, strconv.Itoa(int(base.Port))),
			Region:      region,
			User:        base.User,
			Credentials: creds,
			Clock:       deps.clock,
			Logger:      logger.Named("iam"),
		})
		u.password = func(ctx context.Context, _ pool.Route) (string, error) { return u.iam.Password(ctx) }
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

// upstreamTLSFiles returns the certificate files pgconn reads for cs: its
// sslrootcert, sslcert and sslkey, or PGSSLROOTCERT, PGSSLCERT and
// PGSSLKEY, as libpq.
func upstreamTLSFiles(cs string) (root, cert, key string) {
	get := func(param, env string) string {
		if v := config.URLParam(cs, param); v != "" {
			return v
		}
		return os.Getenv(env)
	}
	return get("sslrootcert", "PGSSLROOTCERT"), get("sslcert", "PGSSLCERT"), get("sslkey", "PGSSLKEY")
}

// loadAWS resolves the region and the credentials with aws-sdk-go-v2's
// default chain (environment, shared config and credentials files, EKS
// web identity, ECS and EC2 roles). Credentials are fetched only when a
// token is minted; the region is needed now.
func loadAWS(ctx context.Context, c *config.Config, deps startDeps) (string, aws.CredentialsProvider, error) {
	var opts []func(*awsconfig.LoadOptions) error
	if c.Upstream.AWSRegion != "" {
		opts = append(opts, awsconfig.WithRegion(c.Upstream.AWSRegion))
	}
	acfg, err := awsconfig.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return "", nil, fmt.Errorf("key upstream.connector: awsiamrds: loading the AWS configuration (AWS_* variables, shared config files): %w", err)
	}
	if acfg.Region == "" {
		return "", nil, errors.New("key upstream.aws_region: upstream.connector awsiamrds needs the database's AWS region: set upstream.aws_region, or AWS_REGION, or a region in the shared AWS config")
	}
	creds := acfg.Credentials // the default chain, behind the SDK's cache
	if deps.awsCredentials != nil {
		creds = deps.awsCredentials
	}
	return acfg.Region, creds, nil
}

// redactParseError describes a parse failure without the secrets: pgconn's
// own message redacts on a best-effort basis only, so the connection string
// is shown as config.RedactURL shows it, with pgconn's cause. When
// RedactURL cannot read the string either, a cause that quotes part of it
// (a stray word taken for a keyword, which may be a password) is left out.
func redactParseError(err error, raw string) string {
	var pe *pgconn.ParseConfigError
	if !errors.As(err, &pe) {
		return err.Error()
	}
	shown := config.RedactURL(raw)
	msg := "cannot parse " + shown
	if cause := pe.Unwrap(); cause != nil {
		unreadable := strings.HasPrefix(shown, "(unparsable")
		if c := cause.Error(); !unreadable || !strings.ContainsAny(c, "\"'`") {
			msg += ": " + c
		}
	}
	return msg
}
