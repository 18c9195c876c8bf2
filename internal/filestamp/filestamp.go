// Package filestamp notices, cheaply, when files that pggovernor reads on use
// (certificates, keys, the upstream password file, the users file) have
// changed, so they can be re-read without a restart and without a watcher
// goroutine.
//
// A file's stamp is taken with os.Stat, which follows symbolic links: when
// Kubernetes updates a mounted secret by pointing the ..data symlink at a new
// directory, the path resolves to a different file (another inode) and the
// stamp changes, although nothing was written at the path itself. A write in
// place changes the modification time and usually the size.
package filestamp

import (
	"os"
	"sync"
	"syscall"
	"time"
)

// Stamp identifies one version of a file.
type Stamp struct {
	dev, ino uint64
	size     int64
	mtime    time.Time
	ctime    int64
}

// Of stamps the file a path resolves to.
func Of(path string) (Stamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return Stamp{}, err
	}
	s := Stamp{size: fi.Size(), mtime: fi.ModTime()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.dev, s.ino = uint64(st.Dev), st.Ino //nolint:unconvert // Dev is int on some platforms
		s.ctime = st.Ctim.Nano()
	}
	return s, nil
}

// Equal reports whether two stamps are of the same version of a file.
func (s Stamp) Equal(o Stamp) bool {
	return s.dev == o.dev && s.ino == o.ino && s.size == o.size && s.mtime.Equal(o.mtime) && s.ctime == o.ctime
}

// Reloader holds a value built from files and builds it again, on use, when
// any of the files has changed. It starts no goroutine. Its methods are safe
// for concurrent use.
type Reloader[T any] struct {
	paths []string
	load  func() (T, error)

	mu     sync.Mutex
	val    T
	stamps []Stamp // of the files the value was built from
	failed []Stamp // of the files a reload last failed on; nil when none did
}

// NewReloader builds the value once with load, which reads paths; its error
// is returned as is. Paths that are "" are ignored.
func NewReloader[T any](load func() (T, error), paths ...string) (*Reloader[T], error) {
	r := &Reloader[T]{load: load}
	for _, p := range paths {
		if p != "" {
			r.paths = append(r.paths, p)
		}
	}
	stamps, _ := r.stampAll()
	v, err := load()
	if err != nil {
		return nil, err
	}
	r.val, r.stamps = v, stamps
	return r, nil
}

// stampAll stamps every file; a file that cannot be stamped gets the zero
// stamp, which differs from any real one.
func (r *Reloader[T]) stampAll() ([]Stamp, error) {
	out := make([]Stamp, len(r.paths))
	var first error
	for i, p := range r.paths {
		s, err := Of(p)
		if err != nil && first == nil {
			first = err
		}
		out[i] = s
	}
	return out, first
}

func equalAll(a, b []Stamp) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(b[i]) {
			return false
		}
	}
	return true
}

// Get returns the current value. When a file changed since the value was
// built, it is built again first: reloaded reports that it was; err reports
// that building it failed, and the previous value is returned. A failed
// version of the files is tried once: until one of them changes again, Get
// returns the previous value without error, so that the failure is reported
// once.
func (r *Reloader[T]) Get() (val T, reloaded bool, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.paths) == 0 {
		return r.val, false, nil
	}
	stamps, statErr := r.stampAll()
	if equalAll(stamps, r.stamps) || (r.failed != nil && equalAll(stamps, r.failed)) {
		return r.val, false, nil
	}
	if statErr != nil {
		r.failed = stamps
		return r.val, false, statErr
	}
	// The stamps are taken before reading: a change during the read is
	// seen at the next Get.
	v, err := r.load()
	if err != nil {
		r.failed = stamps
		return r.val, false, err
	}
	r.val, r.stamps, r.failed = v, stamps, nil
	return v, true, nil
}

// Current returns the value in force without checking the files.
func (r *Reloader[T]) Current() T {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.val
}

// Reload builds the value again whether or not the files changed (SIGHUP).
// On error the previous value stays.
func (r *Reloader[T]) Reload() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	stamps, _ := r.stampAll()
	v, err := r.load()
	if err != nil {
		r.failed = stamps
		return err
	}
	r.val, r.stamps, r.failed = v, stamps, nil
	return nil
}
