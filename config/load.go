package config

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// EnvPrefix starts every environment variable pggovernor reads for its own
// keys, e.g. PGGOVERNOR_UPSTREAM_PASSWORD_FILE.
const EnvPrefix = "PGGOVERNOR_"

// EnvConfigFile names the config file when --config is not given.
const EnvConfigFile = EnvPrefix + "CONFIG"

// shortFlags returns the aliases of common keys, besides the flag that every
// key has (--upstream.url and so on).
func shortFlags() map[string]string {
	return map[string]string{"upstream-url": "upstream.url"}
}

// key is one leaf of Config: a path such as "upstream.password_file" and
// the field it sets.
type key struct {
	path  string
	field reflect.StructField
	index []int
}

// keys lists every leaf key of Config in declaration order.
func keys() []key {
	var out []key
	var walk func(t reflect.Type, prefix string, index []int)
	walk = func(t reflect.Type, prefix string, index []int) {
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name := strings.Split(f.Tag.Get("yaml"), ",")[0]
			if name == "" || name == "-" {
				continue
			}
			path := name
			if prefix != "" {
				path = prefix + "." + name
			}
			idx := append(append([]int(nil), index...), i)
			if f.Type.Kind() == reflect.Struct && f.Type != reflect.TypeOf(time.Duration(0)) {
				walk(f.Type, path, idx)
				continue
			}
			out = append(out, key{path: path, field: f, index: idx})
		}
	}
	walk(reflect.TypeOf(Config{}), "", nil)
	return out
}

// Keys returns every configuration key path, e.g. "timeouts.query_wait".
func Keys() []string {
	var out []string
	for _, k := range keys() {
		out = append(out, k.path)
	}
	return out
}

// EnvName returns the environment variable that sets a key path.
func EnvName(path string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(path, ".", "_"))
}

// FlagName returns the long flag (without dashes) that sets a key path.
func FlagName(path string) string {
	return strings.ReplaceAll(path, "_", "-")
}

// Flags collects flag values for keys; it is filled by the flag package and
// applied by Load after the file and the environment.
type Flags struct {
	// ConfigFile is the value of --config.
	ConfigFile string
	set        []flagValue
}

type flagValue struct{ path, value string }

// RegisterFlags adds --config, one flag per key and the short aliases to fs,
// and returns where their values are collected.
func RegisterFlags(fs *flag.FlagSet) *Flags {
	fl := &Flags{}
	fs.StringVar(&fl.ConfigFile, "config", "", "YAML configuration file (also "+EnvConfigFile+")")
	add := func(name, path string, k key) {
		usage := fmt.Sprintf("sets %s (env %s)", path, EnvName(path))
		if e := k.field.Tag.Get("enum"); e != "" {
			usage += ": one of " + strings.Trim(e, ",")
		}
		record := func(v string) error {
			fl.set = append(fl.set, flagValue{path: path, value: v})
			return nil
		}
		if k.field.Type.Kind() == reflect.Bool {
			fs.BoolFunc(name, usage, record)
		} else {
			fs.Func(name, usage, record)
		}
	}
	byPath := map[string]key{}
	for _, k := range keys() {
		byPath[k.path] = k
		add(FlagName(k.path), k.path, k)
	}
	short := shortFlags()
	aliases := make([]string, 0, len(short))
	for a := range short {
		aliases = append(aliases, a)
	}
	sort.Strings(aliases)
	for _, a := range aliases {
		add(a, short[a], byPath[short[a]])
	}
	return fl
}

// Source says where the loader takes its input from. Tests fill it; the
// command fills it from the process.
type Source struct {
	// File is the YAML file to read; empty reads none.
	File string
	// Environ is the environment as os.Environ returns it.
	Environ []string
	// Flags are the flag values collected by RegisterFlags; may be nil.
	Flags *Flags
}

// Load builds a Config from defaults, then the file, then the environment,
// then flags, then Coder's deployment environment where nothing else names
// the upstream, and validates it. Errors name the key and the accepted
// values.
func Load(src Source) (Config, error) {
	cfg := Default()
	explicit := map[string]bool{}
	setKey := func(path, value string) error {
		if value != "" || path != "upstream.url" { // an empty URL names no upstream
			explicit[path] = true
		}
		return set(&cfg, path, value)
	}
	env := envMap(src.Environ)
	cfg.libpqEnv = libpqEnv{user: env["PGUSER"], sslMode: env["PGSSLMODE"]}
	file := src.File
	if file == "" && src.Flags != nil {
		file = src.Flags.ConfigFile
	}
	if file == "" {
		file = env[EnvConfigFile]
	}
	if file != "" {
		data, err := os.ReadFile(file)
		if err != nil {
			return Config{}, fmt.Errorf("reading config file: %w", err)
		}
		if err := applyYAML(data, setKey); err != nil {
			return Config{}, fmt.Errorf("config file %s: %w", file, err)
		}
	}
	if err := applyEnv(env, setKey); err != nil {
		return Config{}, err
	}
	if src.Flags != nil {
		for _, fv := range src.Flags.set {
			if err := setKey(fv.path, fv.value); err != nil {
				return Config{}, fmt.Errorf("flag --%s: %w", FlagName(fv.path), err)
			}
		}
	}
	if err := applyCoderEnv(&cfg, env, explicit); err != nil {
		return Config{}, err
	}
	cfg.authSet = explicit["clients.auth"]
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

func envMap(environ []string) map[string]string {
	m := make(map[string]string, len(environ))
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok {
			m[k] = v
		}
	}
	return m
}

func applyEnv(env map[string]string, set func(path, value string) error) error {
	byEnv := map[string]string{}
	for _, k := range keys() {
		byEnv[EnvName(k.path)] = k.path
	}
	names := make([]string, 0, len(env))
	for name := range env {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if !strings.HasPrefix(name, EnvPrefix) || name == EnvConfigFile {
			continue
		}
		path, ok := byEnv[name]
		if !ok {
			return fmt.Errorf("environment variable %s is not a pggovernor setting (see `pggovernor run --help` for the keys)", name)
		}
		if err := set(path, env[name]); err != nil {
			return fmt.Errorf("environment variable %s: %w", name, err)
		}
	}
	return nil
}

func applyYAML(data []byte, set func(path, value string) error) error {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return err
	}
	if len(doc.Content) == 0 {
		return nil // empty file
	}
	byPath := map[string]key{}
	children := map[string][]string{}
	for _, k := range keys() {
		byPath[k.path] = k
		parts := strings.Split(k.path, ".")
		for i := range parts {
			parent := strings.Join(parts[:i], ".")
			child := parts[i]
			if !contains(children[parent], child) {
				children[parent] = append(children[parent], child)
			}
		}
	}
	var walk func(n *yaml.Node, prefix string) error
	walk = func(n *yaml.Node, prefix string) error {
		if n.Kind != yaml.MappingNode {
			where := "the top level"
			if prefix != "" {
				where = "key " + prefix
			}
			return fmt.Errorf("line %d: %s must be a mapping of keys (known keys: %s)", n.Line, where, strings.Join(children[prefix], ", "))
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			kn, vn := n.Content[i], n.Content[i+1]
			path := kn.Value
			if prefix != "" {
				path = prefix + "." + kn.Value
			}
			if _, isGroup := children[path]; isGroup {
				if vn.Kind == yaml.ScalarNode && vn.Tag == "!!null" {
					continue
				}
				if err := walk(vn, path); err != nil {
					return err
				}
				continue
			}
			k, ok := byPath[path]
			if !ok {
				return fmt.Errorf("line %d: unknown key %q (known keys here: %s)", kn.Line, path, strings.Join(children[prefix], ", "))
			}
			if k.field.Type.Kind() == reflect.Slice {
				if vn.Kind != yaml.SequenceNode {
					return fmt.Errorf("line %d: key %s must be a list", vn.Line, path)
				}
				var items []string
				for _, item := range vn.Content {
					items = append(items, item.Value)
				}
				if err := set(path, strings.Join(items, ",")); err != nil {
					return fmt.Errorf("line %d: %w", vn.Line, err)
				}
				continue
			}
			if vn.Kind != yaml.ScalarNode {
				return fmt.Errorf("line %d: key %s must be a single value", vn.Line, path)
			}
			if err := set(path, vn.Value); err != nil {
				return fmt.Errorf("line %d: %w", vn.Line, err)
			}
		}
		return nil
	}
	return walk(doc.Content[0], "")
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// set parses value into the field at path, checking enum and min tags.
func set(cfg *Config, path, value string) error {
	var k key
	found := false
	for _, kk := range keys() {
		if kk.path == path {
			k, found = kk, true
			break
		}
	}
	if !found {
		return fmt.Errorf("unknown key %q", path)
	}
	v := reflect.ValueOf(cfg).Elem().FieldByIndex(k.index)
	switch {
	case k.field.Type == reflect.TypeOf(time.Duration(0)):
		d, err := time.ParseDuration(strings.TrimSpace(value))
		if err != nil {
			return fmt.Errorf("key %s: %q is not a duration (examples: 500ms, 30s, 10m, 1h)", path, value)
		}
		v.SetInt(int64(d))
	case k.field.Type.Kind() == reflect.String:
		v.SetString(value)
	case k.field.Type.Kind() == reflect.Int:
		n, err := strconv.ParseInt(strings.TrimSpace(value), 0, 64) // 0x… and 0o… too
		if err != nil {
			return fmt.Errorf("key %s: %q is not a whole number", path, value)
		}
		v.SetInt(int64(n))
	case k.field.Type.Kind() == reflect.Bool:
		b, err := strconv.ParseBool(strings.TrimSpace(value))
		if err != nil {
			return fmt.Errorf("key %s: %q is not true or false", path, value)
		}
		v.SetBool(b)
	case k.field.Type.Kind() == reflect.Slice && k.field.Type.Elem().Kind() == reflect.String:
		var items []string
		for _, s := range strings.Split(value, ",") {
			if s = strings.TrimSpace(s); s != "" {
				items = append(items, s)
			}
		}
		v.Set(reflect.ValueOf(items))
	default:
		return fmt.Errorf("key %s: unsupported type %s", path, k.field.Type)
	}
	return nil
}

// checkTags enforces the enum and min tags of every key.
func checkTags(cfg *Config) error {
	root := reflect.ValueOf(cfg).Elem()
	var errs []error
	for _, k := range keys() {
		v := root.FieldByIndex(k.index)
		if e, ok := k.field.Tag.Lookup("enum"); ok {
			allowed := strings.Split(e, ",")
			if !contains(allowed, v.String()) {
				var shown []string
				for _, a := range allowed {
					if a != "" {
						shown = append(shown, a)
					}
				}
				errs = append(errs, fmt.Errorf("key %s: %q is not one of: %s", k.path, v.String(), strings.Join(shown, ", ")))
			}
		}
		if m, ok := k.field.Tag.Lookup("min"); ok {
			switch {
			case k.field.Type == reflect.TypeOf(time.Duration(0)):
				min, _ := time.ParseDuration(m)
				if time.Duration(v.Int()) < min {
					errs = append(errs, fmt.Errorf("key %s: %s is below the minimum %s", k.path, time.Duration(v.Int()), min))
				}
			case k.field.Type.Kind() == reflect.Int:
				min, _ := strconv.Atoi(m)
				if v.Int() < int64(min) {
					errs = append(errs, fmt.Errorf("key %s: %d is below the minimum %d", k.path, v.Int(), min))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// Reloadable reports whether RELOAD (and SIGHUP) apply a new value of the
// key path without a restart: the fields tagged reload:"true".
func Reloadable(path string) bool {
	for _, k := range keys() {
		if k.path == path {
			return k.field.Tag.Get("reload") == "true"
		}
	}
	return false
}
