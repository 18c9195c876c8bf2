package cluster

import (
	"context"
	"maps"
	"net"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestKeepalivesFollowTheMemberTimeout(t *testing.T) {
	for _, tc := range []struct {
		timeout time.Duration
		params  map[string]string
		bound   time.Duration
	}{
		{10 * time.Second, map[string]string{"tcp_keepalives_idle": "2", "tcp_keepalives_interval": "1", "tcp_keepalives_count": "2", "tcp_user_timeout": "5000"}, 5 * time.Second},
		{40 * time.Second, map[string]string{"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "2", "tcp_user_timeout": "20000"}, 20 * time.Second},
		{time.Second, map[string]string{"tcp_keepalives_idle": "1", "tcp_keepalives_interval": "1", "tcp_keepalives_count": "2", "tcp_user_timeout": "500"}, 3 * time.Second},
	} {
		if got := ServerParams(tc.timeout); !maps.Equal(got, tc.params) {
			t.Errorf("ServerParams(%s): want = %v, got = %v", tc.timeout, tc.params, got)
		}
		if got := KeepaliveBound(tc.timeout); got != tc.bound {
			t.Errorf("KeepaliveBound(%s): want = %s, got = %s", tc.timeout, tc.bound, got)
		}
	}
}

func TestDialerSetsUserTimeout(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("TCP_USER_TIMEOUT is Linux's")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := Dialer(10*time.Second).DialContext(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var got, idle int
	_ = raw.Control(func(fd uintptr) {
		got, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
		idle, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
	})
	if got != 5000 || idle != 2 {
		t.Fatalf("TCP_USER_TIMEOUT and TCP_KEEPIDLE: want = 5000 ms and 2 s, got = %d and %d", got, idle)
	}
}
