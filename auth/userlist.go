// Package auth verifies clients and supplies upstream credentials.
//
// Client side: SCRAM-SHA-256 (and SCRAM-SHA-256-PLUS over TLS), md5 and
// trust against a users file in PgBouncer's userlist.txt format, which is
// read again when it changes and fails closed; cert (the client
// certificate's CN is the user); failed-login throttling per source
// address and user.
//
// Upstream side: a static password, a password file read again when it
// changes (following a Kubernetes ..data symlink swap), RDS IAM tokens
// minted with aws-sdk-go-v2 and cached.
//
// Nothing in this package logs or returns a password, a verifier, a token
// or SCRAM state: errors name the user, the method and the cause, never the
// secret.
package auth

import (
	"bufio"
	"bytes"
	"crypto/md5" //nolint:gosec // md5 is the Postgres md5 auth method, not our choice
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/xdg-go/scram"
	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/internal/filestamp"
)

// Secret is one user's entry in the users file. Exactly one form is set.
// Its String method never reveals the secret.
type Secret struct {
	// Plain is the password itself.
	Plain string
	// MD5 is Postgres' md5 verifier: the 32 hex digits of md5(password+user).
	MD5 string
	// SCRAM is a SCRAM-SHA-256 verifier as Postgres stores it.
	SCRAM *scram.StoredCredentials

	derive sync.Once
	scram  scram.StoredCredentials
}

// String describes the form of the secret, never its value.
func (s *Secret) String() string {
	switch {
	case s.Plain != "":
		return "plaintext"
	case s.MD5 != "":
		return "md5"
	case s.SCRAM != nil:
		return "scram-sha-256"
	}
	return "empty"
}

// scramCredentials returns SCRAM keys for the secret: the stored verifier,
// or keys derived once from the plaintext with a random salt. ok is false for
// an md5 secret, which cannot do SCRAM.
func (s *Secret) scramCredentials() (scram.StoredCredentials, bool) {
	if s.SCRAM != nil {
		return *s.SCRAM, true
	}
	if s.Plain == "" {
		return scram.StoredCredentials{}, false
	}
	s.derive.Do(func() {
		client, err := scram.SHA256.NewClient("", s.Plain, "")
		if err != nil { // SASLprep refused the password: Postgres then uses it raw
			client, _ = scram.SHA256.NewClientUnprepped("", s.Plain, "")
		}
		s.scram = client.GetStoredCredentials(scram.KeyFactors{Salt: string(randomBytes(16)), Iters: 4096})
	})
	return s.scram, true
}

// md5Hash returns md5(password+user) as hex, the inner half of Postgres' md5
// method, or "" when the secret is a SCRAM verifier.
func (s *Secret) md5Hash(user string) string {
	if s.MD5 != "" {
		return s.MD5
	}
	if s.Plain != "" {
		sum := md5.Sum([]byte(s.Plain + user)) //nolint:gosec // Postgres md5 method
		return hex.EncodeToString(sum[:])
	}
	return ""
}

// UserList is a parsed users file. It is immutable once loaded.
type UserList struct {
	users map[string]*Secret
}

// Lookup returns a user's secret.
func (u *UserList) Lookup(name string) (*Secret, bool) {
	if u == nil {
		return nil, false
	}
	s, ok := u.users[name]
	return s, ok
}

// Len is the number of users.
func (u *UserList) Len() int {
	if u == nil {
		return 0
	}
	return len(u.users)
}

// LoadUserList reads a users file. A file with lines that do not parse is
// an error naming each as path:line; the entries of the lines that do
// parse are still returned with it (see Users for what is done with them).
func LoadUserList(path string) (*UserList, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening users file: %w", err)
	}
	defer f.Close()
	return parseUserList(f, path)
}

// ParseUserList parses PgBouncer's userlist.txt format: each line holds two
// double-quoted fields, user and password ("" inside a field is a quote);
// further fields are ignored, and lines that do not start with a quote are
// comments. The password is plaintext, "md5" + 32 hex digits, or
// "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>". A later line
// for the same user replaces an earlier one. Lines that do not parse are
// an error naming each one; the entries of the others are returned with
// it.
func ParseUserList(r io.Reader) (*UserList, error) { return parseUserList(r, "") }

// parseUserList parses a users file, naming the lines that do not parse
// name:line ("line n" without a name).
func parseUserList(r io.Reader, name string) (*UserList, error) {
	at := func(n int) string {
		if name == "" {
			return fmt.Sprintf("line %d", n)
		}
		return fmt.Sprintf("%s:%d", name, n)
	}
	ul := &UserList{users: map[string]*Secret{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), 1<<20)
	var errs []error
	lineNo := 0
	for sc.Scan() {
		lineNo++
		line := strings.TrimSpace(sc.Text())
		if !strings.HasPrefix(line, `"`) {
			continue
		}
		user, rest, err := quotedField(line)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", at(lineNo), err))
			continue
		}
		rest = strings.TrimLeft(rest, " \t")
		password, _, err := quotedField(rest)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: user %q: %w", at(lineNo), user, err))
			delete(ul.users, user) // its entry is not what the file says
			continue
		}
		secret, err := parseSecret(password)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: user %q: %w", at(lineNo), user, err))
			delete(ul.users, user)
			continue
		}
		ul.users[user] = secret
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", at(lineNo+1), err))
	}
	if len(errs) > 0 {
		return ul, &userListError{err: errors.Join(errs...), valid: ul}
	}
	return ul, nil
}

// userListError is a users file with lines that do not parse, and the
// entries of the lines that do.
type userListError struct {
	err   error
	valid *UserList
}

func (e *userListError) Error() string { return e.err.Error() }
func (e *userListError) Unwrap() error { return e.err }

// intersect returns the entries that u and o both hold, with the same
// secret: what neither grants is not granted. u's secrets are kept (a
// plaintext entry keeps the SCRAM keys derived from it).
func (u *UserList) intersect(o *UserList) *UserList {
	out := &UserList{users: map[string]*Secret{}}
	for name, s := range u.users {
		if t, ok := o.users[name]; ok && s.equal(t) {
			out.users[name] = s
		}
	}
	return out
}

// equal reports whether two secrets are the same password in the same
// form.
func (s *Secret) equal(o *Secret) bool {
	switch {
	case s.Plain != "" || o.Plain != "":
		return s.Plain == o.Plain
	case s.MD5 != "" || o.MD5 != "":
		return s.MD5 == o.MD5
	case s.SCRAM != nil && o.SCRAM != nil:
		return s.SCRAM.Salt == o.SCRAM.Salt && s.SCRAM.Iters == o.SCRAM.Iters &&
			bytes.Equal(s.SCRAM.StoredKey, o.SCRAM.StoredKey) && bytes.Equal(s.SCRAM.ServerKey, o.SCRAM.ServerKey)
	}
	return false
}

// Users holds the users file in force. It is read again, on use, when the
// file changed (a write in place or a Kubernetes ..data symlink swap), and
// on Reload (SIGHUP). It fails closed:
//
//   - a new version with lines that do not parse is refused: nothing it
//     adds or changes takes effect, and an error names each bad line
//     (file:line). What stays in force is what both the version in force
//     and the new one grant: the entries the new version keeps, unchanged,
//     on lines that parse. A user it removes, or whose line it breaks or
//     changes, can no longer log in;
//   - a file that is deleted or cannot be read means no users until it is
//     back, logged as an error;
//   - at start (NewUsers), a file that is missing or does not parse is an
//     error.
//
// Each failure is logged once per version of the file.
type Users struct {
	path   string
	logger *zap.Logger
	r      *filestamp.Reloader[*UserList]

	mu      sync.Mutex // serialises updates of inForce with the reads of the file
	inForce *UserList
}

// UsersOption adjusts NewUsers.
type UsersOption func(*Users)

// WithUsersLogger sets where reloads of the users file are reported.
func WithUsersLogger(l *zap.Logger) UsersOption { return func(u *Users) { u.logger = l } }

// NewUsers loads a users file; an empty path yields an empty list.
func NewUsers(path string, opts ...UsersOption) (*Users, error) {
	u := &Users{path: path, logger: zap.NewNop()}
	for _, o := range opts {
		o(u)
	}
	load := func() (*UserList, error) {
		if path == "" {
			return &UserList{users: map[string]*Secret{}}, nil
		}
		return LoadUserList(path)
	}
	r, err := filestamp.NewReloader(load, path)
	if err != nil {
		return nil, err
	}
	u.r, u.inForce = r, r.Current()
	return u, nil
}

// Reload re-reads the users file (SIGHUP). A version that cannot be used
// is handled as on use (see Users) and its error returned.
func (u *Users) Reload() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if err := u.r.Reload(); err != nil {
		u.failedLocked(err)
		return err
	}
	u.inForce = u.r.Current()
	return nil
}

// Path is the users file's path.
func (u *Users) Path() string { return u.path }

// Current returns the list in force, read again first if the file changed.
func (u *Users) Current() *UserList {
	u.mu.Lock()
	defer u.mu.Unlock()
	ul, reloaded, err := u.r.Get()
	switch {
	case err != nil:
		u.failedLocked(err)
	case reloaded:
		u.inForce = ul
		u.logger.Info("users file changed and was reloaded", zap.String("file", u.path), zap.Int("users", ul.Len()))
	}
	return u.inForce
}

// failedLocked applies a version of the file that cannot be used: one with
// lines that do not parse leaves what both versions grant; one that cannot
// be read leaves no users.
func (u *Users) failedLocked(err error) {
	var bad *userListError
	if errors.As(err, &bad) {
		before := u.inForce.Len()
		u.inForce = u.inForce.intersect(bad.valid)
		u.logger.Error("the users file has lines that do not parse: nothing this version adds or changes takes effect, and the users it removes or breaks can no longer log in (fix clients.users_file)",
			zap.String("file", u.path), zap.Int("users", u.inForce.Len()), zap.Int("users_before", before), zap.Error(err))
		return
	}
	u.inForce = &UserList{users: map[string]*Secret{}}
	u.logger.Error("the users file cannot be read: no user can log in with a password until it is back (clients.users_file)",
		zap.String("file", u.path), zap.Error(err))
}

func quotedField(s string) (field, rest string, err error) {
	if !strings.HasPrefix(s, `"`) {
		return "", "", errors.New(`expected a double-quoted field`)
	}
	var b strings.Builder
	for i := 1; i < len(s); i++ {
		if s[i] == '"' {
			if i+1 < len(s) && s[i+1] == '"' {
				b.WriteByte('"')
				i++
				continue
			}
			return b.String(), s[i+1:], nil
		}
		b.WriteByte(s[i])
	}
	return "", "", errors.New("unterminated double-quoted field")
}

func parseSecret(p string) (*Secret, error) {
	switch {
	case strings.HasPrefix(p, "SCRAM-SHA-256$"):
		creds, err := parseSCRAMVerifier(p)
		if err != nil {
			return nil, err
		}
		return &Secret{SCRAM: creds}, nil
	case len(p) == 35 && strings.HasPrefix(p, "md5") && isHex(p[3:]):
		return &Secret{MD5: strings.ToLower(p[3:])}, nil
	case p == "":
		return nil, errors.New("empty password")
	default:
		return &Secret{Plain: p}, nil
	}
}

// parseSCRAMVerifier parses Postgres' stored form
// SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, base64 parts.
func parseSCRAMVerifier(v string) (*scram.StoredCredentials, error) {
	bad := errors.New("malformed SCRAM-SHA-256 verifier (want SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)")
	parts := strings.Split(strings.TrimPrefix(v, "SCRAM-SHA-256$"), "$")
	if len(parts) != 2 {
		return nil, bad
	}
	iterSalt := strings.SplitN(parts[0], ":", 2)
	keys := strings.SplitN(parts[1], ":", 2)
	if len(iterSalt) != 2 || len(keys) != 2 {
		return nil, bad
	}
	iters, err := strconv.Atoi(iterSalt[0])
	if err != nil || iters <= 0 {
		return nil, bad
	}
	salt, err1 := base64.StdEncoding.DecodeString(iterSalt[1])
	stored, err2 := base64.StdEncoding.DecodeString(keys[0])
	server, err3 := base64.StdEncoding.DecodeString(keys[1])
	if err1 != nil || err2 != nil || err3 != nil || len(stored) != 32 || len(server) != 32 {
		return nil, bad
	}
	return &scram.StoredCredentials{
		KeyFactors: scram.KeyFactors{Salt: string(salt), Iters: iters},
		StoredKey:  stored,
		ServerKey:  server,
	}, nil
}

func isHex(s string) bool {
	_, err := hex.DecodeString(s)
	return err == nil
}
