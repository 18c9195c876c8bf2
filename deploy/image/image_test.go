package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/jackc/pgx/v5"

	"github.com/pggovernor/pggovernor/deploy/internal/chartrender"
	"github.com/pggovernor/pggovernor/internal/pgtest"
)

// buildBinary builds the static binary as `make image` does.
func buildBinary(t *testing.T, dir, version string) string {
	t.Helper()
	out := filepath.Join(dir, "pggovernor")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X main.version="+version+" -buildid=", "-o", out, "./cmd/pggovernor")
	cmd.Dir = filepath.Join(chartrender.DeployDir(), "..")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	return out
}

func fileSHA(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", sha256.Sum256(b))
}

// TestImage builds the image twice (same digest, same bytes), reads its
// configuration back, extracts its layer and runs the binary from it:
// `version`, then `run` with the Helm chart's rendered configuration
// against a real Postgres, through which pgx runs a query, and the chart's
// probes answer.
func TestImage(t *testing.T) {
	dir := t.TempDir()
	const version = "v0.0.0-imagetest"
	opts := Options{Binary: buildBinary(t, dir, version), Arch: runtime.GOARCH, Version: version,
		Revision: "0123456789abcdef0123456789abcdef01234567", Created: time.Unix(1767225600, 0)}
	var digests, sums []string
	for i := 0; i < 2; i++ {
		img, err := Build(opts)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, fmt.Sprintf("image-%d.tar", i))
		if err := Write(p, img, version); err != nil {
			t.Fatal(err)
		}
		d, err := img.Digest()
		if err != nil {
			t.Fatal(err)
		}
		digests, sums = append(digests, d.String()), append(sums, fileSHA(t, p))
	}
	if digests[0] != digests[1] || sums[0] != sums[1] {
		t.Fatalf("two builds of the same binary: want the same image, got digests %v, archives %v", digests, sums)
	}
	t.Logf("image %s, archive sha256:%s", digests[0], sums[0])

	// The archive read back.
	tag, _ := Tag(version)
	img, err := tarball.ImageFromPath(filepath.Join(dir, "image-0.tar"), &tag)
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := img.Digest(); d.String() != digests[0] {
		t.Fatalf("the archive's image: want = %s, got = %s", digests[0], d)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	c := cf.Config
	if c.User != User || len(c.Entrypoint) != 1 || c.Entrypoint[0] != BinaryPath || cf.OS != "linux" || cf.Architecture != runtime.GOARCH ||
		c.Labels["org.opencontainers.image.version"] != version || c.Labels["org.opencontainers.image.revision"] != opts.Revision ||
		!cf.Created.Time.Equal(opts.Created) {
		t.Fatalf("image configuration: %+v", cf)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("want one layer, got %d (%v)", len(layers), err)
	}

	// The layer, extracted.
	root := filepath.Join(dir, "rootfs")
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if !h.ModTime.Equal(opts.Created) || (h.Uid != 0 && h.Name != "home/nonroot/") {
			t.Fatalf("%s: mtime %s uid %d: want the fixed time and root", h.Name, h.ModTime, h.Uid)
		}
		p := filepath.Join(root, filepath.FromSlash(h.Name))
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, os.FileMode(h.Mode))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(f, tr); err != nil {
				t.Fatal(err)
			}
			f.Close()
		}
	}
	rc.Close()
	for i := 1; i < len(names); i++ {
		if names[i-1] >= names[i] {
			t.Fatalf("layer entries not sorted: %v", names)
		}
	}
	bin := filepath.Join(root, filepath.FromSlash(strings.TrimPrefix(BinaryPath, "/")))
	out, err := exec.Command(bin, "version").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "pggovernor "+version {
		t.Fatalf("%s version: want = pggovernor %s, got = %q (%v)", BinaryPath, version, out, err)
	}

	runFromImage(t, bin, dir)
}

// runFromImage runs the image's binary with the chart's configuration
// file (defaults and the Secrets as files), its listeners and upstream
// moved to this machine by PGGOVERNOR_* variables as extraEnv would.
func runFromImage(t *testing.T, bin, dir string) {
	ctx := context.Background()
	pg, err := pgtest.Start(ctx, pgtest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Close()
	const dbPass, clientPass = "image-db-secret", "image-client-secret"
	if _, err := pg.Exec(ctx, "CREATE ROLE coder LOGIN PASSWORD '"+dbPass+"'"); err != nil {
		t.Fatal(err)
	}

	c, err := chartrender.Load()
	if err != nil {
		t.Fatal(err)
	}
	vals, err := chartrender.Values([]string{filepath.Join(chartrender.DeployDir(), "testdata", "values", "sidecar-like.yaml")}, map[string]any{
		"secrets.upstreamTLS.name": "", "secrets.clientTLS.name": "",
	})
	if err != nil {
		t.Fatal(err)
	}
	objs, err := chartrender.Render(c, vals)
	if err != nil {
		t.Fatal(err)
	}
	ctr, err := objs.Container()
	if err != nil {
		t.Fatal(err)
	}
	cfgFile, err := objs.ConfigFile(dir)
	if err != nil {
		t.Fatal(err)
	}
	pwFile, usersFile := filepath.Join(dir, "password"), filepath.Join(dir, "userlist.txt")
	if err := os.WriteFile(pwFile, []byte(dbPass+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(usersFile, []byte(`"coder" "`+clientPass+`"`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	admin := freeAddr(t)
	args := append([]string(nil), ctr.Args...)
	args[1] = "--config=" + cfgFile
	cmd := exec.Command(bin, args...)
	cmd.Env = append(chartrender.Environ(ctr.Env, "127.0.0.1", ""),
		"PGGOVERNOR_LISTEN=127.0.0.1:0", "PGGOVERNOR_ADMIN_LISTEN="+admin,
		"PGGOVERNOR_UPSTREAM_URL="+pg.URL("coder", "", "postgres"),
		"PGGOVERNOR_UPSTREAM_PASSWORD_FILE="+pwFile, "PGGOVERNOR_CLIENTS_USERS_FILE="+usersFile)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	addrc := make(chan string, 1)
	go func() { // owner: the test; ends when the process closes stdout
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "pggovernor listening on "); ok {
				addrc <- a
			}
		}
	}()
	go func() { exited <- cmd.Wait() }() // owner: the test
	defer func() {
		_ = cmd.Process.Kill()
		<-exited
	}()
	var addr string
	select {
	case addr = <-addrc:
	case err := <-exited:
		t.Fatalf("pggovernor from the image exited at start: %v\n%s", err, stderr.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("pggovernor from the image did not start:\n%s", stderr.String())
	}
	host, port, _ := net.SplitHostPort(addr)
	conn, err := pgx.Connect(ctx, fmt.Sprintf("postgres://coder:%s@%s:%s/postgres?sslmode=disable", clientPass, host, port))
	if err != nil {
		t.Fatalf("through pggovernor from the image: %v\n%s", err, stderr.String())
	}
	defer conn.Close(ctx)
	var user string
	if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil || user != "coder" {
		t.Fatalf("SELECT current_user: %q, %v", user, err)
	}
	// The chart's probes, against what the binary serves.
	for _, probe := range []struct {
		name string
		path string
	}{{"liveness", ctr.LivenessProbe.HTTPGet.Path}, {"readiness", ctr.ReadinessProbe.HTTPGet.Path}, {"startup", ctr.StartupProbe.HTTPGet.Path}} {
		deadline := time.Now().Add(20 * time.Second)
		for {
			resp, err := http.Get("http://" + admin + probe.path)
			code := 0
			if err == nil {
				code = resp.StatusCode
				resp.Body.Close()
			}
			if code == http.StatusOK {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the chart's %s probe GET %s: want = 200, got = %d (%v)\n%s", probe.name, probe.path, code, err, stderr.String())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if strings.Contains(stderr.String(), dbPass) || strings.Contains(stderr.String(), clientPass) {
		t.Fatalf("a password is in the log:\n%s", stderr.String())
	}
}

// freeAddr returns a 127.0.0.1 address that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
