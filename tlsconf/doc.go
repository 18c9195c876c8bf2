// Package tlsconf builds *tls.Config for both ends of pggovernor and
// reloads certificates when their files change:
//
//   - Server: the client-facing side, TLS termination with an optional
//     client-certificate check against a CA (clients.tls.*).
//   - Upstream: the server-facing side, libpq's sslmode semantics (as
//     pgconn implements them), root CA, client certificate and key (mTLS),
//     server name override (upstream.ssl.*).
//
// Files are not watched by a goroutine: each new connection (or handshake)
// checks their stamps (internal/filestamp), which follows a Kubernetes
// ..data symlink swap, and rebuilds the configuration when one changed.
// Connections already established keep the configuration they were made
// with. A rebuild that fails (a certificate that does not match its key
// because only one of them was written yet, say) keeps the previous
// configuration and is logged once.
//
// Private keys are checked as libpq checks them: a key file readable by
// group or others is refused.
package tlsconf
