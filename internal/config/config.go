// Package config reads the daemon's YAML configuration. Every error names
// the line of the offending value, and a file that cannot be applied is
// refused as a whole.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"time"

	"go.uber.org/zap/zapcore"
	"gopkg.in/yaml.v3"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/dataplane"
)

// Field is a configuration value with the line it was read from (0 when
// it was not in the file).
type Field[T any] struct {
	Value T
	Line  int
}

// UnmarshalYAML implements yaml.Unmarshaler.
func (f *Field[T]) UnmarshalYAML(n *yaml.Node) error {
	f.Line = n.Line
	if err := n.Decode(&f.Value); err != nil {
		// yaml.v3 names the line itself ("line 3: cannot unmarshal"):
		// say it once.
		msg := linePrefix.ReplaceAllString(unwrapYAML(err).Error(), "")
		return fmt.Errorf("line %d: %s", n.Line, msg)
	}
	return nil
}

// Duration is a time.Duration written as "2s", "500ms".
type Duration time.Duration

// UnmarshalYAML implements yaml.Unmarshaler.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	var s string
	if err := n.Decode(&s); err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration (write it as 2s or 500ms)", s)
	}
	*d = Duration(v)
	return nil
}

// Config is the daemon's configuration.
//
//	cgroups:            # cgroup v2 paths or globs, absolute or relative to the cgroup2 mount
//	  - kubepods.slice/kubepods-*.slice/*
//	  - system.slice/redis.service
//	tcDevices: [lo]     # interfaces whose egress TC also accounts (default none); [NETNS:]DEV
//	accountOnly: false  # count, do not accelerate
//	allConnections: false  # true: pair connections to short-lived listeners too
//	noProbation: false  # true: pair a new listener's first connections too (servers that never splice nor block)
//	stackPorts: [8081]  # server ports that stay plain TCP (splice readers), and all connections of processes listening on them
//	metricsAddr: 127.0.0.1:9464   # "" disables the metrics endpoint
//	logLevel: info      # debug, info, warn, error
//	rescanInterval: 2s  # how often globs are expanded again
//	sockhashSize: 65536 # sockhash capacity when it is first created
//	extraNetns: [/run/netns/*]  # namespaces whose addresses also count as pod addresses
//	mesh:               # sidecar mode for every configured cgroup (pods with a sidecar)
//	  name: istio       # istio, linkerd or kuma presets
//	  intercept: false  # true: no iptables, sockbypass intercepts connect()
//	  sidecarUID: 1337  # overrides of the preset
//	  outboundPort: 15001
//	  inboundPort: 15006
//	  excludePorts: [15090]
//	  excludeCIDRs: [169.254.0.0/16]
//	requireMatch: false # true: not Ready while the cgroups match nothing
//	kubernetes:         # select this node's pods from the API server (internal/k8s)
//	  namespaceSelectors: [sockbypass.io/accelerate=enabled]  # label selectors, any one
//	  allPods: false    # true: every pod not opted out (kube-system never)
//	  excludeNamespaces: [kube-system, kube-node-lease, kube-public]
//	  kubepods: []      # kubelet pod cgroup roots (default: found below the mount)
//	  nodeName: ""      # default: $NODE_NAME
type Config struct {
	Cgroups        []Field[string]   `yaml:"cgroups"`
	TCDevices      *[]Field[string]  `yaml:"tcDevices"`
	AccountOnly    Field[bool]       `yaml:"accountOnly"`
	AllConnections Field[bool]       `yaml:"allConnections"`
	NoProbation    Field[bool]       `yaml:"noProbation"`
	StackPorts     []Field[uint16]   `yaml:"stackPorts"`
	MetricsAddr    *Field[string]    `yaml:"metricsAddr"`
	LogLevel       Field[string]     `yaml:"logLevel"`
	RescanInterval Field[Duration]   `yaml:"rescanInterval"`
	SockhashSize   Field[uint32]     `yaml:"sockhashSize"`
	ExtraNetns     []Field[string]   `yaml:"extraNetns"`
	Mesh           *MeshConfig       `yaml:"mesh"`
	RequireMatch   Field[bool]       `yaml:"requireMatch"`
	Kubernetes     *KubernetesConfig `yaml:"kubernetes"`

	// Derived by Parse.
	mesh    *dataplane.MeshOptions
	devices []dataplane.TCDevice
	level   zapcore.Level
}

// KubernetesConfig is the kubernetes section: pods are selected from the
// API server by their namespace's labels and their annotations. Its mere
// presence turns it on.
type KubernetesConfig struct {
	NamespaceSelectors []Field[string]  `yaml:"namespaceSelectors"`
	AllPods            Field[bool]      `yaml:"allPods"`
	ExcludeNamespaces  *[]Field[string] `yaml:"excludeNamespaces"`
	Kubepods           []Field[string]  `yaml:"kubepods"`
	NodeName           Field[string]    `yaml:"nodeName"`
	Kubeconfig         Field[string]    `yaml:"kubeconfig"`

	selectors []labels.Selector
}

// Selectors returns the parsed namespaceSelectors (nil: the default).
func (k *KubernetesConfig) Selectors() []labels.Selector { return k.selectors }

// MeshName returns the mesh the mesh section is for ("" without one).
func (c *Config) MeshName() string {
	if c.Mesh == nil {
		return ""
	}
	return c.Mesh.Name.Value
}

// MeshConfig is the sidecar-mode section.
type MeshConfig struct {
	Name         Field[string]   `yaml:"name"`
	Intercept    Field[bool]     `yaml:"intercept"`
	SidecarUID   *Field[uint32]  `yaml:"sidecarUID"`
	OutboundPort Field[uint16]   `yaml:"outboundPort"`
	InboundPort  Field[uint16]   `yaml:"inboundPort"`
	ExcludePorts []Field[uint16] `yaml:"excludePorts"`
	ExcludeCIDRs []Field[string] `yaml:"excludeCIDRs"`
}

// Defaults.
const (
	DefaultMetricsAddr    = "127.0.0.1:9464"
	DefaultRescanInterval = 2 * time.Second
)

// Load reads and parses the file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	cfg, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// Parse parses and validates a configuration. Unknown keys, values of the
// wrong type, bad globs, cgroups that do not exist (for paths without glob
// characters), bad devices and addresses are refused with the line.
func Parse(data []byte) (*Config, error) {
	var cfg Config
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		return nil, unwrapYAML(err)
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &cfg, nil
}

// unwrapYAML turns yaml.v3's multi-line errors into one line, and its
// "field X not found in type config.Config" into the key and the keys that
// are valid there.
func unwrapYAML(err error) error {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	msg = strings.TrimPrefix(msg, "unmarshal errors:\n")
	msg = unknownField.ReplaceAllStringFunc(msg, func(m string) string {
		sub := unknownField.FindStringSubmatch(m)
		section, keys := "", yamlKeys(reflect.TypeOf(Config{}))
		if sub[2] == "MeshConfig" {
			section, keys = "mesh.", yamlKeys(reflect.TypeOf(MeshConfig{}))
		}
		where := ""
		if section != "" {
			where = " in " + strings.TrimSuffix(section, ".")
		}
		return fmt.Sprintf("unknown key %s%s (valid keys%s: %s)", section, sub[1], where, strings.Join(keys, ", "))
	})
	msg = strings.Join(strings.Fields(strings.ReplaceAll(msg, "\n", "; ")), " ")
	return errors.New(msg)
}

// linePrefix matches the line yaml.v3 puts before its messages.
var linePrefix = regexp.MustCompile(`^line \d+: `)

// unknownField matches yaml.v3's error for a key that no field takes.
var unknownField = regexp.MustCompile(`field (\S+) not found in type config\.(\w+)`)

// yamlKeys lists the YAML keys of a configuration struct, in file order.
func yamlKeys(t reflect.Type) []string {
	var keys []string
	for i := 0; i < t.NumField(); i++ {
		if k, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ","); k != "" && k != "-" {
			keys = append(keys, k)
		}
	}
	return keys
}

func (c *Config) validate() error {
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return err
	}
	for _, p := range c.Cgroups {
		if err := validatePattern(mounts, p); err != nil {
			return err
		}
	}
	for _, p := range c.StackPorts {
		if p.Value == 0 {
			return fmt.Errorf("line %d: stackPorts: 0 is not a port", p.Line)
		}
	}
	if len(c.StackPorts) > 16 {
		return fmt.Errorf("line %d: stackPorts: %d ports given, at most 16", c.StackPorts[16].Line, len(c.StackPorts))
	}
	if c.TCDevices != nil {
		for _, d := range *c.TCDevices {
			dev, err := dataplane.ParseTCDevice(d.Value)
			if err == nil {
				// Refused at load and reload, not found at every rescan.
				err = dataplane.CheckTCDevice(dev)
			}
			if err != nil {
				return fmt.Errorf("line %d: tcDevices: %w", d.Line, err)
			}
			c.devices = append(c.devices, dev)
		}
	}
	if c.MetricsAddr != nil && c.MetricsAddr.Value != "" {
		if _, _, err := net.SplitHostPort(c.MetricsAddr.Value); err != nil {
			return fmt.Errorf("line %d: metricsAddr %q: %v (write HOST:PORT, e.g. 127.0.0.1:9464)", c.MetricsAddr.Line, c.MetricsAddr.Value, err)
		}
	}
	c.level = zapcore.InfoLevel
	if c.LogLevel.Value != "" {
		if c.level, err = zapcore.ParseLevel(c.LogLevel.Value); err != nil {
			return fmt.Errorf("line %d: logLevel %q: use debug, info, warn or error", c.LogLevel.Line, c.LogLevel.Value)
		}
	}
	if v := time.Duration(c.RescanInterval.Value); c.RescanInterval.Line != 0 && (v < 100*time.Millisecond || v > time.Hour) {
		return fmt.Errorf("line %d: rescanInterval %v: use a value between 100ms and 1h", c.RescanInterval.Line, v)
	}
	for _, p := range c.ExtraNetns {
		if !filepath.IsAbs(p.Value) {
			return fmt.Errorf("line %d: extraNetns: %q must be an absolute path or glob, such as /run/netns/*", p.Line, p.Value)
		}
		if _, err := filepath.Match(p.Value, ""); err != nil {
			return fmt.Errorf("line %d: extraNetns: bad glob %q: %v", p.Line, p.Value, err)
		}
	}
	if m := c.Mesh; m != nil {
		settings := dataplane.MeshSettings{Name: m.Name.Value, Intercept: m.Intercept.Value,
			OutboundPort: m.OutboundPort.Value, InboundPort: m.InboundPort.Value}
		if m.SidecarUID != nil {
			settings.SidecarUID = &m.SidecarUID.Value
		}
		for _, p := range m.ExcludePorts {
			if p.Value == 0 {
				return fmt.Errorf("line %d: mesh.excludePorts: 0 is not a port", p.Line)
			}
			settings.ExcludePorts = append(settings.ExcludePorts, p.Value)
		}
		for _, cidr := range m.ExcludeCIDRs {
			pfx, err := dataplane.ParseCIDRs(cidr.Value)
			if err != nil || len(pfx) != 1 {
				return fmt.Errorf("line %d: mesh.excludeCIDRs: %q: write it as 10.0.0.0/8", cidr.Line, cidr.Value)
			}
			settings.ExcludeCIDRs = append(settings.ExcludeCIDRs, pfx[0])
		}
		opts, err := settings.Options()
		if err != nil {
			return fmt.Errorf("line %d: mesh: %w", m.Name.Line, err)
		}
		c.mesh = opts
	}
	if k := c.Kubernetes; k != nil {
		for _, sel := range k.NamespaceSelectors {
			parsed, err := labels.Parse(sel.Value)
			if err != nil || sel.Value == "" {
				return fmt.Errorf("line %d: kubernetes.namespaceSelectors: %q: %v (write it as sockbypass.io/accelerate=enabled)", sel.Line, sel.Value, err)
			}
			k.selectors = append(k.selectors, parsed)
		}
		for _, p := range k.Kubepods {
			if filepath.IsAbs(p.Value) || p.Value == "" || strings.HasPrefix(filepath.Clean(p.Value), "..") {
				return fmt.Errorf("line %d: kubernetes.kubepods: %q must be relative to the cgroup v2 mount, such as kubepods.slice", p.Line, p.Value)
			}
		}
	}
	if v := c.SockhashSize.Value; c.SockhashSize.Line != 0 && (v == 0 || v > 1<<20) {
		return fmt.Errorf("line %d: sockhashSize %d: use a value between 1 and %d", c.SockhashSize.Line, v, 1<<20)
	}
	return nil
}

func hasGlob(p string) bool { return strings.ContainsAny(p, `*?[\`) }

func absPattern(mounts cgroup.Mounts, p string) string {
	if filepath.IsAbs(p) {
		return filepath.Clean(p)
	}
	return filepath.Join(mounts.V2, p)
}

func validatePattern(mounts cgroup.Mounts, p Field[string]) error {
	if strings.TrimSpace(p.Value) == "" {
		return fmt.Errorf("line %d: cgroups: empty entry", p.Line)
	}
	if !hasGlob(p.Value) {
		if _, err := mounts.Resolve(p.Value); err != nil {
			return fmt.Errorf("line %d: cgroups: %w", p.Line, err)
		}
		return nil
	}
	abs := absPattern(mounts, p.Value)
	if _, err := filepath.Match(abs, ""); err != nil {
		return fmt.Errorf("line %d: cgroups: bad glob %q: %v", p.Line, p.Value, err)
	}
	if rel, err := filepath.Rel(mounts.V2, abs); err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return fmt.Errorf("line %d: cgroups: glob %q is not inside the cgroup v2 hierarchy at %s", p.Line, p.Value, mounts.V2)
	}
	return nil
}

// Expand expands the configured paths and globs into the cgroups that exist
// now, deduplicated by id. Globs that match nothing are fine.
func (c *Config) Expand(mounts cgroup.Mounts) ([]cgroup.Cgroup, error) {
	seen := map[uint64]bool{}
	var out []cgroup.Cgroup
	for _, p := range c.Cgroups {
		var paths []string
		if hasGlob(p.Value) {
			m, err := filepath.Glob(absPattern(mounts, p.Value))
			if err != nil {
				return nil, fmt.Errorf("line %d: cgroups: %w", p.Line, err)
			}
			paths = m
		} else {
			paths = []string{p.Value}
		}
		for _, path := range paths {
			cg, err := mounts.Resolve(path)
			if err != nil {
				if hasGlob(p.Value) {
					continue // a file or a directory that just went away
				}
				return nil, fmt.Errorf("line %d: cgroups: %w", p.Line, err)
			}
			if !seen[cg.ID] {
				seen[cg.ID] = true
				out = append(out, cg)
			}
		}
	}
	return out, nil
}

// TCDevicesOrDefault returns the devices TC accounts (none unless the file
// names some: the per-cgroup stack bytes are counted at the sockets).
func (c *Config) TCDevicesOrDefault() []dataplane.TCDevice { return c.devices }

// Metrics returns the metrics address ("" when disabled).
func (c *Config) Metrics() string {
	if c.MetricsAddr == nil {
		return DefaultMetricsAddr
	}
	return c.MetricsAddr.Value
}

// Level returns the log level.
func (c *Config) Level() zapcore.Level { return c.level }

// Rescan returns how often globs are expanded again.
func (c *Config) Rescan() time.Duration {
	if c.RescanInterval.Line == 0 {
		return DefaultRescanInterval
	}
	return time.Duration(c.RescanInterval.Value)
}

// ExtraNetnsPaths expands extraNetns into the namespace paths that exist
// now.
func (c *Config) ExtraNetnsPaths() []string {
	var out []string
	for _, p := range c.ExtraNetns {
		m, _ := filepath.Glob(p.Value)
		out = append(out, m...)
	}
	return out
}

// MeshOptions returns the sidecar mode of the configured cgroups (nil for
// none).
func (c *Config) MeshOptions() *dataplane.MeshOptions { return c.mesh }

// StackPortValues returns the stackPorts setting: server ports whose
// connections stay plain TCP.
func (c *Config) StackPortValues() []uint16 {
	var out []uint16
	for _, p := range c.StackPorts {
		out = append(out, p.Value)
	}
	return out
}
