// Package harness runs pggovernor processes in front of ephemeral Postgres
// clusters for the long-running programs of this module (clustersoak,
// faults): it builds the binary from the work tree, starts, signals and
// stops processes, and samples pg_stat_activity.
package harness

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// RepoRoot walks up from the working directory to the repository root: the
// directory whose go.mod is the product's module (bench/ is a module of its
// own), where ./cmd/pggovernor is built.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		b, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && slices.Contains(strings.Split(string(b), "\n"), "module github.com/pggovernor/pggovernor") {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("run from inside the pggovernor repository (no go.mod of github.com/pggovernor/pggovernor above %s)", dir)
		}
	}
}

// Build builds ./cmd/pggovernor of the repository the working directory is
// in as dir/pggovernor, with the race detector when race is set, and
// returns its path.
func Build(ctx context.Context, dir string, race bool) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "pggovernor")
	args := []string{"build", "-o", bin}
	if race {
		args = append(args, "-race")
	}
	cmd := exec.CommandContext(ctx, "go", append(args, "./cmd/pggovernor")...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, out)
	}
	return bin, nil
}

// Spec says how to run one pggovernor process.
type Spec struct {
	// Bin is the pggovernor binary.
	Bin string
	// Args follow "run".
	Args []string
	// Env is added to this process' environment.
	Env []string
	// Log is the file the process' standard error is appended to.
	Log string
	// Prefix is a command the binary runs under (nsenter, say); nil runs it
	// directly. The prefix must exec the binary, so that signals reach it.
	Prefix []string
}

// Process is a running pggovernor.
type Process struct {
	// Addr is the TCP address it printed it listens on.
	Addr string

	cmd    *exec.Cmd
	exited chan struct{}
	once   sync.Once
	err    error // the exit status, valid once exited is closed
}

// errNoAddress says the process ended, or said nothing, before it listened.
var errNoAddress = errors.New("pggovernor did not print its listening address")

// Start runs the process and waits, up to 20 s, until it prints its
// listening address. The caller must call Stop.
func Start(ctx context.Context, s Spec) (*Process, error) {
	args := append(slices.Clone(s.Prefix), s.Bin, "run")
	cmd := exec.Command(args[0], append(args[1:], s.Args...)...)
	cmd.Env = append(os.Environ(), s.Env...)
	logf, err := os.OpenFile(s.Log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	cmd.Stderr = logf
	out, err := cmd.StdoutPipe()
	if err != nil {
		logf.Close()
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	p := &Process{cmd: cmd, exited: make(chan struct{})}
	addrc := make(chan string, 1)
	go func() { // owner: p; exits when the process closes its standard output
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "pggovernor listening on "); ok {
				select {
				case addrc <- a:
				default:
				}
			}
		}
	}()
	go func() { // owner: p; exits when the process does
		p.err = cmd.Wait()
		logf.Close()
		close(p.exited)
	}()
	t := time.NewTimer(20 * time.Second)
	defer t.Stop()
	select {
	case p.Addr = <-addrc:
		return p, nil
	case <-p.exited:
		return nil, fmt.Errorf("%w: it exited (%v); its log is %s", errNoAddress, p.err, s.Log)
	case <-t.C:
	case <-ctx.Done():
	}
	p.Stop()
	return nil, fmt.Errorf("%w within 20 s; its log is %s", errNoAddress, s.Log)
}

// Pid is the process' id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Signal sends sig to the process.
func (p *Process) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// Exited is closed when the process has exited.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// Err is the exit status; valid once Exited is closed.
func (p *Process) Err() error { return p.err }

// Stop kills the process (if it still runs) and waits for it. Idempotent.
func (p *Process) Stop() {
	p.once.Do(func() { _ = p.cmd.Process.Kill() })
	<-p.exited
}
