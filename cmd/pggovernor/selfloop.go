package main

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pggovernor/pggovernor/config"
)

// selfLoopResolveTimeout bounds the name lookups of the self-loop check.
const selfLoopResolveTimeout = 5 * time.Second

// checkUpstreamNotSelf refuses an upstream that is pggovernor's own
// listener: a sidecar that inherits coderd's environment reads
// CODER_PG_CONNECTION_URL, which points at the governor, and would open
// server connections to itself, each one a client that opens another.
//
// An upstream host:port is this process when the port is listen's and the
// host resolves to listen's address, or, when listen is a wildcard
// (0.0.0.0, [::], empty host), to a loopback, unspecified or local
// interface address; a Unix socket upstream is this process when it is
// unix_socket_dir with listen's port. A name that does not resolve is left
// to the connection attempt.
func checkUpstreamNotSelf(ctx context.Context, c *config.Config, base *pgconn.Config) error {
	lhost, lport, err := net.SplitHostPort(c.Listen)
	if err != nil {
		return nil // Validate reported it
	}
	ctx, cancel := context.WithTimeout(ctx, selfLoopResolveTimeout)
	defer cancel()
	wildcard := lhost == "" || net.ParseIP(lhost) != nil && net.ParseIP(lhost).IsUnspecified()
	var listenIPs []net.IP
	if !wildcard {
		listenIPs = resolve(ctx, net.DefaultResolver.LookupHost, lhost)
	}
	var local []net.IP
	if wildcard {
		if addrs, err := net.InterfaceAddrs(); err == nil {
			for _, a := range addrs {
				if n, ok := a.(*net.IPNet); ok {
					local = append(local, n.IP)
				}
			}
		}
	}
	isSelf := func(host string, port uint16) bool {
		if strconv.Itoa(int(port)) != lport {
			return false
		}
		if filepath.IsAbs(host) {
			return c.UnixSocketDir != "" && filepath.Clean(host) == filepath.Clean(c.UnixSocketDir)
		}
		for _, ip := range resolve(ctx, base.LookupFunc, host) {
			switch {
			case wildcard && (ip.IsLoopback() || ip.IsUnspecified() || slices.ContainsFunc(local, ip.Equal)):
				return true
			case !wildcard && ip.IsUnspecified() && slices.ContainsFunc(listenIPs, net.IP.IsLoopback):
				return true // connecting to 0.0.0.0 reaches the loopback listener
			case !wildcard && slices.ContainsFunc(listenIPs, ip.Equal):
				return true
			}
		}
		return false
	}
	endpoints := []*pgconn.FallbackConfig{{Host: base.Host, Port: base.Port}}
	endpoints = append(endpoints, base.Fallbacks...)
	for _, e := range endpoints {
		if isSelf(e.Host, e.Port) {
			where := net.JoinHostPort(e.Host, strconv.Itoa(int(e.Port)))
			if filepath.IsAbs(e.Host) {
				where = filepath.Join(e.Host, ".s.PGSQL."+lport)
			}
			return fmt.Errorf("key upstream.url: the upstream (%s, from %s) is pggovernor's own listen address %s: "+
				"a sidecar that inherits coderd's CODER_PG_CONNECTION_URL would connect to itself; "+
				"set PGGOVERNOR_UPSTREAM_URL (upstream.url) to the database's address", where, c.UpstreamSource(), c.Listen)
		}
	}
	return nil
}

// resolve returns the addresses of a host name or literal, looked up with
// lookup (the upstream's resolver: what its connections will reach); none
// when it does not resolve.
func resolve(ctx context.Context, lookup pgconn.LookupFunc, host string) []net.IP {
	if ip := net.ParseIP(host); ip != nil {
		return []net.IP{ip}
	}
	if lookup == nil {
		lookup = net.DefaultResolver.LookupHost
	}
	addrs, err := lookup(ctx, host)
	if err != nil {
		return nil
	}
	ips := make([]net.IP, 0, len(addrs))
	for _, a := range addrs {
		if h, _, err := net.SplitHostPort(a); err == nil {
			a = h // a lookup may answer host:port (pgconn.LookupFunc)
		}
		if ip := net.ParseIP(a); ip != nil {
			ips = append(ips, ip)
		}
	}
	return ips
}
