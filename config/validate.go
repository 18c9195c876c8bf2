package config

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"net/url"
	"os"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// Validate checks the whole configuration and returns every problem found,
// each naming the key to change.
func (c *Config) Validate() error {
	var errs []error
	if err := checkTags(c); err != nil {
		errs = append(errs, err)
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		errs = append(errs, fmt.Errorf("key listen: %q is not host:port", c.Listen))
	}
	if c.AdminListen != "" {
		if _, _, err := net.SplitHostPort(c.AdminListen); err != nil {
			errs = append(errs, fmt.Errorf("key admin_listen: %q is not host:port", c.AdminListen))
		}
	}
	if _, err := c.UnixSocketPerm(); err != nil {
		errs = append(errs, err)
	}
	if c.Upstream.Password != "" && c.Upstream.PasswordFile != "" {
		errs = append(errs, errors.New("keys upstream.password and upstream.password_file: set only one of them"))
	}
	switch {
	case c.Clients.HBAFile != "":
		// The file's lines are checked when it is loaded (auth.NewHBA),
		// against the TLS, users file and listen settings; clients.auth
		// is not used (AuthIgnored).
	case c.Clients.Auth == AuthSCRAM, c.Clients.Auth == AuthMD5:
		if c.Clients.UsersFile == "" {
			errs = append(errs, fmt.Errorf("key clients.users_file: required when clients.auth is %s (a PgBouncer userlist.txt: \"user\" \"password\" per line)", c.Clients.Auth))
		}
	case c.Clients.Auth == AuthTrust:
		if !c.Clients.AllowTrustRemote && !IsLoopback(c.Listen) {
			errs = append(errs, fmt.Errorf("key clients.auth: trust is refused on the non-loopback listener %s; set clients.allow_trust_remote: true to accept it anyway, or choose scram-sha-256", c.Listen))
		}
	case c.Clients.Auth == AuthCert:
		if c.Clients.TLS.Mode != "verify-client" {
			errs = append(errs, errors.New("key clients.auth: cert needs clients.tls.mode: verify-client"))
		}
	}
	if c.Clients.TLS.Mode != "disable" && (c.Clients.TLS.CertFile == "" || c.Clients.TLS.KeyFile == "") {
		errs = append(errs, fmt.Errorf("keys clients.tls.cert_file and clients.tls.key_file: required when clients.tls.mode is %s", c.Clients.TLS.Mode))
	}
	if c.Clients.TLS.Mode == "verify-client" && c.Clients.TLS.ClientCAFile == "" {
		errs = append(errs, errors.New("key clients.tls.client_ca_file: required when clients.tls.mode is verify-client"))
	}
	if c.Upstream.Connector == ConnectorAWSIAMRDS {
		// The token is a password valid for 15 minutes: over TLS that does
		// not verify the server (require), an active man in the middle
		// reads it and logs in as the user.
		switch mode := c.EffectiveSSLMode(); {
		case mode == "verify-full":
		case mode == "verify-ca" && c.Upstream.SSL.AllowVerifyCAForIAM:
		case mode == "verify-ca":
			errs = append(errs, errors.New("key upstream.ssl.mode: RDS IAM authentication sends its token as a cleartext password, and verify-ca does not check that the certificate names the server: set upstream.ssl.mode to verify-full (RDS certificates name their endpoints), or, for an endpoint whose name the certificate does not carry (a custom DNS name, a proxy), set upstream.ssl.allow_verify_ca_for_iam: true"))
		default:
			errs = append(errs, fmt.Errorf("key upstream.ssl.mode: RDS IAM authentication sends its token as a cleartext password, so it needs TLS that verifies the server, or an active man in the middle reads the token: set upstream.ssl.mode to verify-full, with the RDS CA bundle as upstream.ssl.root_cert_file (it is %s)", mode))
		}
		if !c.UpstreamHasUser() {
			errs = append(errs, errors.New("key upstream.url: upstream.connector awsiamrds needs the database user in the URL"))
		}
	}
	if (c.Upstream.SSL.CertFile == "") != (c.Upstream.SSL.KeyFile == "") {
		errs = append(errs, errors.New("keys upstream.ssl.cert_file and upstream.ssl.key_file: set both or neither"))
	}
	if cl := c.Budget.Cluster; cl.Enabled {
		if cl.Namespace < math.MinInt32 || cl.Namespace > math.MaxInt32 {
			errs = append(errs, fmt.Errorf("key budget.cluster.namespace: %d does not fit in 32 bits (an advisory lock key is an int4)", cl.Namespace))
		}
		if cl.MemberTimeout < 4*cl.HeartbeatInterval {
			errs = append(errs, fmt.Errorf("key budget.cluster.member_timeout: %s is less than 4 × budget.cluster.heartbeat_interval (%s): a replica must be able to miss a heartbeat without losing its leases", cl.MemberTimeout, cl.HeartbeatInterval))
		}
		if !validTableName(cl.Table) {
			errs = append(errs, fmt.Errorf("key budget.cluster.table: %q is not a table name (letters, digits and _, optionally schema.table)", cl.Table))
		}
		var prefixes []netip.Prefix
		for _, c := range cl.PeerCIDRs {
			p, err := netip.ParsePrefix(c)
			if err != nil {
				errs = append(errs, fmt.Errorf("key budget.cluster.peer_cidrs: %q is not a CIDR (such as 10.0.0.0/8 or fc00::/7)", c))
				continue
			}
			prefixes = append(prefixes, p.Masked())
		}
		if a := cl.AdvertiseAddress; a != "" {
			host, port, err := net.SplitHostPort(a)
			if err != nil || port == "" || port == "0" {
				errs = append(errs, fmt.Errorf("key budget.cluster.advertise_address: %q is not host:port", a))
			} else if ip, err := netip.ParseAddr(host); err == nil && !slices.ContainsFunc(prefixes, func(p netip.Prefix) bool { return p.Contains(ip.WithZone("").Unmap()) }) {
				errs = append(errs, fmt.Errorf("key budget.cluster.advertise_address: %s is outside budget.cluster.peer_cidrs (%s): the other replicas would not forward cancel requests to it; add its network to budget.cluster.peer_cidrs", a, strings.Join(cl.PeerCIDRs, ", ")))
			}
		}
		if cl.ControlPasswordFile != "" && cl.ControlUser == "" {
			errs = append(errs, errors.New("key budget.cluster.control_password_file: set budget.cluster.control_user too (the role whose password it holds)"))
		}
	}
	if c.Budget.Max > 0 && c.Budget.Reserve > 0 {
		errs = append(errs, errors.New("keys budget.max and budget.reserve: reserve only applies when max is 0 (derived from the server); set one of them"))
	}
	return errors.Join(errs...)
}

// AuthIgnored reports that clients.auth was given although
// clients.hba_file replaces it (the command warns about it).
func (c *Config) AuthIgnored() bool { return c.authSet && c.Clients.HBAFile != "" }

// IsLoopback reports whether a listen address only accepts local clients.
func IsLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// UpstreamHasUser reports whether the upstream URL (or DSN, or PGUSER) names
// a user, which selects the sidecar model.
func (c *Config) UpstreamHasUser() bool {
	return URLParam(c.Upstream.URL, "user") != "" || c.libpqEnv.user != ""
}

// EffectiveSSLMode is the upstream sslmode after upstream.ssl.mode, the URL
// and PGSSLMODE are considered, as libpq would decide it.
func (c *Config) EffectiveSSLMode() string {
	if c.Upstream.SSL.Mode != "" {
		return c.Upstream.SSL.Mode
	}
	if m := URLParam(c.Upstream.URL, "sslmode"); m != "" {
		return m
	}
	if c.libpqEnv.sslMode != "" {
		return c.libpqEnv.sslMode
	}
	return "prefer"
}

// URLParam returns a parameter of a libpq URL or key=value DSN ("user",
// "sslmode", "dbname", ...), or "" when it is not given.
func URLParam(connString, name string) string {
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		u, err := url.Parse(connString)
		if err != nil {
			return ""
		}
		if v := u.Query().Get(name); v != "" {
			return v
		}
		switch name {
		case "user":
			if u.User != nil {
				return u.User.Username()
			}
		case "dbname":
			return strings.TrimPrefix(u.Path, "/")
		}
		return ""
	}
	m, _ := parseDSN(connString)
	return m[name]
}

// parseDSN splits a libpq key=value string, honouring single quotes and
// backslash escapes. ok is false when s is not well formed (text without
// "=", a keyword that is empty or has characters other than letters, digits,
// "_", "." and "-", or an unterminated quote); out then holds what was read
// before the problem.
func parseDSN(s string) (out map[string]string, ok bool) {
	out = map[string]string{}
	for {
		s = strings.TrimLeft(s, " \t\n\r")
		if s == "" {
			return out, true
		}
		eq := strings.IndexByte(s, '=')
		if eq < 0 {
			return out, false
		}
		k := strings.TrimSpace(s[:eq])
		if !validDSNKeyword(k) {
			return out, false
		}
		s = strings.TrimLeft(s[eq+1:], " \t\n\r")
		var v strings.Builder
		if strings.HasPrefix(s, "'") {
			s = s[1:]
			for len(s) > 0 && s[0] != '\'' {
				if s[0] == '\\' && len(s) > 1 {
					s = s[1:]
				}
				v.WriteByte(s[0])
				s = s[1:]
			}
			if len(s) == 0 {
				return out, false // unterminated quote
			}
			s = s[1:]
		} else {
			for len(s) > 0 && s[0] != ' ' && s[0] != '\t' && s[0] != '\n' && s[0] != '\r' {
				if s[0] == '\\' && len(s) > 1 {
					s = s[1:]
				}
				v.WriteByte(s[0])
				s = s[1:]
			}
		}
		out[k] = v.String()
	}
}

// validDSNKeyword reports whether k can be a keyword of a key=value
// connection string: libpq's keywords and server parameter names.
func validDSNKeyword(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-') {
			return false
		}
	}
	return true
}

// quoteDSNValue quotes a key=value connection string value when it needs it.
func quoteDSNValue(v string) string {
	if v != "" && !strings.ContainsAny(v, " \t\n\r\v\f'\\") {
		return v
	}
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v) + "'"
}

// applyCoderEnv reads the environment that Coder's Helm chart sets for
// coderd (DB_HOST, DB_PORT, DB_USER, DB_NAME, DB_PASSWORD, DB_PASSWORD_PATH,
// DB_SSL_MODE, DB_SEARCH_PATH, DB_CERT, DB_KEY, DB_ROOT_CERT, DB_CONNECTOR,
// or Coder v2's CODER_PG_CONNECTION_URL and CODER_PG_AUTH) when nothing
// else names the upstream, so pggovernor drops in beside coderd unchanged.
func applyCoderEnv(c *Config, env map[string]string, explicit map[string]bool) error {
	if explicit["upstream.url"] {
		return nil
	}
	fill := func(path, value string) error {
		if value == "" || explicit[path] {
			return nil
		}
		return set(c, path, value)
	}
	switch {
	case env["CODER_PG_CONNECTION_URL"] != "":
		c.Upstream.URL = env["CODER_PG_CONNECTION_URL"]
		c.upstreamFrom = "CODER_PG_CONNECTION_URL"
	case env["DB_HOST"] != "":
		c.upstreamFrom = "DB_HOST, DB_PORT"
		port := env["DB_PORT"]
		if port == "" {
			port = "5432"
		}
		if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 || port[0] == '+' {
			return fmt.Errorf("environment variable DB_PORT: %q is not a port number", port)
		}
		u := url.URL{Scheme: "postgres", Host: net.JoinHostPort(env["DB_HOST"], port), Path: "/" + env["DB_NAME"]}
		if env["DB_USER"] != "" {
			u.User = url.User(env["DB_USER"])
		}
		q := url.Values{}
		if sp := env["DB_SEARCH_PATH"]; sp != "" {
			q.Set("search_path", sp)
		}
		u.RawQuery = q.Encode()
		c.Upstream.URL = u.String()
	default:
		return nil
	}
	if !explicit["upstream.password"] && !explicit["upstream.password_file"] {
		if err := fill("upstream.password_file", env["DB_PASSWORD_PATH"]); err != nil {
			return err
		}
		if c.Upstream.PasswordFile == "" {
			if err := fill("upstream.password", env["DB_PASSWORD"]); err != nil {
				return err
			}
		}
	}
	for path, name := range map[string]string{
		"upstream.ssl.mode":           "DB_SSL_MODE",
		"upstream.ssl.cert_file":      "DB_CERT",
		"upstream.ssl.key_file":       "DB_KEY",
		"upstream.ssl.root_cert_file": "DB_ROOT_CERT",
	} {
		if err := fill(path, env[name]); err != nil {
			return fmt.Errorf("environment variable %s: %w", name, err)
		}
	}
	connector := env["DB_CONNECTOR"]
	if connector == "" {
		connector = env["CODER_PG_AUTH"]
	}
	if connector == "postgres" { // Coder v1's chart: postgres.connector's default
		connector = ConnectorPassword
	}
	if connector != "" && !explicit["upstream.connector"] {
		if connector != ConnectorPassword && connector != ConnectorAWSIAMRDS {
			return fmt.Errorf("environment variable DB_CONNECTOR/CODER_PG_AUTH: %q is not one of: password (or postgres, Coder v1's name), awsiamrds", connector)
		}
		c.Upstream.Connector = connector
	}
	return nil
}

// UpstreamSource names where upstream.url came from, for messages: the key
// "upstream.url" (file, PGGOVERNOR_UPSTREAM_URL or flag), or the variables
// of Coder's environment it was taken from ("CODER_PG_CONNECTION_URL",
// "DB_HOST, DB_PORT").
func (c *Config) UpstreamSource() string {
	if c.upstreamFrom != "" {
		return c.upstreamFrom
	}
	return "upstream.url"
}

// Redacted returns the configuration as key/value pairs for display (admin
// console, doctor), with secrets replaced.
func (c *Config) Redacted() [][2]string {
	root := reflect.ValueOf(c).Elem()
	var out [][2]string
	for _, k := range keys() {
		v := root.FieldByIndex(k.index)
		s := fmt.Sprint(v.Interface())
		if v.Kind() == reflect.Slice {
			var items []string
			for i := 0; i < v.Len(); i++ {
				items = append(items, fmt.Sprint(v.Index(i).Interface()))
			}
			s = strings.Join(items, ",")
		}
		switch k.field.Tag.Get("secret") {
		case "true":
			if s != "" {
				s = "********"
			}
		case "url":
			s = RedactURL(s)
		}
		out = append(out, [2]string{k.path, s})
	}
	return out
}

// secretConnParams are the libpq connection parameters that hold a secret:
// the password and the passphrase of an encrypted client key. (sslkey,
// sslcert, sslrootcert and passfile are paths; what the files hold is never
// shown.)
var secretConnParams = []string{"password", "sslpassword"}

// isSecretConnParam reports whether a connection parameter holds a secret.
// The comparison ignores case: libpq's keywords are lower case, and a key
// that differs only in case is a mistake whose value is still a secret.
func isSecretConnParam(k string) bool {
	for _, s := range secretConnParams {
		if strings.EqualFold(k, s) {
			return true
		}
	}
	return false
}

// RedactURL hides the secrets of a libpq URL or DSN: the URL's userinfo
// password and the value of every secret parameter (password, sslpassword),
// in the query of a URL or as a key of a DSN. What it cannot read with
// certainty it does not show.
func RedactURL(s string) string {
	const mask = "xxxxx"
	if strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://") {
		u, err := url.Parse(s)
		if err != nil {
			return "(unparsable URL)"
		}
		if _, has := u.User.Password(); has {
			u.User = url.UserPassword(u.User.Username(), mask)
		}
		if u.RawQuery != "" {
			// The raw pairs, as libpq reads them ('&'-separated, the key
			// percent-decoded): url.Values would drop a pair it cannot
			// decode and leave it in RawQuery, password and all.
			pairs := strings.Split(u.RawQuery, "&")
			for i, pair := range pairs {
				rawKey, _, hasValue := strings.Cut(pair, "=")
				key, err := url.PathUnescape(rawKey)
				if hasValue && (err != nil || isSecretConnParam(strings.Trim(key, " "))) {
					pairs[i] = rawKey + "=" + mask
				}
			}
			u.RawQuery = strings.Join(pairs, "&")
		}
		if u.Fragment != "" { // not libpq's; shown as nothing of it
			u.Fragment, u.RawFragment = mask, ""
		}
		return u.String()
	}
	m, ok := parseDSN(s)
	if !ok {
		// A string that is neither a URL nor a well-formed key=value list
		// (a misspelt or upper-case scheme, a stray word) may hold a
		// password where parseDSN cannot see it: show none of it.
		return "(unparsable connection string)"
	}
	secret := false
	for k := range m {
		secret = secret || isSecretConnParam(k)
	}
	if !secret {
		return s
	}
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	sort.Strings(names)
	parts := make([]string, 0, len(names))
	for _, k := range names {
		v := m[k]
		if isSecretConnParam(k) {
			v = mask
		}
		parts = append(parts, k+"="+quoteDSNValue(v))
	}
	return strings.Join(parts, " ")
}

// validTableName reports whether s is a plain or schema-qualified table name
// made of lowercase letters, digits and underscores (so it needs no quoting
// and means the same to every replica).
func validTableName(s string) bool {
	parts := strings.Split(s, ".")
	if len(parts) > 2 {
		return false
	}
	for _, p := range parts {
		if p == "" || (p[0] >= '0' && p[0] <= '9') {
			return false
		}
		for _, r := range p {
			if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_') {
				return false
			}
		}
	}
	return true
}

// UnixSocketPerm is unix_socket_mode as permissions.
func (c *Config) UnixSocketPerm() (os.FileMode, error) {
	m := c.UnixSocketMode
	n, err := strconv.ParseUint(m, 8, 32)
	if err != nil || m == "" || n > 0o777 {
		return 0, fmt.Errorf("key unix_socket_mode: %q is not permissions in octal, 0000 to 0777 (examples: 0770, 0700, 0777)", m)
	}
	return os.FileMode(n), nil
}
