package kubernetes

import (
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"

	"github.com/sockbypass/sockbypass/internal/config"
)

// The checks that the plain manifests and the Helm chart (helm_test.go)
// must both pass.

// checkRBAC: the daemon may read pods and namespaces and write Events,
// nothing more, and the binding names its service account.
func checkRBAC(t *testing.T, role rbacv1.ClusterRole, binding rbacv1.ClusterRoleBinding, sa corev1.ServiceAccount) {
	t.Helper()
	can := func(resource, verb string) bool {
		for _, r := range role.Rules {
			if slices.Contains(r.APIGroups, "") && slices.Contains(r.Resources, resource) && slices.Contains(r.Verbs, verb) {
				return true
			}
		}
		return false
	}
	for _, res := range []string{"pods", "namespaces"} {
		for _, verb := range []string{"list", "watch"} {
			if !can(res, verb) {
				t.Errorf("ClusterRole %s cannot %s %s", role.Name, verb, res)
			}
		}
	}
	if !can("events", "create") {
		t.Errorf("ClusterRole %s cannot create events", role.Name)
	}
	for _, r := range role.Rules {
		for _, v := range r.Verbs {
			if v == "*" || v == "update" || v == "delete" || (v == "patch" && !slices.Equal(r.Resources, []string{"events"})) {
				t.Errorf("ClusterRole %s may %s %v: the daemon changes no object", role.Name, v, r.Resources)
			}
		}
	}
	if binding.RoleRef.Kind != "ClusterRole" || binding.RoleRef.Name != role.Name {
		t.Errorf("ClusterRoleBinding refers to %s %s, want ClusterRole %s", binding.RoleRef.Kind, binding.RoleRef.Name, role.Name)
	}
	if len(binding.Subjects) != 1 || binding.Subjects[0].Kind != "ServiceAccount" || binding.Subjects[0].Name != sa.Name || binding.Subjects[0].Namespace != sa.Namespace {
		t.Errorf("ClusterRoleBinding subjects %+v, want the ServiceAccount %s/%s", binding.Subjects, sa.Namespace, sa.Name)
	}
}

// checkNodeName: the pod informer needs the node's name.
func checkNodeName(t *testing.T, c corev1.Container) {
	t.Helper()
	for _, e := range c.Env {
		if e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName" {
			return
		}
	}
	t.Error("no NODE_NAME from the downward API's spec.nodeName")
}

// checkQuota: system-node-critical outside kube-system is admitted only
// with a ResourceQuota scoped to the class (GKE; cilium/cilium#13852).
func checkQuota(t *testing.T, q corev1.ResourceQuota, priorityClass, ns string) {
	t.Helper()
	if q.Namespace != ns {
		t.Errorf("ResourceQuota in %q, want %q", q.Namespace, ns)
	}
	ok := q.Spec.ScopeSelector != nil && slices.ContainsFunc(q.Spec.ScopeSelector.MatchExpressions, func(e corev1.ScopedResourceSelectorRequirement) bool {
		return e.ScopeName == corev1.ResourceQuotaScopePriorityClass && e.Operator == corev1.ScopeSelectorOpIn && slices.Contains(e.Values, priorityClass)
	})
	if !ok {
		t.Errorf("ResourceQuota %s is not scoped to priority class %s: %+v", q.Name, priorityClass, q.Spec.ScopeSelector)
	}
	if _, ok := q.Spec.Hard[corev1.ResourcePods]; !ok {
		t.Errorf("ResourceQuota %s sets no pods limit", q.Name)
	}
}

// checkImage: a release tag, never latest.
func checkImage(t *testing.T, c corev1.Container) {
	t.Helper()
	_, tag, ok := strings.Cut(c.Image[strings.LastIndex(c.Image, "/")+1:], ":")
	if !ok || tag == "" || tag == "latest" {
		t.Errorf("image %q: use the release's tag, not latest", c.Image)
	}
}

// checkSelection: pods are chosen from the API server, kube-system never,
// and no cgroup globs take every pod.
func checkSelection(t *testing.T, cfg *config.Config) {
	t.Helper()
	k := cfg.Kubernetes
	if k == nil {
		t.Fatal("no kubernetes section: pods would be chosen by cgroup globs")
	}
	if len(cfg.Cgroups) != 0 {
		t.Errorf("cgroups %v: globs take every pod of the node, kube-system included", cfg.Cgroups)
	}
	if k.AllPods.Value {
		t.Error("allPods: the default must be opt-in")
	}
	if k.ExcludeNamespaces == nil || !slices.ContainsFunc(*k.ExcludeNamespaces, func(f config.Field[string]) bool { return f.Value == "kube-system" }) {
		t.Error("excludeNamespaces must name kube-system")
	}
	if len(k.Selectors()) == 0 {
		t.Error("no namespaceSelectors")
	}
	if cfg.MeshOptions() != nil && cfg.MeshOptions().Intercept {
		t.Error("intercept by default: only pods with a sidecar may be intercepted, and only when asked")
	}
	if cfg.AccountOnly.Value {
		t.Error("accountOnly: the deployment should accelerate")
	}
	if len(cfg.TCDevicesOrDefault()) != 0 {
		t.Error("tcDevices: a TC program would run for every packet of the node")
	}
}
