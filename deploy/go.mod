module github.com/pggovernor/pggovernor/deploy

go 1.26.8

// The chart's tests load the rendered configuration with the product's own
// config loader, and the image test runs the binary against
// internal/pgtest's Postgres, from the work tree they are in.
replace github.com/pggovernor/pggovernor => ../

require (
	github.com/google/go-containerregistry v0.21.9 // indirect
	github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring v0.95.2 // indirect
	go.yaml.in/yaml/v2 v2.4.4 // indirect
	helm.sh/helm/v3 v3.21.4 // indirect
	k8s.io/api v0.37.2 // indirect
	k8s.io/apimachinery v0.37.2 // indirect
	sigs.k8s.io/yaml v1.6.0 // indirect
)
