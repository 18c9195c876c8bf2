package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"

	"go.uber.org/zap"
)

// clientTLS is what the TLS handshake with a client established.
type clientTLS struct {
	state tls.ConnectionState
	// leaf is the certificate the governor presented, which
	// SCRAM-SHA-256-PLUS binds to.
	leaf *x509.Certificate
}

// handshakeError is a failed TLS handshake with a client: nothing can be
// sent to it any more, in plaintext or not.
type handshakeError struct{ err error }

func (e *handshakeError) Error() string {
	return "TLS handshake with the client failed: " + e.err.Error()
}
func (e *handshakeError) Unwrap() error { return e.err }

// startTLS answers an SSLRequest with 'S' and runs the handshake with the
// current certificates (clients.tls). From then on the session reads and
// writes through TLS. The caller has checked that the client sent nothing
// after its SSLRequest (CVE-2021-23222).
func (sess *session) startTLS(ctx context.Context) (*clientTLS, error) {
	sc := sess.srv.opts.TLS.Get()
	if _, err := sess.conn.Write([]byte{'S'}); err != nil {
		return nil, err
	}
	tc := tls.Server(sess.conn, sc.TLS)
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, &handshakeError{err: err}
	}
	sess.conn = tc
	sess.rd.Reset(tc)
	sess.cw.Reset(tc)
	ct := &clientTLS{state: tc.ConnectionState(), leaf: sc.Leaf}
	fields := []zap.Field{zap.String("tls", tls.VersionName(ct.state.Version))}
	if len(ct.state.PeerCertificates) > 0 {
		fields = append(fields, zap.String("client_cert_cn", ct.state.PeerCertificates[0].Subject.CommonName))
	}
	sess.log = sess.log.With(fields...)
	return ct, nil
}

// clientIP is the client's IP address for login throttling, "" for a Unix
// socket.
func clientIP(c net.Conn) string {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.IP.String()
	}
	return ""
}
