// Command devrun is what `make run` runs: it creates an ephemeral local
// PostgreSQL cluster in a temporary directory, starts pggovernor in front of
// it in transaction mode, prints a psql command line that connects through
// the governor without a prompt, and removes everything on Ctrl-C.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pggovernor/pggovernor/internal/pgtest"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "make run:", err)
		os.Exit(1)
	}
}

func run() error {
	bin := flag.String("bin", "bin/pggovernor", "the pggovernor binary")
	port := flag.Int("port", 6432, "client port of pggovernor (0 picks a free one)")
	mode := flag.String("pool-mode", "transaction", "transaction or session")
	maxConns := flag.Int("max-connections", 30, "max_connections of the ephemeral server")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	fmt.Println("creating an ephemeral PostgreSQL cluster ...")
	cluster, err := pgtest.Start(ctx, pgtest.Options{MaxConnections: *maxConns})
	if err != nil {
		return err
	}
	defer cluster.Close()

	dir, err := os.MkdirTemp("", "pggovernor-run-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	appPassword, clientPassword := secret(), secret()
	if err := cluster.CreateRole(ctx, "app", appPassword, false); err != nil {
		return err
	}
	if _, err := cluster.Exec(ctx, "CREATE DATABASE app OWNER app"); err != nil {
		return err
	}
	pwFile := filepath.Join(dir, "db-password")
	usersFile := filepath.Join(dir, "userlist.txt")
	if err := os.WriteFile(pwFile, []byte(appPassword), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(usersFile, []byte(fmt.Sprintf("%q %q\n", "dev", clientPassword)), 0o600); err != nil {
		return err
	}
	listen := "127.0.0.1:" + strconv.Itoa(*port)
	if *port != 0 {
		if l, err := net.Listen("tcp", listen); err != nil {
			fmt.Printf("port %d is busy; picking a free one\n", *port)
			listen = "127.0.0.1:0"
		} else {
			l.Close()
		}
	}
	cmd := exec.Command(*bin, "run",
		"--listen="+listen,
		"--admin-listen=127.0.0.1:0",
		"--pool-mode="+*mode,
		"--upstream-url="+cluster.URL("app", "", "app"),
		"--upstream.password-file="+pwFile,
		"--clients.users-file="+usersFile,
		"--log.format=console")
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s (run `make build` first): %w", *bin, err)
	}
	exited := make(chan error, 1)
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "pggovernor listening on "); ok {
				addr <- a
			}
		}
	}()
	go func() { exited <- cmd.Wait() }()
	select {
	case a := <-addr:
		host, p, _ := net.SplitHostPort(a)
		fmt.Printf(`
pggovernor is running in front of PostgreSQL %s (server at %s, max_connections %d).
Connect through it with:

  psql "postgres://dev:%s@%s:%s/app?sslmode=disable"

Press Ctrl-C to stop; everything is removed.
`, cluster.Version, cluster.Addr(), *maxConns, clientPassword, host, p)
	case err := <-exited:
		return fmt.Errorf("pggovernor exited: %v", err)
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		return nil
	}
	select {
	case <-ctx.Done():
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(40 * time.Second):
			_ = cmd.Process.Kill()
		}
		fmt.Println("stopped; the cluster and its files are removed")
	case err := <-exited:
		return fmt.Errorf("pggovernor exited: %v", err)
	}
	return nil
}

func secret() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
