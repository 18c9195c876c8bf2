// Package deploy holds the tests of what pggovernor ships for
// deployment: the Helm chart (deploy/helm/pggovernor), rendered with Helm's
// Go SDK and decoded strictly into the Kubernetes API types; the values
// files for Coder's own chart (deploy/coder); the Prometheus rules and the
// Dockerfile. It is a Go module of its own so that the product's go.mod does
// not carry Helm and Kubernetes. The OCI image builder is in ./image and
// ./cmd/mkimage.
package deploy
