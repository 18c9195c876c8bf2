package auth

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"

	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/internal/filestamp"
)

// PasswordSource supplies the password for a new upstream connection. It
// is called once per connection, so a rotated secret takes effect for the
// next connection without a restart.
type PasswordSource interface {
	Password(ctx context.Context) (string, error)
}

// StaticPassword is a fixed password (from the URL, config or environment).
type StaticPassword string

// Password returns the fixed password.
func (p StaticPassword) Password(context.Context) (string, error) { return string(p), nil }

// PasswordFile supplies the password held in a file (Coder's
// DB_PASSWORD_PATH, a mounted Kubernetes secret). Each call checks the
// file's stamp and reads it again when it changed: Kubernetes updates a
// mounted secret by swapping the ..data symlink, which the stamp follows.
// Surrounding whitespace is trimmed, with one warning naming the file. A
// file that becomes unreadable or empty after the start is logged once and
// the last password read is kept.
type PasswordFile struct {
	SecretFileNames
	path   string
	logger *zap.Logger
	warn   sync.Once
	r      *filestamp.Reloader[string]
}

// SecretFileNames name a secret file in errors and logs.
type SecretFileNames struct {
	// Key is its configuration key, e.g. upstream.password_file.
	Key string
	// Noun names it in logs, e.g. "upstream password file".
	Noun string
	// Use says who uses a new version, e.g. "new server connections use
	// the new password".
	Use string
	// Keep says what happens when it cannot be used, e.g. "new server
	// connections keep the last password read".
	Keep string
}

// UpstreamPasswordFile names upstream.password_file.
var UpstreamPasswordFile = SecretFileNames{Key: "upstream.password_file", Noun: "upstream password file",
	Use: "new server connections use the new password", Keep: "new server connections keep the last password read"}

// NewPasswordFile returns a source reading path. A missing, unreadable or
// empty file is an error naming upstream.password_file.
func NewPasswordFile(path string, logger *zap.Logger) (*PasswordFile, error) {
	return NewSecretFile(UpstreamPasswordFile, path, logger)
}

// NewSecretFile returns a source reading the secret file path, named in
// errors and logs by names. A missing, unreadable or empty file is an error
// naming its key.
func NewSecretFile(names SecretFileNames, path string, logger *zap.Logger) (*PasswordFile, error) {
	if logger == nil {
		logger = zap.NewNop()
	}
	pf := &PasswordFile{SecretFileNames: names, path: path, logger: logger}
	r, err := filestamp.NewReloader(pf.load, path)
	if err != nil {
		return nil, err
	}
	pf.r = r
	return pf, nil
}

func (p *PasswordFile) load() (string, error) {
	pw, trimmed, err := ReadSecretFile(p.Key, p.path)
	if err != nil {
		return "", err
	}
	if trimmed {
		p.warn.Do(func() {
			p.logger.Warn(p.Noun+" has surrounding whitespace or a trailing newline; it was trimmed (write the file without it, e.g. printf '%s' \"$PASSWORD\" > file)",
				zap.String("file", p.path))
		})
	}
	return pw, nil
}

// Password returns the file's password, read again if the file changed.
func (p *PasswordFile) Password(context.Context) (string, error) {
	pw, reloaded, err := p.r.Get()
	switch {
	case err != nil:
		p.logger.Error("the "+p.Noun+" cannot be used; "+p.Keep, zap.Error(err))
	case reloaded:
		p.logger.Info(p.Noun+" changed; "+p.Use, zap.String("file", p.path))
	}
	return pw, nil
}

// ReadPasswordFile reads upstream.password_file: see ReadSecretFile.
func ReadPasswordFile(path string) (pw string, trimmed bool, err error) {
	return ReadSecretFile(UpstreamPasswordFile.Key, path)
}

// ReadSecretFile reads a password or key file and trims surrounding
// whitespace; trimmed says whether there was any. A missing, unreadable or
// empty file is an error naming key.
func ReadSecretFile(key, path string) (pw string, trimmed bool, err error) {
	data, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", false, fmt.Errorf("%s %s does not exist", key, path)
		}
		return "", false, fmt.Errorf("%s %s cannot be read: %w", key, path, errors.Unwrap(err))
	}
	pw = strings.TrimSpace(string(data))
	if pw == "" {
		return "", false, fmt.Errorf("%s %s is empty", key, path)
	}
	return pw, pw != string(data), nil
}
