package auth

import (
	"context"
	"crypto/hmac"
	"crypto/md5" //nolint:gosec // Postgres md5 auth method
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/xdg-go/scram"
)

// ErrAuthFailed is returned (wrapped) when a client's credentials do not
// match, whatever the reason: a wrong password and an unknown user look the
// same to the client.
var ErrAuthFailed = errors.New("password authentication failed")

// ErrCertAuthFailed is returned (wrapped) when the cert method refuses a
// client: no verified client certificate, or its CN is not the user name.
var ErrCertAuthFailed = errors.New("certificate authentication failed")

// ProtocolError is returned when a client breaks the authentication
// exchange (wrong message type, malformed SASL message).
type ProtocolError struct{ Msg string }

func (e *ProtocolError) Error() string { return e.Msg }

// Conn is the message exchange the verifier drives, provided by the proxy.
type Conn interface {
	// Send encodes msg and flushes it to the client.
	Send(msg pgproto3.BackendMessage) error
	// ReceivePassword reads the client's next message, which must be a
	// PasswordMessage/SASL response ('p'), and returns its body.
	ReceivePassword(ctx context.Context) ([]byte, error)
}

// Login is what the verifier knows of a client that asks to log in.
type Login struct {
	// User is the user name of the StartupMessage.
	User string
	// Addr is the client's IP address, "" for a Unix socket. Failed logins
	// are throttled per address and user (LocalAddr for the Unix socket).
	Addr string
	// TLS is the client connection's TLS state, nil in plaintext.
	TLS *tls.ConnectionState
	// ServerCert is the certificate pggovernor presented in that TLS
	// handshake: SCRAM-SHA-256-PLUS binds to it (tls-server-end-point).
	ServerCert *x509.Certificate
	// Database is the database the client asks for (the user name when
	// its StartupMessage names none), which hba rules match.
	Database string
}

// Verifier authenticates clients: with one method for everyone
// (clients.auth), or, with hba rules (clients.hba_file), with the method of
// the first line that matches the login. Its methods are safe for
// concurrent use.
type Verifier struct {
	method             string
	hba                *HBA // nil without clients.hba_file
	users              *Users
	throttle           *Throttle
	passwordEncryption string
	mockKey            []byte
}

// Values of WithPasswordEncryption, as Postgres' password_encryption.
const (
	PasswordEncryptionSCRAM = "scram-sha-256"
	PasswordEncryptionMD5   = "md5"
)

// VerifierOption adjusts NewVerifier.
type VerifierOption func(*Verifier)

// WithThrottle delays the answers to repeated failed logins of one user
// from one address.
func WithThrottle(t *Throttle) VerifierOption { return func(v *Verifier) { v.throttle = t } }

// WithPasswordEncryption says how Postgres would store the users'
// passwords (its password_encryption: PasswordEncryptionSCRAM, the
// default, or PasswordEncryptionMD5), which decides, for the md5 method,
// the exchange of unknown users and plaintext entries.
func WithPasswordEncryption(enc string) VerifierOption {
	return func(v *Verifier) { v.passwordEncryption = enc }
}

// WithHBA makes the hba rules decide each login's method instead of the
// verifier's one method: the first line that matches the connection type,
// address, database and user; no line, or a reject line, refuses the login
// before any exchange.
func WithHBA(h *HBA) VerifierOption { return func(v *Verifier) { v.hba = h } }

// NewVerifier returns a verifier for method (scram-sha-256, md5, cert or
// trust; with WithHBA the rules' methods are used instead).
func NewVerifier(method string, users *Users, opts ...VerifierOption) *Verifier {
	v := &Verifier{method: method, users: users, passwordEncryption: PasswordEncryptionSCRAM, mockKey: randomBytes(32)}
	for _, o := range opts {
		o(v)
	}
	return v
}

// Result is what a successful login established.
type Result struct {
	// User is the authenticated user name.
	User string
	// Secret is the user's users-file entry (nil when it has none), used
	// to authenticate upstream in the multi-role model.
	Secret *Secret
	// ChannelBinding reports that the client logged in with
	// SCRAM-SHA-256-PLUS.
	ChannelBinding bool
	// Rule is the hba line that decided the method (file:line), "" without
	// hba rules. It is set on failures too, for the log.
	Rule string
}

// RefusedError is a login refused with the SQLSTATE and message Postgres
// sends in the same case, shown to the client as is: no hba line matched,
// a reject line matched, a line requires a client certificate the client
// did not present, or trust with clientcert=verify-full and another CN.
type RefusedError struct {
	// Code is the SQLSTATE, Message the client's error message.
	Code, Message string
	// Rules reports a refusal by the hba rules themselves (no line, or a
	// reject line), before any exchange.
	Rules bool
	// Err, when set, is what the refusal counts as (ErrCertAuthFailed for
	// a certificate that does not name the user).
	Err error
}

func (e *RefusedError) Error() string { return e.Message }
func (e *RefusedError) Unwrap() error { return e.Err }

// SQLSTATE of Postgres' refusals (invalid_authorization_specification).
const codeInvalidAuthorization = "28000"

// rejected is Postgres' refusal by pg_hba.conf (auth.c, ClientAuthentication):
// no line matched, or a reject line did.
func rejected(login Login, explicit bool) *RefusedError {
	host := login.Addr
	if host == "" {
		host = "[local]" // what getnameinfo says of a Unix socket
	}
	enc := "no encryption"
	if login.TLS != nil {
		enc = "SSL encryption"
	}
	format := "no pg_hba.conf entry for host \"%s\", user \"%s\", database \"%s\", %s"
	if explicit {
		format = "pg_hba.conf rejects connection for host \"%s\", user \"%s\", database \"%s\", %s"
	}
	return &RefusedError{Code: codeInvalidAuthorization, Rules: true, Message: fmt.Sprintf(format, host, login.User, login.Database, enc)}
}

// rule is how one login is authenticated: a method and the client
// certificate it requires.
type rule struct {
	method     string
	clientCert int
	name       string // file:line of the hba line, "" without hba rules
}

// Authenticate runs the method's exchange for the login and returns nil
// once the client has proved who it is, having sent nothing final: the
// caller sends AuthenticationOk. Failures wrap ErrAuthFailed or
// ErrCertAuthFailed, or are a *RefusedError (hba rules, client
// certificates) or a *ProtocolError. A failure of a user who failed too
// often from the client's address is answered late (a *DelayedError
// wrapping it, returned after the throttle's delay or when ctx ends); a
// success never waits. With hba rules the rules are consulted first: their
// refusals are not throttled and do not count as failures (they reveal
// nothing about passwords).
func (v *Verifier) Authenticate(ctx context.Context, c Conn, login Login) (Result, error) {
	r := rule{method: v.method}
	if v.hba != nil {
		line := v.hba.Current().Match(login)
		switch {
		case line == nil:
			return Result{}, rejected(login, false)
		case line.Method == HBAReject:
			return Result{Rule: line.String()}, rejected(login, true)
		}
		r = rule{method: line.Method, clientCert: line.clientCert, name: line.String()}
	}
	res, err := v.authenticate(ctx, c, login, r)
	res.Rule = r.name
	if errors.Is(err, ErrAuthFailed) || errors.Is(err, ErrCertAuthFailed) {
		if delay, n := v.throttle.Failed(login.Addr, login.User); delay > 0 {
			v.throttle.Hold(ctx, delay)
			err = &DelayedError{Err: err, Delay: delay, Failures: n}
		}
	}
	return res, err
}

// md5Exchange decides, for the md5 method, whether the client gets an md5
// exchange (AuthenticationMD5Password) or SCRAM, as Postgres does
// (auth.c, CheckPWChallengeAuth): md5 only for a password stored as md5.
// A SCRAM verifier cannot check an md5 response, so its user gets SCRAM;
// an unknown user gets what a user whose password is stored as
// password_encryption says would get, so that the exchange offered does
// not tell which users exist; a plaintext entry counts as a password
// stored that way too (Postgres stores none in plaintext).
func (v *Verifier) md5Exchange(secret *Secret, known bool) bool {
	switch {
	case known && secret.MD5 != "":
		return true
	case known && secret.SCRAM != nil:
		return false
	}
	return v.passwordEncryption == PasswordEncryptionMD5
}

func (v *Verifier) authenticate(ctx context.Context, c Conn, login Login, r rule) (Result, error) {
	user := login.User
	if r.clientCert != clientCertOff && !hasVerifiedCert(login) {
		// Postgres checks this before the method (auth.c).
		return Result{}, &RefusedError{Code: codeInvalidAuthorization, Message: "connection requires a valid client certificate"}
	}
	secret, known := v.users.Current().Lookup(user)
	var res Result
	var err error
	switch r.method {
	case HBATrust:
		res = Result{User: user, Secret: secret}
	case HBACert:
		return v.cert(login, secret)
	case HBAMD5:
		if v.md5Exchange(secret, known) {
			res, err = v.md5(ctx, c, user, secret, known)
		} else {
			res, err = v.scram(ctx, c, login, secret, known)
		}
	case HBASCRAM:
		res, err = v.scram(ctx, c, login, secret, known)
	case HBAPassword:
		res, err = v.password(ctx, c, user, secret, known)
	default:
		return Result{}, fmt.Errorf("client authentication method %q is not supported", r.method)
	}
	if err != nil || r.clientCert != clientCertFull {
		return res, err
	}
	// clientcert=verify-full with another method: the certificate's CN
	// must be the user too; a mismatch fails as the method fails.
	if cn := login.TLS.PeerCertificates[0].Subject.CommonName; subtle.ConstantTimeCompare([]byte(cn), []byte(user)) != 1 {
		if r.method == HBATrust {
			return Result{}, &RefusedError{Code: codeInvalidAuthorization, Err: ErrCertAuthFailed,
				Message: fmt.Sprintf("authentication failed for user %q: host rejected", user)}
		}
		return Result{}, fmt.Errorf("%w for user %q: the client certificate's CN is %q (clientcert=verify-full)", ErrAuthFailed, user, cn)
	}
	return res, nil
}

// hasVerifiedCert reports that the client presented a certificate that the
// TLS handshake verified against clients.tls.client_ca_file.
func hasVerifiedCert(login Login) bool {
	return login.TLS != nil && len(login.TLS.VerifiedChains) > 0 && len(login.TLS.PeerCertificates) > 0
}

// cert is Postgres' cert method: the client presented a certificate that
// the TLS handshake verified against clients.tls.client_ca_file, and its
// Common Name is the user name.
func (v *Verifier) cert(login Login, secret *Secret) (Result, error) {
	if !hasVerifiedCert(login) {
		return Result{}, fmt.Errorf("%w for user %q: the connection has no verified client certificate", ErrCertAuthFailed, login.User)
	}
	cn := login.TLS.PeerCertificates[0].Subject.CommonName
	if subtle.ConstantTimeCompare([]byte(cn), []byte(login.User)) != 1 {
		return Result{}, fmt.Errorf("%w for user %q: the client certificate's CN is %q", ErrCertAuthFailed, login.User, cn)
	}
	return Result{User: login.User, Secret: secret}, nil
}

func (v *Verifier) md5(ctx context.Context, c Conn, user string, secret *Secret, known bool) (Result, error) {
	var salt [4]byte
	copy(salt[:], randomBytes(4))
	if err := c.Send(&pgproto3.AuthenticationMD5Password{Salt: salt}); err != nil {
		return Result{}, err
	}
	body, err := c.ReceivePassword(ctx)
	if err != nil {
		return Result{}, err
	}
	var pm pgproto3.PasswordMessage
	if err := pm.Decode(body); err != nil {
		return Result{}, &ProtocolError{Msg: "malformed password message"}
	}
	inner := ""
	if known {
		inner = secret.md5Hash(user)
	}
	if inner == "" { // unknown user: compare against a value nobody can send
		inner = hex.EncodeToString(randomBytes(16))
	}
	outer := md5.Sum(append([]byte(inner), salt[:]...)) //nolint:gosec // Postgres md5 method
	want := "md5" + hex.EncodeToString(outer[:])
	if subtle.ConstantTimeCompare([]byte(want), []byte(pm.Password)) != 1 || !known {
		return Result{}, fmt.Errorf("%w for user %q", ErrAuthFailed, user)
	}
	return Result{User: user, Secret: secret}, nil
}

// password is Postgres' password method: the client sends its password in
// cleartext (AuthenticationCleartextPassword), checked against the users
// file entry in whatever form it is stored.
func (v *Verifier) password(ctx context.Context, c Conn, user string, secret *Secret, known bool) (Result, error) {
	if err := c.Send(&pgproto3.AuthenticationCleartextPassword{}); err != nil {
		return Result{}, err
	}
	body, err := c.ReceivePassword(ctx)
	if err != nil {
		return Result{}, err
	}
	var pm pgproto3.PasswordMessage
	if err := pm.Decode(body); err != nil {
		return Result{}, &ProtocolError{Msg: "malformed password message"}
	}
	ok := false
	switch {
	case !known || pm.Password == "":
		// An unknown user costs what a SCRAM verifier costs, so that the
		// time taken does not tell which users exist.
		mock := v.mockCredentials(user)
		_ = scramKeysMatch(pm.Password, &mock)
	case secret.Plain != "":
		ok = subtle.ConstantTimeCompare([]byte(secret.Plain), []byte(pm.Password)) == 1
	case secret.MD5 != "":
		sum := md5.Sum([]byte(pm.Password + user)) //nolint:gosec // Postgres md5 verifier
		ok = subtle.ConstantTimeCompare([]byte(secret.MD5), []byte(hex.EncodeToString(sum[:]))) == 1
	case secret.SCRAM != nil:
		ok = scramKeysMatch(pm.Password, secret.SCRAM)
	}
	if !ok {
		return Result{}, fmt.Errorf("%w for user %q", ErrAuthFailed, user)
	}
	return Result{User: user, Secret: secret}, nil
}

// scramKeysMatch reports whether password yields the stored SCRAM keys,
// as Postgres' scram_verify_plain_password (SASLprep, or the raw password
// when SASLprep refuses it).
func scramKeysMatch(password string, stored *scram.StoredCredentials) bool {
	client, err := scram.SHA256.NewClient("", password, "")
	if err != nil {
		client, _ = scram.SHA256.NewClientUnprepped("", password, "")
	}
	got := client.GetStoredCredentials(stored.KeyFactors)
	return subtle.ConstantTimeCompare(got.StoredKey, stored.StoredKey)&subtle.ConstantTimeCompare(got.ServerKey, stored.ServerKey) == 1
}

// mockCredentials gives an unknown user (or an md5-only secret) a stable
// fake salt, as Postgres does, so a probe cannot tell it apart from a real
// user with a wrong password.
func (v *Verifier) mockCredentials(user string) scram.StoredCredentials {
	mac := hmac.New(sha256.New, v.mockKey)
	mac.Write([]byte(user))
	sum := mac.Sum(nil)
	return scram.StoredCredentials{
		KeyFactors: scram.KeyFactors{Salt: string(sum[:16]), Iters: 4096},
		StoredKey:  randomBytes(32),
		ServerKey:  randomBytes(32),
	}
}

// SASL mechanism names (RFC 7677, RFC 5802 §4).
const (
	mechSCRAM     = "SCRAM-SHA-256"
	mechSCRAMPlus = "SCRAM-SHA-256-PLUS"
)

// channelBinding returns the tls-server-end-point binding of the
// certificate pggovernor presented, as Postgres binds (RFC 5929: the hash
// of the certificate with the hash of its signature algorithm, SHA-256 for
// MD5 and SHA-1). ok is false in plaintext or when the certificate's
// algorithm has no defined binding; SCRAM-SHA-256-PLUS is not offered then.
func channelBinding(login Login) (scram.ChannelBinding, bool) {
	if login.TLS == nil || login.ServerCert == nil {
		return scram.ChannelBinding{}, false
	}
	// The library hashes the first "peer" certificate; seen from the
	// client, that is the server's own certificate.
	cb, err := scram.NewTLSServerEndpointBinding(&tls.ConnectionState{PeerCertificates: []*x509.Certificate{login.ServerCert}})
	if err != nil {
		return scram.ChannelBinding{}, false
	}
	return cb, true
}

func (v *Verifier) scram(ctx context.Context, c Conn, login Login, secret *Secret, known bool) (Result, error) {
	user := login.User
	creds, ok := scram.StoredCredentials{}, false
	if known {
		creds, ok = secret.scramCredentials()
	}
	if !ok {
		creds = v.mockCredentials(user)
	}
	server, err := scram.SHA256.NewServer(func(string) (scram.StoredCredentials, error) {
		// Postgres ignores the SCRAM user name; the startup user counts.
		return creds, nil
	})
	if err != nil {
		return Result{}, err
	}
	mechanisms := []string{mechSCRAM}
	conv := server.NewConversation()
	cb, plus := channelBinding(login)
	if plus {
		// As Postgres: over TLS, -PLUS first.
		mechanisms = []string{mechSCRAMPlus, mechSCRAM}
		conv = server.NewConversationWithChannelBinding(cb)
	}
	if err := c.Send(&pgproto3.AuthenticationSASL{AuthMechanisms: mechanisms}); err != nil {
		return Result{}, err
	}
	body, err := c.ReceivePassword(ctx)
	if err != nil {
		return Result{}, err
	}
	var initial pgproto3.SASLInitialResponse
	if err := initial.Decode(body); err != nil {
		return Result{}, &ProtocolError{Msg: "malformed SASLInitialResponse"}
	}
	switch {
	case initial.AuthMechanism == mechSCRAMPlus && !plus:
		return Result{}, &ProtocolError{Msg: "client selected SCRAM-SHA-256-PLUS, which is offered only over TLS"}
	case initial.AuthMechanism != mechSCRAM && initial.AuthMechanism != mechSCRAMPlus:
		return Result{}, &ProtocolError{Msg: fmt.Sprintf("client selected an invalid SASL authentication mechanism %q", initial.AuthMechanism)}
	}
	// The GS2 header's first letter says whether the client binds to the
	// channel ("p=…"); it must agree with the mechanism, as Postgres checks.
	bound := len(initial.Data) > 0 && initial.Data[0] == 'p'
	switch {
	case initial.AuthMechanism == mechSCRAMPlus && !bound:
		return Result{}, &ProtocolError{Msg: "malformed SCRAM message: the client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data"}
	case initial.AuthMechanism == mechSCRAM && bound:
		return Result{}, &ProtocolError{Msg: "malformed SCRAM message: the client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data"}
	case plus && len(initial.Data) > 0 && initial.Data[0] == 'y':
		return Result{}, &ProtocolError{Msg: "SCRAM channel binding negotiation error: the client supports SCRAM channel binding but thinks the server does not; this server does support channel binding"}
	}
	serverFirst, err := conv.Step(string(initial.Data))
	if err != nil {
		return Result{}, &ProtocolError{Msg: "malformed SCRAM message"}
	}
	if err := c.Send(&pgproto3.AuthenticationSASLContinue{Data: []byte(serverFirst)}); err != nil {
		return Result{}, err
	}
	body, err = c.ReceivePassword(ctx)
	if err != nil {
		return Result{}, err
	}
	var resp pgproto3.SASLResponse
	if err := resp.Decode(body); err != nil {
		return Result{}, &ProtocolError{Msg: "malformed SASLResponse"}
	}
	serverFinal, err := conv.Step(string(resp.Data))
	if err != nil || !conv.Valid() || !ok {
		return Result{}, fmt.Errorf("%w for user %q", ErrAuthFailed, user)
	}
	if err := c.Send(&pgproto3.AuthenticationSASLFinal{Data: []byte(serverFinal)}); err != nil {
		return Result{}, err
	}
	return Result{User: user, Secret: secret, ChannelBinding: bound}, nil
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	return b
}
