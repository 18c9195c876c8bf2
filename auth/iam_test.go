package auth

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	rdsauth "github.com/aws/aws-sdk-go-v2/feature/rds/auth"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// fakeClock is a Clock that moves only when told.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// Static test credentials (AWS's documented example keys).
var testCreds = aws.Credentials{AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SecretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", Source: "test"}

// countingCreds returns testCreds, or err when set, and counts calls.
type countingCreds struct {
	calls atomic.Int64
	mu    sync.Mutex
	err   error
}

func (c *countingCreds) Retrieve(context.Context) (aws.Credentials, error) {
	c.calls.Add(1)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return aws.Credentials{}, c.err
	}
	return testCreds, nil
}

func (c *countingCreds) setErr(err error) {
	c.mu.Lock()
	c.err = err
	c.mu.Unlock()
}

func newTestIAM(t *testing.T, creds aws.CredentialsProvider, region string) (*IAMTokenSource, *fakeClock, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	clock := newFakeClock()
	src := NewIAMTokenSource(IAMOptions{
		Endpoint:    "db.example.us-east-1.rds.amazonaws.com:5432",
		Region:      region,
		User:        "coder",
		Credentials: creds,
		Clock:       clock,
		Logger:      zap.New(core),
	})
	return src, clock, logs
}

var wantToken = pgtest.IAMTokenWant{Host: "db.example.us-east-1.rds.amazonaws.com", Port: 5432, User: "coder", Region: "us-east-1", Credentials: testCreds}

// TestVerifyIAMTokenMatchesBuildAuthToken shows that the test's
// recomputation of a token is BuildAuthToken's: a token BuildAuthToken
// made verifies, and one changed in any part does not.
func TestVerifyIAMTokenMatchesBuildAuthToken(t *testing.T) {
	before := time.Now().UTC().Truncate(time.Second)
	tok, err := rdsauth.BuildAuthToken(context.Background(), "db.example.us-east-1.rds.amazonaws.com:5432", "us-east-1", "coder",
		aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) { return testCreds, nil }))
	if err != nil {
		t.Fatal(err)
	}
	signedAt, err := pgtest.VerifyIAMToken(tok, wantToken)
	if err != nil {
		t.Fatalf("BuildAuthToken's own token: want = verified, got = %v", err)
	}
	if signedAt.Before(before) || signedAt.After(time.Now().Add(time.Second)) {
		t.Fatalf("X-Amz-Date: want = now, got = %s", signedAt)
	}
	for name, mutate := range map[string]func(pgtest.IAMTokenWant) pgtest.IAMTokenWant{
		"other user":   func(w pgtest.IAMTokenWant) pgtest.IAMTokenWant { w.User = "admin"; return w },
		"other region": func(w pgtest.IAMTokenWant) pgtest.IAMTokenWant { w.Region = "eu-west-1"; return w },
		"other port":   func(w pgtest.IAMTokenWant) pgtest.IAMTokenWant { w.Port = 5433; return w },
		"other secret": func(w pgtest.IAMTokenWant) pgtest.IAMTokenWant {
			w.Credentials.SecretAccessKey = "x" + w.Credentials.SecretAccessKey
			return w
		},
	} {
		if _, err := pgtest.VerifyIAMToken(tok, mutate(wantToken)); err == nil {
			t.Errorf("%s: want = refused, got = verified", name)
		}
	}
	i := strings.Index(tok, "X-Amz-Signature=") + len("X-Amz-Signature=")
	tampered := tok[:i] + "0" + tok[i+1:]
	if tampered == tok {
		tampered = tok[:i] + "1" + tok[i+1:]
	}
	if _, err := pgtest.VerifyIAMToken(tampered, wantToken); err == nil {
		t.Error("tampered signature: want = refused, got = verified")
	}
}

// TestIAMTokenCache: the first use mints a token that verifies as
// BuildAuthToken's for the endpoint, user and region; it is reused until it
// is IAMTokenRefresh old and replaced then, before its 15 minutes run out.
func TestIAMTokenCache(t *testing.T) {
	creds := &countingCreds{}
	src, clock, logs := newTestIAM(t, creds, "us-east-1")
	ctx := context.Background()
	tok, err := src.Password(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pgtest.VerifyIAMToken(tok, wantToken); err != nil {
		t.Fatalf("minted token: %v", err)
	}
	clock.Advance(IAMTokenRefresh - time.Second)
	tok2, err := src.Password(ctx)
	if err != nil || tok2 != tok {
		t.Fatalf("before %s: want = the cached token, got = a new one (%v)", IAMTokenRefresh, err)
	}
	if got := creds.calls.Load(); got != 1 {
		t.Fatalf("credential lookups before refresh: want = 1, got = %d", got)
	}
	clock.Advance(time.Second)
	if _, err := src.Password(ctx); err != nil {
		t.Fatal(err)
	}
	if got := src.Stats().Minted; got != 2 {
		t.Fatalf("mints once the token is %s old: want = 2, got = %d", IAMTokenRefresh, got)
	}
	if IAMTokenRefresh >= IAMTokenLifetime-time.Minute {
		t.Fatalf("refresh at %s leaves too little of the %s lifetime", IAMTokenRefresh, IAMTokenLifetime)
	}
	for _, e := range logs.All() {
		for _, f := range e.Context {
			if strings.Contains(e.Message+f.String, "X-Amz-Signature") {
				t.Fatalf("a token reached the log: %s", e.Message)
			}
		}
	}
}

// TestIAMTokenConcurrentCallersShareOneMint: 20 callers at once cause one
// credential lookup.
func TestIAMTokenConcurrentCallersShareOneMint(t *testing.T) {
	creds := &countingCreds{}
	src, _, _ := newTestIAM(t, creds, "us-east-1")
	var wg sync.WaitGroup
	toks := make([]string, 20)
	for i := range toks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			toks[i], _ = src.Password(context.Background())
		}()
	}
	wg.Wait()
	for i, tok := range toks {
		if tok == "" || tok != toks[0] {
			t.Fatalf("caller %d: want = the shared token, got = %q", i, tok)
		}
	}
	if got := creds.calls.Load(); got != 1 {
		t.Fatalf("credential lookups: want = 1, got = %d", got)
	}
}

// TestIAMTokenMintFailures: a failure names its cause (no credentials, no
// region) in the error and the log, is retried after a backoff that
// doubles, and a cached token still valid for more than a minute is used
// meanwhile.
func TestIAMTokenMintFailures(t *testing.T) {
	ctx := context.Background()
	t.Run("no credentials", func(t *testing.T) {
		creds := &countingCreds{}
		creds.setErr(errors.New("failed to refresh cached credentials, no EC2 IMDS role found"))
		src, clock, logs := newTestIAM(t, creds, "us-east-1")
		_, err := src.Password(ctx)
		var me *MintError
		if !errors.As(err, &me) || me.Cause != MintNoCredentials || !me.Retryable() {
			t.Fatalf("want = a retryable MintError with cause %q, got = %v", MintNoCredentials, err)
		}
		for _, want := range []string{"no AWS credentials", "no EC2 IMDS role found", "AWS_WEB_IDENTITY_TOKEN_FILE"} {
			if !strings.Contains(err.Error(), want) {
				t.Fatalf("error: want = mention of %q, got = %v", want, err)
			}
		}
		entries := logs.FilterMessage("minting an RDS IAM token failed").All()
		if len(entries) != 1 || entries[0].ContextMap()["cause"] != MintNoCredentials {
			t.Fatalf("log: want = one line with cause %q, got = %v", MintNoCredentials, entries)
		}
		// Within the backoff, callers get the error without a lookup.
		if _, err := src.Password(ctx); err == nil || creds.calls.Load() != 1 {
			t.Fatalf("within the backoff: want = the same error and 1 lookup, got = %v and %d", err, creds.calls.Load())
		}
		clock.Advance(iamFirstBackoff)
		if _, err := src.Password(ctx); err == nil || creds.calls.Load() != 2 {
			t.Fatalf("after %s: want = a retry (2 lookups), got = %v and %d", iamFirstBackoff, err, creds.calls.Load())
		}
		clock.Advance(iamFirstBackoff) // the backoff doubled: not yet
		if _, _ = src.Password(ctx); creds.calls.Load() != 2 {
			t.Fatalf("backoff: want = doubled to %s, got = a retry after %s", 2*iamFirstBackoff, iamFirstBackoff)
		}
		clock.Advance(iamFirstBackoff)
		creds.setErr(nil)
		tok, err := src.Password(ctx)
		if err != nil {
			t.Fatalf("credentials back: want = a token, got = %v", err)
		}
		if _, err := pgtest.VerifyIAMToken(tok, wantToken); err != nil {
			t.Fatal(err)
		}
		if st := src.Stats(); st.NoCredentials != 2 || st.Minted != 1 {
			t.Fatalf("stats: want = 2 failed for no credentials and 1 minted, got = %+v", st)
		}
		// Old enough to refresh, and the refresh fails: the cached token
		// (5 minutes left) is used.
		clock.Advance(IAMTokenRefresh)
		creds.setErr(errors.New("sts unavailable"))
		tok2, err := src.Password(ctx)
		if err != nil || tok2 != tok {
			t.Fatalf("refresh failing with a valid cached token: want = the cached token, got = %v", err)
		}
		// Past its lifetime less a minute, it is not used any more.
		clock.Advance(IAMTokenLifetime - IAMTokenRefresh - time.Minute)
		if _, err := src.Password(ctx); err == nil {
			t.Fatal("cached token within a minute of expiry: want = the mint error, got = the token")
		}
	})
	t.Run("no region", func(t *testing.T) {
		src, _, logs := newTestIAM(t, &countingCreds{}, "")
		_, err := src.Password(ctx)
		var me *MintError
		if !errors.As(err, &me) || me.Cause != MintNoRegion || me.Retryable() {
			t.Fatalf("want = a final MintError with cause %q, got = %v", MintNoRegion, err)
		}
		if !strings.Contains(err.Error(), "upstream.aws_region") {
			t.Fatalf("error: want = the setting named, got = %v", err)
		}
		if n := logs.FilterField(zap.String("cause", MintNoRegion)).Len(); n != 1 {
			t.Fatalf("log lines naming the cause: want = 1, got = %d", n)
		}
	})
}
