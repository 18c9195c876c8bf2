// Command mkimage writes pggovernor's OCI image as a docker-archive
// tarball from a static binary, without a container engine (`make image`):
//
//	mkimage -binary bin/pggovernor-linux-amd64 -arch amd64 -version v1.2.3 \
//	  -revision $(git rev-parse HEAD) -created $SOURCE_DATE_EPOCH -out bin/pggovernor-image.tar
//
// It prints the image's digest and the archive's SHA-256; the same inputs
// give the same two.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/pggovernor/pggovernor/deploy/image"
)

func main() {
	var o image.Options
	var out string
	var created int64
	flag.StringVar(&o.Binary, "binary", "", "the static pggovernor binary (CGO_ENABLED=0 GOOS=linux)")
	flag.StringVar(&o.Arch, "arch", "amd64", "GOARCH of the binary")
	flag.StringVar(&o.Version, "version", "dev", "version: the image's label and tag")
	flag.StringVar(&o.Revision, "revision", "", "commit the binary is built from (a label)")
	flag.Int64Var(&created, "created", 0, "Unix time of every timestamp in the image (SOURCE_DATE_EPOCH)")
	flag.StringVar(&out, "out", "bin/pggovernor-image.tar", "the docker-archive tarball to write")
	flag.Parse()
	if o.Binary == "" {
		fmt.Fprintln(os.Stderr, "mkimage: -binary is required")
		os.Exit(2)
	}
	o.Created = time.Unix(created, 0)
	if err := run(o, out); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(o image.Options, out string) error {
	img, err := image.Build(o)
	if err != nil {
		return err
	}
	if err := image.Write(out, img, o.Version); err != nil {
		return err
	}
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	f, err := os.Open(out)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return err
	}
	fmt.Printf("%s: pggovernor:%s %s (archive sha256:%s)\n", out, o.Version, digest, hex.EncodeToString(h.Sum(nil)))
	return nil
}
