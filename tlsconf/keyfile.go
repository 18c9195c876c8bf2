package tlsconf

import (
	"fmt"
	"os"
	"syscall"
)

// CheckKeyFile refuses a private key file that libpq would refuse
// (fe-secure-openssl.c): one that is not a regular file; one owned by the
// current user and accessible to group or others (more than u=rw, 0600);
// one owned by root with more than u=rw,g=r (0640). setting names the
// configuration key, for the message.
func CheckKeyFile(setting, path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("%s %s: %w", setting, path, unwrapPathError(err))
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s %s is not a regular file", setting, path)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	perm := fi.Mode().Perm()
	if (int(st.Uid) == os.Geteuid() && perm&0o077 != 0) || (st.Uid == 0 && perm&0o037 != 0) {
		return fmt.Errorf("%s %s has group or world access (%04o): it must have permissions u=rw (0600) or less if owned by the current user, or u=rw,g=r (0640) or less if owned by root, as libpq requires; run chmod 0600 on it (in Kubernetes, set the secret volume's defaultMode to 0600, or 0640 with fsGroup)",
			setting, path, perm)
	}
	return nil
}

// unwrapPathError drops the path from an *os.PathError, which the caller
// already names.
func unwrapPathError(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}
