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

// Read is one file a value was built from, with its stamp taken before it
// was read: the zero Stamp when it could not be stamped (a missing file).
type Read struct {
	Path  string
	Stamp Stamp
}

// StampRead stamps path for a loader that reports what it read
// (NewReloaderOf); call it just before reading the file.
func StampRead(path string) Read {
	s, _ := Of(path)
	return Read{Path: path, Stamp: s}
}

// Reloader holds a value built from files and builds it again, on use, when
// any of the files has changed. It starts no goroutine. Its methods are safe
// for concurrent use.
type Reloader[T any] struct {
	load func() (T, []Read, error)

	mu     sync.Mutex
	val    T
	files  []Read // the files val was built from
	failed []Read // the files a reload last failed on; nil when none did
}

// NewReloader builds the value once with load, which reads paths; its error
// is returned as is. Paths that are "" are ignored.
func NewReloader[T any](load func() (T, error), paths ...string) (*Reloader[T], error) {
	var ps []string
	for _, p := range paths {
		if p != "" {
			ps = append(ps, p)
		}
	}
	return NewReloaderOf(func() (T, []Read, error) {
		// The stamps are taken before reading: a change during the read
		// is seen at the next Get.
		reads := make([]Read, len(ps))
		for i, p := range ps {
			reads[i] = StampRead(p)
		}
		v, err := load()
		return v, reads, err
	})
}

// NewReloaderOf builds the value once with load, which reports the files it
// read, each stamped with StampRead before it was read, also when it fails.
// It suits a value whose files are known only once it is read (a file that
// includes others): the value is built again when any file of the last
// build changed. Its error is returned as is.
func NewReloaderOf[T any](load func() (T, []Read, error)) (*Reloader[T], error) {
	r := &Reloader[T]{load: load}
	v, files, err := load()
	if err != nil {
		return nil, err
	}
	r.val, r.files = v, files
	return r, nil
}

// restamp stamps the files of reads again; err is the first file that could
// not be stamped, which gets the zero stamp (different from any real one).
func restamp(reads []Read) ([]Read, error) {
	out := make([]Read, len(reads))
	var first error
	for i, rd := range reads {
		s, err := Of(rd.Path)
		if err != nil && first == nil {
			first = err
		}
		out[i] = Read{Path: rd.Path, Stamp: s}
	}
	return out, first
}

func equalAll(a, b []Read) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Path != b[i].Path || !a[i].Stamp.Equal(b[i].Stamp) {
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
	if len(r.files) == 0 {
		return r.val, false, nil
	}
	now, statErr := restamp(r.files)
	if equalAll(now, r.files) {
		return r.val, false, nil
	}
	if r.failed != nil {
		if again, _ := restamp(r.failed); equalAll(again, r.failed) {
			return r.val, false, nil
		}
	}
	if statErr != nil {
		r.failed = now
		return r.val, false, statErr
	}
	v, files, err := r.load()
	if err != nil {
		r.failed = orNow(files, now)
		return r.val, false, err
	}
	r.val, r.files, r.failed = v, files, nil
	return v, true, nil
}

// orNow is what a failed build read, or when it reported nothing, the
// stamps of the previous files: never an empty list, which would make the
// failed version look unchanged forever.
func orNow(files, now []Read) []Read {
	if len(files) == 0 {
		return now
	}
	return files
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
	v, files, err := r.load()
	if err != nil {
		now, _ := restamp(r.files)
		r.failed = orNow(files, now)
		return err
	}
	r.val, r.files, r.failed = v, files, nil
	return nil
}
