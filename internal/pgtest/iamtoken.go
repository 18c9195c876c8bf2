package pgtest

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
)

// IAMTokenWant is what an RDS IAM token must be signed for.
type IAMTokenWant struct {
	// Host and Port are the database endpoint.
	Host string
	Port int
	// User is the database user (DBUser).
	User string
	// Region is the AWS region in the credential scope.
	Region string
	// Credentials are the static keys the token must be signed with.
	Credentials aws.Credentials
}

// VerifyIAMToken checks that token is an RDS IAM authentication token, a
// SigV4 presigned URL "host:port/?Action=connect&DBUser=…&X-Amz-…", for the
// wanted endpoint, user and region, valid for 900 seconds, and that its
// signature is right: it signs the same request again with aws-sdk-go-v2's
// own SigV4 signer, with the same credentials at the token's X-Amz-Date, as
// feature/rds/auth.BuildAuthToken does, and compares the result with the
// token. It returns the time the token was signed at.
func VerifyIAMToken(token string, want IAMTokenWant) (time.Time, error) {
	endpoint := net.JoinHostPort(want.Host, strconv.Itoa(want.Port))
	if strings.Contains(token, "://") {
		return time.Time{}, fmt.Errorf("token has a scheme; BuildAuthToken strips it")
	}
	u, err := url.Parse("https://" + token)
	if err != nil {
		return time.Time{}, fmt.Errorf("token is not a URL: %w", err)
	}
	q := u.Query()
	signedAt, err := time.Parse("20060102T150405Z", q.Get("X-Amz-Date"))
	if err != nil {
		return time.Time{}, fmt.Errorf("X-Amz-Date %q: %w", q.Get("X-Amz-Date"), err)
	}
	scope := fmt.Sprintf("%s/%s/%s/rds-db/aws4_request", want.Credentials.AccessKeyID, signedAt.Format("20060102"), want.Region)
	for _, c := range [][3]string{
		{"host", u.Host, endpoint},
		{"Action", q.Get("Action"), "connect"},
		{"DBUser", q.Get("DBUser"), want.User},
		{"X-Amz-Algorithm", q.Get("X-Amz-Algorithm"), "AWS4-HMAC-SHA256"},
		{"X-Amz-Credential", q.Get("X-Amz-Credential"), scope},
		{"X-Amz-Expires", q.Get("X-Amz-Expires"), "900"},
		{"X-Amz-SignedHeaders", q.Get("X-Amz-SignedHeaders"), "host"},
	} {
		if c[1] != c[2] {
			return signedAt, fmt.Errorf("%s: want = %q, got = %q", c[0], c[2], c[1])
		}
	}
	// The request BuildAuthToken presigns, built the same way.
	req, err := http.NewRequest(http.MethodGet, "https://"+endpoint, nil)
	if err != nil {
		return signedAt, err
	}
	values := req.URL.Query()
	values.Set("Action", "connect")
	values.Set("DBUser", want.User)
	req.URL.RawQuery = values.Encode()
	values = req.URL.Query()
	values.Set("X-Amz-Expires", "900")
	req.URL.RawQuery = values.Encode()
	const emptyPayloadHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" // sha256("")
	signed, _, err := v4.NewSigner().PresignHTTP(context.Background(), want.Credentials, req, emptyPayloadHash, "rds-db", want.Region, signedAt)
	if err != nil {
		return signedAt, err
	}
	if expected := strings.TrimPrefix(signed, "https://"); expected != token {
		return signedAt, fmt.Errorf("signature does not verify: want = %s, got = %s", expected, token)
	}
	return signedAt, nil
}
