package proxy

import (
	"net"
	"syscall"
	"time"
)

// listenConfig sets the client keepalive (clientKeepAliveIdle, …) once, on
// the listening socket: Linux copies a listener's keepalive options to every
// connection it accepts, so the net package need not set them again on each
// one (four system calls per connection, measured in a connection storm).
func listenConfig() net.ListenConfig {
	return net.ListenConfig{
		KeepAlive: -1, // inherited from the listener, set below
		Control: func(network, _ string, c syscall.RawConn) error {
			if network != "tcp" && network != "tcp4" && network != "tcp6" {
				return nil
			}
			var serr error
			err := c.Control(func(fd uintptr) {
				for _, o := range [...]struct{ level, opt, v int }{
					{syscall.SOL_SOCKET, syscall.SO_KEEPALIVE, 1},
					{syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE, int(clientKeepAliveIdle / time.Second)},
					{syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL, int(clientKeepAliveInterval / time.Second)},
					{syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT, clientKeepAliveCount},
				} {
					if serr = syscall.SetsockoptInt(int(fd), o.level, o.opt, o.v); serr != nil {
						return
					}
				}
			})
			if err != nil {
				return err
			}
			return serr
		},
	}
}
