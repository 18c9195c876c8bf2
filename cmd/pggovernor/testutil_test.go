package main

import (
	"crypto/md5" //nolint:gosec // Postgres md5 auth method in tests
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/xdg-go/scram"
	"go.uber.org/zap"
)

func md5hex(s string) string {
	sum := md5.Sum([]byte(s)) //nolint:gosec // Postgres md5 method
	return hex.EncodeToString(sum[:])
}

// scramVerifierFor builds a Postgres-format SCRAM-SHA-256 verifier.
func scramVerifierFor(t testing.TB, password string) string {
	t.Helper()
	salt := make([]byte, 16)
	_, _ = rand.Read(salt)
	client, err := scram.SHA256.NewClient("", password, "")
	if err != nil {
		t.Fatal(err)
	}
	creds := client.GetStoredCredentials(scram.KeyFactors{Salt: string(salt), Iters: 4096})
	return fmt.Sprintf("SCRAM-SHA-256$%d:%s$%s:%s", 4096, base64.StdEncoding.EncodeToString(salt),
		base64.StdEncoding.EncodeToString(creds.StoredKey), base64.StdEncoding.EncodeToString(creds.ServerKey))
}

// scramLogin answers the server's SCRAM-SHA-256 exchange with pgproto3.
func scramLogin(fe *pgproto3.Frontend, user, password string) error {
	msg, err := fe.Receive()
	if err != nil {
		return err
	}
	if _, ok := msg.(*pgproto3.AuthenticationSASL); !ok {
		return fmt.Errorf("want AuthenticationSASL, got %T", msg)
	}
	client, err := scram.SHA256.NewClient(user, password, "")
	if err != nil {
		return err
	}
	conv := client.NewConversation()
	first, err := conv.Step("")
	if err != nil {
		return err
	}
	fe.Send(&pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-256", Data: []byte(first)})
	if err := fe.Flush(); err != nil {
		return err
	}
	msg, err = fe.Receive()
	if err != nil {
		return err
	}
	cont, ok := msg.(*pgproto3.AuthenticationSASLContinue)
	if !ok {
		return fmt.Errorf("want AuthenticationSASLContinue, got %T %+v", msg, msg)
	}
	final, err := conv.Step(string(cont.Data))
	if err != nil {
		return err
	}
	fe.Send(&pgproto3.SASLResponse{Data: []byte(final)})
	if err := fe.Flush(); err != nil {
		return err
	}
	msg, err = fe.Receive()
	if err != nil {
		return err
	}
	fin, ok := msg.(*pgproto3.AuthenticationSASLFinal)
	if !ok {
		return fmt.Errorf("want AuthenticationSASLFinal, got %T %+v", msg, msg)
	}
	if _, err := conv.Step(string(fin.Data)); err != nil {
		return err
	}
	return nil
}

func zapLevel() zap.AtomicLevel { return zap.NewAtomicLevelAt(zap.DebugLevel) }

func zapInt(key string, v int64) zap.Field { return zap.Int64(key, v) }
