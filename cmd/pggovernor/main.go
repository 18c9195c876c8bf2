// Command pggovernor is a PostgreSQL wire-protocol proxy that governs
// connections: one budget for all replicas, fair queueing, transaction
// pooling, upstream authentication on the application's behalf, metrics.
//
// Usage:
//
//	pggovernor [run] [flags]   serve clients (the default)
//	pggovernor doctor [flags]  check the configuration against the server
//	pggovernor version         print the version
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	// CA roots compiled in, used only where the system has none (the
	// container image has no /etc/ssl): verify-full upstreams without
	// upstream.ssl.root_cert_file, and AWS STS for RDS IAM tokens.
	_ "golang.org/x/crypto/x509roots/fallback"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := execute(ctx, os.Args[1:], os.Environ(), os.Stdout, os.Stderr)
	stop()
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.Err != nil {
			fmt.Fprintln(os.Stderr, "pggovernor:", ee.Err)
		}
		os.Exit(ee.Code)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "pggovernor:", err)
		os.Exit(1)
	}
}

// exitError carries the process exit code.
type exitError struct {
	Code int
	Err  error
}

func (e *exitError) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("exit %d", e.Code)
	}
	return e.Err.Error()
}

func (e *exitError) Unwrap() error { return e.Err }

// execute runs a subcommand. The first signal is delivered through ctx.
func execute(ctx context.Context, args, environ []string, stdout, stderr io.Writer) error {
	cmd := "run"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "run":
		return runCommand(ctx, args, environ, stdout, stderr)
	case "doctor":
		return doctorCommand(ctx, args, environ, stdout, stderr)
	case "version":
		fmt.Fprintf(stdout, "pggovernor %s\n", version)
		return nil
	case "help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	return &exitError{Code: 2, Err: fmt.Errorf("unknown command %q\n%s", cmd, usage)}
}

const usage = `usage: pggovernor [run|doctor|version] [flags]

  run      serve clients (default)
  doctor   check the configuration against the live server
  version  print the version

Every configuration key is a flag (--upstream.password-file) and an
environment variable (PGGOVERNOR_UPSTREAM_PASSWORD_FILE); precedence is
flags > environment > --config file > defaults. See "pggovernor run --help".
`
