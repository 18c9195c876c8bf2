package auth

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	rdsauth "github.com/aws/aws-sdk-go-v2/feature/rds/auth"
	"go.uber.org/zap"
)

// RDS IAM token timing. A token is valid for 15 minutes from its signing
// (X-Amz-Expires=900, set by BuildAuthToken), and RDS checks it only when a
// connection logs in.
const (
	// IAMTokenLifetime is how long RDS accepts a token.
	IAMTokenLifetime = 15 * time.Minute
	// IAMTokenRefresh is the age at which a cached token is replaced by a
	// new one: well before expiry, so that a token handed out is always
	// valid for 5 more minutes.
	IAMTokenRefresh = 10 * time.Minute
	// iamTokenGrace is how long before expiry a cached token may still be
	// used when minting a new one fails.
	iamTokenGrace = time.Minute
	// Backoff between failed mints: doubling from the first to the max.
	iamFirstBackoff = 100 * time.Millisecond
	iamMaxBackoff   = 5 * time.Second
)

// Causes of a failure to mint an RDS IAM token (MintError.Cause).
const (
	MintNoCredentials = "no credentials"
	MintNoRegion      = "no region"
	MintSigning       = "signing failed"
)

// MintError is a failure to mint an RDS IAM token. It never holds a token
// or a secret key.
type MintError struct {
	// Cause is MintNoCredentials, MintNoRegion or MintSigning.
	Cause string
	// Err is the underlying error, nil for MintNoRegion.
	Err error
}

func (e *MintError) Error() string {
	switch e.Cause {
	case MintNoRegion:
		return "minting an RDS IAM token failed: no AWS region: set upstream.aws_region, or AWS_REGION, or a region in the shared AWS config"
	case MintNoCredentials:
		return fmt.Sprintf("minting an RDS IAM token failed: no AWS credentials: %v (the default chain reads AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE and the shared AWS files, AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN (EKS IRSA), then the ECS task or EC2 instance role)", e.Err)
	}
	return fmt.Sprintf("minting an RDS IAM token failed: %v", e.Err)
}

func (e *MintError) Unwrap() error { return e.Err }

// Retryable reports whether trying again may succeed: credentials can
// appear (a web identity token file mounted late, instance metadata back);
// a missing region cannot.
func (e *MintError) Retryable() bool { return e.Cause != MintNoRegion }

// IAMOptions configure an IAMTokenSource.
type IAMOptions struct {
	// Endpoint is the database's host:port, which the token is signed for.
	Endpoint string
	// Region is the database's AWS region.
	Region string
	// User is the database user the token logs in as.
	User string
	// Credentials supply the AWS keys that sign tokens: in production
	// aws-sdk-go-v2/config's default chain (which caches them).
	Credentials aws.CredentialsProvider
	// Clock is the time source for the cache; nil is the system clock.
	Clock Clock
	// Logger receives mint failures (naming the cause) and successes at
	// debug level; never a token.
	Logger *zap.Logger
}

// IAMTokenSource mints RDS IAM authentication tokens with aws-sdk-go-v2's
// BuildAuthToken and caches them: a token is reused until it is
// IAMTokenRefresh old, then replaced by a new one before a connection uses
// it. Concurrent callers share one mint. A failed mint is returned to the
// caller as a *MintError, logged with its cause, and retried by the next
// caller after a backoff (100ms doubling to 5s); meanwhile callers get the
// same error at once, or the cached token while it has more than a minute
// left. Its methods are safe for concurrent use.
type IAMTokenSource struct {
	opts IAMOptions

	mu       sync.Mutex
	token    string
	minted   time.Time     // by Clock, of token
	inflight chan struct{} // closed when the mint in progress ends; nil when none
	lastErr  error
	retryAt  time.Time
	backoff  time.Duration

	mints, noCreds, noRegion, otherErrs atomic.Uint64
}

// NewIAMTokenSource returns a source; it mints nothing until asked.
func NewIAMTokenSource(o IAMOptions) *IAMTokenSource {
	if o.Clock == nil {
		o.Clock = SystemClock{}
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	return &IAMTokenSource{opts: o}
}

// Password returns a valid token, minting one when the cached token is
// missing or old. It implements PasswordSource.
func (s *IAMTokenSource) Password(ctx context.Context) (string, error) {
	for {
		s.mu.Lock()
		now := s.opts.Clock.Now()
		age := now.Sub(s.minted)
		if s.token != "" && age < IAMTokenRefresh {
			tok := s.token
			s.mu.Unlock()
			return tok, nil
		}
		if ch := s.inflight; ch != nil {
			s.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return "", ctx.Err()
			}
		}
		if s.lastErr != nil && now.Before(s.retryAt) {
			err := s.lastErr
			tok, usable := s.usableLocked(age)
			s.mu.Unlock()
			if usable {
				return tok, nil
			}
			return "", err
		}
		ch := make(chan struct{})
		s.inflight = ch
		s.mu.Unlock()

		tok, err := s.mint(ctx)

		s.mu.Lock()
		s.inflight = nil
		close(ch)
		if err == nil {
			s.token, s.minted = tok, s.opts.Clock.Now()
			s.lastErr, s.backoff = nil, 0
			s.mu.Unlock()
			return tok, nil
		}
		s.backoff = min(max(2*s.backoff, iamFirstBackoff), iamMaxBackoff)
		s.lastErr, s.retryAt = err, s.opts.Clock.Now().Add(s.backoff)
		tok, usable := s.usableLocked(s.opts.Clock.Now().Sub(s.minted))
		retryIn := s.backoff
		s.mu.Unlock()
		s.opts.Logger.Error("minting an RDS IAM token failed", zap.String("cause", causeOf(err)), zap.Error(err),
			zap.Duration("retry_in", retryIn), zap.Bool("using_cached_token", usable))
		if usable {
			return tok, nil
		}
		return "", err
	}
}

// usableLocked returns the cached token if it has more than the grace
// period left.
func (s *IAMTokenSource) usableLocked(age time.Duration) (string, bool) {
	if s.token != "" && age < IAMTokenLifetime-iamTokenGrace {
		return s.token, true
	}
	return "", false
}

func causeOf(err error) string {
	var me *MintError
	if errors.As(err, &me) {
		return me.Cause
	}
	return "error"
}

// mint builds one token.
func (s *IAMTokenSource) mint(ctx context.Context) (string, error) {
	o := s.opts
	if o.Region == "" {
		s.noRegion.Add(1)
		return "", &MintError{Cause: MintNoRegion}
	}
	if o.Credentials == nil {
		s.noCreds.Add(1)
		return "", &MintError{Cause: MintNoCredentials, Err: errors.New("no credentials provider")}
	}
	creds, err := o.Credentials.Retrieve(ctx)
	if err == nil && !creds.HasKeys() {
		err = errors.New("the credentials provider returned no keys")
	}
	if err != nil {
		s.noCreds.Add(1)
		return "", &MintError{Cause: MintNoCredentials, Err: err}
	}
	fixed := aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) { return creds, nil })
	tok, err := rdsauth.BuildAuthToken(ctx, o.Endpoint, o.Region, o.User, fixed)
	if err != nil {
		s.otherErrs.Add(1)
		return "", &MintError{Cause: MintSigning, Err: err}
	}
	s.mints.Add(1)
	o.Logger.Debug("RDS IAM token minted", zap.String("endpoint", o.Endpoint), zap.String("user", o.User),
		zap.String("region", o.Region), zap.Time("expires", s.opts.Clock.Now().Add(IAMTokenLifetime)))
	return tok, nil
}

// IAMStats are the results of minting, kept for metrics.
type IAMStats struct {
	// Minted counts tokens minted.
	Minted uint64
	// NoCredentials, NoRegion and Other count failed mints by cause.
	NoCredentials, NoRegion, Other uint64
	// TokenAge is the age of the cached token, 0 when there is none.
	TokenAge time.Duration
}

// Stats returns the mint results so far.
func (s *IAMTokenSource) Stats() IAMStats {
	st := IAMStats{Minted: s.mints.Load(), NoCredentials: s.noCreds.Load(), NoRegion: s.noRegion.Load(), Other: s.otherErrs.Load()}
	s.mu.Lock()
	if s.token != "" {
		st.TokenAge = s.opts.Clock.Now().Sub(s.minted)
	}
	s.mu.Unlock()
	return st
}
