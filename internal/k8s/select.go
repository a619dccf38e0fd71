// Package k8s selects the pods of a Kubernetes node for acceleration the
// way service-mesh users choose pods: by a namespace label or a pod
// annotation (opt in), with opt-out annotations and namespaces that are
// never touched (kube-system). It maps each selected pod to its pod-level
// cgroup from the pod's UID and QoS class, for both kubelet cgroup drivers
// and any cgroup root, and tells which pods really have a sidecar, so that
// sidecar (mesh) mode is applied to those only.
//
// The rules are pure functions of the pod and its namespace (this file,
// cgroups.go); source.go feeds them from a node-scoped pod informer.
package k8s

import (
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/sockbypass/sockbypass/internal/dataplane"
)

// The label and annotations users set.
const (
	// NamespaceLabel on a namespace: "enabled" accelerates its pods,
	// "disabled" none of them (whatever the pods' annotations say).
	NamespaceLabel = "sockbypass.io/accelerate"
	// PodAnnotation on a pod: "true" opts it in, "false" out.
	PodAnnotation = "sockbypass.io/accelerate"
	// SidecarAnnotation on a pod names its sidecar ("istio", "linkerd",
	// "kuma") when its container is not recognised by name, or "none" to
	// keep a pod out of sidecar mode.
	SidecarAnnotation = "sockbypass.io/sidecar"
)

// SidecarContainers maps the container names of mesh sidecars to their
// mesh. A sidecar is a container, or an init container with restartPolicy
// Always (a native sidecar); istio-init and linkerd-init are not.
var SidecarContainers = map[string]string{
	"istio-proxy":   "istio",
	"linkerd-proxy": "linkerd",
	"kuma-sidecar":  "kuma",
}

// Rules decide which pods are selected.
type Rules struct {
	// NamespaceSelectors select namespaces whose pods are accelerated
	// (any one matching is enough); by default NamespaceLabel=enabled.
	// Mesh users may add "istio-injection=enabled" or
	// "istio.io/dataplane-mode=ambient".
	NamespaceSelectors []labels.Selector
	// AllPods selects the pods of every namespace that is neither
	// excluded nor labelled disabled (opt out instead of opt in).
	AllPods bool
	// ExcludeNamespaces are never touched, whatever their labels and
	// their pods' annotations say.
	ExcludeNamespaces []string
}

// DefaultExcludeNamespaces are the namespaces of the control plane.
var DefaultExcludeNamespaces = []string{"kube-system", "kube-node-lease", "kube-public"}

// DefaultRules: opt in by NamespaceLabel=enabled or PodAnnotation=true,
// never kube-system.
func DefaultRules() Rules {
	return Rules{
		NamespaceSelectors: []labels.Selector{labels.SelectorFromSet(labels.Set{NamespaceLabel: "enabled"})},
		ExcludeNamespaces:  slices.Clone(DefaultExcludeNamespaces),
	}
}

// Decision is what the rules say about a pod.
type Decision struct {
	Selected bool
	// Reason says why, for logs and tests.
	Reason string
}

// Decide applies the rules to pod, in its namespace ns (nil when the
// namespace is not known yet: only the pod's annotation can select it).
// In order: a finished pod, an excluded namespace, the pod's opt-out
// annotation, the namespace's disabled label, the pod's opt-in
// annotation, a host-network pod (the node's own namespace: only its
// annotation opts it in), the namespace selectors, AllPods.
func (r Rules) Decide(pod *corev1.Pod, ns *corev1.Namespace) Decision {
	switch pod.Status.Phase {
	case corev1.PodSucceeded, corev1.PodFailed:
		return Decision{false, "pod finished"}
	}
	if slices.Contains(r.ExcludeNamespaces, pod.Namespace) {
		return Decision{false, fmt.Sprintf("namespace %s is excluded", pod.Namespace)}
	}
	ann := pod.Annotations[PodAnnotation]
	if ann == "false" {
		return Decision{false, "pod annotation " + PodAnnotation + "=false"}
	}
	if ns != nil && ns.Labels[NamespaceLabel] == "disabled" {
		return Decision{false, "namespace label " + NamespaceLabel + "=disabled"}
	}
	if ann == "true" {
		return Decision{true, "pod annotation " + PodAnnotation + "=true"}
	}
	if pod.Spec.HostNetwork {
		return Decision{false, "host network pod without " + PodAnnotation + "=true"}
	}
	if ns != nil {
		for _, sel := range r.NamespaceSelectors {
			if sel.Matches(labels.Set(ns.Labels)) {
				return Decision{true, "namespace label " + sel.String()}
			}
		}
	}
	if r.AllPods && ns != nil {
		return Decision{true, "all pods"}
	}
	return Decision{false, "not opted in"}
}

// Sidecar returns the mesh of the pod's sidecar ("istio", "linkerd",
// "kuma"), or "" when it has none: SidecarAnnotation when set ("none":
// no sidecar), else a container, or an init container with restartPolicy
// Always, named as in SidecarContainers.
func Sidecar(pod *corev1.Pod) string {
	if v, ok := pod.Annotations[SidecarAnnotation]; ok {
		if v == "none" {
			return ""
		}
		return v
	}
	for _, c := range pod.Spec.Containers {
		if m, ok := SidecarContainers[c.Name]; ok {
			return m
		}
	}
	for _, c := range pod.Spec.InitContainers {
		if c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			if m, ok := SidecarContainers[c.Name]; ok {
				return m
			}
		}
	}
	return ""
}

// MeshFor returns the sidecar mode of a pod whose sidecar is of mesh
// (from Sidecar): nil for a pod without one, whatever the configuration
// says, so no app without a sidecar has its connects sent to a sidecar
// port; configured (the configuration's mesh section) when it is for the
// same mesh; else that mesh's preset in redirect mode (never intercept
// unless configured).
func MeshFor(mesh string, configuredName string, configured *dataplane.MeshOptions) (*dataplane.MeshOptions, error) {
	if mesh == "" {
		return nil, nil
	}
	if configured != nil && configuredName == mesh {
		return configured, nil
	}
	return dataplane.MeshSettings{Name: mesh}.Options()
}
