package auth

import (
	"fmt"
	"os"
	"syscall"
)

// CheckSecretMode reports a file holding secrets (the users file, a
// password file, a key) that others may read: an error saying who and what
// to change, nil when only its owner may (or when it cannot be stamped:
// reading it says why). The rule is libpq's for private keys: readable by
// every user is exposed; readable by the file's group is exposed unless
// root owns the file (0640 root:group, as Kubernetes mounts a secret with
// fsGroup, is accepted). setting names the configuration key.
func CheckSecretMode(setting, path string) error {
	fi, err := os.Stat(path)
	if err != nil || !fi.Mode().IsRegular() {
		return nil
	}
	perm := fi.Mode().Perm()
	rootOwned := false
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		rootOwned = st.Uid == 0
	}
	var who string
	switch {
	case perm&0o004 != 0:
		who = "every user"
	case perm&0o040 != 0 && !rootOwned:
		who = "its group"
	default:
		return nil
	}
	return fmt.Errorf("%s %s is readable by %s (mode %04o): make it readable by pggovernor's user only (chmod 0600; in Kubernetes, the secret volume's defaultMode 0400, or 0440 with fsGroup)",
		setting, path, who, perm)
}
