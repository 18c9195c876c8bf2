package auth

import (
	"context"
	"crypto/hmac"
	"crypto/md5" //nolint:gosec // Postgres md5 auth method
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/xdg-go/scram"
)

// ErrAuthFailed is returned (wrapped) when a client's credentials do not
// match, whatever the reason: a wrong password and an unknown user look the
// same to the client.
var ErrAuthFailed = errors.New("password authentication failed")

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

// Users holds the current users file and swaps it atomically on reload.
type Users struct {
	path string
	list atomic.Pointer[UserList]
}

// NewUsers loads a users file; an empty path yields an empty list.
func NewUsers(path string) (*Users, error) {
	u := &Users{path: path}
	if err := u.Reload(); err != nil {
		return nil, err
	}
	return u, nil
}

// Reload re-reads the users file. On error the previous list stays.
func (u *Users) Reload() error {
	if u.path == "" {
		u.list.Store(&UserList{users: map[string]*Secret{}})
		return nil
	}
	ul, err := LoadUserList(u.path)
	if err != nil {
		return err
	}
	u.list.Store(ul)
	return nil
}

// Path is the users file's path.
func (u *Users) Path() string { return u.path }

// Current returns the list in force.
func (u *Users) Current() *UserList { return u.list.Load() }

// Verifier authenticates clients with one method.
type Verifier struct {
	method  string
	users   *Users
	mockKey []byte
}

// NewVerifier returns a verifier for method (scram-sha-256, md5 or trust).
func NewVerifier(method string, users *Users) *Verifier {
	return &Verifier{method: method, users: users, mockKey: randomBytes(32)}
}

// Result is what a successful login established.
type Result struct {
	// User is the authenticated user name.
	User string
	// Secret is the user's users-file entry (nil for trust without one),
	// used to authenticate upstream in the multi-role model.
	Secret *Secret
}

// Authenticate runs the method's exchange for user and returns nil once the
// client has proved who it is, having sent nothing final: the caller sends
// AuthenticationOk. Failures wrap ErrAuthFailed or are a *ProtocolError.
func (v *Verifier) Authenticate(ctx context.Context, c Conn, user string) (Result, error) {
	secret, known := v.users.Current().Lookup(user)
	switch v.method {
	case "trust":
		return Result{User: user, Secret: secret}, nil
	case "md5":
		if known && secret.SCRAM != nil {
			// As PgBouncer does: a SCRAM verifier cannot check an md5
			// response, so such users log in with SCRAM instead.
			return v.scram(ctx, c, user, secret, known)
		}
		return v.md5(ctx, c, user, secret, known)
	case "scram-sha-256":
		return v.scram(ctx, c, user, secret, known)
	}
	return Result{}, fmt.Errorf("client authentication method %q is not supported", v.method)
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

func (v *Verifier) scram(ctx context.Context, c Conn, user string, secret *Secret, known bool) (Result, error) {
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
	conv := server.NewConversation()
	if err := c.Send(&pgproto3.AuthenticationSASL{AuthMechanisms: []string{"SCRAM-SHA-256"}}); err != nil {
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
	if initial.AuthMechanism != "SCRAM-SHA-256" {
		return Result{}, &ProtocolError{Msg: fmt.Sprintf("client selected an invalid SASL authentication mechanism %q", initial.AuthMechanism)}
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
	return Result{User: user, Secret: secret}, nil
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	return b
}
