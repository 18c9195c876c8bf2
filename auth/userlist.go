// Package auth verifies clients and supplies upstream credentials.
//
// Client side: SCRAM-SHA-256 (and SCRAM-SHA-256-PLUS over TLS), md5 and
// trust against a users file in PgBouncer's userlist.txt format, which is
// read again when it changes; cert (the client certificate's CN is the
// user); failed-login throttling per source address.
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

// LoadUserList reads a users file.
func LoadUserList(path string) (*UserList, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening users file: %w", err)
	}
	defer f.Close()
	ul, err := ParseUserList(f)
	if err != nil {
		return nil, fmt.Errorf("users file %s: %w", path, err)
	}
	return ul, nil
}

// ParseUserList parses PgBouncer's userlist.txt format: each line holds two
// double-quoted fields, user and password ("" inside a field is a quote);
// further fields are ignored, and lines that do not start with a quote are
// comments. The password is plaintext, "md5" + 32 hex digits, or
// "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>".
func ParseUserList(r io.Reader) (*UserList, error) {
	ul := &UserList{users: map[string]*Secret{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), 1<<20)
	lineNo := 0
	for sc.Scan() {
		lineNo++
		line := strings.TrimSpace(sc.Text())
		if !strings.HasPrefix(line, `"`) {
			continue
		}
		user, rest, err := quotedField(line)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", lineNo, err)
		}
		rest = strings.TrimLeft(rest, " \t")
		password, _, err := quotedField(rest)
		if err != nil {
			return nil, fmt.Errorf("line %d: user %q: %w", lineNo, user, err)
		}
		secret, err := parseSecret(password)
		if err != nil {
			return nil, fmt.Errorf("line %d: user %q: %w", lineNo, user, err)
		}
		ul.users[user] = secret
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return ul, nil
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
