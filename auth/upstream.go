package auth

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"

	"go.uber.org/zap"
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

// PasswordFile reads the password from a file for every new connection:
// Kubernetes updates a mounted secret by swapping a ..data symlink, and
// reading the path again follows the swap. Surrounding whitespace is
// trimmed, with one warning naming the file.
type PasswordFile struct {
	path   string
	logger *zap.Logger
	warn   sync.Once
}

// NewPasswordFile returns a source reading path, and checks it once now so
// a missing, unreadable or empty file stops the start.
func NewPasswordFile(path string, logger *zap.Logger) (*PasswordFile, error) {
	pf := &PasswordFile{path: path, logger: logger}
	if _, err := pf.Password(context.Background()); err != nil {
		return nil, err
	}
	return pf, nil
}

// Password reads and trims the file.
func (p *PasswordFile) Password(context.Context) (string, error) {
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
