// Package tlsconf builds *tls.Config for both ends of pggovernor: the
// client side (TLS termination, optional client-certificate verification)
// and the upstream side (libpq sslmode semantics, mTLS), and reloads
// certificates when their files change.
package tlsconf
