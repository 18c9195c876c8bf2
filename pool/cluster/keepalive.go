package cluster

import (
	"net"
	"strconv"
	"syscall"
	"time"
)

// keepaliveTimes derives TCP keepalive settings from the member timeout:
// a peer gone silent is dropped after idle + count × interval, which is at
// most half the member timeout when it is 8 s or more, and 3 s at least
// (Linux counts these in whole seconds).
func keepaliveTimes(memberTimeout time.Duration) (idle, interval time.Duration, count int) {
	idle = max((memberTimeout / 4).Truncate(time.Second), time.Second)
	interval = max((memberTimeout / 8).Truncate(time.Second), time.Second)
	return idle, interval, 2
}

// KeepaliveBound is how long after a replica vanishes without closing its
// sockets (its host lost, the network cut) the server drops its
// connections: the keepalive settings of ServerParams, or tcp_user_timeout
// while data is unacknowledged.
func KeepaliveBound(memberTimeout time.Duration) time.Duration {
	idle, interval, count := keepaliveTimes(memberTimeout)
	return max(idle+time.Duration(count)*interval, memberTimeout/2)
}

// ServerParams are the run-time parameters that make the server drop a
// replica's connections within KeepaliveBound when the replica vanishes:
// set on the control connection and on every server connection in cluster
// mode, so that a replica cut off from the server leaves no backend behind
// by the time the others may take its leases (member_timeout after its
// last heartbeat).
func ServerParams(memberTimeout time.Duration) map[string]string {
	idle, interval, count := keepaliveTimes(memberTimeout)
	return map[string]string{
		"tcp_keepalives_idle":     strconv.Itoa(int(idle / time.Second)),
		"tcp_keepalives_interval": strconv.Itoa(int(interval / time.Second)),
		"tcp_keepalives_count":    strconv.Itoa(count),
		"tcp_user_timeout":        strconv.Itoa(int((memberTimeout / 2).Milliseconds())),
	}
}

// Dialer is the control connection's dialer: the same keepalives on this
// side, and TCP_USER_TIMEOUT (Linux), so that a server gone silent fails
// the control connection within KeepaliveBound even between queries.
func Dialer(memberTimeout time.Duration) *net.Dialer {
	idle, interval, count := keepaliveTimes(memberTimeout)
	return &net.Dialer{
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: idle, Interval: interval, Count: count},
		Control: func(network, _ string, c syscall.RawConn) error {
			if network != "tcp" && network != "tcp4" && network != "tcp6" {
				return nil
			}
			var serr error
			if err := c.Control(func(fd uintptr) { serr = setUserTimeout(fd, memberTimeout/2) }); err != nil {
				return err
			}
			return serr
		},
	}
}
