// Package chartrender renders the pggovernor Helm chart with Helm's own Go
// SDK, as `helm template` / `helm install` would, and decodes every object
// strictly into the Kubernetes API types: a field the type does not have,
// a value of the wrong type or a duplicate key is an error. The deploy
// module's tests use it (chart invariants, goldens, the image test).
package chartrender

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"sigs.k8s.io/yaml"
)

// Release is the release name and namespace the tests render with.
var Release = chartutil.ReleaseOptions{Name: "pggovernor", Namespace: "coder", Revision: 1, IsInstall: true, IsUpgrade: false}

// KubeVersion is the Kubernetes version the tests render for.
const KubeVersion = "v1.31.0"

// DeployDir is the deploy/ directory of the work tree this file is in.
func DeployDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// ChartDir is the chart's directory.
func ChartDir() string { return filepath.Join(DeployDir(), "helm", "pggovernor") }

// Objects are the rendered objects, by kind.
type Objects struct {
	Deployment          *appsv1.Deployment
	Service             *corev1.Service
	ConfigMap           *corev1.ConfigMap
	ServiceAccount      *corev1.ServiceAccount
	PodDisruptionBudget *policyv1.PodDisruptionBudget
	NetworkPolicy       *networkingv1.NetworkPolicy
	ServiceMonitor      *monitoringv1.ServiceMonitor
	PrometheusRule      *monitoringv1.PrometheusRule
	// Manifest is the whole rendered output, templates in name order,
	// documents separated as helm template separates them.
	Manifest string
}

// Load loads the chart.
func Load() (*chart.Chart, error) { return loader.Load(ChartDir()) }

// Values reads and merges values files (later ones win), then applies sets
// (dotted paths, as --set-json would, values as Go values).
func Values(files []string, sets map[string]any) (map[string]any, error) {
	out := map[string]any{}
	for _, f := range files {
		v, err := chartutil.ReadValuesFile(f)
		if err != nil {
			return nil, err
		}
		out = chartutil.MergeTables(v.AsMap(), out)
	}
	for path, v := range sets {
		m := out
		parts := strings.Split(path, ".")
		for _, p := range parts[:len(parts)-1] {
			next, ok := m[p].(map[string]any)
			if !ok {
				next = map[string]any{}
				m[p] = next
			}
			m = next
		}
		m[parts[len(parts)-1]] = v
	}
	return out, nil
}

// Render renders the chart with the values as `helm install` does:
// coalesced with the chart's values.yaml, validated against
// values.schema.json, then the templates; and decodes the objects.
func Render(c *chart.Chart, vals map[string]any) (*Objects, error) {
	caps := chartutil.DefaultCapabilities.Copy()
	kv, err := chartutil.ParseKubeVersion(KubeVersion)
	if err != nil {
		return nil, err
	}
	caps.KubeVersion = *kv
	if c.Metadata.KubeVersion != "" && !chartutil.IsCompatibleRange(c.Metadata.KubeVersion, KubeVersion) {
		return nil, fmt.Errorf("chart requires kubeVersion %s, rendering for %s", c.Metadata.KubeVersion, KubeVersion)
	}
	rv, err := chartutil.ToRenderValues(c, vals, Release, caps)
	if err != nil {
		return nil, err
	}
	files, err := engine.Render(c, rv)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	objs := &Objects{}
	var manifest strings.Builder
	for _, n := range names {
		if !strings.HasSuffix(n, ".yaml") {
			continue
		}
		content := strings.TrimSpace(files[n])
		if content == "" {
			continue
		}
		for _, doc := range strings.Split(content, "\n---") {
			doc = strings.TrimSpace(doc)
			if doc == "" {
				continue
			}
			fmt.Fprintf(&manifest, "---\n# Source: %s\n%s\n", n, doc)
			if err := objs.decode(n, []byte(doc)); err != nil {
				return nil, err
			}
		}
	}
	objs.Manifest = manifest.String()
	return objs, nil
}

// decode decodes one object strictly into the type of its kind.
func (o *Objects) decode(source string, doc []byte) error {
	js, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return fmt.Errorf("%s: %w", source, err)
	}
	var meta struct{ APIVersion, Kind string }
	if err := json.Unmarshal(js, &meta); err != nil {
		return fmt.Errorf("%s: %w", source, err)
	}
	var target any
	switch meta.APIVersion + " " + meta.Kind {
	case "apps/v1 Deployment":
		o.Deployment = &appsv1.Deployment{}
		target = o.Deployment
	case "v1 Service":
		o.Service = &corev1.Service{}
		target = o.Service
	case "v1 ConfigMap":
		o.ConfigMap = &corev1.ConfigMap{}
		target = o.ConfigMap
	case "v1 ServiceAccount":
		o.ServiceAccount = &corev1.ServiceAccount{}
		target = o.ServiceAccount
	case "policy/v1 PodDisruptionBudget":
		o.PodDisruptionBudget = &policyv1.PodDisruptionBudget{}
		target = o.PodDisruptionBudget
	case "networking.k8s.io/v1 NetworkPolicy":
		o.NetworkPolicy = &networkingv1.NetworkPolicy{}
		target = o.NetworkPolicy
	case "monitoring.coreos.com/v1 ServiceMonitor":
		o.ServiceMonitor = &monitoringv1.ServiceMonitor{}
		target = o.ServiceMonitor
	case "monitoring.coreos.com/v1 PrometheusRule":
		o.PrometheusRule = &monitoringv1.PrometheusRule{}
		target = o.PrometheusRule
	default:
		return fmt.Errorf("%s: unexpected object %s %s", source, meta.APIVersion, meta.Kind)
	}
	return DecodeStrict(js, target)
}

// DecodeStrict decodes JSON into v, failing on unknown fields and on
// trailing data.
func DecodeStrict(js []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decoding into %T: %w", v, err)
	}
	if dec.More() {
		return fmt.Errorf("decoding into %T: trailing data", v)
	}
	return nil
}

// DecodeYAMLStrict converts YAML (duplicate keys refused) to JSON and
// decodes it with DecodeStrict.
func DecodeYAMLStrict(data []byte, v any) error {
	js, err := yaml.YAMLToJSONStrict(data)
	if err != nil {
		return err
	}
	return DecodeStrict(js, v)
}

// Container returns the pggovernor container of the Deployment.
func (o *Objects) Container() (*corev1.Container, error) {
	if o.Deployment == nil {
		return nil, fmt.Errorf("no Deployment rendered")
	}
	for i, c := range o.Deployment.Spec.Template.Spec.Containers {
		if c.Name == "pggovernor" {
			return &o.Deployment.Spec.Template.Spec.Containers[i], nil
		}
	}
	return nil, fmt.Errorf("no pggovernor container in the Deployment")
}

// ConfigFile writes the ConfigMap's pggovernor.yaml into dir and returns
// its path.
func (o *Objects) ConfigFile(dir string) (string, error) {
	if o.ConfigMap == nil {
		return "", fmt.Errorf("no ConfigMap rendered")
	}
	data, ok := o.ConfigMap.Data["pggovernor.yaml"]
	if !ok {
		return "", fmt.Errorf("the ConfigMap has no pggovernor.yaml")
	}
	p := filepath.Join(dir, "pggovernor.yaml")
	return p, os.WriteFile(p, []byte(data), 0o600)
}

// envRef is a $(VAR) reference in an EnvVar's value.
var envRef = regexp.MustCompile(`\$\([A-Za-z_][A-Za-z0-9_]*\)`)

// Environ turns a container's environment into KEY=value lines as the
// kubelet would set them: fieldRef status.podIP becomes podIP, $(VAR)
// references to earlier variables are expanded; a variable from a Secret
// or ConfigMap gets secretValue.
func Environ(env []corev1.EnvVar, podIP, secretValue string) []string {
	seen := map[string]string{}
	var out []string
	for _, e := range env {
		v := e.Value
		switch {
		case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.podIP":
			v = podIP
		case e.ValueFrom != nil:
			v = secretValue
		default:
			v = envRef.ReplaceAllStringFunc(v, func(ref string) string {
				if s, ok := seen[ref[2:len(ref)-1]]; ok {
					return s
				}
				return ref
			})
		}
		seen[e.Name] = v
		out = append(out, e.Name+"="+v)
	}
	return out
}
