package testutil

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"
)

// The API server these tests run against is a real kube-apiserver over a
// real etcd, both started here on loopback ports and stopped (by PID) when
// the test ends. kube-apiserver is built from the k8s.io/kubernetes module
// by e2e/kubeapiserver/build.sh (make kube-apiserver) and cached under
// /var/cache/sockbypass-k8s; etcd is Debian's etcd-server.

const kubeVersion = "v1.37.2"

func kubeAPIServerBinary() string {
	if p := os.Getenv("SOCKBYPASS_KUBE_APISERVER"); p != "" {
		return p
	}
	cache := os.Getenv("SOCKBYPASS_K8S_CACHE")
	if cache == "" {
		cache = "/var/cache/sockbypass-k8s"
	}
	return filepath.Join(cache, "kube-apiserver-"+kubeVersion)
}

// APIServer is a running etcd + kube-apiserver.
type APIServer struct {
	URL         string
	AdminToken  string
	DaemonToken string // the user "sockbypass-daemon", authorized by RBAC only
}

// Admin returns a client with every permission (system:masters).
func (a *APIServer) Admin(t testing.TB) kubernetes.Interface { return a.client(t, a.AdminToken) }

// Daemon returns a client as the daemon's user, which has only what RBAC
// grants it.
func (a *APIServer) Daemon(t testing.TB) kubernetes.Interface { return a.client(t, a.DaemonToken) }

func (a *APIServer) client(t testing.TB, token string) kubernetes.Interface {
	t.Helper()
	c, err := kubernetes.NewForConfig(&rest.Config{Host: a.URL, BearerToken: token, TLSClientConfig: rest.TLSClientConfig{Insecure: true}, QPS: 100, Burst: 200})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// requireBinaries skips (fails under CI=true) when etcd or the cached
// kube-apiserver is missing.
func requireBinaries(t testing.TB) (etcd, apiserver string) {
	t.Helper()
	etcd, err := exec.LookPath("etcd")
	if err != nil {
		// make deps installs etcd-server: in CI its absence is a failure.
		msg := "no etcd in PATH (Debian's etcd-server; make deps installs it)"
		if InCI() {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	apiserver = kubeAPIServerBinary()
	if _, err := os.Stat(apiserver); err != nil {
		// Building kube-apiserver takes too long for every CI run: the
		// test runs where `make kube-apiserver` has cached it, and says
		// plainly when it does not, in CI too.
		t.Skip("SKIPPED: no kube-apiserver at " + apiserver + ": run `make kube-apiserver` once (builds kube-apiserver " + kubeVersion + " from the k8s.io/kubernetes module into the cache)")
	}
	return etcd, apiserver
}

// startProcess starts a server and stops it by its PID (SIGTERM, then
// SIGKILL) when the test ends, even on failure.
func startProcess(t testing.TB, logPath string, name string, args ...string) *exec.Cmd {
	t.Helper()
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); logFile.Close(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	return cmd
}

func logTail(path string) string {
	data, _ := os.ReadFile(path)
	if len(data) > 4000 {
		data = data[len(data)-4000:]
	}
	return string(data)
}

// StartAPIServer starts etcd and kube-apiserver for t. Authorization is
// RBAC: the admin token is in system:masters, the daemon's token has no
// group, so the daemon sees only what deploy/kubernetes grants it.
func StartAPIServer(t testing.TB) *APIServer {
	t.Helper()
	etcdBin, apiserverBin := requireBinaries(t)
	dir := t.TempDir()

	clientPort, peerPort := FreePort(t), FreePort(t)
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	etcdLog := filepath.Join(dir, "etcd.log")
	startProcess(t, etcdLog, etcdBin,
		"--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "default="+peerURL)

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	keyPath := filepath.Join(dir, "sa.key")
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	if err := os.WriteFile(keyPath, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	a := &APIServer{AdminToken: "admin-" + rand.Text(), DaemonToken: "daemon-" + rand.Text()}
	tokens := fmt.Sprintf("%s,admin,admin,system:masters\n%s,sockbypass-daemon,sockbypass-daemon\n", a.AdminToken, a.DaemonToken)
	tokenPath := filepath.Join(dir, "tokens.csv")
	if err := os.WriteFile(tokenPath, []byte(tokens), 0o600); err != nil {
		t.Fatal(err)
	}
	port := FreePort(t)
	a.URL = fmt.Sprintf("https://127.0.0.1:%d", port)
	apiLog := filepath.Join(dir, "kube-apiserver.log")
	startProcess(t, apiLog, apiserverBin,
		"--etcd-servers", etcdURL,
		"--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
		"--secure-port", fmt.Sprint(port), "--cert-dir", filepath.Join(dir, "certs"),
		"--token-auth-file", tokenPath,
		"--authorization-mode", "RBAC",
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-account-key-file", keyPath, "--service-account-signing-key-file", keyPath,
		"--service-cluster-ip-range", "10.96.0.0/24",
		// No controller manager creates the default service accounts.
		"--disable-admission-plugins", "ServiceAccount",
		"--endpoint-reconciler-type", "none",
		"--enable-priority-and-fairness=false",
	)

	// Ready when /readyz answers ok (it waits for etcd and the RBAC
	// bootstrap roles).
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	deadline := time.Now().Add(90 * time.Second)
	for {
		req, _ := http.NewRequest("GET", a.URL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+a.AdminToken)
		resp, err := hc.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("kube-apiserver not ready: %v\nkube-apiserver log:\n%s\netcd log:\n%s", err, logTail(apiLog), logTail(etcdLog))
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kube-apiserver log:\n%s", logTail(apiLog))
		}
	})
	return a
}

// Kubeconfig writes a kubeconfig file for the daemon's user and returns its
// path.
func (a *APIServer) Kubeconfig(t testing.TB) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kubeconfig")
	data := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
  - name: test
    cluster:
      server: %s
      insecure-skip-tls-verify: true
users:
  - name: daemon
    user:
      token: %s
contexts:
  - name: test
    context: {cluster: test, user: daemon}
current-context: test
`, a.URL, a.DaemonToken)
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// GrantDaemon applies the ClusterRole of the RBAC manifest at rbacPath
// (deploy/kubernetes/rbac.yaml) to the daemon's user, so a test runs with
// exactly what the manifests grant.
func (a *APIServer) GrantDaemon(t testing.TB, rbacPath string) {
	t.Helper()
	admin := a.Admin(t)
	data, err := os.ReadFile(rbacPath)
	if err != nil {
		t.Fatal(err)
	}
	var role *rbacv1.ClusterRole
	for _, doc := range strings.Split(string(data), "\n---\n") {
		var meta metav1.TypeMeta
		if yaml.Unmarshal([]byte(doc), &meta) != nil || meta.Kind != "ClusterRole" {
			continue
		}
		role = &rbacv1.ClusterRole{}
		if err := yaml.UnmarshalStrict([]byte(doc), role); err != nil {
			t.Fatal(err)
		}
	}
	if role == nil {
		t.Fatalf("%s has no ClusterRole", rbacPath)
	}
	ctx := context.Background()
	if _, err := admin.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "sockbypass-test"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: "User", APIGroup: "rbac.authorization.k8s.io", Name: "sockbypass-daemon"}},
	}
	if _, err := admin.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}
