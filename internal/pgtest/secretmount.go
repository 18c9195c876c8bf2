package pgtest

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
)

// SecretMount is a directory laid out the way the kubelet mounts a Secret
// volume: each key is a symlink <dir>/<key> → ..data/<key>, ..data is a
// symlink to a timestamped directory holding the files, and an update writes
// a new timestamped directory and renames a fresh symlink over ..data
// (kubelet's AtomicWriter), so that every key changes at once and nothing is
// ever written at the paths the application opens.
type SecretMount struct {
	// Dir is the mount point.
	Dir string
	// Mode is the files' permission bits (the volume's defaultMode); 0600
	// when zero.
	Mode os.FileMode
	gen  int
	cur  string
}

// NewSecretMount creates the layout in dir (which must exist) with files.
func NewSecretMount(dir string, files map[string][]byte) (*SecretMount, error) {
	m := &SecretMount{Dir: dir}
	return m, m.Update(files)
}

// Path is the path an application reads for key.
func (m *SecretMount) Path(key string) string { return filepath.Join(m.Dir, key) }

// Update replaces the whole content of the mount with files, atomically.
func (m *SecretMount) Update(files map[string][]byte) error {
	mode := m.Mode
	if mode == 0 {
		mode = 0o600
	}
	m.gen++
	gen := filepath.Join(m.Dir, fmt.Sprintf("..2006_01_02_15_04_05.%09d", m.gen))
	if err := os.Mkdir(gen, 0o755); err != nil {
		return err
	}
	keys := make([]string, 0, len(files))
	for k := range files {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		p := filepath.Join(gen, k)
		if err := os.WriteFile(p, files[k], mode); err != nil {
			return err
		}
		if err := os.Chmod(p, mode); err != nil { // not subject to the umask
			return err
		}
	}
	tmp := filepath.Join(m.Dir, "..data_tmp")
	_ = os.Remove(tmp)
	if err := os.Symlink(filepath.Base(gen), tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(m.Dir, "..data")); err != nil {
		return err
	}
	for _, k := range keys {
		link := filepath.Join(m.Dir, k)
		if _, err := os.Lstat(link); err == nil {
			continue
		}
		if err := os.Symlink(filepath.Join("..data", k), link); err != nil {
			return err
		}
	}
	if m.cur != "" {
		if err := os.RemoveAll(m.cur); err != nil {
			return err
		}
	}
	m.cur = gen
	return nil
}
