package filestamp

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestReloader: a value is rebuilt on use after a write in place and after
// a symlink swap; a failed rebuild keeps the previous value and is reported
// once per version of the files.
func TestReloader(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("v1", "one")
	write("v2", "two")
	link := filepath.Join(dir, "current")
	if err := os.Symlink("v1", link); err != nil {
		t.Fatal(err)
	}
	loads := 0
	r, err := NewReloader(func() (string, error) {
		loads++
		b, err := os.ReadFile(link)
		if string(b) == "bad" {
			return "", errors.New("bad content")
		}
		return string(b), err
	}, link, "")
	if err != nil {
		t.Fatal(err)
	}
	get := func(want string, wantReloaded, wantErr bool) {
		t.Helper()
		v, reloaded, err := r.Get()
		if v != want || reloaded != wantReloaded || (err != nil) != wantErr {
			t.Fatalf("want = %q (reloaded %v, error %v), got = %q (reloaded %v, %v)", want, wantReloaded, wantErr, v, reloaded, err)
		}
	}
	get("one", false, false)
	if loads != 1 {
		t.Fatalf("unchanged file: want = 1 load, got = %d", loads)
	}
	// Swap the symlink, as the kubelet swaps ..data.
	tmp := filepath.Join(dir, "tmp")
	if err := os.Symlink("v2", tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, link); err != nil {
		t.Fatal(err)
	}
	get("two", true, false)
	get("two", false, false)
	// A write in place.
	write("v2", "three")
	get("three", true, false)
	// A bad version: reported once, the previous value kept.
	write("v2", "bad")
	get("three", false, true)
	get("three", false, false)
	write("v2", "four!")
	get("four!", true, false)
	// A removed file: reported once.
	if err := os.Remove(filepath.Join(dir, "v2")); err != nil {
		t.Fatal(err)
	}
	get("four!", false, true)
	get("four!", false, false)
	if err := r.Reload(); err == nil {
		t.Fatal("forced reload of a missing file: want = an error, got = nil")
	}
	if got := r.Current(); got != "four!" {
		t.Fatalf("after a failed forced reload: want = the previous value, got = %q", got)
	}
}

// TestReloaderOf: a value whose files are named by a file it reads is
// rebuilt when any of them changes, a file the last build did not read no
// longer counts, and a failure is reported once per version.
func TestReloaderOf(t *testing.T) {
	dir := t.TempDir()
	path := func(name string) string { return filepath.Join(dir, name) }
	write := func(name, content string) {
		t.Helper()
		// A new inode each time: seen whatever the clock's resolution.
		if err := os.WriteFile(path(name)+".tmp", []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(path(name)+".tmp", path(name)); err != nil {
			t.Fatal(err)
		}
	}
	write("main", "a")
	write("a", "one")
	write("b", "two")
	load := func() (string, []Read, error) {
		reads := []Read{StampRead(path("main"))}
		inc, err := os.ReadFile(path("main"))
		if err != nil {
			return "", reads, err
		}
		reads = append(reads, StampRead(path(string(inc))))
		b, err := os.ReadFile(path(string(inc)))
		return string(b), reads, err
	}
	r, err := NewReloaderOf(load)
	if err != nil {
		t.Fatal(err)
	}
	get := func(want string, wantReloaded, wantErr bool) {
		t.Helper()
		v, reloaded, err := r.Get()
		if v != want || reloaded != wantReloaded || (err != nil) != wantErr {
			t.Fatalf("want = %q (reloaded %v, error %v), got = %q (reloaded %v, %v)", want, wantReloaded, wantErr, v, reloaded, err)
		}
	}
	get("one", false, false)
	write("a", "uno")
	get("uno", true, false) // the included file changed
	write("main", "b")
	get("two", true, false)
	write("a", "ignored")
	get("two", false, false) // a is no longer read
	write("main", "missing")
	get("two", false, true)
	get("two", false, false) // reported once
	write("missing", "three")
	get("three", true, false) // the file the failed build lacked appeared
}
