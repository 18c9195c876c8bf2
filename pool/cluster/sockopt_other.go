//go:build !linux

package cluster

import "time"

// setUserTimeout does nothing where TCP_USER_TIMEOUT does not exist; the
// keepalives still bound how long a silent server goes unnoticed.
func setUserTimeout(uintptr, time.Duration) error { return nil }
