package auth

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// TestPasswordFileKubernetesSwap: the password file is a mounted secret
// updated the way the kubelet does it, by swapping the ..data symlink; each
// new value is picked up at the next use, whitespace is trimmed with one
// warning, and a file that disappears keeps the last password.
func TestPasswordFileKubernetesSwap(t *testing.T) {
	m, err := pgtest.NewSecretMount(t.TempDir(), map[string][]byte{"password": []byte("first-pw\n")})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	pf, err := NewPasswordFile(m.Path("password"), zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	get := func() string {
		t.Helper()
		pw, err := pf.Password(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return pw
	}
	if got := get(); got != "first-pw" {
		t.Fatalf("want = first-pw, got = %q", got)
	}
	for i, next := range []string{"second-pw", " third-pw\n", "fourth-pw"} {
		if err := m.Update(map[string][]byte{"password": []byte(next)}); err != nil {
			t.Fatal(err)
		}
		if got, want := get(), strings.TrimSpace(next); got != want {
			t.Fatalf("after swap %d: want = %q, got = %q", i+1, want, got)
		}
	}
	if n := logs.FilterMessageSnippet("trailing newline").Len(); n != 1 {
		t.Fatalf("whitespace warnings: want = 1 (one-time), got = %d", n)
	}
	if n := logs.FilterMessageSnippet("password file changed").Len(); n != 3 {
		t.Fatalf("change notices: want = 3, got = %d", n)
	}
	// The secret is removed: the last password stays, with one error.
	if err := os.Remove(m.Path("password")); err != nil {
		t.Fatal(err)
	}
	if got := get(); got != "fourth-pw" {
		t.Fatalf("file gone: want = the last password, got = %q", got)
	}
	get()
	if n := logs.FilterMessageSnippet("cannot be used").Len(); n != 1 {
		t.Fatalf("errors for the missing file: want = 1, got = %d", n)
	}
	for _, e := range logs.All() {
		for _, pw := range []string{"first-pw", "second-pw", "third-pw", "fourth-pw"} {
			if strings.Contains(e.Message+fmt.Sprint(e.ContextMap()), pw) {
				t.Fatalf("a password reached the log: %q", e.Message)
			}
		}
	}
}

// TestPasswordFileErrorsAtStart: missing, unreadable or empty stop the
// start with an error naming the setting.
func TestPasswordFileErrorsAtStart(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte(" \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ name, path, want string }{
		{"missing", filepath.Join(dir, "nope"), "does not exist"},
		{"unreadable", dir, "cannot be read"},
		{"empty", empty, "is empty"},
	} {
		_, err := NewPasswordFile(c.path, nil)
		if err == nil || !strings.Contains(err.Error(), "upstream.password_file "+c.path) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: want = an error naming upstream.password_file and saying %q, got = %v", c.name, c.want, err)
		}
	}
}

// TestUsersFileReloadsOnChange: a users file swapped like a Kubernetes
// ConfigMap or Secret is read again at the next lookup.
func TestUsersFileReloadsOnChange(t *testing.T) {
	m, err := pgtest.NewSecretMount(t.TempDir(), map[string][]byte{"userlist.txt": []byte(`"alice" "pw1"` + "\n")})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	u, err := NewUsers(m.Path("userlist.txt"), WithUsersLogger(zap.New(core)))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := u.Current().Lookup("bob"); ok {
		t.Fatal("bob before the update: want = unknown, got = known")
	}
	if err := m.Update(map[string][]byte{"userlist.txt": []byte(`"alice" "pw1"` + "\n" + `"bob" "pw2"` + "\n")}); err != nil {
		t.Fatal(err)
	}
	if s, ok := u.Current().Lookup("bob"); !ok || s.Plain != "pw2" {
		t.Fatal("bob after the swap: want = known, got = unknown")
	}
	if n := logs.FilterMessageSnippet("reloaded").Len(); n != 1 {
		t.Fatalf("reloads logged: want = 1, got = %d", n)
	}
}

// TestUsersFileFailsClosed: a new version with a line that does not parse
// adds and changes nothing, but what it removes or breaks is gone; a
// deleted or unreadable file means no users; each failure is logged once,
// naming the file and line; a good version restores the list; a broken
// file stops the start.
func TestUsersFileFailsClosed(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "userlist.txt")
	write := func(lines ...string) {
		t.Helper()
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	core, logs := observer.New(zapcore.DebugLevel)
	write(`"alice" "pw-a"`, `"bob" "pw-b"`, `"carol" "pw-c"`, `"dave" "pw-d"`)
	u, err := NewUsers(path, WithUsersLogger(zap.New(core)))
	if err != nil {
		t.Fatal(err)
	}
	has := func(want map[string]string) {
		t.Helper()
		ul := u.Current()
		for _, name := range []string{"alice", "bob", "carol", "dave", "erin"} {
			s, ok := ul.Lookup(name)
			pw, wantOK := want[name]
			if ok != wantOK || (ok && s.Plain != pw) {
				t.Fatalf("%s: want = known %v %q, got = known %v %v", name, wantOK, pw, ok, s)
			}
		}
		if ul.Len() != len(want) {
			t.Fatalf("users: want = %d, got = %d", len(want), ul.Len())
		}
	}
	has(map[string]string{"alice": "pw-a", "bob": "pw-b", "carol": "pw-c", "dave": "pw-d"})

	// One edit removes bob, changes carol's password, breaks dave's line,
	// adds erin, and has a line that does not parse: only alice is left.
	write(`"alice" "pw-a"`, `"carol" "pw-c2"`, `"dave" "unterminated`, `"erin" "pw-e"`, `"broken`)
	has(map[string]string{"alice": "pw-a"})
	has(map[string]string{"alice": "pw-a"}) // reported once
	bad := logs.FilterMessageSnippet("do not parse")
	if bad.Len() != 1 || !strings.Contains(fmt.Sprint(bad.All()[0].ContextMap()["error"]), path+":3:") ||
		!strings.Contains(fmt.Sprint(bad.All()[0].ContextMap()["error"]), path+":5:") {
		t.Fatalf("want = one error naming %s:3 and %s:5, got = %v", path, path, bad.All())
	}
	if err := u.Reload(); err == nil || !strings.Contains(err.Error(), path+":3:") {
		t.Fatalf("SIGHUP on the broken version: want = its error, got = %v", err)
	}
	has(map[string]string{"alice": "pw-a"})

	// A good version is taken as it is.
	write(`"alice" "pw-a"`, `"bob" "pw-b"`, `"erin" "pw-e"`)
	has(map[string]string{"alice": "pw-a", "bob": "pw-b", "erin": "pw-e"})

	// Deleted: no users, until it is back.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	has(map[string]string{})
	has(map[string]string{})
	if n := logs.FilterMessageSnippet("cannot be read").Len(); n != 1 {
		t.Fatalf("errors for the deleted file: want = 1, got = %d", n)
	}
	// A broken version after that grants nothing either.
	write(`"alice" "pw-a"`, `"broken`)
	has(map[string]string{})
	write(`"alice" "pw-a"`)
	has(map[string]string{"alice": "pw-a"})

	// Unreadable: no users.
	if os.Geteuid() != 0 { // root reads anything
		if err := os.Chmod(path, 0); err != nil {
			t.Fatal(err)
		}
		has(map[string]string{})
		if err := os.Chmod(path, 0o600); err != nil {
			t.Fatal(err)
		}
	}

	// At start, a broken file is an error naming its line.
	write(`"alice" "pw-a"`, `"broken`)
	if _, err := NewUsers(path); err == nil || !strings.Contains(err.Error(), path+":2:") {
		t.Fatalf("start with a broken file: want = an error naming %s:2, got = %v", path, err)
	}
}
