package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/k8s"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// TestDaemonSelectsPodsFromTheAPIServer runs `sockbypass daemon` with a
// kubernetes section against a real kube-apiserver (as the daemon's user,
// with deploy/kubernetes/rbac.yaml): an annotated pod's cgroup is enabled
// and /readyz is 200; a running pod whose cgroup is nowhere makes /readyz
// 503 naming it; deleting it makes the daemon Ready again and deleting the
// first pod disables its cgroup.
func TestDaemonSelectsPodsFromTheAPIServer(t *testing.T) {
	testutil.RequirePrivileged(t)
	api := testutil.StartAPIServer(t)
	api.GrantDaemon(t, "../../deploy/kubernetes/rbac.yaml")
	admin := api.Admin(t)
	ctx := context.Background()
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "apps"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	newPod := func(name string) *corev1.Pod {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: name, Annotations: map[string]string{k8s.PodAnnotation: "true"}},
			Spec: corev1.PodSpec{NodeName: "node-x", Containers: []corev1.Container{{Name: "app", Image: "example/app",
				Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m")}}}}},
		}
		created, err := admin.CoreV1().Pods("apps").Create(ctx, pod, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		created.Status.Phase = corev1.PodRunning
		if created, err = admin.CoreV1().Pods("apps").UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		return created
	}

	parent := testutil.NewCgroup(t)
	kubepods := path.Join(strings.TrimPrefix(parent.Rel, "/"), "kubepods")
	web := newPod("web")
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		t.Fatal(err)
	}
	rel := k8s.PodCgroup(kubepods, web.UID, corev1.PodQOSBurstable)
	cur := parent.Path
	for _, part := range strings.Split(strings.TrimPrefix(rel, strings.TrimPrefix(parent.Rel, "/")+"/"), "/") {
		cur = filepath.Join(cur, part)
		if err := os.Mkdir(cur, 0o755); err != nil {
			t.Fatal(err)
		}
		d := cur
		t.Cleanup(func() { os.Remove(d) }) // deepest first
	}
	webCg, err := mounts.Resolve(filepath.Join(mounts.V2, rel))
	if err != nil {
		t.Fatal(err)
	}

	pinDir := testutil.NewPinDir(t)
	addr := testutil.FreeAddr(t)
	cfgPath := filepath.Join(t.TempDir(), "config.yaml")
	writeConfig(t, cfgPath, fmt.Sprintf(`cgroups: []
metricsAddr: %s
rescanInterval: 200ms
kubernetes:
  kubepods: [%s]
  kubeconfig: %s
`, addr, kubepods, api.Kubeconfig(t)))
	t.Cleanup(func() { sockbypass(t, "uninstall", "--bpffs-dir", pinDir) })
	d := startDaemonEnv(t, pinDir, cfgPath, "NODE_NAME=node-x")
	waitEnabled(t, pinDir, d, webCg)
	readyz := "http://" + addr + "/readyz"
	waitHTTP(t, d, readyz, http.StatusOK, "ready")

	newPod("lost")
	waitHTTP(t, d, readyz, http.StatusServiceUnavailable, "apps/lost")
	if err := admin.CoreV1().Pods("apps").Delete(ctx, "lost", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	waitHTTP(t, d, readyz, http.StatusOK, "ready")

	if err := admin.CoreV1().Pods("apps").Delete(ctx, "web", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	waitEnabled(t, pinDir, d)
}
