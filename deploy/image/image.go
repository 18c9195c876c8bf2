// Package image builds pggovernor's OCI image without a container engine,
// with go-containerregistry: an empty base and one layer holding the static
// binary and the files a non-root process needs (/etc/passwd and
// /etc/group naming user 65532, a /tmp). CA roots are compiled into the
// binary (golang.org/x/crypto/x509roots/fallback, used when the system has
// none). Everything in it is reproducible: entries sorted, owners, modes
// and every timestamp fixed, so the same binary and options give the same
// digest.
package image

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// BinaryPath is where the binary is in the image.
const BinaryPath = "/usr/local/bin/pggovernor"

// User is the numeric user and group the image runs as (distroless'
// "nonroot").
const User = "65532:65532"

// Options describe one image.
type Options struct {
	// Binary is the static pggovernor binary (CGO_ENABLED=0, GOOS=linux).
	Binary string
	// Arch is the GOARCH the binary is built for.
	Arch string
	// Version labels the image and names its tag (pggovernor:Version).
	Version string
	// Revision is the commit the binary is built from (a label).
	Revision string
	// Created is the time every timestamp in the image carries
	// (SOURCE_DATE_EPOCH).
	Created time.Time
}

// Build returns the image.
func Build(o Options) (v1.Image, error) {
	bin, err := os.ReadFile(o.Binary)
	if err != nil {
		return nil, err
	}
	layerTar, err := layerTar(bin, o.Created)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return nil, err
	}
	created := v1.Time{Time: o.Created.UTC()}
	img, err := mutate.Append(empty.Image, mutate.Addendum{Layer: layer, History: v1.History{
		Created: created, CreatedBy: "make image (deploy/cmd/mkimage)", Comment: "pggovernor " + o.Version,
	}})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS, cf.Created = o.Arch, "linux", created
	cf.Config = v1.Config{
		User:         User,
		Entrypoint:   []string{BinaryPath},
		Cmd:          []string{"run", "--listen=0.0.0.0:6432", "--admin-listen=0.0.0.0:9187"},
		Env:          []string{"PATH=/usr/local/bin"},
		WorkingDir:   "/",
		ExposedPorts: map[string]struct{}{"6432/tcp": {}, "9187/tcp": {}},
		Labels: map[string]string{
			"org.opencontainers.image.title":       "pggovernor",
			"org.opencontainers.image.description": "PostgreSQL wire-protocol proxy that governs connections for Coder",
			"org.opencontainers.image.version":     o.Version,
			"org.opencontainers.image.revision":    o.Revision,
			"org.opencontainers.image.created":     created.Format(time.RFC3339),
			"org.opencontainers.image.source":      "https://github.com/pggovernor/pggovernor",
		},
	}
	return mutate.ConfigFile(img, cf)
}

// Tag is the reference the archive names.
func Tag(version string) (name.Tag, error) { return name.NewTag("pggovernor:" + version) }

// Write writes the image as a docker-archive tarball (docker load,
// podman load, skopeo copy docker-archive:...).
func Write(path string, img v1.Image, version string) error {
	tag, err := Tag(version)
	if err != nil {
		return err
	}
	return tarball.WriteToFile(path, tag, img)
}

// layerTar is the layer's uncompressed tar: directories and files in
// lexical order, owned by root, with fixed modes and times.
func layerTar(bin []byte, mtime time.Time) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	entry := func(name string, mode int64, typ byte, owner int, data []byte) error {
		h := &tar.Header{Name: name, Mode: mode, Typeflag: typ, ModTime: mtime.UTC().Truncate(time.Second), Format: tar.FormatUSTAR,
			Uid: owner, Gid: owner, Size: int64(len(data))}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("layer entry %s: %w", name, err)
		}
		_, err := tw.Write(data)
		return err
	}
	for _, e := range []struct {
		name string
		mode int64
		typ  byte
		uid  int
		data []byte
	}{
		{"etc/", 0o755, tar.TypeDir, 0, nil},
		{"etc/group", 0o644, tar.TypeReg, 0, []byte("root:x:0:\nnonroot:x:65532:\n")},
		{"etc/passwd", 0o644, tar.TypeReg, 0, []byte("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")},
		{"home/", 0o755, tar.TypeDir, 0, nil},
		{"home/nonroot/", 0o700, tar.TypeDir, 65532, nil},
		{"tmp/", 0o1777, tar.TypeDir, 0, nil},
		{"usr/", 0o755, tar.TypeDir, 0, nil},
		{"usr/local/", 0o755, tar.TypeDir, 0, nil},
		{"usr/local/bin/", 0o755, tar.TypeDir, 0, nil},
		{"usr/local/bin/pggovernor", 0o755, tar.TypeReg, 0, bin},
	} {
		if err := entry(e.name, e.mode, e.typ, e.uid, e.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
