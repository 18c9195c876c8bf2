package tlsconf

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/pggovernor/pggovernor/internal/filestamp"
)

// Client-side TLS modes (clients.tls.mode).
const (
	ModeDisable      = "disable"
	ModeAllow        = "allow"
	ModeRequire      = "require"
	ModeVerifyClient = "verify-client"
)

// ServerOptions configure the client-facing TLS termination.
type ServerOptions struct {
	// Mode is allow (TLS offered, plaintext accepted), require (plaintext
	// refused) or verify-client (TLS with a client certificate signed by
	// ClientCAFile).
	Mode string
	// CertFile and KeyFile are the PEM certificate (chain) and private key
	// presented to clients.
	CertFile, KeyFile string
	// ClientCAFile is a PEM file of CAs trusted to sign client
	// certificates. In allow and require modes a certificate a client
	// offers is verified against it; in verify-client mode one is required.
	ClientCAFile string
	// Logger receives reload messages.
	Logger *zap.Logger
}

// ServerConfig is the configuration for one client handshake.
type ServerConfig struct {
	// TLS is shared between handshakes: do not modify it.
	TLS *tls.Config
	// Leaf is the certificate presented to the client: the input of
	// SCRAM-SHA-256-PLUS's tls-server-end-point channel binding.
	Leaf *x509.Certificate
}

// Server builds the client-facing TLS configuration and rebuilds it when its
// files change. Its methods are safe for concurrent use.
type Server struct {
	opts     ServerOptions
	r        *filestamp.Reloader[*ServerConfig]
	reloads  atomic.Uint64
	failures atomic.Uint64
}

// NewServer loads the certificate, key and client CAs; an error names the
// setting to change.
func NewServer(o ServerOptions) (*Server, error) {
	switch o.Mode {
	case ModeAllow, ModeRequire, ModeVerifyClient:
	default:
		return nil, fmt.Errorf("clients.tls.mode %q: TLS termination needs allow, require or verify-client", o.Mode)
	}
	if o.Mode == ModeVerifyClient && o.ClientCAFile == "" {
		return nil, errors.New("clients.tls.client_ca_file: required when clients.tls.mode is verify-client")
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	s := &Server{opts: o}
	r, err := filestamp.NewReloader(s.load, o.CertFile, o.KeyFile, o.ClientCAFile)
	if err != nil {
		return nil, err
	}
	s.r = r
	return s, nil
}

func (s *Server) load() (*ServerConfig, error) {
	o := s.opts
	if err := CheckKeyFile("clients.tls.key_file", o.KeyFile); err != nil {
		return nil, err
	}
	cert, err := tls.LoadX509KeyPair(o.CertFile, o.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("clients.tls.cert_file %s and clients.tls.key_file %s: %w", o.CertFile, o.KeyFile, unwrapPathError(err))
	}
	leaf := cert.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("clients.tls.cert_file %s: %w", o.CertFile, err)
		}
	}
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS12, // Postgres' ssl_min_protocol_version default
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.NoClientCert,
	}
	if o.ClientCAFile != "" {
		pem, err := os.ReadFile(o.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("clients.tls.client_ca_file %s: %w", o.ClientCAFile, unwrapPathError(err))
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("clients.tls.client_ca_file %s holds no PEM certificate", o.ClientCAFile)
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.VerifyClientCertIfGiven
		if o.Mode == ModeVerifyClient {
			cfg.ClientAuth = tls.RequireAndVerifyClientCert
		}
	}
	return &ServerConfig{TLS: cfg, Leaf: leaf}, nil
}

// Mode is the configured mode.
func (s *Server) Mode() string { return s.opts.Mode }

// Required reports whether plaintext clients are refused.
func (s *Server) Required() bool { return s.opts.Mode != ModeAllow }

// Get returns the configuration for a new handshake, rebuilt first when a
// file changed. A failed rebuild is logged once and the previous
// configuration is used.
func (s *Server) Get() *ServerConfig {
	cur, reloaded, err := s.r.Get()
	switch {
	case err != nil:
		s.failures.Add(1)
		s.opts.Logger.Error("reloading the client-facing TLS files (clients.tls.*) failed; new clients get the previous certificate", zap.Error(err))
	case reloaded:
		s.reloads.Add(1)
		s.opts.Logger.Info("client-facing TLS files changed: certificate reloaded",
			zap.String("cert_file", s.opts.CertFile), zap.Time("not_after", cur.Leaf.NotAfter))
	}
	return cur
}

// ServerStats are the client-facing TLS numbers kept for metrics.
type ServerStats struct {
	// CertNotAfter is the end of validity of the certificate presented to
	// new clients.
	CertNotAfter time.Time
	// Reloads counts rebuilds after a file changed; ReloadFailures counts
	// rebuilds that failed (the previous configuration stayed).
	Reloads, ReloadFailures uint64
}

// Stats returns the numbers, after checking the files.
func (s *Server) Stats() ServerStats {
	cur := s.Get()
	return ServerStats{CertNotAfter: cur.Leaf.NotAfter, Reloads: s.reloads.Load(), ReloadFailures: s.failures.Load()}
}
