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
	path   string
	logger *zap.Logger
	warn   sync.Once
	r      *filestamp.Reloader[string]
}

// NewPasswordFile returns a source reading path. A missing, unreadable or
// empty file is an error naming upstream.password_file.
func NewPasswordFile(path string, logger *zap.Logger) (*PasswordFile, error) {
	if logger == nil {
		logger = zap.NewNop()
	}
	pf := &PasswordFile{path: path, logger: logger}
	r, err := filestamp.NewReloader(pf.load, path)
	if err != nil {
		return nil, err
	}
	pf.r = r
	return pf, nil
}

func (p *PasswordFile) load() (string, error) {
	pw, trimmed, err := ReadPasswordFile(p.path)
	if err != nil {
		return "", err
	}
	if trimmed {
		p.warn.Do(func() {
			p.logger.Warn("upstream password file has surrounding whitespace or a trailing newline; it was trimmed (write the file without it, e.g. printf '%s' \"$PASSWORD\" > file)",
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
		p.logger.Error("the upstream password file cannot be used; new server connections keep the last password read", zap.Error(err))
	case reloaded:
		p.logger.Info("upstream password file changed; new server connections use the new password", zap.String("file", p.path))
	}
	return pw, nil
}

// ReadPasswordFile reads a password file and trims surrounding whitespace;
// trimmed says whether there was any. A missing, unreadable or empty file is
// an error naming the key upstream.password_file.
func ReadPasswordFile(path string) (pw string, trimmed bool, err error) {
	data, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", false, fmt.Errorf("upstream.password_file %s does not exist", path)
		}
		return "", false, fmt.Errorf("upstream.password_file %s cannot be read: %w", path, errors.Unwrap(err))
	}
	pw = strings.TrimSpace(string(data))
	if pw == "" {
		return "", false, fmt.Errorf("upstream.password_file %s is empty", path)
	}
	return pw, pw != string(data), nil
}
