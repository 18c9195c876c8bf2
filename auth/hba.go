package auth

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/internal/filestamp"
)

// This file reads client authentication rules in Postgres' pg_hba.conf
// format (clients.hba_file) as Postgres 15 does (src/backend/libpq/hba.c:
// tokenize_auth_file, next_token, parse_hba_line, check_hba), with what
// pggovernor cannot do refused by a clear error instead of being ignored.

// Bounds on what an hba file may make pggovernor read.
const (
	// maxHBAToken is Postgres' MAX_TOKEN (256) less its terminator.
	maxHBAToken = 255
	// maxHBAFileSize bounds each file read (the hba file and each @file).
	maxHBAFileSize = 1 << 20
	// maxHBARead bounds all the files of one hba file together, includes
	// read more than once counted each time.
	maxHBARead = 4 << 20
	// maxHBADepth bounds @file nesting (Postgres 16's limit); it also ends
	// a file that includes itself.
	maxHBADepth = 10
	// maxHBAErrors is how many problems one error reports.
	maxHBAErrors = 20
)

// HBA methods: what a line's method field may say.
const (
	HBATrust    = "trust"
	HBAReject   = "reject"
	HBASCRAM    = "scram-sha-256"
	HBAMD5      = "md5"
	HBAPassword = "password"
	HBACert     = "cert"
)

// hbaConn is a line's connection type.
type hbaConn int

const (
	connLocal     hbaConn = iota // local: the Unix socket
	connHost                     // host (and hostnogssenc): TCP, TLS or not
	connHostSSL                  // hostssl: TCP with TLS
	connHostNoSSL                // hostnossl: TCP without TLS
)

// Client certificate requirements (clientcert=).
const (
	clientCertOff = iota
	clientCertCA
	clientCertFull
)

// hbaToken is one word of a field. quoted records that it started with a
// double quote: a quoted keyword ("all") is a plain name.
type hbaToken struct {
	s      string
	quoted bool
}

func (t hbaToken) is(keyword string) bool { return !t.quoted && t.s == keyword }

// HBARule is one line of an hba file. It is immutable once parsed.
type HBARule struct {
	// File and Line say where the line was read (the first physical line
	// of a line continued with backslashes).
	File string
	Line int
	// Method is the authentication method: trust, reject, scram-sha-256,
	// md5, password or cert.
	Method string

	conn       hbaConn
	databases  []hbaToken
	users      []hbaToken
	anyAddr    bool     // the address field is all (or the line is local)
	v4         bool     // the address is IPv4
	addr, mask [16]byte // the first 4 bytes for IPv4
	clientCert int      // clientCertOff, clientCertCA or clientCertFull
}

// String names the line as file:line.
func (r *HBARule) String() string { return fmt.Sprintf("%s:%d", r.File, r.Line) }

// HBARules is a parsed hba file: its lines, in order. It is immutable once
// parsed.
type HBARules struct {
	// File is the hba file's path.
	File string
	// Rules are its lines in order; the first that matches a login decides.
	Rules []*HBARule
}

// Len is the number of lines.
func (r *HBARules) Len() int {
	if r == nil {
		return 0
	}
	return len(r.Rules)
}

// HBAError is a problem in an hba file, naming the file and the line.
type HBAError struct {
	File string
	Line int
	Msg  string
	// IncludedFrom is the line of the hba file (file:line) whose @file
	// led to File, "" when File is the hba file itself.
	IncludedFrom string
}

func (e *HBAError) Error() string {
	if e.IncludedFrom != "" {
		return fmt.Sprintf("%s:%d: %s (included from %s)", e.File, e.Line, e.Msg, e.IncludedFrom)
	}
	return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
}

// HBAReadFunc reads a file an hba file names: the file itself and every
// @file it includes.
type HBAReadFunc func(path string) ([]byte, error)

// ParseHBA parses the hba file at path, reading it and the files it
// includes with read. Every problem found is returned (errors.Join of
// *HBAError, the first maxHBAErrors of them); the file is then refused as a
// whole, as Postgres refuses it.
func ParseHBA(path string, read HBAReadFunc) (*HBARules, error) {
	p := &hbaParser{read: read}
	lines, err := p.tokenizeFile(path, 0)
	if err != nil {
		return nil, err
	}
	rules := &HBARules{File: path}
	var errs []error
	for _, l := range lines {
		if l.err == nil {
			var r *HBARule
			if r, l.err = parseRule(path, l); l.err == nil {
				rules.Rules = append(rules.Rules, r)
				continue
			}
		}
		errs = append(errs, l.err)
	}
	if len(errs) > maxHBAErrors {
		errs = append(errs[:maxHBAErrors], fmt.Errorf("and %d more problems", len(errs)-maxHBAErrors))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if len(rules.Rules) == 0 {
		return nil, fmt.Errorf("configuration file %q contains no entries: every login would be refused", path)
	}
	return rules, nil
}

// hbaLine is one logical line, split into fields of tokens, or the error
// that stopped reading it.
type hbaLine struct {
	line   int
	fields [][]hbaToken
	err    error
}

type hbaParser struct {
	read  HBAReadFunc
	bytes int // read so far, over all files
}

// tokenizeFile splits a file into logical lines of fields (comments,
// backslash continuations, quotes and commas as in Postgres). An error
// returned is about the file as a whole; errors of one line are in it.
func (p *hbaParser) tokenizeFile(path string, depth int) ([]hbaLine, error) {
	data, err := p.read(path)
	if err != nil {
		return nil, err
	}
	if p.bytes += len(data); p.bytes > maxHBARead {
		return nil, fmt.Errorf("%s: the hba file and the files it includes are more than %d bytes together", path, maxHBARead)
	}
	if i := bytes.IndexByte(data, 0); i >= 0 {
		return nil, &HBAError{File: path, Line: 1 + bytes.Count(data[:i], []byte{'\n'}), Msg: "the file holds a NUL byte: it is not a text file"}
	}
	var lines []hbaLine
	lineNo := 1
	rest := data
	buf := make([]byte, 0, 256)
	for len(rest) > 0 {
		// Collect a logical line: a backslash at the end of a physical
		// line (after its \r\n is stripped) joins the next one to it.
		buf = buf[:0]
		continuations, lastBackslash := 0, 0
		for len(rest) > 0 {
			var raw []byte
			if j := bytes.IndexByte(rest, '\n'); j >= 0 {
				raw, rest = rest[:j], rest[j+1:]
			} else {
				raw, rest = rest, nil
			}
			buf = append(buf, raw...)
			for len(buf) > 0 && (buf[len(buf)-1] == '\n' || buf[len(buf)-1] == '\r') {
				buf = buf[:len(buf)-1]
			}
			if len(buf) > lastBackslash && buf[len(buf)-1] == '\\' {
				buf = buf[:len(buf)-1]
				lastBackslash = len(buf)
				continuations++
				continue
			}
			break
		}
		l := hbaLine{line: lineNo}
		s := string(buf)
		for pos := 0; pos < len(s) && l.err == nil; {
			field, err := p.nextField(path, s, &pos, depth)
			if err != nil {
				l.err = p.lineError(path, lineNo, err)
				break
			}
			if len(field) > 0 { // as Postgres: an empty @file adds no field
				l.fields = append(l.fields, field)
			}
		}
		if len(l.fields) > 0 || l.err != nil {
			lines = append(lines, l)
		}
		lineNo += continuations + 1
	}
	return lines, nil
}

// lineError places err at path:line; an error of an included file keeps
// its own place and says from which line it was included (the outermost
// one, once every level has placed it).
func (p *hbaParser) lineError(path string, line int, err error) error {
	var he *HBAError
	if errors.As(err, &he) {
		return &HBAError{File: he.File, Line: he.Line, Msg: he.Msg, IncludedFrom: fmt.Sprintf("%s:%d", path, line)}
	}
	return &HBAError{File: path, Line: line, Msg: err.Error()}
}

func isBlank(c byte) bool { return c == ' ' || c == '\t' || c == '\r' }

// nextToken reads the token at s[*pos:], as Postgres' next_token: blanks
// and commas before it are skipped; it ends at an unquoted blank or comma
// (comma reports the latter, which is left for the next call); an unquoted
// # ends the line; "" in quotes is a quote. ok is false at the end of the
// line.
func nextToken(s string, pos *int) (tok hbaToken, comma, ok bool, err error) {
	i := *pos
	for i < len(s) && (isBlank(s[i]) || s[i] == ',') {
		i++
	}
	var buf []byte
	inQuote, wasQuote, sawQuote := false, false, false
	for i < len(s) && (!isBlank(s[i]) || inQuote) {
		c := s[i]
		if c == '#' && !inQuote {
			i = len(s) // a comment: the rest of the line
			break
		}
		if len(buf) >= maxHBAToken {
			*pos = len(s)
			return hbaToken{}, false, false, fmt.Errorf("authentication file token too long (more than %d bytes): %q", maxHBAToken, string(buf))
		}
		if c == ',' && !inQuote {
			comma = true
			break
		}
		if c != '"' || wasQuote {
			buf = append(buf, c)
		}
		if inQuote && c == '"' {
			wasQuote = !wasQuote
		} else {
			wasQuote = false
		}
		if c == '"' {
			inQuote = !inQuote
			sawQuote = true
			if len(buf) == 0 {
				tok.quoted = true
			}
		}
		i++
	}
	*pos = i
	tok.s = string(buf)
	return tok, comma, sawQuote || len(buf) > 0, nil
}

// nextField reads one field: a comma-separated list of tokens, with each
// unquoted @file replaced by the tokens of that file.
func (p *hbaParser) nextField(path, s string, pos *int, depth int) ([]hbaToken, error) {
	var toks []hbaToken
	for {
		tok, comma, ok, err := nextToken(s, pos)
		if err != nil || !ok {
			return toks, err
		}
		if !tok.quoted && len(tok.s) > 1 && tok.s[0] == '@' {
			inc, err := p.include(path, tok.s[1:], depth)
			if err != nil {
				return toks, err
			}
			toks = append(toks, inc...)
		} else {
			toks = append(toks, tok)
		}
		if !comma {
			return toks, nil
		}
	}
}

// include reads an @file, relative to the directory of the file naming
// it, and returns all its tokens, every line and field, in order.
func (p *hbaParser) include(outer, name string, depth int) ([]hbaToken, error) {
	full := name
	if !filepath.IsAbs(name) {
		full = filepath.Join(filepath.Dir(outer), name)
	}
	if depth+1 > maxHBADepth {
		return nil, fmt.Errorf("could not open file %q: maximum nesting depth (%d) of @ includes exceeded", full, maxHBADepth)
	}
	lines, err := p.tokenizeFile(full, depth+1)
	if err != nil {
		var he *HBAError
		if errors.As(err, &he) {
			return nil, err
		}
		return nil, fmt.Errorf("could not open secondary authentication file \"@%s\" as %q: %w", name, full, unwrapPath(err))
	}
	var toks []hbaToken
	for _, l := range lines {
		if l.err != nil {
			return nil, l.err
		}
		for _, f := range l.fields {
			toks = append(toks, f...)
		}
	}
	return toks, nil
}

func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// parseRule turns a tokenized line into a rule, as parse_hba_line does,
// refusing what pggovernor cannot do.
func parseRule(path string, l hbaLine) (*HBARule, error) {
	bad := func(format string, args ...any) error {
		return &HBAError{File: path, Line: l.line, Msg: fmt.Sprintf(format, args...)}
	}
	f := l.fields
	r := &HBARule{File: path, Line: l.line}
	if len(f[0]) > 1 {
		return nil, bad("multiple values specified for connection type (specify exactly one connection type per line)")
	}
	switch t := f[0][0].s; t {
	case "local":
		r.conn = connLocal
	case "host", "hostnogssenc": // pggovernor has no GSSAPI encryption: hostnogssenc is host
		r.conn = connHost
	case "hostssl":
		r.conn = connHostSSL
	case "hostnossl":
		r.conn = connHostNoSSL
	case "hostgssenc":
		return nil, bad("hostgssenc record cannot match because GSSAPI encryption is not supported by pggovernor")
	default:
		return nil, bad("invalid connection type %q", t)
	}
	i := 1
	if i >= len(f) {
		return nil, bad("end-of-line before database specification")
	}
	r.databases = f[i]
	for _, t := range r.databases {
		if t.is("samerole") || t.is("samegroup") {
			return nil, bad("%q is not supported: pggovernor has no roles (the users file has no group memberships); name the databases, or list them in an @file", t.s)
		}
	}
	i++
	if i >= len(f) {
		return nil, bad("end-of-line before role specification")
	}
	r.users = f[i]
	for _, t := range r.users {
		if !t.quoted && strings.HasPrefix(t.s, "+") {
			return nil, bad("group name %q is not supported: pggovernor has no roles (the users file has no group memberships); name the users, or list them in an @file", t.s)
		}
	}
	i++
	if r.conn == connLocal {
		r.anyAddr = true
	} else {
		if i >= len(f) {
			return nil, bad("end-of-line before IP address specification")
		}
		if len(f[i]) > 1 {
			return nil, bad("multiple values specified for host address (specify one address range per line)")
		}
		tok := f[i][0]
		i++
		switch {
		case tok.is("all"):
			r.anyAddr = true
		case tok.is("samehost"), tok.is("samenet"):
			return nil, bad("%q is not supported by pggovernor: give the address range (for example 127.0.0.1/32 or 10.0.0.0/8)", tok.s)
		default:
			str, bits, hasBits := strings.Cut(tok.s, "/")
			addr, err := netip.ParseAddr(str)
			if err != nil || addr.Zone() != "" {
				return nil, bad("%q is not an IP address, and host names are not supported by pggovernor: give an address with a CIDR mask (10.0.0.0/8), an address and a netmask, or all", tok.s)
			}
			r.v4 = addr.Is4()
			r.addr = addrBytes(addr)
			if hasBits {
				n, err := strconv.Atoi(bits)
				if err != nil || n < 0 || n > addr.BitLen() || bits == "" || bits[0] < '0' || bits[0] > '9' {
					return nil, bad("invalid CIDR mask in address %q", tok.s)
				}
				for b := 0; b < n; b++ {
					r.mask[b/8] |= 0x80 >> (b % 8)
				}
			} else {
				if i >= len(f) {
					return nil, bad("end-of-line before netmask specification (specify an address range in CIDR notation, or provide a separate netmask)")
				}
				if len(f[i]) > 1 {
					return nil, bad("multiple values specified for netmask")
				}
				mtok := f[i][0]
				i++
				mask, err := netip.ParseAddr(mtok.s)
				if err != nil || mask.Zone() != "" {
					return nil, bad("invalid IP mask %q", mtok.s)
				}
				if mask.Is4() != addr.Is4() {
					return nil, bad("IP address and mask do not match")
				}
				r.mask = addrBytes(mask)
			}
		}
	}
	if i >= len(f) {
		return nil, bad("end-of-line before authentication method")
	}
	if len(f[i]) > 1 {
		return nil, bad("multiple values specified for authentication type (specify exactly one authentication type per line)")
	}
	switch m := f[i][0].s; m {
	case HBATrust, HBAReject, HBASCRAM, HBAMD5, HBAPassword, HBACert:
		r.Method = m
	case "ident", "peer", "gss", "sspi", "pam", "bsd", "ldap", "radius":
		return nil, bad("authentication method %q is not supported by pggovernor (it supports trust, reject, scram-sha-256, md5, password and cert)", m)
	default:
		return nil, bad("invalid authentication method %q", m)
	}
	i++
	if r.Method == HBACert && r.conn != connHostSSL {
		return nil, bad("cert authentication is only supported on hostssl connections")
	}
	for ; i < len(f); i++ {
		for _, tok := range f[i] {
			name, val, ok := strings.Cut(tok.s, "=")
			if !ok {
				return nil, bad("authentication option not in name=value format: %s", tok.s)
			}
			if err := r.option(name, val); err != "" {
				return nil, bad("%s", err)
			}
		}
	}
	if r.Method == HBACert {
		// As Postgres: cert always checks the certificate and its CN.
		r.clientCert = clientCertFull
	}
	return r, nil
}

// option applies one name=value option, returning Postgres' complaint (or
// pggovernor's refusal) when it cannot.
func (r *HBARule) option(name, val string) string {
	switch name {
	case "map":
		if r.Method != HBACert {
			return `authentication option "map" is only valid for authentication methods ident, peer, gssapi, sspi, and cert`
		}
		return "map= (user name maps from pg_ident.conf) is not supported by pggovernor: with cert, the client certificate's CN must be the user name"
	case "clientcert":
		if r.conn != connHostSSL {
			return `clientcert can only be configured for "hostssl" rows`
		}
		switch val {
		case "verify-full":
			r.clientCert = clientCertFull
		case "verify-ca":
			if r.Method == HBACert {
				return `clientcert only accepts "verify-full" when using "cert" authentication`
			}
			r.clientCert = clientCertCA
		default:
			return fmt.Sprintf("invalid value for clientcert: %q", val)
		}
	case "clientname":
		if r.conn != connHostSSL {
			return `clientname can only be configured for "hostssl" rows`
		}
		switch val {
		case "CN":
		case "DN":
			return "clientname=DN is not supported by pggovernor: the client certificate's CN is compared with the user name"
		default:
			return fmt.Sprintf("invalid value for clientname: %q", val)
		}
	default:
		if methods, ok := otherMethodOptions[name]; ok {
			return fmt.Sprintf("authentication option %q is only valid for authentication methods %s", name, methods)
		}
		return fmt.Sprintf("unrecognized authentication option name: %q", name)
	}
	return ""
}

// otherMethodOptions are Postgres' options of the methods pggovernor does
// not support, with the methods Postgres names when they are misplaced.
var otherMethodOptions = map[string]string{
	"pamservice": "pam", "pam_use_hostname": "pam",
	"ldapurl": "ldap", "ldaptls": "ldap", "ldapscheme": "ldap", "ldapserver": "ldap", "ldapport": "ldap",
	"ldapbinddn": "ldap", "ldapbindpasswd": "ldap", "ldapsearchattribute": "ldap", "ldapsearchfilter": "ldap",
	"ldapbasedn": "ldap", "ldapprefix": "ldap", "ldapsuffix": "ldap",
	"krb_realm": "gssapi and sspi", "include_realm": "gssapi and sspi", "compat_realm": "sspi", "upn_username": "sspi",
	"radiusservers": "radius", "radiusports": "radius", "radiussecrets": "radius", "radiusidentifiers": "radius",
}

func addrBytes(a netip.Addr) [16]byte {
	if a.Is4() {
		var b [16]byte
		v4 := a.As4()
		copy(b[:], v4[:])
		return b
	}
	return a.As16()
}

// Match returns the first rule that applies to the login, nil when none
// does (Postgres' implicit reject).
func (r *HBARules) Match(l Login) *HBARule {
	local := l.Addr == ""
	var ip netip.Addr
	if !local {
		ip, _ = netip.ParseAddr(l.Addr)
		ip = ip.Unmap()
	}
	ssl := l.TLS != nil
	for _, rule := range r.Rules {
		switch rule.conn {
		case connLocal:
			if !local {
				continue
			}
		default:
			if local || (rule.conn == connHostSSL && !ssl) || (rule.conn == connHostNoSSL && ssl) {
				continue
			}
			if !rule.anyAddr && !rule.matchIP(ip) {
				continue
			}
		}
		if matchDatabase(rule.databases, l.Database, l.User) && matchUser(rule.users, l.User) {
			return rule
		}
	}
	return nil
}

// matchIP is Postgres' check_ip: the same address family, and the same
// bits under the mask.
func (r *HBARule) matchIP(ip netip.Addr) bool {
	if !ip.IsValid() || ip.Is4() != r.v4 {
		return false
	}
	b := addrBytes(ip)
	for i := range b {
		if (b[i]^r.addr[i])&r.mask[i] != 0 {
			return false
		}
	}
	return true
}

// matchDatabase is Postgres' check_db for a connection that is not a
// replication one: all, sameuser, the name; replication never matches.
func matchDatabase(toks []hbaToken, db, user string) bool {
	for _, t := range toks {
		switch {
		case t.is("all"):
			return true
		case t.is("sameuser"):
			if db == user {
				return true
			}
		case t.is("replication"):
		case t.s == db:
			return true
		}
	}
	return false
}

// matchUser is Postgres' check_role without groups (refused when parsed).
func matchUser(toks []hbaToken, user string) bool {
	for _, t := range toks {
		if t.s == user || t.is("all") {
			return true
		}
	}
	return false
}

// HBAOptions are what an hba file is checked against: the rest of the
// configuration, which does not change while pggovernor runs.
type HBAOptions struct {
	// TLS reports that clients may use TLS (clients.tls.mode is not
	// disable): without it a hostssl line could never match.
	TLS bool
	// ClientCA reports that client certificates are verified
	// (clients.tls.client_ca_file): cert and clientcert= need it.
	ClientCA bool
	// UsersFile reports that clients.users_file is set: the password
	// methods check passwords in it.
	UsersFile bool
	// TrustRemote permits trust lines whose addresses reach beyond
	// loopback: clients.allow_trust_remote, or a loopback listen address.
	TrustRemote bool
	// Logger receives reloads of the file.
	Logger *zap.Logger
}

// check refuses lines that the rest of the configuration makes unusable
// or dangerous, each error naming its line.
func (r *HBARules) check(o HBAOptions) error {
	var errs []error
	for _, rule := range r.Rules {
		bad := func(format string, args ...any) {
			errs = append(errs, &HBAError{File: rule.File, Line: rule.Line, Msg: fmt.Sprintf(format, args...)})
		}
		switch {
		case rule.conn == connHostSSL && !o.TLS:
			bad("hostssl record cannot match because TLS is disabled: set clients.tls.mode to allow, require or verify-client")
		case rule.Method == HBACert && !o.ClientCA:
			bad("cert needs client certificates verified against clients.tls.client_ca_file, which is not set")
		case rule.clientCert != clientCertOff && !o.ClientCA:
			bad("clientcert needs client certificates verified against clients.tls.client_ca_file, which is not set")
		case (rule.Method == HBASCRAM || rule.Method == HBAMD5 || rule.Method == HBAPassword) && !o.UsersFile:
			bad("%s checks passwords in clients.users_file, which is not set", rule.Method)
		case rule.Method == HBATrust && rule.conn != connLocal && !o.TrustRemote && !rule.loopbackOnly():
			bad("trust for addresses beyond loopback is refused: anyone who can reach pggovernor could log in as anyone; narrow the address to 127.0.0.1/32 or ::1/128, use a local line, or set clients.allow_trust_remote: true")
		}
	}
	if len(errs) > maxHBAErrors {
		errs = append(errs[:maxHBAErrors], fmt.Errorf("and %d more problems", len(errs)-maxHBAErrors))
	}
	return errors.Join(errs...)
}

// loopbackOnly reports whether every address the line matches is a
// loopback one: within 127.0.0.0/8, or ::1 alone.
func (r *HBARule) loopbackOnly() bool {
	switch {
	case r.anyAddr:
		return false
	case r.v4:
		return r.mask[0] == 0xff && r.addr[0] == 127
	}
	one := [16]byte{15: 1}
	for i := range r.mask {
		if r.mask[i] != 0xff || r.addr[i] != one[i] {
			return false
		}
	}
	return true
}

// HBA holds the rules of clients.hba_file. They are read again, on use,
// when the file or a file it includes changed (a write in place or a
// Kubernetes ..data symlink swap), and on Reload (SIGHUP); a version that
// does not parse, or does not fit the configuration, is refused as a
// whole, logged with its file and line, and the previous rules stay.
type HBA struct {
	path   string
	logger *zap.Logger
	r      *filestamp.Reloader[*HBARules]
}

// NewHBA loads an hba file; an error names the file and line of every
// problem.
func NewHBA(path string, o HBAOptions) (*HBA, error) {
	h := &HBA{path: path, logger: o.Logger}
	if h.logger == nil {
		h.logger = zap.NewNop()
	}
	load := func() (*HBARules, []filestamp.Read, error) {
		var reads []filestamp.Read
		read := func(p string) ([]byte, error) {
			reads = append(reads, filestamp.StampRead(p))
			return readBounded(p, maxHBAFileSize)
		}
		rules, err := ParseHBA(path, read)
		if err == nil {
			err = rules.check(o)
		}
		return rules, reads, err
	}
	r, err := filestamp.NewReloaderOf(load)
	if err != nil {
		return nil, err
	}
	h.r = r
	return h, nil
}

// readBounded reads a file of at most limit bytes.
func readBounded(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, limit)
	}
	return data, nil
}

// Path is the hba file's path.
func (h *HBA) Path() string { return h.path }

// Reload reads the hba file again. On error the previous rules stay.
func (h *HBA) Reload() error { return h.r.Reload() }

// Current returns the rules in force, read again first if a file changed.
func (h *HBA) Current() *HBARules {
	rules, reloaded, err := h.r.Get()
	switch {
	case err != nil:
		h.logger.Error("the hba file changed but cannot be used; keeping the previous rules (fix clients.hba_file)", zap.String("file", h.path), zap.Error(err))
	case reloaded:
		h.logger.Info("hba file changed and was reloaded", zap.String("file", h.path), zap.Int("rules", rules.Len()))
	}
	return rules
}
